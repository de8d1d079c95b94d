"""@triton.jit helpers that find a program's work (its Q tile for the forward and dQ, its
sequence) and load the K/V tiles those two kernels stream."""

import triton
import triton.language as tl


@triton.jit
def q_tile_program(num_m_blocks, n_heads, group_size, SEQ_ORDER, LONGEST_LAST: tl.constexpr,
                   IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Which Q tile this program owns: ``(pid_bh, pid_b, pid_h, pid_kv_h, start_m)``.

    Grid: ``(num_m_blocks * batch * n_heads,)`` -- one flat axis, so batch x heads is never
    limited by the 65535 cap of grid axes 1 and 2. Q tiles of one head are neighbours in
    launch order (their K/V stays in L2: measured, a tile-major order lost 20-30% under
    varlen). With LONGEST_LAST (causal: the last Q tiles see the most keys) the order within
    a head is reversed, so the longest tiles go first. Under varlen the batch entries run in
    ``SEQ_ORDER`` (longest sequence first), so a long sequence never starts last and leaves a
    tail of busy SMs while the rest idle.
    ``pid_b`` and ``pid_kv_h`` come back as int64 (they scale strides); the rest is int32.
    """
    pid = tl.program_id(0)
    pid_bh = pid // num_m_blocks
    pid_m = pid % num_m_blocks
    if LONGEST_LAST:
        pid_m = num_m_blocks - 1 - pid_m
    pid_h = pid_bh % n_heads
    pid_b = pid_bh // n_heads
    if IS_VARLEN:
        pid_b = tl.load(SEQ_ORDER + pid_b)
        pid_bh = pid_b * n_heads + pid_h
    pid_kv_h = (pid_h // group_size).to(tl.int64)
    return pid_bh, pid_b.to(tl.int64), pid_h, pid_kv_h, pid_m * BLOCK_M


@triton.jit
def sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, pid_b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """``(q_begin, k_begin, seqlen_q, seqlen_k)`` of batch entry ``pid_b``: under varlen read from
    ``cu_seqlens`` (begins int64, lengths int32), otherwise ``(0, 0, seqlen_q, seqlen_k)``."""
    if IS_VARLEN:
        q_begin = tl.load(CU_SEQLENS_Q + pid_b)
        k_begin = tl.load(CU_SEQLENS_K + pid_b)
        seqlen_q = tl.load(CU_SEQLENS_Q + pid_b + 1) - q_begin
        seqlen_k = tl.load(CU_SEQLENS_K + pid_b + 1) - k_begin
        return q_begin.to(tl.int64), k_begin.to(tl.int64), seqlen_q, seqlen_k
    else:
        return tl.full([], 0, tl.int64), tl.full([], 0, tl.int64), seqlen_q, seqlen_k


@triton.jit
def stream_sources(a_ptr, b_ptr, n_rows, stride_a, stride_b, TMA: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Where a loop reads the two tiles it streams (K/V, or Q/dO), given scalar pointers to row 0
    of this head: with TMA, tensor descriptors of the ``[n_rows, HEAD_DIM]`` rows (Hopper; the
    hardware zero-fills rows past ``n_rows``, so no mask is needed), else the pointers."""
    if TMA:
        a_src = tl.make_tensor_descriptor(a_ptr, shape=[n_rows, HEAD_DIM], strides=[stride_a, 1],
                                          block_shape=[BLOCK_ROWS, BLOCK_D])
        b_src = tl.make_tensor_descriptor(b_ptr, shape=[n_rows, HEAD_DIM], strides=[stride_b, 1],
                                          block_shape=[BLOCK_ROWS, BLOCK_D])
        return a_src, b_src
    else:
        return a_ptr, b_ptr


@triton.jit
def start_kv_stream(k_src, v_src, start_n, offs_n, offs_d, stride_ks, TMA: tl.constexpr):
    """``(k_src, v_src, kv_offs)`` for a loop of ``load_kv_tile`` from key ``start_n``: TMA
    descriptors pass through; scalar pointers to key 0 move to key ``start_n``.

    Scalar base pointers carried through the loop plus a loop-invariant int32 offset tile: a
    loop-carried 2-D tile of 64-bit pointers costs two registers per element. K and V share
    strides (the launchers guarantee it), so one offset tile serves both.
    """
    if not TMA:
        k_src += start_n.to(tl.int64) * stride_ks
        v_src += start_n.to(tl.int64) * stride_ks
    kv_offs = offs_n[:, None] * stride_ks + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    return k_src, v_src, kv_offs


@triton.jit
def load_kv_tile(k_src, v_src, kv_offs, tile_start, offs_key, mask_d, seqlen_k,
                 MASKED: tl.constexpr, TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The K and V tiles of keys ``tile_start + [0, BLOCK_N)`` for the forward and dQ loops.

    TMA: ``k_src``/``v_src`` are tensor descriptors of the head's ``[seqlen_k, HEAD_DIM]`` rows,
    which zero-fill keys past the end. Otherwise they are scalar pointers to key ``tile_start``
    and ``kv_offs`` the loop-invariant int32 offset tile: MASKED tiles (the sequence's tail among
    them) mask keys past ``seqlen_k`` to 0; unmasked ones mask only a padded head dim.
    """
    if TMA:
        k = k_src.load([tile_start, 0])
        v = v_src.load([tile_start, 0])
    elif MASKED:
        mask_kv = (offs_key[:, None] < seqlen_k) & mask_d[None, :]
        k = tl.load(k_src + kv_offs, mask=mask_kv, other=0.0)
        v = tl.load(v_src + kv_offs, mask=mask_kv, other=0.0)
    elif HEAD_DIM == BLOCK_D:
        k = tl.load(k_src + kv_offs)
        v = tl.load(v_src + kv_offs)
    else:
        k = tl.load(k_src + kv_offs, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_src + kv_offs, mask=mask_d[None, :], other=0.0)
    return k, v
