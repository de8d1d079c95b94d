"""The public API: FlashAttention-2's functions, arguments, defaults and return values.

Each function validates everything before any kernel runs (bad input raises ``TypeError`` or
``ValueError`` naming the argument; nothing is half-written), fills in defaults and calls the
custom op in ``autograd.py``.
"""

import math
import numbers

import torch

from flashtile.autograd import MAX_SEQ_STRIDE, attention, kernel_layout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

_CAUSAL_PICTURE = """
    Causal masks are aligned to the bottom-right corner of the score matrix: query ``i``
    sees key ``j`` iff ``j <= i + seqlen_k - seqlen_q``. For seqlen_q = 2, seqlen_k = 5
    (1 = attended)::

        1 1 1 1 0
        1 1 1 1 1

    and for seqlen_q = 5, seqlen_k = 2::

        0 0
        0 0
        0 0
        1 0
        1 1

    A row that sees no key (the first three above) outputs 0, its ``softmax_lse`` is
    ``+inf``, and its gradients are 0.
"""


def _check_tensor(name, t, rank, layout):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {layout}, got shape {tuple(t.shape)}")


def _check_qkv(q, k, v):
    layout = "(batch, seqlen, nheads, headdim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4, layout)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} has batch size {t.shape[0]} but q has {q.shape[0]}")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"{name} has head dim {t.shape[3]} but q has {q.shape[3]}; they must be equal")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v has seqlen {v.shape[1]} but k has {k.shape[1]}; k and v must have the same seqlen")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has {v.shape[2]} heads but k has {k.shape[2]}; k and v must have the same nheads")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q, k and v are on {q.device}; flashtile runs on CUDA GPUs and on the CPU")
    head_dim = q.shape[3]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {head_dim}; flashtile supports head dims 1 to {MAX_HEAD_DIM}")
    for name, t in (("q", q), ("k", k)):
        if t.shape[2] * head_dim >= MAX_SEQ_STRIDE:
            raise ValueError(f"{name} has nheads * headdim = {t.shape[2] * head_dim}; flashtile supports "
                             f"less than {MAX_SEQ_STRIDE}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"the number of heads in q ({q.shape[2]}) must be a multiple of the number in k and v "
            f"({k.shape[2]}) (GQA/MQA)"
        )


def _check_options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs):
    for name, flag in (("causal", causal), ("deterministic", deterministic), ("return_attn_probs", return_attn_probs)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if softmax_scale is not None:
        if not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale) or softmax_scale < 0:
            raise ValueError(f"softmax_scale must be a finite number >= 0, got {softmax_scale}")
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p != 0.0:
        raise NotImplementedError("dropout_p > 0 is not supported yet (planned); pass dropout_p=0.0")
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError("window_size other than (-1, -1) is not supported yet (planned)")
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if softcap != 0.0:
        raise NotImplementedError("softcap > 0 is not supported yet (planned); pass softcap=0.0")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not supported yet (planned); pass alibi_slopes=None")


def _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
               deterministic, return_attn_probs):
    _check_qkv(q, k, v)
    _check_options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    out, lse = attention(kernel_layout(q), kernel_layout(k), kernel_layout(v), float(softmax_scale), causal)
    if return_attn_probs:
        # S_dmask encodes the dropout pattern; like FlashAttention-2 it is None without dropout.
        return out, lse, None
    return out


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False,
):
    """Exact softmax attention, FlashAttention-style: ``softmax(scale * Q K^T) V``.

    Supports multi-query and grouped-query attention (MQA/GQA) by passing in K, V with fewer
    heads than Q. The number of heads in Q must be divisible by the number of heads in K/V:
    with 6 query heads and 2 KV heads, query heads 0, 1, 2 use KV head 0 and query heads
    3, 4, 5 use KV head 1.
    {causal}
    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim), float16, bfloat16 or float32.
        k: (batch_size, seqlen_k, nheads_k, headdim), same dtype and device as q.
        v: (batch_size, seqlen_k, nheads_k, headdim), same dtype and device as q.
            Any strides with ``stride(-1) == 1`` are read in place (views of a packed QKV
            tensor included); other layouts are copied once. headdim may be 1 to 256.
        dropout_p: float, must be 0.0 for now (dropout is planned).
        softmax_scale: float >= 0. The scaling of QK^T before the softmax.
            Default to 1 / sqrt(headdim).
        causal: bool. Whether to apply the bottom-right aligned causal mask.
        window_size: (left, right). Only (-1, -1), no window, for now.
        softcap: float. Only 0.0, no capping, for now.
        alibi_slopes: only None for now.
        deterministic: bool. Accepted for compatibility; flashtile's backward uses no atomics
            and is always bitwise reproducible.
        return_attn_probs: bool. Also return ``softmax_lse`` (and ``S_dmask``, None without
            dropout).
    Return:
        out: (batch_size, seqlen_q, nheads, headdim), q's dtype.
        softmax_lse [optional, if return_attn_probs=True]: (batch_size, nheads, seqlen_q),
            float32. The logsumexp of each row of ``scale * Q K^T`` (+inf for fully masked rows).
        S_dmask [optional, if return_attn_probs=True]: None (no dropout).
    """
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False,
):
    """``flash_attn_func`` on a packed ``qkv`` of shape (batch_size, seqlen, 3, nheads, headdim).

    Q, K and V are read in place from the packed tensor (no copy), and the gradient flows back
    into ``qkv``. All other arguments and the return value are as in ``flash_attn_func``.
    """
    _check_tensor("qkv", qkv, 5, "(batch, seqlen, 3, nheads, headdim)")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have size 3 in dim 2 (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(dim=2)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False,
):
    """``flash_attn_func`` with K and V packed: ``kv`` of shape (batch_size, seqlen_k, 2, nheads_k, headdim).

    q: (batch_size, seqlen_q, nheads, headdim). K and V are read in place from ``kv``; GQA/MQA
    works as in ``flash_attn_func``. All other arguments and the return value are as there.
    """
    _check_tensor("kv", kv, 5, "(batch, seqlen_k, 2, nheads_k, headdim)")
    if kv.shape[2] != 2:
        raise ValueError(f"kv must have size 2 in dim 2 (batch, seqlen_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    k, v = kv.unbind(dim=2)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs)


if flash_attn_func.__doc__:  # None under python -OO
    flash_attn_func.__doc__ = flash_attn_func.__doc__.format(causal=_CAUSAL_PICTURE)
