"""The oracle for ``flash_attn_with_kvcache``: the append, the rotary embedding and the
attention spelled out one sequence at a time on a plain copy of the cache, then
``attention_ref`` (float64 when ``upcast``; the inputs' precision otherwise, rotary in float32
as FlashAttention-2 rounds it)."""

import torch

from flashtile.reference import attention_ref
from flashtile.rotary import apply_rotary


def sequence_rows(cache_tensor, b, batch_idx=None, block_table=None):
    """Every position sequence b can address, as a (capacity, Hk, D) copy."""
    if block_table is None:
        return cache_tensor[b if batch_idx is None else int(batch_idx[b])].clone()
    return cache_tensor[block_table[b].long()].flatten(0, 1).clone()


def kvcache_ref(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                cache_batch_idx=None, cache_leftpad=None, block_table=None, rotary_interleaved=True,
                causal=False, window_size=(-1, -1), upcast=True, reorder_ops=False, alibi_slopes=None, **features):
    """Returns ``(out, lse, keys, values)``: out (B, Sq, Hq, D), lse (B, Hq, Sq), and each
    sequence's cache contents after the append (lists of (capacity, Hk, D), in k_cache's dtype)."""
    batch, seqlen_q = q.shape[:2]
    compute = torch.float64 if upcast else torch.float32
    seqlen_new = 0 if k is None else k.shape[1]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32)
    left, right = window_size
    capacity = sequence_rows(k_cache, 0, cache_batch_idx, block_table).shape[0] if batch else 0
    local = causal or 0 <= left < capacity or 0 <= right < capacity
    outs, lses, keys, values = [], [], [], []
    for b in range(batch):
        k_seq = sequence_rows(k_cache, b, cache_batch_idx, block_table)
        v_seq = sequence_rows(v_cache, b, cache_batch_idx, block_table)
        begin = capacity if cache_seqlens is None else int(cache_seqlens[b])
        q_b = q[b:b + 1]
        if k is not None:
            k_new = k[b:b + 1]
            if rotary_cos is not None:
                positions = begin + torch.arange(seqlen_new)[None]
                k_new = apply_rotary(k_new, rotary_cos, rotary_sin, positions, rotary_interleaved, compute)
                q_positions = begin + torch.arange(seqlen_q)[None] * int(local)
                q_b = apply_rotary(q_b, rotary_cos, rotary_sin, q_positions, rotary_interleaved, compute)
            k_seq[begin:begin + seqlen_new] = k_new[0].to(k_seq.dtype)
            v_seq[begin:begin + seqlen_new] = v[b].to(v_seq.dtype)
        if upcast and rotary_cos is not None:
            # The float64 oracle attends the unrounded rotation of q and of the new keys.
            q_b = apply_rotary(q[b:b + 1].double(), rotary_cos, rotary_sin,
                               begin + torch.arange(seqlen_q)[None] * int(local), rotary_interleaved, torch.float64)
            k_attend = k_seq.double()
            k_attend[begin:begin + seqlen_new] = apply_rotary(
                k[b:b + 1].double(), rotary_cos, rotary_sin, begin + torch.arange(seqlen_new)[None],
                rotary_interleaved, torch.float64)[0]
        else:
            k_attend = k_seq
        end = begin + seqlen_new
        start = 0 if cache_leftpad is None else int(cache_leftpad[b])
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b:b + 1]
        out, lse = attention_ref(q_b, k_attend[None, start:end], v_seq[None, start:end], causal=causal,
                                 window_size=window_size, upcast=upcast, reorder_ops=reorder_ops,
                                 alibi_slopes=slopes, **features)
        outs.append(out)
        lses.append(lse)
        keys.append(k_seq)
        values.append(v_seq)
    if batch == 0:
        return q.new_zeros(q.shape), torch.zeros(0, q.shape[2], seqlen_q), keys, values
    return torch.cat(outs), torch.cat(lses), keys, values
