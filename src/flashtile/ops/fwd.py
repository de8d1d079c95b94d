"""Forward pass: one Q tile per program, K/V tiles streamed past it with an online softmax.

Softmax runs in base 2: scores are scaled by ``softmax_scale * log2(e)`` once, so the inner
loop uses ``exp2``. The running max ``m_i`` and sum ``l_i`` are in those base-2 units; the
stored LSE is converted back to natural log.

Causal masks are bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``.
The K/V loop is split in two stages: tiles every row of the Q tile sees in full (no mask
arithmetic at all) and the few tiles on the diagonal or past ``seqlen_k`` (masked). Tiles
wholly above the diagonal are never loaded.

Fully masked rows (causal with ``Sq > Sk``, or ``Sk == 0``) write ``out = 0`` and
``lse = +inf``, FlashAttention-2's convention: the backward then recomputes ``P = 0`` there.
"""

import torch
import triton
import triton.language as tl

from flashtile.configs import tile_config
from flashtile.ops.common import LOG2E, device_guard, dot_precision, padded_head_dim, shared_strides
from flashtile.ops.tiles import q_tile_program, visible_key_range


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q,
    k_ptrs, v_ptrs, stride_ks,
    offs_m, offs_n, offs_d,
    start_n, end_n, seqlen_k, diag_offset, qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold the K/V tiles ``[start_n, end_n)`` into ``(acc, m_i, l_i)``.

    ``k_ptrs``/``v_ptrs`` are scalar pointers to key ``start_n``. ``MASKED`` tiles apply the causal and
    ``seqlen_k`` masks; unmasked ones skip both.
    """
    mask_d = offs_d < HEAD_DIM  # [BLOCK_D]
    # Scalar base pointers carried through the loop plus loop-invariant int32 tile offsets:
    # a loop-carried 2-D tile of 64-bit pointers costs two registers per element.
    # K and V share strides (the launcher guarantees it), so one offset tile serves both.
    kv_offs = offs_n[:, None] * stride_ks + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    for tile_start in range(start_n, end_n, BLOCK_N):
        offs_key = tile_start + offs_n  # [BLOCK_N]
        if MASKED:
            mask_kv = (offs_key[:, None] < seqlen_k) & mask_d[None, :]
            k = tl.load(k_ptrs + kv_offs, mask=mask_kv, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_ptrs + kv_offs, mask=mask_kv, other=0.0)  # [BLOCK_N, BLOCK_D]
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs + kv_offs)
            v = tl.load(v_ptrs + kv_offs)
        else:
            k = tl.load(k_ptrs + kv_offs, mask=mask_d[None, :], other=0.0)
            v = tl.load(v_ptrs + kv_offs, mask=mask_d[None, :], other=0.0)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if MASKED:
            visible = offs_key[None, :] < seqlen_k  # [1, BLOCK_N]
            if IS_CAUSAL:
                visible = visible & (offs_key[None, :] <= offs_m[:, None] + diag_offset)
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # [BLOCK_M]
            # A row that has seen no key yet keeps m = -inf; subtract 0 there instead so
            # exp2 gives 0 rather than NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_sub[:, None])  # [BLOCK_M, BLOCK_N]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)  # [BLOCK_M]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_ks
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "num_m_blocks"])
def _fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_ob, stride_os, stride_oh,
    n_heads, group_size, seqlen_q, seqlen_k, num_m_blocks, qk_scale,
    IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grid: (num_m_blocks * batch * n_heads,), order as in q_tile_program.
    # Index math is int32 (sequence positions < 2**31); pointer offsets are int64, since
    # B*S*H*D may pass 2**31. The host keeps BLOCK * stride(1) below 2**31.
    pid_bh, pid_b, pid_h, pid_kv_h, start_m = q_tile_program(num_m_blocks, n_heads, group_size, IS_CAUSAL, BLOCK_M)

    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < HEAD_DIM

    q_ptrs = (Q + pid_b * stride_qb + pid_h.to(tl.int64) * stride_qh
              + offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :])
    k_ptrs = K + pid_b * stride_kb + pid_kv_h * stride_kh  # scalar: key 0 of this head
    v_ptrs = V + pid_b * stride_kb + pid_kv_h * stride_kh  # V shares K's strides
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    diag_offset = seqlen_k - seqlen_q
    end_full, end_visible = visible_key_range(start_m, seqlen_q, seqlen_k, IS_CAUSAL, BLOCK_M, BLOCK_N)

    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_ks, offs_m, offs_n, offs_d,
        0, end_full, seqlen_k, diag_offset, qk_scale,
        False, IS_CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )
    skip = end_full.to(tl.int64)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_ptrs + skip * stride_ks, v_ptrs + skip * stride_ks, stride_ks,
        offs_m, offs_n, offs_d, end_full, end_visible, seqlen_k, diag_offset, qk_scale,
        True, IS_CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )

    has_keys = l_i > 0.0
    safe_l = tl.where(has_keys, l_i, 1.0)
    out = acc * tl.where(has_keys, 1.0 / safe_l, 0.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(safe_l)) / 1.4426950408889634, float("inf"))

    o_ptrs = (O + pid_b * stride_ob + pid_h.to(tl.int64) * stride_oh
              + offs_m.to(tl.int64)[:, None] * stride_os + offs_d[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    lse_ptrs = LSE + pid_bh.to(tl.int64) * seqlen_q + offs_m
    tl.store(lse_ptrs, lse, mask=mask_m)


def flash_fwd(q, k, v, softmax_scale, causal):
    """Launch the forward kernel.

    q: (B, Sq, Hq, D); k, v: (B, Sk, Hk, D), each with ``stride(-1) == 1`` (see
    ``common.kernel_layout`` for the other stride conditions).
    Returns ``out`` (B, Sq, Hq, D) in q's dtype and ``lse`` (B, Hq, Sq) float32.
    """
    k, v = shared_strides(k, v)
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))

    block_d = padded_head_dim(head_dim)
    cfg = tile_config(q.device, q.dtype, block_d, "fwd", causal)
    num_m_blocks = triton.cdiv(seqlen_q, cfg.block_m)
    grid = (num_m_blocks * batch * n_heads,)
    with device_guard(q):
        _fwd_kernel[grid](
            q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            n_heads, n_heads // n_kv_heads, seqlen_q, seqlen_k, num_m_blocks,
            softmax_scale * LOG2E,
            IS_CAUSAL=causal, HEAD_DIM=head_dim,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
            DOT_PRECISION=dot_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, lse
