"""@triton.jit helpers shared by the kernels that own one Q tile per program (forward, dQ)."""

import triton
import triton.language as tl


@triton.jit
def q_tile_program(num_m_blocks, n_heads, group_size, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Which Q tile this program owns: ``(pid_bh, pid_b, pid_h, pid_kv_h, start_m)``.

    Grid: ``(num_m_blocks * batch * n_heads,)`` -- one flat axis, so batch x heads is never
    limited by the 65535 cap of grid axes 1 and 2. Q tiles of one head are neighbours in
    launch order (their K/V stays in L2); under causal masking the longest tiles go first.
    ``pid_b`` and ``pid_kv_h`` come back as int64 (they scale strides); the rest is int32.
    """
    pid = tl.program_id(0)
    pid_bh = pid // num_m_blocks
    pid_m = pid % num_m_blocks
    if IS_CAUSAL:
        pid_m = num_m_blocks - 1 - pid_m
    pid_h = pid_bh % n_heads
    pid_b = (pid_bh // n_heads).to(tl.int64)
    pid_kv_h = (pid_h // group_size).to(tl.int64)
    return pid_bh, pid_b, pid_h, pid_kv_h, pid_m * BLOCK_M


@triton.jit
def visible_key_range(start_m, seqlen_q, seqlen_k, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Keys the Q tile at ``start_m`` needs: ``(end_full, end_visible)``.

    Tiles of keys ``[0, end_full)`` are seen in full by every row of the tile (no mask
    arithmetic); ``[end_full, end_visible)`` straddle the causal diagonal or ``seqlen_k`` and
    are masked; keys from ``end_visible`` on are never loaded. Causal is bottom-right aligned:
    query i sees key j iff ``j <= i + seqlen_k - seqlen_q``.
    """
    diag_offset = seqlen_k - seqlen_q
    if IS_CAUSAL:
        end_visible = tl.minimum(seqlen_k, start_m + BLOCK_M + diag_offset)
        end_full = tl.minimum(seqlen_k, start_m + diag_offset + 1)
    else:
        end_visible = seqlen_k
        end_full = seqlen_k
    end_full = tl.maximum(end_full, 0) // BLOCK_N * BLOCK_N
    return end_full, tl.maximum(end_visible, 0)
