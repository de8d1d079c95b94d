"""Backward pass: P is recomputed tile by tile from the saved LSE; nothing N x N is stored.

Three launches, no atomics (so the result is bitwise reproducible):

1. ``_delta_kernel``: ``delta_i = sum_d dO_id * O_id`` (the rowsum that softmax's Jacobian needs).
2. ``_dkdv_kernel``: one K/V tile per program; streams the Q/dO tiles that see it and
   accumulates ``dV += P^T dO`` and ``dK += dS^T Q`` in registers. Under GQA the program
   also loops over the query heads of its group, so dK/dV are summed without atomics.
3. ``_dq_kernel``: one Q tile per program; streams K/V and accumulates ``dQ += dS K``.

With ``S = scale * Q K^T``, ``P = exp(S - LSE)``, ``dP = dO V^T`` and ``dS = P * (dP - delta)``:
``dQ = scale * dS K`` and ``dK = scale * dS^T Q``. Softcap multiplies ``dS`` by the tanh's
derivative ``1 - tanh^2``; ALiBi's bias has no gradient. Dropout regenerates the forward's keep
mask ``Z`` (same Philox counters): ``dV = (P Z / (1-p))^T dO`` and ``dP`` is masked and scaled
the same way before ``dS``. Tiles no query sees are skipped as in the forward (``score.span``).

Rows past ``seqlen_q`` load ``LSE = +inf`` so their recomputed P is exactly 0; fully masked
rows carry ``LSE = +inf`` from the forward and get zero gradients the same way.

On Hopper, loops over ``configs.TMA_MIN_SEQLEN`` rows or more read the tiles they stream (Q/dO
in dK/dV, K/V in dQ) through TMA tensor descriptors where the tile entry says so
(``TileConfig.tma``), which zero-fill rows past the sequence's end. The calls ``bwd_hopper``
covers (plain or causal attention at head dims 64 and 128, ``deterministic=False``) take its
Gluon one-pass kernel instead, which sums dQ by atomics (in ``tl`` that design was slower:
docs/performance.md, issue 4 steps 3 and 7).
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
from flashtile.ops.score import dropout_keep, recomputed_probs, span
from flashtile.ops.tiles import (
    load_kv_tile, q_tile_program, sequence_bounds, start_kv_stream, stream_sources,
)


@triton.jit(do_not_specialize=["seqlen_q", "num_m_blocks"])
def _delta_kernel(
    O, DO, DELTA, ZERO, COUNTS,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_zb, stride_zs, stride_zh,
    n_heads, seqlen_q, num_m_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ZERO_FILL: tl.constexpr,
    ZERO_COUNTS: tl.constexpr,
):
    # Grid: (num_m_blocks * batch * n_heads,)
    pid = tl.program_id(0)
    pid_bh = pid // num_m_blocks
    pid_m = pid % num_m_blocks
    pid_b = (pid_bh // n_heads).to(tl.int64)
    pid_h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m.to(tl.int64)[:, None]
    o_ptrs = O + pid_b * stride_ob + pid_h * stride_oh + rows * stride_os + offs_d[None, :]
    do_ptrs = DO + pid_b * stride_dob + pid_h * stride_doh + rows * stride_dos + offs_d[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_D]
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_D]
    delta = tl.sum(o * do, axis=1)  # [BLOCK_M]
    tl.store(DELTA + pid_bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)
    if ZERO_FILL:  # the same rows of a float32 tensor laid out like O (see launch_delta)
        z_ptrs = ZERO + pid_b * stride_zb + pid_h * stride_zh + rows * stride_zs + offs_d[None, :]
        tl.store(z_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=mask)
    if ZERO_COUNTS:  # an int32 counter per program, (batch, head, row block) in grid order
        tl.store(COUNTS + pid, 0)


_delta_launch = FastLaunch(_delta_kernel)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v,
    q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qs, stride_dos,
    offs_m, offs_n, offs_d,
    start_m, end_m, start_n, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
    qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, dropout_scale, pid_b, pid_h,
    MASKED: tl.constexpr, BOUND_LEFT: tl.constexpr, BOUND_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_AS_B: tl.constexpr, DO_LIKE_Q: tl.constexpr, QDO_TMA: tl.constexpr,
):
    """Fold the Q/dO tiles ``[start_m, end_m)`` into the K/V tile's ``(dk, dv)``.

    ``q_ptrs``/``do_ptrs`` are scalar pointers to row 0 of this head (QDO_TMA: tensor descriptors
    of its ``[seqlen_q, HEAD_DIM]`` Q and dO). ``MASKED`` tiles straddle an edge of the
    causal/window band and apply it.
    """
    if not QDO_TMA:
        q_ptrs += start_m.to(tl.int64) * stride_qs
        do_ptrs += start_m.to(tl.int64) * stride_dos
    mask_d = offs_d < HEAD_DIM  # [BLOCK_D]
    # Scalar base pointers carried through the loop plus loop-invariant int32 tile offsets:
    # a loop-carried 2-D tile of 64-bit pointers costs two registers per element.
    q_offs = offs_m[:, None] * stride_qs + offs_d[None, :]  # [BLOCK_M, BLOCK_D]
    if DO_LIKE_Q:
        do_offs = q_offs  # dO has Q's strides: one offset tile serves both
    else:
        do_offs = offs_m[:, None] * stride_dos + offs_d[None, :]  # [BLOCK_M, BLOCK_D]
    for tile_start in range(start_m, end_m, BLOCK_M):
        offs_row = tile_start + offs_m  # [BLOCK_M]
        mask_row = offs_row < seqlen_q
        mask_q = mask_row[:, None] & mask_d[None, :]
        if QDO_TMA:  # rows past seqlen_q come back as zeros
            q = q_ptrs.load([tile_start, 0])
            do = do_ptrs.load([tile_start, 0])
        else:
            q = tl.load(q_ptrs + q_offs, mask=mask_q, other=0.0)  # [BLOCK_M, BLOCK_D]
            do = tl.load(do_ptrs + do_offs, mask=mask_q, other=0.0)  # [BLOCK_M, BLOCK_D]
        lse2 = tl.load(lse_ptr + offs_row, mask=mask_row, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + offs_row, mask=mask_row, other=0.0)  # [BLOCK_M]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, dropout_threshold, pid_b, pid_h, tile_start, start_n, BLOCK_M, BLOCK_N)

        if KV_AS_B:
            # Computes P (not P^T): K and V become B operands and stay in shared memory, at the
            # price of transposing P and dS for the dV and dK products.
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            p, capped = recomputed_probs(  # [BLOCK_M, BLOCK_N]
                qk, offs_row[:, None], offs_n[None, :], lse2[:, None], seqlen_k, diag_offset, window_left,
                window_right, qk_scale, softcap_in, alibi_slope, MASKED, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            if HAS_DROPOUT:
                p_kept = tl.where(keep, p * dropout_scale, 0.0)
                dp = tl.where(keep, dp * dropout_scale, 0.0)
            else:
                p_kept = p
            dv = tl.dot(tl.trans(p_kept.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
            ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N]
            if SOFTCAP:
                ds = ds * (1.0 - capped * capped)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
        else:
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
            p_t, capped_t = recomputed_probs(  # [BLOCK_N, BLOCK_M]
                qk_t, offs_row[None, :], offs_n[:, None], lse2[None, :], seqlen_k, diag_offset, window_left,
                window_right, qk_scale, softcap_in, alibi_slope, MASKED, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
            if HAS_DROPOUT:
                keep_t = tl.trans(keep)
                p_kept_t = tl.where(keep_t, p_t * dropout_scale, 0.0)
                dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
            else:
                p_kept_t = p_t
            dv = tl.dot(p_kept_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
            ds_t = p_t * (dp_t - delta[None, :])  # [BLOCK_N, BLOCK_M]
            if SOFTCAP:
                ds_t = ds_t * (1.0 - capped_t * capped_t)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
        if not QDO_TMA:
            q_ptrs += BLOCK_M * stride_qs
            do_ptrs += BLOCK_M * stride_dos
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "num_n_blocks", "window_left", "window_right", "seed",
                               "dropout_threshold"])
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS_Q, CU_SEQLENS_K, SEQ_ORDER, ALIBI,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,  # shared by V
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,  # shared by DV
    stride_lse_b, stride_lse_h, stride_alibi_b,  # LSE's shared by DELTA
    n_heads, group_size, seqlen_q, seqlen_k, num_n_blocks, softmax_scale,
    qk_scale, softcap_in, window_left, window_right, seed, dropout_threshold, dropout_scale,
    IS_VARLEN: tl.constexpr, BOUND_LEFT: tl.constexpr, BOUND_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_AS_B: tl.constexpr, DO_LIKE_Q: tl.constexpr, QDO_TMA: tl.constexpr,
):
    # Grid: (num_n_blocks * batch * n_kv_heads,). Index math int32, pointer offsets int64.
    if DO_LIKE_Q:  # the usual case (the launcher checks): address dO with Q's strides
        stride_dob, stride_dos, stride_doh = stride_qb, stride_qs, stride_qh
    pid = tl.program_id(0)
    n_kv_heads = n_heads // group_size
    pid_bkv = pid // num_n_blocks
    pid_n = pid % num_n_blocks
    pid_b = pid_bkv // n_kv_heads
    if IS_VARLEN:  # longest sequence first, as in q_tile_program
        pid_b = tl.load(SEQ_ORDER + pid_b)
    pid_b = pid_b.to(tl.int64)
    pid_kv_h = (pid_bkv % n_kv_heads).to(tl.int64)
    q_begin, k_begin, seqlen_q, seqlen_k = sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, pid_b, seqlen_q, seqlen_k,
                                                           IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:  # varlen: this sequence is shorter than the longest one
        return

    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_kv = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    keys = (k_begin + offs_n.to(tl.int64))[:, None]
    kv_offs = pid_b * stride_kb + pid_kv_h * stride_kh + keys * stride_ks + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    k = tl.load(K + kv_offs, mask=mask_kv, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + kv_offs, mask=mask_kv, other=0.0)  # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query i sees key j iff j - diag - right <= i <= j - diag + left: the rows this K/V tile
    # needs, in the same three stages as the forward's keys.
    diag_offset = seqlen_k - seqlen_q
    last_n = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    start_m, full_start, full_end, end_m = span(start_n, last_n, seqlen_q, -diag_offset - window_right,
                                                window_left - diag_offset, BOUND_RIGHT, BOUND_LEFT, BLOCK_M)

    for g in range(group_size):
        pid_h = pid_kv_h * group_size + g
        q_ptrs = Q + pid_b * stride_qb + pid_h * stride_qh + q_begin * stride_qs  # scalar: row 0 of this head
        do_ptrs = DO + pid_b * stride_dob + pid_h * stride_doh + q_begin * stride_dos
        q_ptrs, do_ptrs = stream_sources(q_ptrs, do_ptrs, seqlen_q, stride_qs, stride_dos, QDO_TMA, HEAD_DIM,
                                         BLOCK_M, BLOCK_D)
        row_base = pid_b * stride_lse_b + pid_h * stride_lse_h + q_begin
        alibi_slope = 0.0
        if HAS_ALIBI:
            alibi_slope = tl.load(ALIBI + pid_b * stride_alibi_b + pid_h) * 1.4426950408889634
        if BOUND_RIGHT:  # rows above the band's diagonal edge
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, q_ptrs, do_ptrs,
                LSE + row_base, DELTA + row_base, stride_qs, stride_dos,
                offs_m, offs_n, offs_d, start_m, full_start, start_n, seqlen_q, seqlen_k, diag_offset,
                window_left, window_right,
                qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, dropout_scale, pid_b, pid_h,
                True, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, KV_AS_B, DO_LIKE_Q, QDO_TMA,
            )
        if not BOUND_LEFT:
            # Without a left edge the rest runs unmasked to the end: rows past seqlen_q load
            # LSE = +inf, so their P is 0 without a mask.
            full_end = end_m
        dk, dv = _dkdv_tiles(  # rows that see the whole tile
            dk, dv, k, v, q_ptrs, do_ptrs,
            LSE + row_base, DELTA + row_base, stride_qs, stride_dos,
            offs_m, offs_n, offs_d, full_start, full_end, start_n, seqlen_q, seqlen_k, diag_offset,
            window_left, window_right,
            qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, dropout_scale, pid_b, pid_h,
            False, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, KV_AS_B, DO_LIKE_Q, QDO_TMA,
        )
        if BOUND_LEFT:  # rows at the window's left edge, and the tail past seqlen_q
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, q_ptrs, do_ptrs,
                LSE + row_base, DELTA + row_base, stride_qs, stride_dos,
                offs_m, offs_n, offs_d, full_end, end_m, start_n, seqlen_q, seqlen_k, diag_offset,
                window_left, window_right,
                qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, dropout_scale, pid_b, pid_h,
                True, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, KV_AS_B, DO_LIKE_Q, QDO_TMA,
            )

    dk = dk * softmax_scale
    dk_offs = pid_b * stride_dkb + pid_kv_h * stride_dkh + keys * stride_dks + offs_d[None, :]  # DV shares strides
    tl.store(DK + dk_offs, dk.to(DK.dtype.element_ty), mask=mask_kv)
    tl.store(DV + dk_offs, dv.to(DV.dtype.element_ty), mask=mask_kv)


_dkdv_launch = FastLaunch(_dkdv_kernel)


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta,
    k_ptrs, v_ptrs, stride_ks,
    start_m, offs_m, offs_n, offs_d,
    start_n, end_n, seqlen_k, diag_offset, window_left, window_right,
    qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, dropout_scale, pid_b, pid_h,
    MASKED: tl.constexpr, BOUND_LEFT: tl.constexpr, BOUND_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_TMA: tl.constexpr,
):
    """Fold the K/V tiles ``[start_n, end_n)`` into the Q tile's ``dq``.

    ``MASKED`` tiles apply the causal/window and ``seqlen_k`` masks. The ``seqlen_k`` mask
    matters here: a key past the end loads as 0, so its score is 0 and ``exp(0 - LSE)`` can
    overflow. ``k_ptrs``/``v_ptrs`` are scalar pointers to key 0 of this head (KV_TMA: tensor
    descriptors of its ``[seqlen_k, HEAD_DIM]`` K and V, as in the forward).
    """
    k_ptrs, v_ptrs, kv_offs = start_kv_stream(k_ptrs, v_ptrs, start_n, offs_n, offs_d, stride_ks, KV_TMA)
    mask_d = offs_d < HEAD_DIM  # [BLOCK_D]
    for tile_start in range(start_n, end_n, BLOCK_N):
        offs_key = tile_start + offs_n  # [BLOCK_N]
        k, v = load_kv_tile(k_ptrs, v_ptrs, kv_offs, tile_start, offs_key, mask_d, seqlen_k,
                            MASKED, KV_TMA, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D] each

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        p, capped = recomputed_probs(  # [BLOCK_M, BLOCK_N]
            qk, offs_m[:, None], offs_key[None, :], lse2[:, None], seqlen_k, diag_offset, window_left,
            window_right, qk_scale, softcap_in, alibi_slope, MASKED, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, dropout_threshold, pid_b, pid_h, start_m, tile_start, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N]
        if SOFTCAP:
            ds = ds * (1.0 - capped * capped)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
        if not KV_TMA:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_ks
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "num_m_blocks", "window_left", "window_right", "seed",
                               "dropout_threshold"])
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS_Q, CU_SEQLENS_K, SEQ_ORDER, ALIBI,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,  # shared by V
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lse_b, stride_lse_h, stride_alibi_b,  # LSE's shared by DELTA
    n_heads, group_size, seqlen_q, seqlen_k, num_m_blocks, softmax_scale,
    qk_scale, softcap_in, window_left, window_right, seed, dropout_threshold, dropout_scale,
    IS_VARLEN: tl.constexpr, BOUND_LEFT: tl.constexpr, BOUND_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DO_LIKE_Q: tl.constexpr, KV_TMA: tl.constexpr,
):
    # Grid: (num_m_blocks * batch * n_heads,), order as in q_tile_program.
    # Index math int32, pointer offsets int64.
    if DO_LIKE_Q:  # the usual case (the launcher checks): address dO with Q's strides
        stride_dob, stride_dos, stride_doh = stride_qb, stride_qs, stride_qh
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
    mask_q = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = (q_begin + offs_m.to(tl.int64))[:, None]
    q_ptrs = Q + pid_b * stride_qb + pid_h.to(tl.int64) * stride_qh + rows * stride_qs + offs_d[None, :]
    do_ptrs = DO + pid_b * stride_dob + pid_h.to(tl.int64) * stride_doh + rows * stride_dos + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_q, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(do_ptrs, mask=mask_q, other=0.0)  # [BLOCK_M, BLOCK_D]
    row_base = pid_b * stride_lse_b + pid_h.to(tl.int64) * stride_lse_h + q_begin
    lse2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)  # [BLOCK_M]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(ALIBI + pid_b * stride_alibi_b + pid_h) * 1.4426950408889634

    k_ptrs = K + pid_b * stride_kb + pid_kv_h * stride_kh + k_begin * stride_ks  # scalar: key 0 of this head
    v_ptrs = V + pid_b * stride_kb + pid_kv_h * stride_kh + k_begin * stride_ks  # V shares K's strides
    k_ptrs, v_ptrs = stream_sources(k_ptrs, v_ptrs, seqlen_k, stride_ks, stride_ks, KV_TMA, HEAD_DIM, BLOCK_N, BLOCK_D)
    diag_offset = seqlen_k - seqlen_q
    last_m = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
    start_n, full_start, full_end, end_n = span(start_m, last_m, seqlen_k, diag_offset - window_left,
                                                diag_offset + window_right, BOUND_LEFT, BOUND_RIGHT, BLOCK_N)
    if BOUND_LEFT:  # tiles cut by the window's left edge
        dq = _dq_tiles(
            dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, start_m, offs_m, offs_n, offs_d,
            start_n, full_start, seqlen_k, diag_offset, window_left, window_right,
            qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, dropout_scale, pid_b, pid_h,
            True, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, KV_TMA,
        )
    dq = _dq_tiles(  # tiles every row sees whole
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, start_m, offs_m, offs_n, offs_d,
        full_start, full_end, seqlen_k, diag_offset, window_left, window_right,
        qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, dropout_scale, pid_b, pid_h,
        False, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, KV_TMA,
    )
    dq = _dq_tiles(  # the diagonal (causal / right edge) and the tail past seqlen_k
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, start_m, offs_m, offs_n, offs_d,
        full_end, end_n, seqlen_k, diag_offset, window_left, window_right,
        qk_scale, softcap_in, alibi_slope, seed, dropout_threshold, dropout_scale, pid_b, pid_h,
        True, BOUND_LEFT, BOUND_RIGHT, SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, KV_TMA,
    )
    dq = dq * softmax_scale
    dq_ptrs = DQ + pid_b * stride_dqb + pid_h.to(tl.int64) * stride_dqh + rows * stride_dqs + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_q)


_dq_launch = FastLaunch(_dq_kernel)


def launch_delta(out, dout, delta, zero=None, counts=None):
    """delta <- rowsum(dout * out), float32 laid out like the LSE; and, given ``zero`` (float32,
    shaped like ``out``), zero <- 0 in the same pass: the Gluon backward's dQ accumulator, which
    would otherwise take a fill kernel of its own (and ~50 us of host time per call). Given
    ``counts`` (int32, one per 64 rows of each head: (B, H, Sq / 64)), counts <- 0 as well: the
    Gluon backward's dQ counters (CUDA only, where the row blocks are 64).

    Dense: out (B, Sq, H, D), delta (B, H, Sq). Varlen tensors arrive as one batch entry:
    out (1, total, H, D), delta (1, H, total).
    """
    batch, seqlen_q, n_heads, head_dim = out.shape
    block_m = 64 if out.is_cuda else 16
    num_m_blocks = cdiv(seqlen_q, block_m)
    zero_strides = zero.stride()[:3] if zero is not None else (0, 0, 0)
    if counts is not None and (block_m != 64 or counts.numel() != num_m_blocks * batch * n_heads):
        raise ValueError(f"counts: expected one counter per 64 rows of each head, got {counts.numel()}")
    _delta_launch[(num_m_blocks * batch * n_heads,)](
        out, dout, delta, delta if zero is None else zero, delta if counts is None else counts,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2), *zero_strides,
        n_heads, seqlen_q, num_m_blocks,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=padded_head_dim(head_dim), ZERO_FILL=zero is not None,
        ZERO_COUNTS=counts is not None,
    )


def launch_dkdv(dout, q, k, v, lse, delta, dk, dv, features, layout):
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    n_kv_heads = k.shape[-2]
    block_d = padded_head_dim(head_dim)
    cfg = tile_config(q.device, q.dtype, block_d, "dkdv", features.masked, heavy_scores=features.heavy_scores,
                      long_loop=layout.max_seqlen_q >= configs.TMA_MIN_SEQLEN)
    num_n_blocks = cdiv(layout.max_seqlen_k, cfg.block_n)
    args = feature_args(features, q)
    _dkdv_launch[(num_n_blocks * layout.batch * n_kv_heads,)](
        q, k, v, dout, lse, delta, dk, dv, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.seq_order, args.alibi,
        *layout.strides(q), *layout.strides(k), *layout.strides(dout), *layout.strides(dk),
        *layout.lse_strides(n_heads), args.stride_alibi_b,
        n_heads, n_heads // n_kv_heads, layout.max_seqlen_q, layout.max_seqlen_k, num_n_blocks,
        features.softmax_scale, **args.runtime, IS_VARLEN=layout.is_varlen, **args.flags,
        HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), KV_AS_B=cfg.kv_as_b, DO_LIKE_Q=dout.stride() == q.stride(),
        QDO_TMA=stream_by_tma(cfg, q, dout), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def launch_dq(dout, q, k, v, lse, delta, dq, features, layout):
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    n_kv_heads = k.shape[-2]
    block_d = padded_head_dim(head_dim)
    cfg = tile_config(q.device, q.dtype, block_d, "dq", features.masked,
                      long_loop=layout.max_seqlen_k >= configs.TMA_MIN_SEQLEN)
    num_m_blocks = cdiv(layout.max_seqlen_q, cfg.block_m)
    args = feature_args(features, q)
    _dq_launch[(num_m_blocks * layout.batch * n_heads,)](
        q, k, v, dout, lse, delta, dq, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.seq_order, args.alibi,
        *layout.strides(q), *layout.strides(k), *layout.strides(dout), *layout.strides(dq),
        *layout.lse_strides(n_heads), args.stride_alibi_b,
        n_heads, n_heads // n_kv_heads, layout.max_seqlen_q, layout.max_seqlen_k, num_m_blocks,
        features.softmax_scale, **args.runtime, IS_VARLEN=layout.is_varlen, **args.flags,
        HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), DO_LIKE_Q=dout.stride() == q.stride(),
        KV_TMA=stream_by_tma(cfg, k, v), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


@functools.lru_cache(maxsize=None)
def _gluon_backward():
    """``ops.bwd_hopper``, imported on first CUDA use, or None (``common.load_gluon_module``)."""
    return load_gluon_module("bwd_hopper")


def flash_bwd(dout, q, k, v, out, lse, features, varlen=None):
    """Launch the backward kernels; returns ``(dq, dk, dv)`` shaped like ``(q, k, v)``.

    ``out`` and ``lse`` are the forward's outputs; ``varlen`` as in ``flash_fwd``. Every
    tensor needs ``stride(-1) == 1``.
    """
    hopper = _gluon_backward() if q.is_cuda else None
    if hopper is not None and hopper.hopper_bwd_eligible(q, k, v, dout, features, varlen):
        with device_guard(q):
            return hopper.hopper_bwd(dout, q, k, v, out, lse, features)
    k, v = shared_strides(k, v)
    layout = sequence_layout(q, k, varlen)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0 or layout.batch == 0:
        # No queries or no keys: every gradient is an (possibly empty) zero.
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    with device_guard(q):
        if layout.is_varlen:
            launch_delta(out[None], dout[None], delta[None])
        else:
            launch_delta(out, dout, delta)
        launch_dkdv(dout, q, k, v, lse, delta, dk, dv, features, layout)
        launch_dq(dout, q, k, v, lse, delta, dq, features, layout)
    return dq, dk, dv
