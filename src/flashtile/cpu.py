"""Exact blockwise attention in plain PyTorch, for CPU tensors.

The same algorithm as the Triton kernels, expressed with batched matmuls over tiles: an
online softmax over K/V blocks in the forward, recomputation of P from the saved LSE in the
backward. Memory is linear in sequence length (one ``[B, H, block_q, block_k]`` score tile
at a time); arithmetic is float32 whatever the input dtype. Same semantics as the kernels
(docs/semantics.md): bottom-right causal/window masks, softcap, ALiBi, dropout with the same
Philox mask (``philox.py``), GQA; fully masked rows give ``out = 0`` and ``lse = +inf``.
Varlen batches run one sequence at a time.
"""

import math

import numpy as np
import torch

from flashtile import philox
from flashtile.features import Features

# Big enough that each matmul is efficient on a CPU, small enough that a score tile of
# 32 heads stays under 32 MiB.
BLOCK_Q = 256
BLOCK_K = 512


def _heads_first(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, S, H, D) slice -> float32 (B, Hk, G, S, D), so GQA broadcasts instead of copying K/V."""
    batch, seqlen, heads, head_dim = x.shape
    return x.float().permute(0, 2, 1, 3).reshape(batch, heads // group, group, seqlen, head_dim)


def _key_blocks(q_start, q_end, seqlen_q, seqlen_k, f: Features):
    """Start indices of the K/V blocks that some query in [q_start, q_end) can see."""
    diag = seqlen_k - seqlen_q
    begin, end = 0, seqlen_k
    if f.window_right >= 0:
        end = max(0, min(seqlen_k, q_end - 1 + diag + f.window_right + 1))
    if f.window_left >= 0:
        begin = max(0, q_start + diag - f.window_left) // BLOCK_K * BLOCK_K
    return range(begin, end, BLOCK_K)


class _Tile:
    """Scores of one (query block, key block) pair and what the backward needs from them."""

    def __init__(self, q_blk, k_blk, f, slopes, q_start, k_start, seqlen_q, seqlen_k, batch_offset):
        scores = torch.matmul(q_blk, k_blk.transpose(-1, -2)) * f.softmax_scale  # [B, Hk, G, bq, bk]
        self.capped = None
        if f.softcap > 0:
            self.capped = torch.tanh(scores / f.softcap)
            scores = f.softcap * self.capped
        rows = torch.arange(q_start, q_start + q_blk.shape[-2])[:, None]
        cols = torch.arange(k_start, k_start + k_blk.shape[-2])[None, :]
        offset = cols - (rows + seqlen_k - seqlen_q)  # how far right of the query's diagonal
        if slopes is not None:
            scores = scores - slopes * offset.abs().float()
        hidden = torch.zeros_like(offset, dtype=torch.bool)
        if f.window_right >= 0:
            hidden |= offset > f.window_right
        if f.window_left >= 0:
            hidden |= offset < -f.window_left
        self.scores = scores.masked_fill(hidden, float("-inf"))
        self.keep = None
        if f.dropout_p > 0:
            batch, n_kv, group = q_blk.shape[:3]
            keep = philox.keep_mask(f.seed, f.dropout_p, (np.arange(batch) + batch_offset)[:, None, None, None],
                                    np.arange(n_kv * group)[None, :, None, None], rows.numpy()[None, None],
                                    cols.numpy()[None, None])
            self.keep = keep.reshape(batch, n_kv, group, *keep.shape[-2:])

    def dropped(self, probs, dropout_p):
        """Probabilities after dropout: zeroed where dropped, kept ones scaled by the inverse keep rate."""
        if self.keep is None:
            return probs
        return torch.where(self.keep, probs / philox.keep_probability(dropout_p), 0.0)


def _slopes(f: Features, batch, n_kv_heads, group):
    """ALiBi slopes shaped [B, Hk, G, 1, 1] to broadcast over a score tile, or None."""
    if f.alibi_slopes is None:
        return None
    slopes = f.alibi_slopes.float().cpu().expand(batch, n_kv_heads * group)
    return slopes.reshape(batch, n_kv_heads, group, 1, 1)


def attention_forward(q, k, v, f: Features, batch_offset=0):
    """Returns ``(out, lse)``: out like q, lse float32 (B, Hq, Sq). ``batch_offset``: the batch
    index of ``q[0]`` in the dropout mask's numbering (varlen passes each sequence alone)."""
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    out = torch.zeros(q.shape, dtype=q.dtype)
    lse = torch.full((batch, n_heads, seqlen_q), math.inf, dtype=torch.float32)
    if out.numel() == 0 or seqlen_k == 0:
        return out, lse
    slopes = _slopes(f, batch, n_kv_heads, group)

    for q_start in range(0, seqlen_q, BLOCK_Q):
        q_end = min(q_start + BLOCK_Q, seqlen_q)
        q_blk = _heads_first(q[:, q_start:q_end], group)  # [B, Hk, G, bq, D]
        row_max = torch.full(q_blk.shape[:-1], -math.inf)  # [B, Hk, G, bq]
        row_sum = torch.zeros(q_blk.shape[:-1])
        acc = torch.zeros(q_blk.shape)
        for k_start in _key_blocks(q_start, q_end, seqlen_q, seqlen_k, f):
            k_end = min(k_start + BLOCK_K, seqlen_k)
            k_blk, v_blk = _heads_first(k[:, k_start:k_end], 1), _heads_first(v[:, k_start:k_end], 1)
            tile = _Tile(q_blk, k_blk, f, slopes, q_start, k_start, seqlen_q, seqlen_k, batch_offset)
            new_max = torch.maximum(row_max, tile.scores.amax(dim=-1))
            # Rows that have seen no visible key keep max = -inf; shift by 0 there (no NaN).
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            probs = torch.exp(tile.scores - shift[..., None])
            rescale = torch.exp(row_max - shift)
            row_sum = row_sum * rescale + probs.sum(dim=-1)
            acc = acc * rescale[..., None] + torch.matmul(tile.dropped(probs, f.dropout_p), v_blk)
            row_max = new_max
        has_keys = row_sum > 0
        out_blk = torch.where(has_keys[..., None], acc / row_sum.clamp_min(1e-30)[..., None], 0.0)
        lse_blk = torch.where(has_keys, row_max + torch.log(row_sum), math.inf)
        out[:, q_start:q_end] = out_blk.reshape(batch, n_heads, q_end - q_start, head_dim).transpose(1, 2).to(q.dtype)
        lse[:, :, q_start:q_end] = lse_blk.reshape(batch, n_heads, q_end - q_start)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, f: Features, batch_offset=0):
    """Returns ``(dq, dk, dv)`` shaped and typed like ``(q, k, v)``."""
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    dq = torch.zeros(q.shape, dtype=q.dtype)
    dk = torch.zeros((batch, n_kv_heads, seqlen_k, head_dim))  # float32, heads first
    dv = torch.zeros((batch, n_kv_heads, seqlen_k, head_dim))
    if dq.numel() > 0 and seqlen_k > 0:
        slopes = _slopes(f, batch, n_kv_heads, group)
        lse_heads = lse.reshape(batch, n_kv_heads, group, seqlen_q)
        for q_start in range(0, seqlen_q, BLOCK_Q):
            q_end = min(q_start + BLOCK_Q, seqlen_q)
            q_blk = _heads_first(q[:, q_start:q_end], group)  # [B, Hk, G, bq, D]
            do_blk = _heads_first(dout[:, q_start:q_end], group)
            o_blk = _heads_first(out[:, q_start:q_end], group)
            delta = (do_blk * o_blk).sum(dim=-1)  # [B, Hk, G, bq]
            lse_blk = lse_heads[..., q_start:q_end]
            dq_blk = torch.zeros(q_blk.shape)
            for k_start in _key_blocks(q_start, q_end, seqlen_q, seqlen_k, f):
                k_end = min(k_start + BLOCK_K, seqlen_k)
                k_blk, v_blk = _heads_first(k[:, k_start:k_end], 1), _heads_first(v[:, k_start:k_end], 1)
                tile = _Tile(q_blk, k_blk, f, slopes, q_start, k_start, seqlen_q, seqlen_k, batch_offset)
                probs = torch.exp(tile.scores - lse_blk[..., None])  # exactly 0 where masked or lse = +inf
                dv[:, :, k_start:k_end] += torch.matmul(tile.dropped(probs, f.dropout_p).transpose(-1, -2),
                                                        do_blk).sum(dim=2)
                dprobs = tile.dropped(torch.matmul(do_blk, v_blk.transpose(-1, -2)), f.dropout_p)
                dscores = probs * (dprobs - delta[..., None])
                if tile.capped is not None:
                    dscores = dscores * (1.0 - tile.capped * tile.capped)
                dq_blk += torch.matmul(dscores, k_blk)
                dk[:, :, k_start:k_end] += torch.matmul(dscores.transpose(-1, -2), q_blk).sum(dim=2)
            dq_blk = dq_blk * f.softmax_scale
            dq[:, q_start:q_end] = dq_blk.reshape(batch, n_heads, q_end - q_start, head_dim).transpose(1, 2).to(q.dtype)
    dk = (dk * f.softmax_scale).transpose(1, 2).to(k.dtype).contiguous()
    dv = dv.transpose(1, 2).to(v.dtype).contiguous()
    return dq, dk, dv


def _sequences(cu_seqlens_q, cu_seqlens_k):
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(b, bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]) for b in range(len(bounds_q) - 1)]


def _for_sequence(f: Features, b: int) -> Features:
    if f.alibi_slopes is not None and f.alibi_slopes.dim() == 2:
        return Features(**{**f.__dict__, "alibi_slopes": f.alibi_slopes[b]})
    return f


def varlen_forward(q, k, v, f: Features, cu_seqlens_q, cu_seqlens_k):
    """Packed (total, H, D) inputs: ``(out, lse)`` with lse float32 (H, total_q)."""
    out = torch.zeros(q.shape, dtype=q.dtype)
    lse = torch.full((q.shape[1], q.shape[0]), math.inf, dtype=torch.float32)
    for b, q_lo, q_hi, k_lo, k_hi in _sequences(cu_seqlens_q, cu_seqlens_k):
        seq_out, seq_lse = attention_forward(q[None, q_lo:q_hi], k[None, k_lo:k_hi], v[None, k_lo:k_hi],
                                             _for_sequence(f, b), batch_offset=b)
        out[q_lo:q_hi] = seq_out[0]
        lse[:, q_lo:q_hi] = seq_lse[0]
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, f: Features, cu_seqlens_q, cu_seqlens_k):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, q_lo, q_hi, k_lo, k_hi in _sequences(cu_seqlens_q, cu_seqlens_k):
        grads = attention_backward(dout[None, q_lo:q_hi], q[None, q_lo:q_hi], k[None, k_lo:k_hi], v[None, k_lo:k_hi],
                                   out[None, q_lo:q_hi], lse[None, :, q_lo:q_hi], _for_sequence(f, b), batch_offset=b)
        dq[q_lo:q_hi], dk[k_lo:k_hi], dv[k_lo:k_hi] = (g[0] for g in grads)
    return dq, dk, dv


def _cache_index(cache, page_size, b, positions):
    """Indices into a cache tensor's first two dims of ``positions`` of sequence ``b``: its row of
    a contiguous cache, or its pages of a paged one."""
    if cache.block_table is None:
        return (b if cache.batch_idx is None else int(cache.batch_idx[b])), positions
    return cache.block_table[b].long()[positions // page_size], positions % page_size


def _cache_rows(cache_tensor, cache, b, start, end):
    """Positions ``[start, end)`` of sequence ``b`` in a contiguous or paged cache tensor."""
    return cache_tensor[_cache_index(cache, cache_tensor.shape[1], b, torch.arange(start, end))]


def cache_append(x, cache_tensor, cache, base):
    """Write ``x`` (B, S, Hk, D) into the cache at positions ``base[b] + j`` (``base``: list of ints)."""
    for b in range(x.shape[0]):
        positions = torch.arange(base[b], base[b] + x.shape[1])
        cache_tensor[_cache_index(cache, cache_tensor.shape[1], b, positions)] = x[b]


def cache_forward(q, cache, f: Features, varlen_q=None):
    """Attention of q over a ``features.KVCache``, one sequence at a time: ``(out, lse)`` shaped as
    ``ops.decode.cache_attention`` returns them (q dense (B, Sq, Hq, D), or packed with
    ``varlen_q = (cu_seqlens_q, max_seqlen_q)``)."""
    out = torch.zeros(q.shape, dtype=q.dtype)
    if varlen_q is None:
        batch = q.shape[0]
        bounds = [(b, b + 1) for b in range(batch)]
        lse = torch.full((batch, q.shape[2], q.shape[1]), math.inf, dtype=torch.float32)
    else:
        cu = varlen_q[0].tolist()
        batch = len(cu) - 1
        bounds = list(zip(cu, cu[1:]))
        lse = torch.full((q.shape[1], q.shape[0]), math.inf, dtype=torch.float32)
    ends = [cache.seqlen] * batch if cache.seqlens is None else [n + cache.seqlen_new for n in cache.seqlens.tolist()]
    starts = [0] * batch if cache.leftpad is None else cache.leftpad.tolist()
    for b, (lo, hi) in enumerate(bounds):
        keys = _cache_rows(cache.k_cache, cache, b, starts[b], ends[b])[None]
        values = _cache_rows(cache.v_cache, cache, b, starts[b], ends[b])[None]
        queries = q[lo:hi] if varlen_q is None else q[None, lo:hi]
        seq_out, seq_lse = attention_forward(queries, keys, values, _for_sequence(f, b), batch_offset=b)
        if varlen_q is None:
            out[b], lse[b] = seq_out[0], seq_lse[0]
        else:
            out[lo:hi], lse[:, lo:hi] = seq_out[0], seq_lse[0]
    return out, lse
