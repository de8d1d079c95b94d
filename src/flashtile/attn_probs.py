"""``S_dmask`` for ``return_attn_probs=True`` with dropout, in FlashAttention-2's encoding:
the attention probabilities ``P`` (softmax before dropout), negated where dropout dropped them.
``S_dmask >= 0`` recovers the keep mask wherever ``P > 0``. Quadratic in memory: a debugging
and testing aid, as in FlashAttention-2."""

import torch

from flashtile import philox
from flashtile.features import Features
from flashtile.reference import alibi_bias, visible_mask


def _keep(f: Features, batch_index, n_heads, seqlen_q, seqlen_k, device, on_triton):
    if on_triton:
        from flashtile.ops.dropout_mask import keep_mask

        return keep_mask(f.seed, f.dropout_p, batch_index, n_heads, seqlen_q, seqlen_k, device)
    return philox.keep_mask_dense(f.seed, f.dropout_p, 1, n_heads, seqlen_q, seqlen_k, batch_index)[0]


def _one_sequence(q, k, lse, f: Features, batch_index, on_triton):
    """(H, Sq, Sk) float32 for one sequence: q (Sq, H, D), k (Sk, Hk, D), lse (H, Sq)."""
    seqlen_q, n_heads = q.shape[0], q.shape[1]
    seqlen_k = k.shape[0]
    k = k.float().repeat_interleave(n_heads // k.shape[1], dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), k) * f.softmax_scale
    if f.softcap > 0:
        scores = f.softcap * torch.tanh(scores / f.softcap)
    if f.alibi_slopes is not None:
        slopes = f.alibi_slopes if f.alibi_slopes.dim() == 1 else f.alibi_slopes[batch_index]
        scores = scores + alibi_bias(slopes, 1, seqlen_q, seqlen_k, torch.float32, q.device)[0]
    seen = visible_mask(seqlen_q, seqlen_k, window_size=(f.window_left, f.window_right), device=q.device)
    probs = torch.exp(scores.masked_fill(~seen, float("-inf")) - lse[:, :, None])  # 0 where lse = +inf
    keep = _keep(f, batch_index, n_heads, seqlen_q, seqlen_k, q.device, on_triton)
    return torch.where(keep.to(probs.device), probs, -probs)


def dropout_attn_probs(q, k, lse, f: Features, varlen, on_triton) -> torch.Tensor:
    """(B, H, Sq, Sk) in q's dtype; varlen: (B, H, max_seqlen_q, max_seqlen_k), sequence b in the
    top-left corner of entry b and zeros elsewhere."""
    with torch.no_grad():
        if varlen is None:
            result = q.new_zeros((q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
            for b in range(q.shape[0]):
                result[b] = _one_sequence(q[b], k[b], lse[b], f, b, on_triton).to(q.dtype)
            return result
        cu_q, cu_k, max_q, max_k = varlen
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
        batch = len(bounds_q) - 1
        result = torch.zeros((batch, q.shape[1], max_q, max_k), dtype=q.dtype, device=q.device)
        for b in range(batch):
            q_lo, q_hi, k_lo, k_hi = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
            result[b, :, :q_hi - q_lo, :k_hi - k_lo] = _one_sequence(
                q[q_lo:q_hi], k[k_lo:k_hi], lse[:, q_lo:q_hi], f, b, on_triton).to(q.dtype)
        return result
