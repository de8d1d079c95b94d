"""The public API: FlashAttention-2's functions, arguments, defaults and return values.

Each function validates everything before any kernel runs (bad input raises ``TypeError`` or
``ValueError`` naming the argument; nothing is half-written), fills in defaults and calls the
custom op in ``autograd.py``.
"""

import math
import numbers
import weakref

import torch

from flashtile import philox
from flashtile.attn_probs import dropout_attn_probs
from flashtile.autograd import MAX_SEQ_STRIDE, attention, kernel_layout, uses_triton
from flashtile.features import Features, normalized_window

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# id(cu_seqlens_q) -> (weakrefs to it and cu_seqlens_k, what was checked); entries leave with the tensor.
# (Not a WeakKeyDictionary: its lookups compare tensors with ==, which is elementwise.)
_VALIDATED_CU_SEQLENS = {}
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


def _check_qkv(q, k, v, varlen=False):
    """Shapes, dtypes and devices of q, k, v: (B, S, H, D), or (total, H, D) when ``varlen``."""
    rank, layout = (3, "(total_tokens, nheads, headdim)") if varlen else (4, "(batch, seqlen, nheads, headdim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, rank, layout)
    # Shapes, dtype and device read once: this runs on every call.
    q_shape, k_shape, v_shape, q_dtype, q_device = q.shape, k.shape, v.shape, q.dtype, q.device
    for name, t, shape in (("k", k, k_shape), ("v", v, v_shape)):
        if t.dtype != q_dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q_dtype}; q, k and v must share one dtype")
        if t.device != q_device:
            raise ValueError(f"{name} is on {t.device} but q is on {q_device}; all inputs must be on one device")
        if not varlen and shape[0] != q_shape[0]:
            raise ValueError(f"{name} has batch size {shape[0]} but q has {q_shape[0]}")
        if shape[-1] != q_shape[-1]:
            raise ValueError(f"{name} has head dim {shape[-1]} but q has {q_shape[-1]}; they must be equal")
    seq = "total_tokens" if varlen else "seqlen"
    if v_shape[-3] != k_shape[-3]:
        raise ValueError(f"v has {seq} {v_shape[-3]} but k has {k_shape[-3]}; k and v must have the same {seq}")
    if v_shape[-2] != k_shape[-2]:
        raise ValueError(f"v has {v_shape[-2]} heads but k has {k_shape[-2]}; k and v must have the same nheads")
    if q_device.type not in ("cpu", "cuda"):
        raise ValueError(f"q, k and v are on {q_device}; flashtile runs on CUDA GPUs and on the CPU")
    head_dim = q_shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {head_dim}; flashtile supports head dims 1 to {MAX_HEAD_DIM}")
    for name, shape in (("q", q_shape), ("k", k_shape)):
        if shape[-2] * head_dim >= MAX_SEQ_STRIDE:
            raise ValueError(f"{name} has nheads * headdim = {shape[-2] * head_dim}; flashtile supports "
                             f"less than {MAX_SEQ_STRIDE}")
    if k_shape[-2] == 0 or q_shape[-2] % k_shape[-2] != 0:
        raise ValueError(
            f"the number of heads in q ({q_shape[-2]}) must be a multiple of the number in k and v "
            f"({k_shape[-2]}) (GQA/MQA)"
        )


def _check_cu_seqlens(q, total_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """cu_seqlens: int32, 1-D, on q's device, equal lengths B + 1, starting at 0, non-decreasing,
    ending at the token count (``total_k`` None: any key count, for paged K/V); max_seqlen: int at
    least the longest sequence."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (as in FlashAttention-2), got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D with batch_size + 1 entries, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.shape[0]}; both must be batch_size + 1")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TypeError(f"{name} must be an int >= 0, got {value!r}")
    if torch.compiler.is_compiling():
        return  # the checks below read the tensors' values (a device sync and a graph break)
    # Reading the values costs a device-to-host copy, which stalls the launch queue. A model
    # passes the same cu_seqlens to every layer, so each pair is checked once per version
    # (in-place writes bump ``_version``; the weak keys die with the tensors).
    # Tensors made under torch.inference_mode have no version counter: checked on every call.
    cacheable = not (cu_seqlens_q.is_inference() or cu_seqlens_k.is_inference())
    if cacheable:
        key = (cu_seqlens_q._version, cu_seqlens_k._version, q.shape[0], total_k, max_seqlen_q, max_seqlen_k)
        ref_q, ref_k, checked = _VALIDATED_CU_SEQLENS.get(id(cu_seqlens_q), (None, None, None))
        if ref_q is not None and ref_q() is cu_seqlens_q and ref_k() is cu_seqlens_k and checked == key:
            return
    values = torch.cat([cu_seqlens_q, cu_seqlens_k]).tolist()  # one device-to-host copy
    half = len(values) // 2
    for name, bounds, total, max_name, max_len in (
        ("cu_seqlens_q", values[:half], q.shape[0], "max_seqlen_q", max_seqlen_q),
        ("cu_seqlens_k", values[half:], total_k, "max_seqlen_k", max_seqlen_k),
    ):
        if bounds[0] != 0:
            raise ValueError(f"{name} must start at 0, got {bounds[0]}")
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"{name} must be non-decreasing, got {bounds}")
        if total is not None and bounds[-1] != total:
            raise ValueError(f"{name} must end at the number of tokens ({total}), got {bounds[-1]}")
        if lengths and max(lengths) > max_len:
            raise ValueError(f"{max_name} is {max_len} but a sequence has {max(lengths)} tokens; it must be at "
                             f"least the longest sequence")
    if not cacheable:
        return
    identity = id(cu_seqlens_q)
    _VALIDATED_CU_SEQLENS[identity] = (weakref.ref(cu_seqlens_q, lambda _: _VALIDATED_CU_SEQLENS.pop(identity, None)),
                                       weakref.ref(cu_seqlens_k), key)


def _is_real(x) -> bool:
    """A real number but not a bool; the exact-type test first, since ABC isinstance is slow and
    this runs on every call."""
    return type(x) in (float, int) or (isinstance(x, numbers.Real) and not isinstance(x, bool))


def _check_options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs):
    for name, flag in (("causal", causal), ("deterministic", deterministic), ("return_attn_probs", return_attn_probs)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if softmax_scale is not None:
        if not _is_real(softmax_scale):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale) or softmax_scale < 0:
            raise ValueError(f"softmax_scale must be a finite number >= 0, got {softmax_scale}")
    if not _is_real(dropout_p):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size entries must be >= 0, or -1 for no bound, got {tuple(window_size)}")
    if not _is_real(softcap):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 = no capping), got {softcap}")


def _check_alibi(alibi_slopes, q, batch, n_heads):
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
    if tuple(alibi_slopes.shape) not in ((n_heads,), (batch, n_heads)):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({n_heads},) or (batch_size, nheads) = "
                         f"({batch}, {n_heads}), got {tuple(alibi_slopes.shape)}")


def _features(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, max_seqlen_q,
              max_seqlen_k):
    left, right = normalized_window(causal, window_size, max_seqlen_q, max_seqlen_k)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.contiguous()
    return Features(
        softmax_scale=float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale),
        window_left=left, window_right=right, softcap=float(softcap), alibi_slopes=alibi_slopes,
        dropout_p=float(dropout_p),
        seed=philox.new_seed() if dropout_p > 0 and not torch.compiler.is_compiling() else 0,
        deterministic=bool(deterministic),
    )


def _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
               deterministic, return_attn_probs, varlen=None):
    """Validate, then run. ``varlen``: None, or (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)."""
    _check_qkv(q, k, v, varlen=varlen is not None)
    _check_options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)
    if varlen is None:
        batch, max_seqlen_q, max_seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    else:
        _check_cu_seqlens(q, k.shape[0], *varlen)
        batch, max_seqlen_q, max_seqlen_k = varlen[0].shape[0] - 1, varlen[2], varlen[3]
    _check_alibi(alibi_slopes, q, batch, q.shape[-2])
    f = _features(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, max_seqlen_q,
                  max_seqlen_k)
    q, k, v = kernel_layout(q), kernel_layout(k), kernel_layout(v)
    out, lse = attention(q, k, v, f, varlen)
    if not return_attn_probs:
        return out
    # S_dmask encodes the dropout pattern; like FlashAttention-2 it is None without dropout.
    s_dmask = dropout_attn_probs(q, k, lse, f, varlen, uses_triton(q)) if dropout_p > 0 else None
    return out, lse, s_dmask


_ARGS_DOC = """
        dropout_p: float in [0, 1). Dropout probability on the attention probabilities (pass
            0.0 in evaluation), rounded to 8 bits as FlashAttention-2 does: each value is kept
            with probability 1 - min(round(256 * dropout_p), 255) / 256 and kept values are scaled by its
            inverse (docs/semantics.md). The mask comes
            from a counter-based RNG (Philox) seeded from torch's default generator: the same
            ``torch.manual_seed`` gives bitwise the same result, and the backward regenerates
            the forward's mask instead of storing it.
        softmax_scale: float >= 0. The scaling of QK^T before the softmax.
            Default to 1 / sqrt(headdim).
        causal: bool. Whether to apply the bottom-right aligned causal mask (see above).
        window_size: (left, right). If not (-1, -1), sliding-window local attention: query i
            attends keys j with ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q
            + right``; -1 leaves that side unbounded; ``causal`` sets right = 0. K/V tiles
            outside the window are never loaded.
        softcap: float >= 0. If > 0, scores are capped: ``S = softcap * tanh(S / softcap)``
            (after scaling, before ALiBi and masking); 0.0 disables it.
        alibi_slopes: float32 tensor of shape (nheads,) or (batch_size, nheads), or None. Adds
            ``-slope * |i + seqlen_k - seqlen_q - j|`` to the score of query i and key j.
        deterministic: bool. Whether the backward must be bitwise reproducible. On Hopper the
            fastest backward (head dims 64, 128 and 256, no window/ALiBi/dropout) sums dq
            by atomic adds, whose order varies from run to run; True takes the atomic-free
            kernels instead (slower there). Everywhere else the backward is reproducible either way.
        return_attn_probs: bool. Also return ``softmax_lse`` and ``S_dmask``. For testing only."""


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
            tensor included); other layouts are copied once. headdim may be 1 to 256.{args}
    Return:
        out: (batch_size, seqlen_q, nheads, headdim), q's dtype.
        softmax_lse [optional, if return_attn_probs=True]: (batch_size, nheads, seqlen_q),
            float32. The logsumexp of each row of the scores (after softcap and ALiBi, before
            dropout); +inf for rows that see no key.
        S_dmask [optional, if return_attn_probs=True]: (batch_size, nheads, seqlen_q, seqlen_k),
            q's dtype: the attention probabilities, negative where dropout dropped them (None
            when dropout_p == 0, as in FlashAttention-2).
    """
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs)


def _unpack(name, packed, count, layout):
    rank = layout.count(",") + 1
    _check_tensor(name, packed, rank, layout)
    if packed.shape[-3] != count:
        raise ValueError(f"{name} must have size {count} in dim {rank - 3} {layout}, got {tuple(packed.shape)}")
    return packed.unbind(dim=-3)


def flash_attn_qkvpacked_func(
    qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False,
):
    """``flash_attn_func`` on a packed ``qkv`` of shape (batch_size, seqlen, 3, nheads, headdim).

    Q, K and V are read in place from the packed tensor (no copy), and the gradient flows back
    into ``qkv``. All other arguments and the return value are as in ``flash_attn_func``.
    """
    q, k, v = _unpack("qkv", qkv, 3, "(batch, seqlen, 3, nheads, headdim)")
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
    k, v = _unpack("kv", kv, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs)


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None,
):
    """``flash_attn_func`` on a batch of sequences of different lengths, packed without padding.

    Sequence b holds tokens ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and
    ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and v. No work is spent on padding: programs
    beyond a sequence's end return at once. Causal and window masks are aligned per sequence
    (bottom-right of each sequence's own seqlen_q x seqlen_k score matrix).

    Arguments:
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim).
        cu_seqlens_q, cu_seqlens_k: int32 (batch_size + 1,), on q's device: 0, then the
            running sums of the sequence lengths (lengths of 0 are allowed).
        max_seqlen_q, max_seqlen_k: int, at least the longest query / key sequence.
        block_table: int32 (batch_size, max_num_blocks_per_seq) or None: paged K/V (paged
            prefill). k and v are then caches of shape (num_blocks, page_block_size, nheads_k,
            headdim) and key j of sequence b (j < cu_seqlens_k[b + 1] - cu_seqlens_k[b]) lives in
            page ``block_table[b, j // page_block_size]``, row ``j % page_block_size``. Forward only
            (no dropout, no gradient), as in FlashAttention-2.
        All other arguments as in ``flash_attn_func``; ``alibi_slopes`` of shape
        (batch_size, nheads) gives each sequence its own slopes.
    Return:
        out: (total_q, nheads, headdim).
        softmax_lse [optional]: (nheads, total_q) float32.
        S_dmask [optional]: (batch_size, nheads, max_seqlen_q, max_seqlen_k), sequence b in
            the top-left corner of entry b (None without dropout).
    """
    if block_table is not None:
        from flashtile.kvcache import paged_varlen_attention

        return paged_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                                      dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                      return_attn_probs)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs,
                      varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


def flash_attn_varlen_qkvpacked_func(
    qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
):
    """``flash_attn_varlen_func`` on a packed ``qkv`` of shape (total, 3, nheads, headdim), with one
    ``cu_seqlens`` / ``max_seqlen`` for queries and keys. Read in place; the gradient flows into qkv."""
    q, k, v = _unpack("qkv", qkv, 3, "(total, 3, nheads, headdim)")
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs, varlen=(cu_seqlens, cu_seqlens, max_seqlen, max_seqlen))


def flash_attn_varlen_kvpacked_func(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False,
):
    """``flash_attn_varlen_func`` with K and V packed: ``kv`` of shape (total_k, 2, nheads_k, headdim)."""
    k, v = _unpack("kv", kv, 2, "(total_k, 2, nheads_k, headdim)")
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs,
                      varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


if flash_attn_func.__doc__:  # None under python -OO
    flash_attn_func.__doc__ = flash_attn_func.__doc__.format(causal=_CAUSAL_PICTURE, args=_ARGS_DOC)
