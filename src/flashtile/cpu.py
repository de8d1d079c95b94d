"""Exact blockwise attention in plain PyTorch, for CPU tensors.

The same algorithm as the Triton kernels, expressed with batched matmuls over tiles: an
online softmax over K/V blocks in the forward, recomputation of P from the saved LSE in the
backward. Memory is linear in sequence length (one ``[B, H, block_q, block_k]`` score tile
at a time); arithmetic is float32 whatever the input dtype. Same semantics as the kernels:
bottom-right causal mask, GQA, fully masked rows give ``out = 0`` and ``lse = +inf``.
"""

import math

import torch

# Big enough that each matmul is efficient on a CPU, small enough that a score tile of
# 32 heads stays under 32 MiB.
BLOCK_Q = 256
BLOCK_K = 512


def _heads_first(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, S, H, D) slice -> float32 (B, Hk, G, S, D), so GQA broadcasts instead of copying K/V."""
    batch, seqlen, heads, head_dim = x.shape
    return x.float().permute(0, 2, 1, 3).reshape(batch, heads // group, group, seqlen, head_dim)


def _key_blocks(q_start, q_end, seqlen_q, seqlen_k, causal):
    """Start indices of the K/V blocks that some query in [q_start, q_end) can see."""
    end = seqlen_k
    if causal:
        end = max(0, min(seqlen_k, q_end + seqlen_k - seqlen_q))
    return range(0, end, BLOCK_K)


def _kv_block(k, v, k_start):
    """float32 (B, Hk, 1, bk, D) K and V blocks starting at key ``k_start``."""
    k_end = min(k_start + BLOCK_K, k.shape[1])
    return k_end, _heads_first(k[:, k_start:k_end], 1), _heads_first(v[:, k_start:k_end], 1)


def _masked_scores(q_blk, k_blk, scale, q_start, k_start, seqlen_q, seqlen_k, causal):
    scores = torch.matmul(q_blk, k_blk.transpose(-1, -2)) * scale  # [B, Hk, G, bq, bk]
    if causal:
        rows = torch.arange(q_start, q_start + q_blk.shape[-2])[:, None]
        cols = torch.arange(k_start, k_start + k_blk.shape[-2])[None, :]
        scores = scores.masked_fill(cols > rows + (seqlen_k - seqlen_q), float("-inf"))
    return scores


def attention_forward(q, k, v, softmax_scale: float, causal: bool):
    """Returns ``(out, lse)``: out like q, lse float32 (B, Hq, Sq)."""
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    out = torch.zeros(q.shape, dtype=q.dtype)
    lse = torch.full((batch, n_heads, seqlen_q), math.inf, dtype=torch.float32)
    if out.numel() == 0 or seqlen_k == 0:
        return out, lse

    for q_start in range(0, seqlen_q, BLOCK_Q):
        q_end = min(q_start + BLOCK_Q, seqlen_q)
        q_blk = _heads_first(q[:, q_start:q_end], group)  # [B, Hk, G, bq, D]
        row_max = torch.full(q_blk.shape[:-1], -math.inf)  # [B, Hk, G, bq]
        row_sum = torch.zeros(q_blk.shape[:-1])
        acc = torch.zeros(q_blk.shape)
        for k_start in _key_blocks(q_start, q_end, seqlen_q, seqlen_k, causal):
            k_end, k_blk, v_blk = _kv_block(k, v, k_start)  # [B, Hk, 1, bk, D]
            scores = _masked_scores(q_blk, k_blk, softmax_scale, q_start, k_start, seqlen_q, seqlen_k, causal)
            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            # Rows that have seen no visible key keep max = -inf; shift by 0 there (no NaN).
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            probs = torch.exp(scores - shift[..., None])
            rescale = torch.exp(row_max - shift)
            row_sum = row_sum * rescale + probs.sum(dim=-1)
            acc = acc * rescale[..., None] + torch.matmul(probs, v_blk)
            row_max = new_max
        has_keys = row_sum > 0
        out_blk = torch.where(has_keys[..., None], acc / row_sum.clamp_min(1e-30)[..., None], 0.0)
        lse_blk = torch.where(has_keys, row_max + torch.log(row_sum), math.inf)
        out[:, q_start:q_end] = out_blk.reshape(batch, n_heads, q_end - q_start, head_dim).transpose(1, 2).to(q.dtype)
        lse[:, :, q_start:q_end] = lse_blk.reshape(batch, n_heads, q_end - q_start)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, softmax_scale: float, causal: bool):
    """Returns ``(dq, dk, dv)`` shaped and typed like ``(q, k, v)``."""
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    dq = torch.zeros(q.shape, dtype=q.dtype)
    dk = torch.zeros((batch, n_kv_heads, seqlen_k, head_dim))  # float32, heads first
    dv = torch.zeros((batch, n_kv_heads, seqlen_k, head_dim))
    if dq.numel() > 0 and seqlen_k > 0:
        lse_heads = lse.reshape(batch, n_kv_heads, group, seqlen_q)
        for q_start in range(0, seqlen_q, BLOCK_Q):
            q_end = min(q_start + BLOCK_Q, seqlen_q)
            q_blk = _heads_first(q[:, q_start:q_end], group)  # [B, Hk, G, bq, D]
            do_blk = _heads_first(dout[:, q_start:q_end], group)
            o_blk = _heads_first(out[:, q_start:q_end], group)
            delta = (do_blk * o_blk).sum(dim=-1)  # [B, Hk, G, bq]
            lse_blk = lse_heads[..., q_start:q_end]
            dq_blk = torch.zeros(q_blk.shape)
            for k_start in _key_blocks(q_start, q_end, seqlen_q, seqlen_k, causal):
                k_end, k_blk, v_blk = _kv_block(k, v, k_start)  # [B, Hk, 1, bk, D]
                scores = _masked_scores(q_blk, k_blk, softmax_scale, q_start, k_start, seqlen_q, seqlen_k, causal)
                probs = torch.exp(scores - lse_blk[..., None])  # exactly 0 where masked or lse = +inf
                dv[:, :, k_start:k_end] += torch.matmul(probs.transpose(-1, -2), do_blk).sum(dim=2)
                dprobs = torch.matmul(do_blk, v_blk.transpose(-1, -2))
                dscores = probs * (dprobs - delta[..., None])
                dq_blk += torch.matmul(dscores, k_blk)
                dk[:, :, k_start:k_end] += torch.matmul(dscores.transpose(-1, -2), q_blk).sum(dim=2)
            dq_blk = dq_blk * softmax_scale
            dq[:, q_start:q_end] = dq_blk.reshape(batch, n_heads, q_end - q_start, head_dim).transpose(1, 2).to(q.dtype)
    dk = (dk * softmax_scale).transpose(1, 2).to(k.dtype).contiguous()
    dv = dv.transpose(1, 2).to(v.dtype).contiguous()
    return dq, dk, dv
