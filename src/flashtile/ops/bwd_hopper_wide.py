"""Hopper backward in Gluon for head dim 256: dK, dV and dQ in one pass, the two consumer
warpgroups split by role.

``bwd_hopper``'s kernel gives each consumer warpgroup 64 keys and their whole dK and dV rows: at
head dim 256 that is 2 x 128 float32 accumulator registers per thread, more than a thread has.
Here one program owns 64 keys; one warpgroup holds their dV (128 registers), the other their dK,
and each Q/dO tile's five products are split between them with P and dS exchanged through
shared memory::

    S side (warpgroup 0)                        dP side (warpgroup 1)
    S = Q K^T                                   dP = dO V^T
    P = exp2(S * scale2 - LSE2)  --- P --->     dS = P * (dP - delta)
    dV += P^T dO                 <--- dS ---    dK += dS^T Q
    dQ[:, :D/2] = dS K[:, :D/2]                 dQ[:, D/2:] = dS K[:, D/2:]

Each warpgroup issues two and a half products per tile (the whole program five, the backward's
minimum); the kernel this replaced had both warpgroups compute the whole S and dP (seven). The
dQ halves go to the float32 ``dQ_acc`` by TMA reductions, 32 columns at a time, from an 8 KB
staging tile per warpgroup. With softcap the S side also sends ``F = P (1 - tanh^2)`` (in the dS
buffer, which the dP side then overwrites with dS), so the dP side computes ``dS = F (dP -
delta)``; without softcap it reads P. Either way dS is computed from P rounded to the input dtype
(the exchange), where a one-warpgroup kernel would use the float32 P: the gradients stay within
the tolerance rule (GPU tests), within 3-9e-3 of their largest entry of the ``tl`` kernels' (bf16's
half-ulp is 2e-3; the old kernel: 0.2-5e-3).

Unlike ``bwd_hopper``, neither side issues its next tile's product before the dQ reductions:
that measured 3-12% slower here (docs/performance.md, step 16).

Four mbarriers order the exchange, one completion per tile each (phase = tile parity):
``p_full`` (P and F stored), ``ds_full`` (dS stored), ``p_free`` (the dP side has read P, and
with softcap its dK product has read the dS buffer), ``ds_done`` (the S side has read dS). A
fifth, ``kv_done``, tells the sides that both have finished with K and V: without a mask dV then
leaves by a TMA store staged in V's tile, dK in K's (``_store_dkdv``).

Shared memory (224 KB of the 227 available): K and V (32 KB each), two Q/dO ring slots (64 KB
each), P and dS (8 KB each), the two staging tiles. Launched by ``bwd_hopper.hopper_bwd`` (same
arguments, same dQ buffer and head chunks)."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

from flashtile.ops.fwd_hopper import tanh_approx
from flashtile.ops.bwd_hopper import (
    CONSUMER_REGS, LOG2E, SLOTS, BackwardKernel, _key_tile, _mask_window, _produce_q_do, _row_vector, _start,
    _tma_reduce_add,
)
from flashtile.ops.launch import FastLaunch

BLOCK_N = 64  # keys per program


@gluon.constexpr_function
def _mma_layout(columns):
    """The accumulator layout of one warpgroup's MMA with ``columns`` columns."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, columns, 16])


@gluon.constexpr_function
def _dq_width(D, masked):
    """Columns per dQ product (``_dq_half``): 32 in masked kernels, else D / 4."""
    return 32 if masked else D // 4


@gluon.jit
def _dq_half(ds_a, k_s, staging, dq_desc, row, col, softmax_scale, C: gl.constexpr, WIDTH: gl.constexpr):
    """``dQ_acc[row:, col:] += scale * dS K[:, C D/2 + [0, D/2)]`` from dS in registers (the
    MMA's A operand), as products of WIDTH columns, each reduced in 32-column pieces through
    ``staging`` (its previous reduction waited for first). At most two products are in flight:
    the next runs while this one is reduced. WIDTH 64 holds 64 accumulator registers per thread,
    32 holds 32. Chosen by measurement (docs/performance.md, step 21): the masked kernels' loops
    held 34-51 spill stores with 64 and 7-16 with 32 (bench/ptxas_report.py) and ran 12-15%
    faster with 32; the unmasked kernel's loop went from 23 spill stores to 3 but ran 2-12%
    slower."""
    BLOCK_M: gl.constexpr = staging.shape[0]
    PIECE: gl.constexpr = staging.shape[1]
    D: gl.constexpr = k_s.shape[1]
    PRODUCTS: gl.constexpr = D // 2 // WIDTH
    zero = gl.zeros([BLOCK_M, WIDTH], gl.float32, layout=_mma_layout(WIDTH))
    tok = warpgroup_mma(ds_a, k_s.slice(C * (D // 2), WIDTH, dim=1), zero, use_acc=False, is_async=True)
    for i in gl.static_range(PRODUCTS):
        if i + 1 < PRODUCTS:
            next_tok = warpgroup_mma(ds_a, k_s.slice(C * (D // 2) + (i + 1) * WIDTH, WIDTH, dim=1), zero,
                                     use_acc=False, is_async=True)
            dq = warpgroup_mma_wait(1, deps=[tok])
            tok = next_tok
        else:
            dq = warpgroup_mma_wait(0, deps=[tok])
        lo = dq * softmax_scale
        hi = lo
        if WIDTH != PIECE:  # 64 columns as two 32-column halves (register-local: the high column
            # bit is a register index of the MMA layout)
            lo, hi = gl.split(gl.permute(gl.reshape(lo, [BLOCK_M, 2, PIECE]), (0, 2, 1)))
        for j in gl.static_range(WIDTH // PIECE):
            tma.store_wait(0)
            staging.store(lo if j == 0 else hi)
            fence_async_shared()
            _tma_reduce_add(dq_desc, [row, col + i * WIDTH + j * PIECE], staging)


@gluon.jit
def _s_side(q_ring, do_ring, k_s, v_s, p_s, ds_s, staging, ready, empty, p_full, p_free, ds_full, ds_done, kv_bar,
            kv_done, lse_ptr, dq_desc, dv_out, b, kv_h, dq_h0, n0, key_pos0, left_pos0, m_begin, n_m, group_size,
            n_heads, seqlen_q, seqlen_k, qk_scale, softcap_in, softmax_scale, D: gl.constexpr, BOUND_LEFT: gl.constexpr,
            BOUND_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr, DQ_WIDTH: gl.constexpr):
    """Warpgroup 0: S and P, dV for the program's keys, dQ's first D/2 columns."""
    BLOCK_M: gl.constexpr = q_ring.shape[1]
    N: gl.constexpr = k_s.shape[0]
    mn_layout: gl.constexpr = _mma_layout(N)  # S, dP: [BLOCK_M rows, N keys]
    kd_layout: gl.constexpr = _mma_layout(D)  # dV, dK: [N keys, D]
    ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=_mma_layout(D // 4), k_width=2)
    dv = gl.zeros([N, D], gl.float32, layout=kd_layout)
    h0 = kv_h * group_size
    total = group_size * n_m
    mbarrier.wait(kv_bar, 0)
    for t in range(total):
        slot = t % SLOTS
        phase = t & 1
        q_s = q_ring.index(slot)
        m0 = m_begin + (t % n_m) * BLOCK_M
        lse2 = _row_vector(lse_ptr, t, total, b, h0, n_heads, seqlen_q, m_begin, n_m, BLOCK_M, BLOCK_M,
                           gl.SliceLayout(1, mn_layout)) * LOG2E
        mbarrier.wait(ready.index(slot), (t // SLOTS) & 1)
        s_tok = warpgroup_mma(q_s, k_s.permute((1, 0)), gl.zeros([BLOCK_M, N], gl.float32, layout=mn_layout),
                              use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s_tok])
        if SOFTCAP:  # scores cap * tanh(S * scale / cap): dS picks up the derivative 1 - tanh^2
            s = tanh_approx(s * softcap_in)
        p = gl.exp2(s * qk_scale - lse2[:, None])
        if BOUND_LEFT or BOUND_RIGHT:
            p = _mask_window(p, m0, key_pos0, left_pos0, BOUND_LEFT, BOUND_RIGHT)
        mbarrier.wait(p_free, phase ^ 1, pred=t > 0)  # the dP side is done with the last tile's P (and F)
        p_s.store(p.to(q_s.dtype))
        if SOFTCAP:
            ds_s.store((p * (1.0 - s * s)).to(q_s.dtype))
        fence_async_shared()
        mbarrier.arrive(p_full, count=1)
        dv_tok = warpgroup_mma(p_s.permute((1, 0)), do_ring.index(slot), dv, is_async=True)
        mbarrier.wait(ds_full, phase)
        ds_a = ds_s.load(ds_layout)
        mbarrier.arrive(ds_done, count=1)
        _dq_half(ds_a, k_s, staging, dq_desc, b * seqlen_q + m0, (dq_h0 + t // n_m) * D, softmax_scale, 0, DQ_WIDTH)
        dv = warpgroup_mma_wait(0, deps=[dv_tok])
        mbarrier.arrive(empty.index(slot), count=1)
    tma.store_wait(0)  # the last reductions have read shared memory before the program ends
    _store_dkdv(dv_out, dv, v_s, kv_done, b, kv_h, n0, group_size, n_heads, seqlen_k, BOUND_LEFT or BOUND_RIGHT)


@gluon.jit
def _dp_side(q_ring, do_ring, k_s, v_s, p_s, ds_s, staging, ready, empty, p_full, p_free, ds_full, ds_done, kv_bar,
             kv_done, delta_ptr, dq_desc, dk_out, b, kv_h, dq_h0, n0, m_begin, n_m, group_size, n_heads, seqlen_q,
             seqlen_k, softmax_scale, D: gl.constexpr, SOFTCAP: gl.constexpr, DQ_WIDTH: gl.constexpr,
             MASKED: gl.constexpr):
    """Warpgroup 1: dP and dS, dK for the program's keys, dQ's last D/2 columns."""
    BLOCK_M: gl.constexpr = q_ring.shape[1]
    N: gl.constexpr = k_s.shape[0]
    mn_layout: gl.constexpr = _mma_layout(N)  # S, dP: [BLOCK_M rows, N keys]
    kd_layout: gl.constexpr = _mma_layout(D)  # dV, dK: [N keys, D]
    ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=_mma_layout(D // 4), k_width=2)
    dk = gl.zeros([N, D], gl.float32, layout=kd_layout)
    h0 = kv_h * group_size
    total = group_size * n_m
    mbarrier.wait(kv_bar, 0)
    for t in range(total):
        slot = t % SLOTS
        phase = t & 1
        q_s = q_ring.index(slot)
        m0 = m_begin + (t % n_m) * BLOCK_M
        delta = _row_vector(delta_ptr, t, total, b, h0, n_heads, seqlen_q, m_begin, n_m, BLOCK_M, BLOCK_M,
                            gl.SliceLayout(1, mn_layout))
        mbarrier.wait(ready.index(slot), (t // SLOTS) & 1)
        dp_tok = warpgroup_mma(do_ring.index(slot), v_s.permute((1, 0)),
                               gl.zeros([BLOCK_M, N], gl.float32, layout=mn_layout), use_acc=False, is_async=True)
        mbarrier.wait(p_full, phase)
        if SOFTCAP:
            f = ds_s.load(mn_layout).to(gl.float32)  # P (1 - tanh^2)
        else:
            f = p_s.load(mn_layout).to(gl.float32)
            mbarrier.arrive(p_free, count=1)
        dp = warpgroup_mma_wait(0, deps=[dp_tok])
        ds = (f * (dp - delta[:, None])).to(q_s.dtype)
        mbarrier.wait(ds_done, phase ^ 1, pred=t > 0)  # the S side has read the last tile's dS
        ds_s.store(ds)
        fence_async_shared()
        mbarrier.arrive(ds_full, count=1)
        dk_tok = warpgroup_mma(ds_s.permute((1, 0)), q_s, dk, is_async=True)
        _dq_half(gl.convert_layout(ds, ds_layout), k_s, staging, dq_desc, b * seqlen_q + m0,
                 (dq_h0 + t // n_m) * D + D // 2, softmax_scale, 1, DQ_WIDTH)
        dk = warpgroup_mma_wait(0, deps=[dk_tok])
        if SOFTCAP:  # the dS buffer is free for the next tile's F only now
            mbarrier.arrive(p_free, count=1)
        mbarrier.arrive(empty.index(slot), count=1)
    tma.store_wait(0)
    _store_dkdv(dk_out, dk * softmax_scale, k_s, kv_done, b, kv_h, n0, group_size, n_heads, seqlen_k, MASKED)


@gluon.jit
def _store_dkdv(out, acc, tile, kv_done, b, kv_h, n0, group_size, n_heads, seqlen_k, MASKED: gl.constexpr):
    """The program's keys' rows of dK or dV from a float32 accumulator. Without a mask by a TMA
    store (``out`` a descriptor) staged in ``tile``, K's or V's, once both sides have passed
    ``kv_done`` and so are done with K and V: whole 128-byte lines, where the accumulator's layout
    writes 4 bytes per thread and row piece (1.4-2.5% faster at 2048-8192 tokens). Masked kernels
    store from the accumulator (``out`` a pointer to the (B, Sk, Hk, D) tensor): with the TMA
    store their loop spilled more (7 -> 12 spill stores) and ran 2-4% slower at 8192-16384 tokens
    (docs/performance.md, step 25)."""
    N: gl.constexpr = acc.shape[0]
    D: gl.constexpr = acc.shape[1]
    if MASKED:
        layout: gl.constexpr = acc.type.layout
        n_kv_heads = n_heads // group_size
        keys = (b * seqlen_k + n0 + gl.arange(0, N, layout=gl.SliceLayout(1, layout))).to(gl.int64)
        dims = kv_h * D + gl.arange(0, D, layout=gl.SliceLayout(0, layout))
        gl.store(out + keys[:, None] * (n_kv_heads * D) + dims[None, :], acc.to(out.dtype.element_ty))
    else:
        mbarrier.arrive(kv_done, count=1)
        mbarrier.wait(kv_done, 0)
        tile.store(acc.to(tile.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out, [b * seqlen_k + n0, kv_h * D], tile)
        tma.store_wait(0)  # the store has read shared memory before the program ends


@gluon.jit
def _wide_bwd_kernel(q_desc, do_desc, k_desc, v_desc, lse_ptr, delta_ptr, dq_desc, dk_out, dv_out,
                     seqlen_q, seqlen_k, n_heads, group_size, kv_head0, chunk_kv_heads, num_n_blocks,
                     head_group, tail_group, qk_scale, softcap_in, softmax_scale, window_left, window_right,
                     D: gl.constexpr, BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr):
    # Grid and views as bwd_hopper._hopper_bwd_kernel's, with 64-key programs.
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    N: gl.constexpr = k_desc.block_type.shape[0]
    b, kv_h, n0, key_pos0, left_pos0, m_begin, n_m = _key_tile(
        seqlen_q, seqlen_k, window_left, window_right, kv_head0, chunk_kv_heads, num_n_blocks, head_group, tail_group,
        BLOCK_M, N, BOUND_LEFT, BOUND_RIGHT)

    k_s = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    v_s = gl.allocate_shared_memory(v_desc.dtype, v_desc.block_type.shape, v_desc.layout)
    q_ring = gl.allocate_shared_memory(q_desc.dtype, [SLOTS] + q_desc.block_type.shape, q_desc.layout)
    do_ring = gl.allocate_shared_memory(do_desc.dtype, [SLOTS] + do_desc.block_type.shape, do_desc.layout)
    pds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, N], q_desc.dtype)
    p_s = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, N], pds_layout)
    ds_s = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, N], pds_layout)
    staging = gl.allocate_shared_memory(gl.float32, [2] + dq_desc.block_type.shape, dq_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    exchange = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())  # p_full ds_full p_free ds_done
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(4):
        mbarrier.init(exchange.index(i), count=1)
    mbarrier.init(kv_done, count=2)  # both sides' last products have run
    _start(k_desc, v_desc, k_s, v_s, ready, empty, kv_bar, b * seqlen_k + n0, kv_h * D)

    MASKED: gl.constexpr = BOUND_LEFT or BOUND_RIGHT
    DQ_WIDTH: gl.constexpr = _dq_width(D, MASKED)
    p_full, ds_full, p_free, ds_done = exchange.index(0), exchange.index(1), exchange.index(2), exchange.index(3)
    h0 = kv_h * group_size
    dq_h0 = (kv_h - kv_head0) * group_size
    gl.warp_specialize([
        (_s_side, (q_ring, do_ring, k_s, v_s, p_s, ds_s, staging.index(0), ready, empty, p_full, p_free, ds_full,
                   ds_done, kv_bar, kv_done, lse_ptr, dq_desc, dv_out, b, kv_h, dq_h0, n0, key_pos0, left_pos0,
                   m_begin, n_m, group_size, n_heads, seqlen_q, seqlen_k, qk_scale, softcap_in, softmax_scale, D,
                   BOUND_LEFT, BOUND_RIGHT, SOFTCAP, DQ_WIDTH)),
        (_dp_side, (q_ring, do_ring, k_s, v_s, p_s, ds_s, staging.index(1), ready, empty, p_full, p_free, ds_full,
                    ds_done, kv_bar, kv_done, delta_ptr, dq_desc, dk_out, b, kv_h, dq_h0, n0, m_begin, n_m, group_size,
                    n_heads, seqlen_q, seqlen_k, softmax_scale, D, SOFTCAP, DQ_WIDTH, MASKED)),
        (_produce_q_do, (q_desc, do_desc, q_ring, do_ring, ready, empty, b * seqlen_q, m_begin, n_m,
                         group_size * n_m, h0, BLOCK_M)),  # Q tiles in order
    ], [4, 1], [CONSUMER_REGS, 24])


WIDE_BWD = BackwardKernel(_wide_bwd_kernel, FastLaunch(_wide_bwd_kernel), BLOCK_N, masked_tma_store=False,
                          can_cast_dq=False)
