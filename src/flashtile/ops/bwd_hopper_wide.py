"""Hopper backward in Gluon for head dim 256: dK, dV and dQ in one pass, the head dim split
between the two consumer warpgroups.

``bwd_hopper``'s kernel gives each consumer warpgroup 64 keys and their whole dK and dV rows: at
head dim 256 that is 2 x 128 float32 accumulator registers per thread, more than a thread has.
Here one program owns 64 keys and consumer warpgroup c owns columns ``c D/2 + [0, D/2)`` of
their dK and dV (64 + 64 registers). Both warpgroups compute the tile's whole ``S = Q K^T`` and
``dP = dO V^T`` (64 rows x 64 keys, the sums over all of D), so each tile costs 7 matrix
products' worth of work instead of 5, like the ``tl`` backward, but nothing crosses between the
warpgroups but the Q/dO ring::

    S = Q K^T, dP = dO V^T                          (both warpgroups, asynchronous)
    P = exp2(S * scale2 - LSE2), dS = P * (dP - delta)
    dV[:, half] += P^T dO[:, half], dK[:, half] += dS^T Q[:, half]
    dQ[:, half] = dS K[:, half]                     (two 64-column products, each summed into
                                                    dQ_acc by TMA reductions)

(with softcap, S is ``tanh(S * scale / cap)`` before the exponential and dS carries the factor
``1 - tanh^2``, as in ``bwd_hopper``).

Shared memory (224 KB of the 227 available): K and V (32 KB each), two Q/dO ring slots (64 KB
each), and per warpgroup 16 KB that holds P and dS and then, once the tile's products have read
them, the float32 dQ columns on their way to the TMA reduction. Launched by
``bwd_hopper.hopper_bwd`` (same arguments, same dQ buffer and head chunks)."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

from flashtile.ops.fwd_hopper import tanh_approx
from flashtile.ops.bwd_hopper import (
    CONSUMER_REGS, SLOTS, _key_tile, _mask_window, _produce_q_do, _reduce_dq, _row_stats, _scores, _start,
)

BLOCK_N = 64  # keys per program


@gluon.jit
def _fold_q_tile(C: gl.constexpr, t, total, q_ring, do_ring, k_s, v_s, pds, ready, empty, dk, dv,
                 lse_ptr, delta_ptr, dq_desc, dq_h0, b, h0, n_heads, seqlen_q, m_begin, n_m, key_pos0, left_pos0,
                 qk_scale, softcap_in, softmax_scale, BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr,
                 SOFTCAP: gl.constexpr):
    """Consumer C's share of Q/dO tile t: columns ``C D/2 + [0, D/2)`` of the keys' ``(dk, dv)``
    and of the tile's dQ. The bounds as in ``bwd_hopper._mask_window``."""
    BLOCK_M: gl.constexpr = q_ring.shape[1]
    D: gl.constexpr = q_ring.shape[2]
    HALF_D: gl.constexpr = D // 2
    QUARTER: gl.constexpr = D // 4
    N: gl.constexpr = k_s.shape[0]
    mn_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, N, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, mn_layout)
    slot = t % SLOTS
    q_s = q_ring.index(slot)
    do_s = do_ring.index(slot)
    m0 = m_begin + (t % n_m) * BLOCK_M
    lse2, delta = _row_stats(t, total, lse_ptr, delta_ptr, b, h0, n_heads, seqlen_q, m_begin, n_m, BLOCK_M,
                             row_layout)
    s_tok = _scores(t, total, q_ring, k_s, ready, mn_layout)  # waits for the slot
    dp_tok = warpgroup_mma(do_s, v_s.permute((1, 0)), gl.zeros([BLOCK_M, N], gl.float32, layout=mn_layout),
                           use_acc=False, is_async=True)
    s = warpgroup_mma_wait(1, deps=[s_tok])  # dP may still run
    if SOFTCAP:  # scores cap * tanh(S * scale / cap): dS picks up the derivative 1 - tanh^2
        s = tanh_approx(s * softcap_in)
    p = gl.exp2(s * qk_scale - lse2[:, None])
    if BOUND_LEFT or BOUND_RIGHT:
        p = _mask_window(p, m0, key_pos0, left_pos0, BOUND_LEFT, BOUND_RIGHT)
    p_s = pds.index(0)
    ds_s = pds.index(1)
    tma.store_wait(0)  # the last tile's dQ reductions have read this memory (it held their columns)
    p_s.store(p.to(q_s.dtype))
    fence_async_shared()
    dv_tok = warpgroup_mma(p_s.permute((1, 0)), do_s.slice(C * HALF_D, HALF_D, dim=1), dv, is_async=True)
    dp = warpgroup_mma_wait(1, deps=[dp_tok])  # dV's product may still run
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - s * s)
    ds = ds.to(q_s.dtype)
    ds_s.store(ds)
    fence_async_shared()
    dk_tok = warpgroup_mma(ds_s.permute((1, 0)), q_s.slice(C * HALF_D, HALF_D, dim=1), dk, is_async=True)
    zero = gl.zeros([BLOCK_M, QUARTER], gl.float32, layout=mn_layout)
    # dS from registers: the dQ products read only K from shared memory.
    ds_a = gl.convert_layout(ds, gl.DotOperandLayout(operand_index=0, parent=mn_layout, k_width=2))
    dqa_tok = warpgroup_mma(ds_a, k_s.slice(C * HALF_D, QUARTER, dim=1), zero, use_acc=False, is_async=True)
    dqb_tok = warpgroup_mma(ds_a, k_s.slice(C * HALF_D + QUARTER, QUARTER, dim=1), zero, use_acc=False,
                            is_async=True)
    dv, dk, dqa, dqb = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dqa_tok, dqb_tok])
    mbarrier.arrive(empty.index(slot), count=1)
    # P and dS are read: their 16 KB now carry dQ's float32 columns, 64 at a time.
    staging = pds._reinterpret(gl.float32, [BLOCK_M, QUARTER], dq_desc.layout)
    row = b * seqlen_q + m0
    col = (dq_h0 + t // n_m) * D + C * HALF_D
    _reduce_dq(dq_desc, dqa * softmax_scale, staging, row, col)
    tma.store_wait(0)
    _reduce_dq(dq_desc, dqb * softmax_scale, staging, row, col + QUARTER)
    return dk, dv


@gluon.jit
def _consume(C: gl.constexpr, q_ring, do_ring, k_s, v_s, pds, ready, empty, kv_bar, lse_ptr, delta_ptr, dq_desc,
             dk_ptr, dv_ptr, b, kv_h, dq_h0, n0, key_pos0, left_pos0, m_begin, n_m, group_size, n_heads, seqlen_q,
             seqlen_k, qk_scale, softcap_in, softmax_scale, D: gl.constexpr, BOUND_LEFT: gl.constexpr,
             BOUND_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr):
    """Consumer warpgroup C: columns ``C D/2 + [0, D/2)`` of dK and dV for keys ``n0 + [0, 64)``;
    ``pds``: its own P, dS and dQ staging memory."""
    HALF_D: gl.constexpr = D // 2
    N: gl.constexpr = k_s.shape[0]
    kd_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HALF_D, 16])
    dk = gl.zeros([N, HALF_D], gl.float32, layout=kd_layout)
    dv = gl.zeros([N, HALF_D], gl.float32, layout=kd_layout)
    h0 = kv_h * group_size
    total = group_size * n_m
    mbarrier.wait(kv_bar, 0)
    for t in range(total):
        dk, dv = _fold_q_tile(C, t, total, q_ring, do_ring, k_s, v_s, pds, ready, empty, dk, dv,
                              lse_ptr, delta_ptr, dq_desc, dq_h0, b, h0, n_heads, seqlen_q, m_begin, n_m, key_pos0,
                              left_pos0, qk_scale, softcap_in, softmax_scale, BOUND_LEFT, BOUND_RIGHT, SOFTCAP)
    tma.store_wait(0)  # the last reductions have read shared memory before the program ends

    n_kv_heads = n_heads // group_size
    keys = (b * seqlen_k + n0 + gl.arange(0, N, layout=gl.SliceLayout(1, kd_layout))).to(gl.int64)
    dims = kv_h * D + C * HALF_D + gl.arange(0, HALF_D, layout=gl.SliceLayout(0, kd_layout))
    offs = keys[:, None] * (n_kv_heads * D) + dims[None, :]
    gl.store(dk_ptr + offs, (dk * softmax_scale).to(dk_ptr.dtype.element_ty))
    gl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty))


@gluon.jit
def _wide_bwd_kernel(q_desc, do_desc, k_desc, v_desc, lse_ptr, delta_ptr, dq_desc, dk_ptr, dv_ptr,
                     seqlen_q, seqlen_k, n_heads, group_size, kv_head0, chunk_kv_heads, num_n_blocks,
                     head_group, qk_scale, softcap_in, softmax_scale, window_left, window_right, D: gl.constexpr,
                     BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr):
    # Grid and views as bwd_hopper._hopper_bwd_kernel's, with 64-key programs.
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    N: gl.constexpr = k_desc.block_type.shape[0]
    b, kv_h, n0, key_pos0, left_pos0, m_begin, n_m = _key_tile(
        seqlen_q, seqlen_k, window_left, window_right, kv_head0, chunk_kv_heads, num_n_blocks, head_group, BLOCK_M, N,
        BOUND_LEFT, BOUND_RIGHT)

    k_s = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    v_s = gl.allocate_shared_memory(v_desc.dtype, v_desc.block_type.shape, v_desc.layout)
    q_ring = gl.allocate_shared_memory(q_desc.dtype, [SLOTS] + q_desc.block_type.shape, q_desc.layout)
    do_ring = gl.allocate_shared_memory(do_desc.dtype, [SLOTS] + do_desc.block_type.shape, do_desc.layout)
    # Per consumer: P and dS ([BLOCK_M rows, N keys] each), then its float32 dQ columns.
    pds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, N], q_desc.dtype)
    pds0 = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_M, N], pds_layout)
    pds1 = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_M, N], pds_layout)
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    _start(k_desc, v_desc, k_s, v_s, ready, empty, kv_bar, b * seqlen_k + n0, kv_h * D)

    h0 = kv_h * group_size
    dq_h0 = (kv_h - kv_head0) * group_size
    gl.warp_specialize([
        (_consume, (0, q_ring, do_ring, k_s, v_s, pds0, ready, empty, kv_bar, lse_ptr, delta_ptr, dq_desc, dk_ptr,
                    dv_ptr, b, kv_h, dq_h0, n0, key_pos0, left_pos0, m_begin, n_m, group_size, n_heads, seqlen_q,
                    seqlen_k, qk_scale, softcap_in, softmax_scale, D, BOUND_LEFT, BOUND_RIGHT, SOFTCAP)),
        (_consume, (1, q_ring, do_ring, k_s, v_s, pds1, ready, empty, kv_bar, lse_ptr, delta_ptr, dq_desc, dk_ptr,
                    dv_ptr, b, kv_h, dq_h0, n0, key_pos0, left_pos0, m_begin, n_m, group_size, n_heads, seqlen_q,
                    seqlen_k, qk_scale, softcap_in, softmax_scale, D, BOUND_LEFT, BOUND_RIGHT, SOFTCAP)),
        (_produce_q_do, (q_desc, do_desc, q_ring, do_ring, ready, empty, b * seqlen_q, m_begin, n_m,
                         group_size * n_m, h0)),
    ], [4, 1], [CONSUMER_REGS, 24])
