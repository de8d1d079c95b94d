"""Rotary embedding and KV-cache append for ``flash_attn_with_kvcache``: one kernel, three uses.

``_rotary_store_kernel`` copies the rows of a ``(B, S, H, D)`` tensor, optionally rotated
(``flashtile/rotary.py`` is the definition: float32 arithmetic, one rounding), either into a
new contiguous tensor (q) or into the cache at positions ``seqlens[b] + j`` (the new k and
v), through the block table when the cache is paged. One program per token and block of heads.
"""

import torch
import triton
import triton.language as tl

from flashtile.ops.common import cdiv, device_guard, padded_head_dim
from flashtile.ops.launch import FastLaunch


@triton.jit(do_not_specialize=["seqlen", "base", "position_step", "rotary_half"])
def _rotary_store_kernel(
    X, DST, COS, SIN, SEQLENS, BATCH_IDX, BLOCK_TABLE,
    stride_xb, stride_xs, stride_xh,
    stride_db, stride_ds, stride_dh,
    stride_table_b, stride_cos, stride_sin,
    seqlen, n_heads, base, position_step, rotary_half,
    HAS_SEQLENS: tl.constexpr, TO_CACHE: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, PAGE_SIZE: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Token j of sequence b has cache position base_b + j, base_b = SEQLENS[b] (or ``base``);
    # its rotary angle is that of position base_b + j * position_step (step 0: every token at base_b).
    # PAGE_SIZE: 0 for a contiguous cache.
    pid_t = tl.program_id(0)
    pid_b = pid_t // seqlen
    j = pid_t % seqlen
    if HAS_SEQLENS:
        base = tl.load(SEQLENS + pid_b)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_d = tl.arange(0, BLOCK_D)
    mask = (heads < n_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src = X + pid_b.to(tl.int64) * stride_xb + j.to(tl.int64) * stride_xs + heads.to(tl.int64)[:, None] * stride_xh
    x = tl.load(src + offs_d[None, :], mask=mask, other=0.0)  # [BLOCK_H, BLOCK_D]
    if ROTARY:
        rotary_dim = 2 * rotary_half
        if INTERLEAVED:
            partner = offs_d ^ 1
            angle = offs_d // 2
            first = offs_d % 2 == 0
        else:
            first = offs_d < rotary_half
            partner = tl.where(first, offs_d + rotary_half, offs_d - rotary_half)
            angle = tl.where(first, offs_d, offs_d - rotary_half)
        rotated = offs_d < rotary_dim  # [BLOCK_D]
        position = (base + j * position_step).to(tl.int64)
        cos = tl.load(COS + position * stride_cos + angle, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(SIN + position * stride_sin + angle, mask=rotated, other=0.0).to(tl.float32)
        x_partner = tl.load(src + partner[None, :], mask=mask & rotated[None, :], other=0.0).to(tl.float32)
        signed_sin = tl.where(first, -sin, sin)
        x = (x.to(tl.float32) * cos[None, :] + x_partner * signed_sin[None, :]).to(X.dtype.element_ty)
    if TO_CACHE:
        position = base + j
        if PAGE_SIZE == 0:
            row = pid_b
            if HAS_BATCH_IDX:
                row = tl.load(BATCH_IDX + pid_b)
            dst = DST + row.to(tl.int64) * stride_db + position.to(tl.int64) * stride_ds
        else:
            page = tl.load(BLOCK_TABLE + pid_b.to(tl.int64) * stride_table_b + position // PAGE_SIZE)
            dst = DST + page.to(tl.int64) * stride_db + (position % PAGE_SIZE).to(tl.int64) * stride_ds
    else:
        dst = DST + pid_b.to(tl.int64) * stride_db + j.to(tl.int64) * stride_ds
    tl.store(dst + heads.to(tl.int64)[:, None] * stride_dh + offs_d[None, :], x, mask=mask)


_rotary_store_launch = FastLaunch(_rotary_store_kernel)


def rotary_store(x, dst, base, rotary=None, cache=None, position_step=1):
    """Write ``x`` (B, S, H, D), rotated where ``rotary = (cos, sin, interleaved)`` is given, into
    ``dst``: a new contiguous tensor shaped like x (``cache`` None), or the cache tensor ``dst`` of
    ``cache`` (a ``features.KVCache``: its batch index and block table) at positions ``base_b + j``.
    ``base``: int32 (B,) tensor or int. Rotary angles are those of position ``base_b + j * position_step``."""
    batch, seqlen, n_heads, head_dim = x.shape
    if x.numel() == 0:
        return dst
    paged = cache is not None and cache.block_table is not None
    cos, sin, interleaved = rotary if rotary is not None else (x, x, False)
    block_h = min(1 << (n_heads - 1).bit_length(), 16)
    base_tensor = isinstance(base, torch.Tensor)
    placeholder = x  # pointers the flags say are never read
    with device_guard(x):
        _rotary_store_launch[(batch * seqlen, cdiv(n_heads, block_h))](
            x, dst, cos, sin,
            base if base_tensor else placeholder,
            placeholder if cache is None or cache.batch_idx is None else cache.batch_idx,
            cache.block_table if paged else placeholder,
            *x.stride()[:3], *dst.stride()[:3],
            cache.block_table.stride(0) if paged else 0, cos.stride(0), sin.stride(0),
            seqlen, n_heads, 0 if base_tensor else base, position_step, cos.shape[-1] if rotary is not None else 0,
            HAS_SEQLENS=base_tensor, TO_CACHE=cache is not None,
            HAS_BATCH_IDX=cache is not None and cache.batch_idx is not None,
            PAGE_SIZE=dst.shape[1] if paged else 0, ROTARY=rotary is not None, INTERLEAVED=bool(interleaved),
            HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=padded_head_dim(head_dim),
            num_warps=4 if n_heads * head_dim >= 1024 else 2,
        )
    return dst
