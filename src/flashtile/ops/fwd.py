"""Forward pass: one Q tile per program, K/V tiles streamed past it with an online softmax.

Softmax runs in base 2: scores are scaled by ``softmax_scale * log2(e)`` once, so the inner
loop uses ``exp2``. The running max ``m_i`` and sum ``l_i`` are in those base-2 units; the
stored LSE is converted back to natural log.

Masks (causal, window; docs/semantics.md) are bottom-right aligned. The K/V loop runs in up
to three stages (``score.span``): tiles left of the window's edge that need the mask, tiles
every row of the Q tile sees whole (no mask arithmetic at all), and tiles on the diagonal or
past ``seqlen_k`` (masked). Tiles no row sees are never loaded, so a window costs
``seqlen x window``, not ``seqlen^2``. Softcap, ALiBi and dropout are constexpr flags of the
same kernel; under varlen each program reads its sequence's bounds from ``cu_seqlens``.

On Hopper, loops over ``configs.TMA_MIN_SEQLEN`` keys or more read K/V through TMA tensor
descriptors where the tile entry says so (``TileConfig.tma``), and the calls ``fwd_hopper`` covers
(plain or causal attention at head dims 64, 128 and 256, lengths multiples of 128) take its Gluon
kernel instead.

Fully masked rows (causal with ``Sq > Sk``, a window that misses every key, or ``Sk == 0``)
write ``out = 0`` and ``lse = +inf``, FlashAttention-2's convention: the backward then
recomputes ``P = 0`` there.
"""

import functools

import torch
import triton
import triton.language as tl

from flashtile import configs
from flashtile.configs import tile_config
from flashtile.ops.common import (
    cdiv, device_guard, dot_precision, feature_args, load_gluon_module, padded_head_dim, sequence_layout,
    shared_strides, stream_by_tma,
)
from flashtile.ops.launch import FastLaunch
from flashtile.ops.score import dropout_keep, scores_base2, span, tanh, visible
from flashtile.ops.tiles import (
    load_kv_tile, q_tile_program, sequence_bounds, start_kv_stream, stream_sources,
)


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q,
    k_ptrs, v_ptrs, stride_ks,
    start_m, offs_m, offs_n, offs_d,
    start_n, end_n, seqlen_k, diag_offset, window_left, window_right,
    qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, pid_b, pid_h,
    MASKED: tl.constexpr, BOUND_LEFT: tl.constexpr, BOUND_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, ALIBI_LINEAR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_TMA: tl.constexpr,
):
    """Fold the K/V tiles ``[start_n, end_n)`` into ``(acc, m_i, l_i)``.

    ``k_ptrs``/``v_ptrs`` are scalar pointers to key 0 of this head (KV_TMA: tensor descriptors
    of its ``[seqlen_k, HEAD_DIM]`` K and V). ``MASKED`` tiles apply the causal/window and
    ``seqlen_k`` masks; unmasked ones skip them.
    """
    k_ptrs, v_ptrs, kv_offs = start_kv_stream(k_ptrs, v_ptrs, start_n, offs_n, offs_d, stride_ks, KV_TMA)
    mask_d = offs_d < HEAD_DIM  # [BLOCK_D]
    for tile_start in range(start_n, end_n, BLOCK_N):
        offs_key = tile_start + offs_n  # [BLOCK_N]
        k, v = load_kv_tile(k_ptrs, v_ptrs, kv_offs, tile_start, offs_key, mask_d, seqlen_k,
                            MASKED, KV_TMA, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D] each

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if MASKED or (HAS_ALIBI and not ALIBI_LINEAR):
            s, _ = scores_base2(qk, offs_m[:, None], offs_key[None, :], qk_scale, softcap_in, alibi_slope,
                                diag_offset, SOFTCAP, HAS_ALIBI)  # [BLOCK_M, BLOCK_N]
            if MASKED:
                seen = visible(offs_m[:, None], offs_key[None, :], seqlen_k, diag_offset, window_left, window_right,
                               BOUND_LEFT, BOUND_RIGHT)
                s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
            # A row that has seen no key yet keeps m = -inf; subtract 0 there instead so
            # exp2 gives 0 rather than NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])  # [BLOCK_M, BLOCK_N]
        elif ALIBI_LINEAR:
            # Unmasked tile under a right bound of 0 (causal): every key is at or left of the
            # diagonal, so the bias -slope * (i + diag - j) is a column term plus a row term,
            # both relative to the tile start (small, so no precision is lost). The row term
            # moves into the max: one FMA and one add per score instead of the |distance| path.
            if SOFTCAP:
                qk = tanh(qk * softcap_in, SOFTCAP == 2)
            col_bias = alibi_slope * offs_n.to(tl.float32)  # [BLOCK_N]: slope * (j - tile_start)
            row_bias = alibi_slope * (tile_start - diag_offset - offs_m).to(tl.float32)  # [BLOCK_M]
            s = qk * qk_scale + col_bias[None, :]  # [BLOCK_M, BLOCK_N]: the score minus row_bias
            m_new = tl.maximum(m_i, tl.max(s, 1) + row_bias)
            m_sub = m_new
            p = tl.math.exp2(s - (m_new - row_bias)[:, None])
        else:
            # Unmasked, no bias: fold the scale into the exponent's FMA (qk_scale > 0). With
            # softcap the capped tanh takes qk's place (qk_scale is then softcap * log2 e).
            if SOFTCAP:
                qk = tanh(qk * softcap_in, SOFTCAP == 2)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)  # [BLOCK_M]
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax sum counts dropped entries too
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, dropout_threshold, pid_b, pid_h, start_m, tile_start, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
        m_i = m_new
        if not KV_TMA:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_ks
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "num_m_blocks", "window_left", "window_right", "seed",
                               "dropout_threshold"])
def _fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS_Q, CU_SEQLENS_K, SEQ_ORDER, ALIBI,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_ob, stride_os, stride_oh,
    stride_lse_b, stride_lse_h, stride_alibi_b,
    n_heads, group_size, seqlen_q, seqlen_k, num_m_blocks,
    qk_scale, softcap_in, window_left, window_right, seed, dropout_threshold, dropout_scale,
    IS_VARLEN: tl.constexpr, BOUND_LEFT: tl.constexpr, BOUND_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIBI_LINEAR: tl.constexpr = False, KV_TMA: tl.constexpr = False,
):
    # ALIBI_LINEAR: ALiBi with a right bound of exactly 0 (causal), see _attend_tiles.
    # Grid: (num_m_blocks * batch * n_heads,), order as in q_tile_program.
    # Index math is int32 (sequence positions < 2**31); pointer offsets are int64, since
    # B*S*H*D may pass 2**31. The host keeps BLOCK * stride(1) below 2**31.
    pid_bh, pid_b, pid_h, pid_kv_h, start_m = q_tile_program(
        num_m_blocks, n_heads, group_size, SEQ_ORDER, BOUND_RIGHT, IS_VARLEN, BLOCK_M)
    q_begin, k_begin, seqlen_q, seqlen_k = sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, pid_b, seqlen_q, seqlen_k,
                                                           IS_VARLEN)
    if start_m >= seqlen_q:  # varlen: this sequence is shorter than the longest one
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < HEAD_DIM

    q_ptrs = (Q + pid_b * stride_qb + pid_h.to(tl.int64) * stride_qh
              + (q_begin + offs_m.to(tl.int64))[:, None] * stride_qs + offs_d[None, :])
    k_ptrs = K + pid_b * stride_kb + pid_kv_h * stride_kh + k_begin * stride_ks  # scalar: key 0 of this head
    v_ptrs = V + pid_b * stride_kb + pid_kv_h * stride_kh + k_begin * stride_ks  # V shares K's strides
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_src, v_src = stream_sources(k_ptrs, v_ptrs, seqlen_k, stride_ks, stride_ks, KV_TMA, HEAD_DIM, BLOCK_N, BLOCK_D)
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(ALIBI + pid_b * stride_alibi_b + pid_h) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    diag_offset = seqlen_k - seqlen_q
    last_m = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
    start_n, full_start, full_end, end_n = span(start_m, last_m, seqlen_k, diag_offset - window_left,
                                                diag_offset + window_right, BOUND_LEFT, BOUND_RIGHT, BLOCK_N)
    if BOUND_LEFT:  # tiles cut by the window's left edge
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_src, v_src, stride_ks, start_m, offs_m, offs_n, offs_d,
            start_n, full_start, seqlen_k, diag_offset, window_left, window_right,
            qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, pid_b, pid_h,
            True, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI, ALIBI_LINEAR, HAS_DROPOUT,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, KV_TMA,
        )
    acc, m_i, l_i = _attend_tiles(  # tiles every row sees whole
        acc, m_i, l_i, q, k_src, v_src, stride_ks, start_m, offs_m, offs_n, offs_d,
        full_start, full_end, seqlen_k, diag_offset, window_left, window_right,
        qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, pid_b, pid_h,
        False, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI, ALIBI_LINEAR, HAS_DROPOUT,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, KV_TMA,
    )
    acc, m_i, l_i = _attend_tiles(  # the diagonal (causal / right edge) and the tail past seqlen_k
        acc, m_i, l_i, q, k_src, v_src, stride_ks, start_m, offs_m, offs_n, offs_d,
        full_end, end_n, seqlen_k, diag_offset, window_left, window_right,
        qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, pid_b, pid_h,
        True, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI, ALIBI_LINEAR, HAS_DROPOUT,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, KV_TMA,
    )

    has_keys = l_i > 0.0
    safe_l = tl.where(has_keys, l_i, 1.0)
    inv_l = tl.where(has_keys, 1.0 / safe_l, 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l * dropout_scale  # kept probabilities are scaled by 1 / keep rate
    out = acc * inv_l[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(safe_l)) / 1.4426950408889634, float("inf"))

    o_ptrs = (O + pid_b * stride_ob + pid_h.to(tl.int64) * stride_oh
              + (q_begin + offs_m.to(tl.int64))[:, None] * stride_os + offs_d[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    lse_ptrs = LSE + pid_b * stride_lse_b + pid_h.to(tl.int64) * stride_lse_h + q_begin + offs_m
    tl.store(lse_ptrs, lse, mask=mask_m)


_fwd_launch = FastLaunch(_fwd_kernel)


@functools.lru_cache(maxsize=None)
def _gluon_forward():
    """``ops.fwd_hopper``, imported on first CUDA use (Gluon has no interpreter), or None
    (``common.load_gluon_module``)."""
    return load_gluon_module("fwd_hopper")


def flash_fwd(q, k, v, features, varlen=None):
    """Launch the forward kernel.

    Dense: q (B, Sq, Hq, D); k, v (B, Sk, Hk, D). Varlen (``varlen = (cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k)``): q (total_q, Hq, D), k, v (total_k, Hk, D).
    Every tensor has ``stride(-1) == 1`` (see ``autograd.kernel_layout``).
    Returns ``out`` shaped like q in q's dtype and ``lse`` float32, (B, Hq, Sq) or (Hq, total_q).
    """
    hopper = _gluon_forward() if q.is_cuda else None
    if hopper is not None and hopper.hopper_fwd_eligible(q, k, v, features, varlen):
        with device_guard(q):
            return hopper.hopper_fwd(q, k, v, features)
    k, v = shared_strides(k, v)
    layout = sequence_layout(q, k, varlen)
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    n_kv_heads = k.shape[-2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(layout.lse_shape(n_heads), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or layout.batch == 0:
        return out, lse.fill_(float("inf"))

    block_d = padded_head_dim(head_dim)
    cfg = tile_config(q.device, q.dtype, block_d, "fwd", features.masked, layout.is_varlen, features.heavy_scores,
                      long_loop=layout.max_seqlen_k >= configs.TMA_MIN_SEQLEN)
    num_m_blocks = cdiv(layout.max_seqlen_q, cfg.block_m)
    grid = (num_m_blocks * layout.batch * n_heads,)
    args = feature_args(features, q)
    with device_guard(q):
        _fwd_launch[grid](
            q, k, v, out, lse, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.seq_order, args.alibi,
            *layout.strides(q), *layout.strides(k), *layout.strides(out),
            *layout.lse_strides(n_heads), args.stride_alibi_b,
            n_heads, n_heads // n_kv_heads, layout.max_seqlen_q, layout.max_seqlen_k, num_m_blocks,
            **args.runtime, IS_VARLEN=layout.is_varlen, **args.flags, HEAD_DIM=head_dim,
            ALIBI_LINEAR=features.alibi_slopes is not None and features.window_right == 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
            DOT_PRECISION=dot_precision(q.dtype), KV_TMA=stream_by_tma(cfg, k, v),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, lse
