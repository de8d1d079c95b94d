"""Backward pass: P is recomputed tile by tile from the saved LSE; nothing N x N is stored.

Three launches, no atomics (so the result is bitwise reproducible, ``deterministic`` or not):

1. ``_delta_kernel``: ``delta_i = sum_d dO_id * O_id`` (the rowsum that softmax's Jacobian needs).
2. ``_dkdv_kernel``: one K/V tile per program; streams the Q/dO tiles that see it and
   accumulates ``dV += P^T dO`` and ``dK += dS^T Q`` in registers. Under GQA the program
   also loops over the query heads of its group, so dK/dV are summed without atomics.
3. ``_dq_kernel``: one Q tile per program; streams K/V and accumulates ``dQ += dS K``.

With ``S = scale * Q K^T``, ``P = exp(S - LSE)``, ``dP = dO V^T`` and ``dS = P * (dP - delta)``:
``dQ = scale * dS K`` and ``dK = scale * dS^T Q``.

Rows past ``seqlen_q`` load ``LSE = +inf`` so their recomputed P is exactly 0; fully masked
rows carry ``LSE = +inf`` from the forward and get zero gradients the same way.
"""

import torch
import triton
import triton.language as tl

from flashtile.configs import tile_config
from flashtile.ops.common import LOG2E, device_guard, dot_precision, padded_head_dim, shared_strides
from flashtile.ops.tiles import q_tile_program, visible_key_range


@triton.jit(do_not_specialize=["seqlen_q", "num_m_blocks"])
def _delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    n_heads, seqlen_q, num_m_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
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


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v,
    q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qs, stride_dos,
    offs_m, offs_n, offs_d,
    start_m, end_m, seqlen_q, diag_offset, qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_AS_B: tl.constexpr, DO_LIKE_Q: tl.constexpr,
):
    """Fold the Q/dO tiles ``[start_m, end_m)`` into the K/V tile's ``(dk, dv)``.

    ``q_ptrs``/``do_ptrs`` are scalar pointers to row ``start_m``. ``MASKED`` tiles straddle the causal
    diagonal and apply it.
    """
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
        q = tl.load(q_ptrs + q_offs, mask=mask_q, other=0.0)  # [BLOCK_M, BLOCK_D]
        do = tl.load(do_ptrs + do_offs, mask=mask_q, other=0.0)  # [BLOCK_M, BLOCK_D]
        lse2 = tl.load(lse_ptr + offs_row, mask=mask_row, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + offs_row, mask=mask_row, other=0.0)  # [BLOCK_M]

        if KV_AS_B:
            # Computes P (not P^T): K and V become B operands and stay in shared memory, at the
            # price of transposing P and dS for the dV and dK products.
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])  # [BLOCK_M, BLOCK_N]
            if MASKED and IS_CAUSAL:
                p = tl.where(offs_n[None, :] <= offs_row[:, None] + diag_offset, p, 0.0)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N]
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
        else:
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
            p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])  # [BLOCK_N, BLOCK_M]
            if MASKED and IS_CAUSAL:
                p_t = tl.where(offs_n[:, None] <= offs_row[None, :] + diag_offset, p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
            ds_t = p_t * (dp_t - delta[None, :])  # [BLOCK_N, BLOCK_M]
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "num_n_blocks"])
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,  # shared by V
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,  # shared by DV
    n_heads, group_size, seqlen_q, seqlen_k, num_n_blocks, qk_scale, softmax_scale,
    IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_AS_B: tl.constexpr, DO_LIKE_Q: tl.constexpr,
):
    # Grid: (num_n_blocks * batch * n_kv_heads,). Index math int32, pointer offsets int64.
    if DO_LIKE_Q:  # the usual case (the launcher checks): address dO with Q's strides
        stride_dob, stride_dos, stride_doh = stride_qb, stride_qs, stride_qh
    pid = tl.program_id(0)
    n_kv_heads = n_heads // group_size
    pid_bkv = pid // num_n_blocks
    pid_n = pid % num_n_blocks
    pid_b = pid_bkv // n_kv_heads
    pid_kv_h = pid_bkv % n_kv_heads
    start_n = pid_n * BLOCK_N

    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_kv = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    keys = offs_n.to(tl.int64)[:, None]
    k_ptrs = K + pid_b.to(tl.int64) * stride_kb + pid_kv_h.to(tl.int64) * stride_kh + keys * stride_ks + offs_d[None, :]
    v_ptrs = V + pid_b.to(tl.int64) * stride_kb + pid_kv_h.to(tl.int64) * stride_kh + keys * stride_ks + offs_d[None, :]
    k = tl.load(k_ptrs, mask=mask_kv, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_ptrs, mask=mask_kv, other=0.0)  # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query i sees key j iff j <= i + diag_offset (causal). Rows before begin_m see no key
    # of this tile; rows from begin_full on see all of them.
    diag_offset = seqlen_k - seqlen_q
    if IS_CAUSAL:
        begin_m = tl.maximum(start_n - diag_offset, 0) // BLOCK_M * BLOCK_M
        begin_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag_offset, 0), BLOCK_M) * BLOCK_M
        begin_full = tl.minimum(tl.maximum(begin_full, begin_m), seqlen_q)

    for g in range(group_size):
        pid_h = (pid_kv_h * group_size + g).to(tl.int64)
        q_ptrs = Q + pid_b.to(tl.int64) * stride_qb + pid_h * stride_qh  # scalar: row 0 of this head
        do_ptrs = DO + pid_b.to(tl.int64) * stride_dob + pid_h * stride_doh
        row_base = (pid_b.to(tl.int64) * n_heads + pid_h) * seqlen_q
        if IS_CAUSAL:
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, q_ptrs + begin_m.to(tl.int64) * stride_qs, do_ptrs + begin_m.to(tl.int64) * stride_dos,
                LSE + row_base, DELTA + row_base, stride_qs, stride_dos,
                offs_m, offs_n, offs_d, begin_m, begin_full, seqlen_q, diag_offset, qk_scale,
                True, IS_CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_D, DOT_PRECISION, KV_AS_B, DO_LIKE_Q,
            )
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, q_ptrs + begin_full.to(tl.int64) * stride_qs,
                do_ptrs + begin_full.to(tl.int64) * stride_dos,
                LSE + row_base, DELTA + row_base, stride_qs, stride_dos,
                offs_m, offs_n, offs_d, begin_full, seqlen_q, seqlen_q, diag_offset, qk_scale,
                False, IS_CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_D, DOT_PRECISION, KV_AS_B, DO_LIKE_Q,
            )
        else:
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, q_ptrs, do_ptrs, LSE + row_base, DELTA + row_base, stride_qs, stride_dos,
                offs_m, offs_n, offs_d, 0, seqlen_q, seqlen_q, diag_offset, qk_scale,
                False, IS_CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_D, DOT_PRECISION, KV_AS_B, DO_LIKE_Q,
            )

    dk = dk * softmax_scale
    dk_ptrs = (DK + pid_b.to(tl.int64) * stride_dkb + pid_kv_h.to(tl.int64) * stride_dkh
               + keys * stride_dks + offs_d[None, :])
    dv_ptrs = (DV + pid_b.to(tl.int64) * stride_dkb + pid_kv_h.to(tl.int64) * stride_dkh
               + keys * stride_dks + offs_d[None, :])
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask_kv)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask_kv)


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta,
    k_ptrs, v_ptrs, stride_ks,
    offs_m, offs_n, offs_d,
    start_n, end_n, seqlen_k, diag_offset, qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold the K/V tiles ``[start_n, end_n)`` into the Q tile's ``dq``.

    ``MASKED`` tiles apply the causal and ``seqlen_k`` masks. The ``seqlen_k`` mask matters
    here: a key past the end loads as 0, so its score is 0 and ``exp(0 - LSE)`` can overflow.
    ``k_ptrs``/``v_ptrs`` are scalar pointers to key ``start_n``.
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
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])  # [BLOCK_M, BLOCK_N]
        if MASKED:
            visible = offs_key[None, :] < seqlen_k
            if IS_CAUSAL:
                visible = visible & (offs_key[None, :] <= offs_m[:, None] + diag_offset)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N]
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_ks
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "num_m_blocks"])
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,  # shared by V
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    n_heads, group_size, seqlen_q, seqlen_k, num_m_blocks, qk_scale, softmax_scale,
    IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DO_LIKE_Q: tl.constexpr,
):
    # Grid: (num_m_blocks * batch * n_heads,), order as in q_tile_program.
    # Index math int32, pointer offsets int64.
    if DO_LIKE_Q:  # the usual case (the launcher checks): address dO with Q's strides
        stride_dob, stride_dos, stride_doh = stride_qb, stride_qs, stride_qh
    pid_bh, pid_b, pid_h, pid_kv_h, start_m = q_tile_program(num_m_blocks, n_heads, group_size, IS_CAUSAL, BLOCK_M)

    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_m = offs_m < seqlen_q
    mask_q = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m.to(tl.int64)[:, None]
    q_ptrs = Q + pid_b * stride_qb + pid_h.to(tl.int64) * stride_qh + rows * stride_qs + offs_d[None, :]
    do_ptrs = DO + pid_b * stride_dob + pid_h.to(tl.int64) * stride_doh + rows * stride_dos + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_q, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(do_ptrs, mask=mask_q, other=0.0)  # [BLOCK_M, BLOCK_D]
    row_base = pid_bh.to(tl.int64) * seqlen_q
    lse2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)  # [BLOCK_M]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_ptrs = K + pid_b * stride_kb + pid_kv_h * stride_kh  # scalar: key 0 of this head
    v_ptrs = V + pid_b * stride_kb + pid_kv_h * stride_kh  # V shares K's strides
    diag_offset = seqlen_k - seqlen_q
    end_full, end_visible = visible_key_range(start_m, seqlen_q, seqlen_k, IS_CAUSAL, BLOCK_M, BLOCK_N)

    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, offs_m, offs_n, offs_d,
        0, end_full, seqlen_k, diag_offset, qk_scale,
        False, IS_CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )
    skip = end_full.to(tl.int64)
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_ptrs + skip * stride_ks, v_ptrs + skip * stride_ks, stride_ks,
        offs_m, offs_n, offs_d, end_full, end_visible, seqlen_k, diag_offset, qk_scale,
        True, IS_CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )
    dq = dq * softmax_scale
    dq_ptrs = DQ + pid_b * stride_dqb + pid_h.to(tl.int64) * stride_dqh + rows * stride_dqs + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_q)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def launch_delta(out, dout, delta):
    """delta (B, H, Sq) float32 <- rowsum(dout * out)."""
    batch, seqlen_q, n_heads, head_dim = out.shape
    block_m = 64 if out.is_cuda else 16
    num_m_blocks = triton.cdiv(seqlen_q, block_m)
    _delta_kernel[(num_m_blocks * batch * n_heads,)](
        out, dout, delta, *_strides(out), *_strides(dout), n_heads, seqlen_q, num_m_blocks,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=padded_head_dim(head_dim),
    )


def launch_dkdv(dout, q, k, v, lse, delta, dk, dv, softmax_scale, causal):
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    block_d = padded_head_dim(head_dim)
    cfg = tile_config(q.device, q.dtype, block_d, "dkdv", causal)
    num_n_blocks = triton.cdiv(seqlen_k, cfg.block_n)
    _dkdv_kernel[(num_n_blocks * batch * n_kv_heads,)](
        q, k, v, dout, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(dout), *_strides(dk),
        n_heads, n_heads // n_kv_heads, seqlen_q, seqlen_k, num_n_blocks, softmax_scale * LOG2E, softmax_scale,
        IS_CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), KV_AS_B=cfg.kv_as_b, DO_LIKE_Q=dout.stride() == q.stride(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def launch_dq(dout, q, k, v, lse, delta, dq, softmax_scale, causal):
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    block_d = padded_head_dim(head_dim)
    cfg = tile_config(q.device, q.dtype, block_d, "dq", causal)
    num_m_blocks = triton.cdiv(seqlen_q, cfg.block_m)
    _dq_kernel[(num_m_blocks * batch * n_heads,)](
        q, k, v, dout, lse, delta, dq, *_strides(q), *_strides(k), *_strides(dout), *_strides(dq),
        n_heads, n_heads // n_kv_heads, seqlen_q, seqlen_k, num_m_blocks, softmax_scale * LOG2E, softmax_scale,
        IS_CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), DO_LIKE_Q=dout.stride() == q.stride(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def flash_bwd(dout, q, k, v, out, lse, softmax_scale, causal):
    """Launch the backward kernels; returns ``(dq, dk, dv)`` shaped like ``(q, k, v)``.

    ``out`` and ``lse`` are the forward's outputs; every tensor needs ``stride(-1) == 1``.
    """
    k, v = shared_strides(k, v)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        # No queries or no keys: every gradient is an (possibly empty) zero.
        return dq.zero_(), dk.zero_(), dv.zero_()
    batch, seqlen_q, n_heads, _ = q.shape
    delta = torch.empty((batch, n_heads, seqlen_q), dtype=torch.float32, device=q.device)
    with device_guard(q):
        launch_delta(out, dout, delta)
        launch_dkdv(dout, q, k, v, lse, delta, dk, dv, softmax_scale, causal)
        launch_dq(dout, q, k, v, lse, delta, dq, softmax_scale, causal)
    return dq, dk, dv
