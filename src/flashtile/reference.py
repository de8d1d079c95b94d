"""The oracle: plain PyTorch attention that materialises the score matrix.

Tests and users share it. ``attention_ref(..., upcast=True)`` computes in float64 (the
oracle); ``upcast=False`` computes in the inputs' own precision, which is what the tolerance
rule compares against: ``max|ours - oracle| <= 2 * max|lowp - oracle| + 1e-5``.

Every rule of docs/semantics.md is spelled out here in the most direct form: scale, softcap,
ALiBi bias, the causal/window mask, softmax, dropout, GQA.
"""

import math

import torch

from flashtile import philox


def visible_mask(seqlen_q, seqlen_k, causal=False, window_size=(-1, -1), device=None) -> torch.Tensor:
    """Bool (Sq, Sk): which keys each query sees.

    With ``diag = Sk - Sq`` (bottom-right alignment), query ``i`` sees key ``j`` iff
    ``i + diag - left <= j <= i + diag + right``; a bound of -1 is absent and ``causal`` sets
    ``right = 0``.
    """
    left, right = window_size
    if causal:
        right = 0
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    offset = cols - (rows + seqlen_k - seqlen_q)  # how far right of the query's diagonal
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        visible &= offset <= right
    if left >= 0:
        visible &= offset >= -left
    return visible


def causal_visible(seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """Bool (Sq, Sk): query i sees key j iff ``j <= i + Sk - Sq`` (bottom-right aligned)."""
    return visible_mask(seqlen_q, seqlen_k, causal=True, device=device)


def alibi_bias(alibi_slopes, batch, seqlen_q, seqlen_k, dtype, device) -> torch.Tensor:
    """(B, H, Sq, Sk) bias ``-slope * |i + Sk - Sq - j|`` from slopes of shape (H,) or (B, H)."""
    slopes = alibi_slopes.to(dtype=dtype, device=device)
    if slopes.dim() == 1:
        slopes = slopes.expand(batch, -1)
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    distance = (rows + seqlen_k - seqlen_q - cols).abs().to(dtype)
    return -slopes[:, :, None, None] * distance


def attention_ref(q, k, v, causal=False, softmax_scale=None, upcast=True, reorder_ops=False,
                  window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_mask=None):
    """Reference attention on ``(B, S, H, D)`` tensors.

    Returns ``(out, lse)``: ``out`` in q's dtype (float64 when ``upcast``), ``lse`` float32 of
    shape ``(B, Hq, Sq)`` (float64 when ``upcast``). Fully masked rows give ``out = 0`` and
    ``lse = +inf``, the convention of flashtile and FlashAttention-2.

    ``dropout_mask``: bool (B, Hq, Sq, Sk), True where kept; kept probabilities are scaled by
    ``1 / keep_rate`` with the mask's exact keep rate ``philox.keep_probability(dropout_p)``. The LSE is that of the softmax before dropout.
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
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, batch, seqlen_q, seqlen_k, scores.dtype, q.device)
    visible = visible_mask(seqlen_q, seqlen_k, causal, window_size, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
    attn = torch.softmax(scores, dim=-1)
    # softmax of an all -inf row is NaN: such a row attends to nothing and outputs 0.
    has_keys = visible.any(dim=-1)  # (Sq,)
    attn = torch.where(has_keys[:, None], attn, torch.zeros((), dtype=attn.dtype, device=attn.device))
    if dropout_mask is not None:
        attn = attn.masked_fill(~dropout_mask, 0.0) / philox.keep_probability(dropout_p)
    out = torch.einsum("bhts,bshd->bthd", attn, v)
    lse = torch.where(has_keys, lse, torch.full((), math.inf, dtype=lse.dtype, device=lse.device))
    if not upcast:
        out = out.to(dtype)
        lse = lse.float()
    return out, lse


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_mask=None, **kwargs):
    """``attention_ref`` on packed ``(total, H, D)`` sequences, one sequence at a time.

    Returns ``(out, lse)`` with out ``(total_q, H, D)`` and lse ``(H, total_q)``.
    ``dropout_mask``: bool (B, H, max_seqlen_q, max_seqlen_k), sequence b in its top-left corner.
    """
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        q_lo, q_hi, k_lo, k_hi = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        mask = None if dropout_mask is None else dropout_mask[b:b + 1, :, :q_hi - q_lo, :k_hi - k_lo]
        out, lse = attention_ref(q[None, q_lo:q_hi], k[None, k_lo:k_hi], v[None, k_lo:k_hi],
                                 dropout_mask=mask, **_one_sequence(kwargs, b))
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


def _one_sequence(kwargs, b):
    slopes = kwargs.get("alibi_slopes")
    if slopes is not None and slopes.dim() == 2:
        return {**kwargs, "alibi_slopes": slopes[b:b + 1]}
    return kwargs
