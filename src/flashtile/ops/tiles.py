"""@triton.jit helpers that find a program's work: its Q tile (forward, dQ) and its sequence."""

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
