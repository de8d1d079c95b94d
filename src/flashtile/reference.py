"""The oracle: plain PyTorch attention that materialises the score matrix.

Tests and users share it. ``attention_ref(..., upcast=True)`` computes in float64 (the
oracle); ``upcast=False`` computes in the inputs' own precision, which is what the tolerance
rule compares against: ``max|ours - oracle| <= 2 * max|lowp - oracle| + 1e-5``.
"""

import math

import torch


def causal_visible(seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """Bool (Sq, Sk): query i sees key j iff ``j <= i + Sk - Sq`` (bottom-right aligned)."""
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    return cols <= rows + (seqlen_k - seqlen_q)


def attention_ref(q, k, v, causal=False, softmax_scale=None, upcast=True, reorder_ops=False):
    """Reference attention on ``(B, S, H, D)`` tensors.

    Returns ``(out, lse)``: ``out`` in q's dtype (float64 when ``upcast``), ``lse`` float32 of
    shape ``(B, Hq, Sq)`` (float64 when ``upcast``). Fully masked rows give ``out = 0`` and
    ``lse = +inf``, the convention of flashtile and FlashAttention-2.

    ``reorder_ops`` scales K instead of Q, a different rounding order for the same function.
    GQA: query head ``h`` uses KV head ``h // (Hq // Hk)``.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    if reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", q, k * scale)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q * scale, k)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if causal:
        visible = causal_visible(seqlen_q, seqlen_k, q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    else:
        visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
    attn = torch.softmax(scores, dim=-1)
    # softmax of an all -inf row is NaN: such a row attends to nothing and outputs 0.
    has_keys = visible.any(dim=-1)  # (Sq,)
    attn = torch.where(has_keys[:, None], attn, torch.zeros((), dtype=attn.dtype, device=attn.device))
    out = torch.einsum("bhts,bshd->bthd", attn, v)
    lse = torch.where(has_keys, lse, torch.full((), math.inf, dtype=lse.dtype, device=lse.device))
    if not upcast:
        out = out.to(dtype)
        lse = lse.float()
    return out, lse
