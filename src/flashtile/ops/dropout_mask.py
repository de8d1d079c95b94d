"""The dropout keep mask as a tensor, from the same ``score.dropout_keep`` the attention
kernels use. Only for ``return_attn_probs=True`` with dropout (a debugging aid, quadratic in
memory like FlashAttention-2's ``S_dmask``) and for tests."""

import torch
import triton
import triton.language as tl

from flashtile import philox
from flashtile.ops.common import cdiv, device_guard
from flashtile.ops.launch import FastLaunch
from flashtile.ops.score import dropout_keep


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "batch_index", "seed", "dropout_threshold"])
def _keep_mask_kernel(MASK, seqlen_q, seqlen_k, batch_index, seed, dropout_threshold,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (cdiv(Sq, BLOCK_M), cdiv(Sk, BLOCK_N), n_heads). MASK: int8 (H, Sq, Sk), contiguous.
    pid_h = tl.program_id(2)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    keep = dropout_keep(seed, dropout_threshold, batch_index, pid_h, start_m, start_n, BLOCK_M, BLOCK_N)
    ptrs = MASK + (pid_h.to(tl.int64) * seqlen_q + offs_m[:, None]) * seqlen_k + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


_keep_mask_launch = FastLaunch(_keep_mask_kernel)


def keep_mask(seed, dropout_p, batch_index, n_heads, seqlen_q, seqlen_k, device, block=(16, 64)) -> torch.Tensor:
    """Bool (H, Sq, Sk): which probabilities batch entry ``batch_index`` keeps. ``block``: the
    tile (rows, keys), a choice that must not change the result (tests vary it)."""
    mask = torch.zeros((n_heads, seqlen_q, seqlen_k), dtype=torch.int8, device=device)
    if mask.numel() == 0:
        return mask.bool()
    block_m, block_n = block
    grid = (cdiv(seqlen_q, block_m), cdiv(seqlen_k, block_n), n_heads)
    with device_guard(mask):
        _keep_mask_launch[grid](mask, seqlen_q, seqlen_k, batch_index, seed, philox.threshold(dropout_p),
                                BLOCK_M=block_m, BLOCK_N=block_n)
    return mask.bool()
