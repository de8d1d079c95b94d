"""Hopper backward in Gluon (``triton.experimental.gluon``): dK, dV and dQ in one pass.

The ``tl`` backward (``bwd.py``) runs two kernels, dK/dV and dQ, so it computes ``S = Q K^T``
and ``dP = dO V^T`` twice: 7 matrix products per tile where the backward needs 5. This kernel
is FlashAttention-2/3's single pass (head dims 64 and 128; head dim 256 takes
``bwd_hopper_wide``'s kernel, launched from here). One program owns a 128-key K/V tile; three
partitions:

* a 1-warp producer streams the 64-row Q/dO tiles that see the K/V tile through a 2-slot TMA
  ring (``ready``/``empty`` mbarriers);
* two consumer warpgroups own 64 keys each (their dK and dV accumulators, D / 2 registers each
  per thread) and per Q tile compute, with rows on the MMA's M side::

      S = Q K^T, dP = dO V^T             (asynchronous warpgroup MMAs; the next tile's S is
                                          issued before this tile's dQ is added)
      P = exp2(S * scale2 - LSE2)        (masked on tiles the causal diagonal / a window edge cuts)
      dV += P^T dO, dK += dS^T Q         (P and dS through shared memory, read transposed)
      dS = P * (dP - delta)
      dQ[:, c D/2:(c+1) D/2] = dS K[:, c D/2:(c+1) D/2]
                                         (both halves of dS, shared through shared memory;
                                          warpgroup c takes half of dQ's columns; at head dim
                                          64 causal its own half is read from registers,
                                          ``_own_ds_in_registers``)
      dQ_acc[rows] += scale * dQ         (float32 TMA reductions into L2, from shared memory)

  and after the last Q tile each warpgroup's dK and dV rows leave by TMA stores, staged in its
  rows of the K and V tiles (whole 128-byte lines: 2-5% faster at 2048-4096 tokens than stores
  from the accumulators' layout).

With softcap the scores are ``cap * tanh(S * scale / cap)``: S becomes ``tanh(S * softcap_in)``
(``qk_scale = cap * log2 e``) and dS picks up the derivative ``1 - tanh^2``.

The dQ sums first went out as ``red.global.add.v4.f32`` instructions from every thread (480-506
TFLOP/s at head dim 128); a TMA bulk reduction per 32 columns (``_tma_reduce_add``) replaced them
(docs/performance.md). ``dQ_acc`` is float32 and zero-filled (by the delta kernel, which runs
first), covering half of the heads at a time from ``configs.GLUON_BWD_SPLIT_DQ_MIN_SEQLEN`` query
rows (peak memory). At head dim 128, unmasked or causal, the kernel converts it to dq itself: the
program whose reductions complete a tile converts it after its loop (CAST_DQ, ``cast_dq_in_kernel``;
the comment above ``NOTES``; under causal each program then takes its Q tiles last to first,
``_q_step``); otherwise the launcher casts it after the kernel. The sums depend
on their order, so this path is not bitwise reproducible: calls with ``deterministic=True`` take
the ``tl`` kernels. Covers what ``hopper_bwd_eligible`` checks: 16-bit inputs, the (head dim,
causal) entries of ``configs.SM90_GLUON_BWD`` (head dims 64, 128 and 256, each from the key
length where it beats the ``tl`` kernels), softcap or not, plain, causal or sliding-window
attention (windows, and causal with ``Sq > Sk``, from ``configs.SM90_GLUON_BWD_WINDOW_MIN_KEYS``
keys per row; a program runs only the Q tiles that see its keys, and masks only the tiles an
edge cuts: ``_mask_window``), no ALiBi/dropout, dense contiguous batches with ``Sq % 64 == 0``
and ``Sk`` a multiple of the kernel's keys per program (128; 64 at head dim 256).
"""

from typing import NamedTuple

import torch
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

from flashtile import configs
from flashtile.ops.bwd import launch_delta
from flashtile.ops.common import LOG2E as _LOG2E, gluon_applies, mask_admitted, softcap_scales
from flashtile.ops.descriptors import descriptor
from flashtile.ops.fwd_hopper import post_scalar, read_scalar, tanh_approx
from flashtile.ops.hopper_order import head_and_rank, head_group, tail_group
from flashtile.ops.launch import FastLaunch

LOG2E = gl.constexpr(_LOG2E)
HALF_N = gl.constexpr(64)  # keys per consumer warpgroup (two per program)
SLOTS = gl.constexpr(2)  # Q/dO ring depth (3 measured no faster; with the dQ staging buffers it does not fit)
CONSUMER_REGS = gl.constexpr(240)  # setmaxnreg for each consumer warpgroup; the producer gets 24
BLOCK_M = 64  # query rows per streamed Q/dO tile
BLOCK_N = 2 * HALF_N.value  # keys per program
NUM_WARPS = 4  # per consumer warpgroup (the launch's default partition)


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """``tensor_desc[coord] += src`` (a float32 shared-memory tile) by a TMA bulk reduction
    (``cp.reduce.async.bulk.tensor``, UTMAREDG): Gluon 3.6 exports TMA loads and stores but not
    this, which its builder has (``create_async_tma_reduce``). Asynchronous like a TMA store:
    ``tma.store_wait`` before ``src`` is written again."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _reduce_dq(dq_desc, dq, staging, row, col):
    """``dQ_acc[row:, col:] += dq`` (float32, ``staging``'s shape): through ``staging`` in shared
    memory, then one TMA reduction per 32 columns (128-byte rows, the swizzle's width: the widest
    TMA box). The caller waits (``tma.store_wait``) before ``staging`` is written again."""
    PIECE: gl.constexpr = dq_desc.block_type.shape[1]
    staging.store(dq)
    fence_async_shared()
    for i in gl.static_range(staging.shape[1] // PIECE):
        _tma_reduce_add(dq_desc, [row, col + i * PIECE], staging.slice(i * PIECE, PIECE, dim=1))


# Unmasked or causal, dQ can leave the kernel in the input dtype (CAST_DQ, ``cast_dq_in_kernel``).
# Each 64-row tile of dQ_acc takes one TMA reduction per consumer from every program of its KV head
# whose keys its rows see (``_contributors``); a counter per tile counts the programs whose
# reductions of it have completed, and the program whose count completes it converts the tile's
# float32 sums to dq after its own loop. That replaces the cast kernel after the backward (B * Sq *
# H * D * 6 bytes through HBM: 67 us at every length of the benchmark; docs/performance.md, step
# 37). The counting runs in a warp of its own (``_count_tiles``, in the producer's warpgroup): the
# consumers only wait for their reductions to complete and post a notice per tile through a ring of
# NOTES mbarrier pairs. Conversions wait for the end of the program: the last program to reach a
# tile tends to be the same one for every tile of a head, and converting as the counts came in put
# all of a head's conversions on that program's path.
NOTES = gl.constexpr(8)
MAX_OWNED = gl.constexpr(2048)  # tiles a program can convert (``owned``: 8 KB of shared memory)


@gluon.constexpr_function
def _wait_group_asm(pending):
    return f"cp.async.bulk.wait_group {pending};\n\tmov.b32 $0, $1;"


@gluon.jit
def _wait_reductions(PENDING: gl.constexpr):
    """Until at most PENDING of this thread's bulk groups are in flight, the rest completed: their
    sums are in L2 and visible to the generic proxy (``tma.store_wait`` waits only until they
    have read shared memory)."""
    lanes = gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [4], [0]))  # an operand for the asm
    gl.inline_asm_elementwise(_wait_group_asm(PENDING), "=r,r", [lanes], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _post_reduced(full, empty, x):
    """Consumer side: tell ``_count_tiles`` that this warpgroup's reductions of its tile x have
    completed (nothing for x < 0). The mbarrier arrive releases what the warpgroup's last
    barrier ordered after the completion."""
    slot = gl.maximum(x, 0) % NOTES
    mbarrier.wait(empty.index(slot), ((x // NOTES) & 1) ^ 1, pred=x >= NOTES)
    mbarrier.arrive(full.index(slot), count=1, pred=x >= 0)


@gluon.jit
def _count_tile(counter):
    """Lane 0 adds 1 to ``*counter`` (relaxed, GPU scope: every count follows its reductions'
    completion, and the converted sums are read from L2 after the count that says they are all
    there) and gets the count before it; the other lanes get -1. ``_own_if_last`` reads it two tiles
    later, meant to keep the atomic's round trip off the loop; but ptxas makes the atomic a
    warp-aggregated one whose result is shuffled at once (SHFL.IDX after ATOMG), so the warp waits
    for each count in its own tile (bench/results/h100_ncu_bwd_d64_cast.txt). That costs nothing
    while a tile takes longer than the round trip, as at head dim 128."""
    lane = gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0]))
    return gl.inline_asm_elementwise(
        "{\n\t.reg .pred p;\n\tsetp.eq.s32 p, $2, 0;\n\tmov.u32 $0, 0xffffffff;\n\t"
        "@p atom.relaxed.gpu.global.add.u32 $0, [$1], 1;\n\t}",
        "=r,l,r", [counter + lane * 0, lane], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _contributors(row, key_shift, num_n_blocks, BLOCK_M: gl.constexpr, BOUND_RIGHT: gl.constexpr):
    """How many of the KV head's ``num_n_blocks`` programs add into the dQ tile of query rows
    ``row + [0, BLOCK_M)``: all of them unmasked; under a right bound (causal), those whose first
    key ``n0`` some row sees (``n0 <= row + BLOCK_M - 1 + key_shift``; every row sees key 0)."""
    if BOUND_RIGHT:
        return gl.minimum(num_n_blocks, (row + BLOCK_M - 1 + key_shift) // (2 * HALF_N) + 1)
    else:
        return num_n_blocks


@gluon.jit
def _own_if_last(count, x, owned, n_owned, m_first, n_m, key_shift, num_n_blocks, BLOCK_M: gl.constexpr,
                 M_STEP: gl.constexpr, BOUND_RIGHT: gl.constexpr):
    """Appends tile x to ``owned`` if ``count`` (``_count_tile``'s, for x) shows this program's
    count was the tile's last (``_contributors``). Nothing for x < 0; returns the list's new length."""
    if x >= 0:
        row = m_first + (x % n_m) * M_STEP
        if gl.max(count, axis=0) == _contributors(row, key_shift, num_n_blocks, BLOCK_M, BOUND_RIGHT) - 1:
            post_scalar(owned.index(n_owned), x)
            n_owned += 1
    return n_owned


@gluon.jit
def _count_tiles(full0, empty0, full1, empty1, counters, owned, owned_len, owned_done, b, h0, n_heads, seqlen_q,
                 m_first, n_m, total, key_shift, num_n_blocks, BLOCK_M: gl.constexpr, M_STEP: gl.constexpr,
                 BOUND_RIGHT: gl.constexpr):
    """The counting warp: for each tile x of the program's loop, once both consumers have posted
    it (``_post_reduced``), counts the program's reductions of it; two tiles later lists x in
    ``owned`` if its count was the tile's last (``_count_tile``). Then publishes the list's length
    (``owned_len``, ``owned_done``) for the consumers' ``_convert_owned``."""
    one: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    n_owned = total * 0  # a runtime value: the branches that append change it
    # Tile x - 2's and x - 1's counts (none yet). Their first values must differ: triton carries a
    # variable through the loop only if the body changes it, and ``older = old`` would not.
    older = gl.full([32], -1, gl.int32, one)
    old = gl.full([32], -2, gl.int32, one)
    for x in range(total):
        slot = x % NOTES
        phase = (x // NOTES) & 1
        mbarrier.wait(full0.index(slot), phase)
        mbarrier.wait(full1.index(slot), phase)
        tile = m_first // BLOCK_M + (x % n_m) * (M_STEP // BLOCK_M)  # of the head's dQ tiles
        count = _count_tile(counters + (b * n_heads + h0 + x // n_m).to(gl.int64) * (seqlen_q // BLOCK_M) + tile)
        mbarrier.arrive(empty0.index(slot), count=1)
        mbarrier.arrive(empty1.index(slot), count=1)
        n_owned = _own_if_last(older, x - 2, owned, n_owned, m_first, n_m, key_shift, num_n_blocks, BLOCK_M, M_STEP,
                               BOUND_RIGHT)
        older = old
        old = count
    n_owned = _own_if_last(older, total - 2, owned, n_owned, m_first, n_m, key_shift, num_n_blocks, BLOCK_M, M_STEP,
                           BOUND_RIGHT)
    n_owned = _own_if_last(old, total - 1, owned, n_owned, m_first, n_m, key_shift, num_n_blocks, BLOCK_M, M_STEP,
                           BOUND_RIGHT)
    post_scalar(owned_len, n_owned)
    mbarrier.arrive(owned_done, count=1)


@gluon.jit
def _convert_owned(C: gl.constexpr, owned, owned_len, owned_done, dq_acc_ptr, dq_ptr, acc_heads, b, h0, dq_h0,
                   n_heads, seqlen_q, m_first, n_m, D: gl.constexpr, BLOCK_M: gl.constexpr, M_STEP: gl.constexpr):
    """After the loop, consumer C's columns of the dQ tiles ``_count_tiles`` listed: dq =
    dQ_acc's float32 sums (``.cg``: from L2, never a line this SM's L1 held), two tiles per step
    so that both tiles' loads are in flight at once."""
    mbarrier.wait(owned_done, 0)
    n_owned = read_scalar(owned_len)
    COLS: gl.constexpr = D // 2
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (COLS // 4), COLS // 4], [4, 1], [1, 0])
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))[:, None]
    cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))[None, :] + C * COLS
    for k in range(0, n_owned, 2):
        x0 = read_scalar(owned.index(k))
        x1 = read_scalar(owned.index(gl.minimum(k + 1, n_owned - 1)))  # x0 again past the end
        row0 = (b * seqlen_q + m_first + (x0 % n_m) * M_STEP + rows).to(gl.int64)
        row1 = (b * seqlen_q + m_first + (x1 % n_m) * M_STEP + rows).to(gl.int64)
        acc0 = gl.load(dq_acc_ptr + (row0 * acc_heads + dq_h0 + x0 // n_m) * D + cols, cache_modifier=".cg")
        acc1 = gl.load(dq_acc_ptr + (row1 * acc_heads + dq_h0 + x1 // n_m) * D + cols, cache_modifier=".cg")
        gl.store(dq_ptr + (row0 * n_heads + h0 + x0 // n_m) * D + cols, acc0.to(dq_ptr.dtype.element_ty))
        gl.store(dq_ptr + (row1 * n_heads + h0 + x1 // n_m) * D + cols, acc1.to(dq_ptr.dtype.element_ty))


@gluon.jit
def _produce_q_do(q_desc, do_desc, q_ring, do_ring, ready, empty, q_row0, m_first, n_m, total, h0,
                  M_STEP: gl.constexpr):
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    for t in range(total):
        slot = t % SLOTS
        row = q_row0 + m_first + (t % n_m) * M_STEP
        col = (h0 + t // n_m) * D
        mbarrier.wait(empty.index(slot), ((t // SLOTS) & 1) ^ 1, pred=t >= SLOTS)  # both consumers released it
        mbarrier.expect(ready.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row, col], ready.index(slot), q_ring.index(slot))
        tma.async_copy_global_to_shared(do_desc, [row, col], ready.index(slot), do_ring.index(slot))


@gluon.jit
def _row_vector(ptr, t, total, b, h0, n_heads, seqlen_q, m_first, n_m, BLOCK_M: gl.constexpr, M_STEP: gl.constexpr,
                layout: gl.constexpr):
    """Q tile t's rows of a (B, H, Sq) float32 vector (LSE or delta), zeros past the last tile,
    in ``layout``."""
    row_base = (b * n_heads + h0 + t // n_m).to(gl.int64) * seqlen_q
    rows = m_first + (t % n_m) * M_STEP + gl.arange(0, BLOCK_M, layout=layout)
    valid = (rows * 0 + t) < total  # the scalar test t < total as a mask in the rows' layout
    return gl.load(ptr + row_base + rows, mask=valid, other=0.0)


@gluon.jit
def _row_stats(t, total, lse_ptr, delta_ptr, b, h0, n_heads, seqlen_q, m_first, n_m, BLOCK_M: gl.constexpr,
               M_STEP: gl.constexpr, layout: gl.constexpr):
    """Base-2 LSE and delta of Q tile t's rows (zeros past the last tile), in ``layout``."""
    lse2 = _row_vector(lse_ptr, t, total, b, h0, n_heads, seqlen_q, m_first, n_m, BLOCK_M, M_STEP, layout) * LOG2E
    return lse2, _row_vector(delta_ptr, t, total, b, h0, n_heads, seqlen_q, m_first, n_m, BLOCK_M, M_STEP, layout)


@gluon.jit
def _scores(t, total, q_ring, k_w, ready, layout: gl.constexpr):
    """Issue tile t's S = Q K^T (asynchronous; reads its ring slot). Past the last tile the
    product runs on whatever the slot holds and is discarded."""
    BLOCK_M: gl.constexpr = q_ring.shape[1]
    slot = t % SLOTS
    mbarrier.wait(ready.index(slot), (t // SLOTS) & 1, pred=t < total)
    N: gl.constexpr = k_w.shape[0]
    zero = gl.zeros([BLOCK_M, N], gl.float32, layout=layout)
    return warpgroup_mma(q_ring.index(slot), k_w.permute((1, 0)), zero, use_acc=False, is_async=True)


@gluon.jit
def _mask_window(p, m0, key_pos0, left_pos0, BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr):
    """``p`` (rows from ``m0``) with the keys row i does not see set to 0: key j of the tile is
    seen iff ``key_pos0 + j <= m0 + i`` (BOUND_RIGHT: causal, a window's right edge) and
    ``left_pos0 + j >= m0 + i`` (BOUND_LEFT: a window's left edge). Only a tile an edge cuts pays
    for the mask: the test is per tile, uniform across the warpgroup."""
    M: gl.constexpr = p.shape[0]
    N: gl.constexpr = p.shape[1]
    if BOUND_RIGHT and BOUND_LEFT:
        cut = (key_pos0 + N - 1 > m0) | (left_pos0 < m0 + M - 1)
    elif BOUND_RIGHT:
        cut = key_pos0 + N - 1 > m0
    else:
        cut = left_pos0 < m0 + M - 1
    if cut:
        cols = gl.arange(0, N, layout=gl.SliceLayout(0, p.type.layout))[None, :]
        rows = gl.arange(0, M, layout=gl.SliceLayout(1, p.type.layout))[:, None]
        if BOUND_RIGHT:
            p = gl.where(cols + (key_pos0 - m0) <= rows, p, 0.0)
        if BOUND_LEFT:
            p = gl.where(cols + (left_pos0 - m0) >= rows, p, 0.0)
    return p


@gluon.constexpr_function
def _own_ds_in_registers(D, BOUND_LEFT, BOUND_RIGHT):
    """Whether each warpgroup's dQ product takes its own half of dS from registers (the MMA's A
    operand) and issues that half before the two warpgroups meet, adding the other half from
    shared memory after; otherwise both halves come from shared memory after they meet. Chosen
    by measurement (bench/ab_backward.py, docs/performance.md step 22): head dim 64 causal ran
    3.6-6.3% faster at 2048-16384 tokens in two runs of five interleaved rounds, 3.0-6.8% in one
    of three (a fourth: one cell of three at 0.97); everything else was slower: head dim 64 with a
    window (seqlen / 4 keys) by 1.3-3.5%, without a mask by 5-9% at 2048-4096 tokens, head dim
    128 by up to 7% in 11 of 12 cells (its loop's spill stores 9 -> 29)."""
    return D == 64 and BOUND_RIGHT and not BOUND_LEFT


@gluon.jit
def _fold_q_tile(C: gl.constexpr, t, total, q_ring, do_ring, k_w, v_w, k_cols, p_s, ds_s, ready, empty, ds_bar,
                 dk, dv, s, lse2, delta, lse_ptr, delta_ptr, dq_desc, dq_s, note_full, note_empty, dq_h0, b, h0,
                 n_heads, seqlen_q, m_first, n_m, key_pos0, left_pos0, qk_scale, softcap_in, softmax_scale,
                 BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr, CAST_DQ: gl.constexpr,
                 M_STEP: gl.constexpr):
    """Consumer C's share of Q/dO tile t: its 64 keys' ``(dk, dv)``, and columns ``C D/2 + [0, D/2)``
    of the tile's dQ, from the tile's scores ``s``, ``lse2`` and ``delta``; returns those of tile
    t + 1, whose S product runs while this tile's dQ is added (dP = dO V^T runs during the
    exponentials). CAST_DQ: posts tile t - 2 to the counting warp (``note_full``/``note_empty``:
    this warpgroup's ring). ``key_pos0`` / ``left_pos0``: the first / last row that sees the warpgroup's
    first key under the bounds that are set (``_mask_window``).

    Rows sit on the MMA's M side (S = Q K^T, not K Q^T), so each thread holds the LSE and delta
    of two rows, not sixteen; P and dS reach the dV and dK products transposed, through shared
    memory."""
    BLOCK_M: gl.constexpr = q_ring.shape[1]
    D: gl.constexpr = q_ring.shape[2]
    mn_layout: gl.constexpr = s.type.layout
    row_layout: gl.constexpr = gl.SliceLayout(1, mn_layout)
    slot = t % SLOTS
    q_s = q_ring.index(slot)
    do_s = do_ring.index(slot)
    m0 = m_first + (t % n_m) * M_STEP
    dp_tok = warpgroup_mma(do_s, v_w.permute((1, 0)), gl.zeros_like(s), use_acc=False, is_async=True)
    if SOFTCAP:  # scores cap * tanh(S * scale / cap): dS picks up the derivative 1 - tanh^2
        s = tanh_approx(s * softcap_in)
    p = gl.exp2(s * qk_scale - lse2[:, None])
    if BOUND_LEFT or BOUND_RIGHT:
        p = _mask_window(p, m0, key_pos0, left_pos0, BOUND_LEFT, BOUND_RIGHT)
    p_half = p_s.slice(C * HALF_N, HALF_N, dim=1)
    p_half.store(p.to(q_s.dtype))
    fence_async_shared()
    dv_tok = warpgroup_mma(p_half.permute((1, 0)), do_s, dv, is_async=True)
    dp = warpgroup_mma_wait(1, deps=[dp_tok])  # dV's product may still run
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - s * s)
    ds = ds.to(q_s.dtype)
    # dQ = dS K needs both warpgroups' halves of dS: they meet in shared memory (one buffer per
    # parity of t, so a warpgroup a tile ahead never overwrites what the other still reads).
    ds_buf = ds_s.index(t % 2)
    ds_half = ds_buf.slice(C * HALF_N, HALF_N, dim=1)
    ds_half.store(ds)
    fence_async_shared()
    dk_tok = warpgroup_mma(ds_half.permute((1, 0)), q_s, dk, is_async=True)
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, D // 2, 16])
    dq_zero = gl.zeros([BLOCK_M, D // 2], gl.float32, layout=dq_layout)
    OWN_DS_IN_REGISTERS: gl.constexpr = _own_ds_in_registers(D, BOUND_LEFT, BOUND_RIGHT)
    if OWN_DS_IN_REGISTERS:
        ds_a = gl.convert_layout(ds, gl.DotOperandLayout(operand_index=0, parent=dq_layout, k_width=2))
        dq_tok = warpgroup_mma(ds_a, k_cols.slice(C * HALF_N, HALF_N, dim=0), dq_zero, use_acc=False, is_async=True)
    mbarrier.arrive(ds_bar.index(t % 2), count=1)
    mbarrier.wait(ds_bar.index(t % 2), (t // 2) & 1)
    if OWN_DS_IN_REGISTERS:  # the other warpgroup's keys
        other: gl.constexpr = (1 - C) * HALF_N
        dq_tok = warpgroup_mma(ds_buf.slice(other, HALF_N, dim=1), k_cols.slice(other, HALF_N, dim=0), dq_tok,
                               is_async=True)
    else:
        dq_tok = warpgroup_mma(ds_buf, k_cols, dq_zero, use_acc=False, is_async=True)
    s_tok = _scores(t + 1, total, q_ring, k_w, ready, mn_layout)
    next_lse2, next_delta = _row_stats(t + 1, total, lse_ptr, delta_ptr, b, h0, n_heads, seqlen_q, m_first, n_m,
                                       BLOCK_M, M_STEP, row_layout)
    # Tile t + 1's S may still run; with dS read from registers, they stay untouched until then.
    if OWN_DS_IN_REGISTERS:
        dv, dk, dq, ds_a = warpgroup_mma_wait(1, deps=[dv_tok, dk_tok, dq_tok, ds_a])
    else:
        dv, dk, dq = warpgroup_mma_wait(1, deps=[dv_tok, dk_tok, dq_tok])
    mbarrier.arrive(empty.index(slot), count=1)
    # The warpgroup's dQ columns reach L2 by TMA reductions from shared memory; the previous
    # tile's reductions must have read the buffer first (CAST_DQ: and tile t - 2's, complete, go
    # to the counting warp).
    if CAST_DQ:
        _wait_reductions((D // 2) // dq_desc.block_type.shape[1])
    tma.store_wait(0)
    if CAST_DQ:
        _post_reduced(note_full, note_empty, t - 2)
    _reduce_dq(dq_desc, dq * softmax_scale, dq_s.index(C), b * seqlen_q + m0, (dq_h0 + t // n_m) * D + C * (D // 2))
    s = warpgroup_mma_wait(0, deps=[s_tok])
    return dk, dv, s, next_lse2, next_delta


@gluon.jit
def _consume(C: gl.constexpr, q_ring, do_ring, k_s, v_s, p_s, ds_s, ready, empty, ds_bar, kv_bar, kv_done, lse_ptr,
             delta_ptr, dq_desc, dq_s, note_full, note_empty, owned, owned_len, owned_done, dq_acc_ptr, dq_ptr,
             acc_heads, dk_out, dv_out, b, kv_h, dq_h0, n0, key_pos0, left_pos0, m_first, n_m, group_size, n_heads,
             seqlen_q, seqlen_k, qk_scale, softcap_in, softmax_scale, D: gl.constexpr, BOUND_LEFT: gl.constexpr,
             BOUND_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr, CAST_DQ: gl.constexpr, M_STEP: gl.constexpr):
    """Consumer warpgroup C: keys ``n0 + C * HALF_N + [0, HALF_N)``; writes their dK and dV (and
    with CAST_DQ its columns of the dQ tiles the program converts). ``dq_desc``'s columns (and
    ``dq_acc_ptr``'s) start at head ``dq_h0`` for this program's group."""
    BLOCK_M: gl.constexpr = q_ring.shape[1]
    kd_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, D, 16])
    mn_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HALF_N, 16])
    k_w = k_s.slice(C * HALF_N, HALF_N, dim=0)
    v_w = v_s.slice(C * HALF_N, HALF_N, dim=0)
    k_cols = k_s.slice(C * (D // 2), D // 2, dim=1)  # the head-dim columns of dQ this warpgroup computes
    dk = gl.zeros([HALF_N, D], gl.float32, layout=kd_layout)
    dv = gl.zeros([HALF_N, D], gl.float32, layout=kd_layout)
    my_key_pos0 = key_pos0 + C * HALF_N
    my_left_pos0 = left_pos0 + C * HALF_N
    h0 = kv_h * group_size
    total = group_size * n_m
    mbarrier.wait(kv_bar, 0)
    s_tok = _scores(0, total, q_ring, k_w, ready, mn_layout)
    lse2, delta = _row_stats(0, total, lse_ptr, delta_ptr, b, h0, n_heads, seqlen_q, m_first, n_m, BLOCK_M, M_STEP,
                             gl.SliceLayout(1, mn_layout))
    s = warpgroup_mma_wait(0, deps=[s_tok])
    # Tiles t = g * n_m + i: the group's query heads g, each over its Q tiles i. Under causal
    # every tile takes the mask: a second loop for the few diagonal tiles cost more registers than
    # the mask (ptxas: 340 against 288 bytes of spills; 392 against 412 TFLOP/s at 16k).
    for t in range(total):
        dk, dv, s, lse2, delta = _fold_q_tile(
            C, t, total, q_ring, do_ring, k_w, v_w, k_cols, p_s, ds_s, ready, empty, ds_bar,
            dk, dv, s, lse2, delta, lse_ptr, delta_ptr, dq_desc, dq_s, note_full, note_empty, dq_h0, b, h0, n_heads,
            seqlen_q, m_first, n_m, my_key_pos0, my_left_pos0, qk_scale, softcap_in, softmax_scale, BOUND_LEFT,
            BOUND_RIGHT, SOFTCAP, CAST_DQ, M_STEP)
    if CAST_DQ:  # the last two tiles go to the counting warp once every reduction has completed
        _wait_reductions(0)
        tma.store_wait(0)
        _post_reduced(note_full, note_empty, total - 2)
        _post_reduced(note_full, note_empty, total - 1)

    # dK and dV leave through shared memory by TMA stores, whole 128-byte lines: stored straight
    # from the accumulators (4 bytes per thread and row piece) they took 2-8% of the backward at
    # 2048-4096 tokens, and the TMA stores gave back 2-5% (docs/performance.md, step 25). dV goes
    # over this warpgroup's rows of V, which only its own dP products read; dK over its rows of K
    # once the other warpgroup's last dQ product, which reads every row of K, has run too
    # (``kv_done``). The last dQ reduction may still be reading dq_s meanwhile: the wait at the
    # end covers it.
    v_w.store(dv.to(v_s.dtype))
    mbarrier.arrive(kv_done, count=1)
    mbarrier.wait(kv_done, 0)
    k_w.store((dk * softmax_scale).to(k_s.dtype))
    fence_async_shared()
    row = b * seqlen_k + n0 + C * HALF_N
    tma.async_copy_shared_to_global(dv_out, [row, kv_h * D], v_w)
    tma.async_copy_shared_to_global(dk_out, [row, kv_h * D], k_w)
    if CAST_DQ:
        _convert_owned(C, owned, owned_len, owned_done, dq_acc_ptr, dq_ptr, acc_heads, b, h0, dq_h0, n_heads, seqlen_q,
                       m_first, n_m, D, BLOCK_M, M_STEP)
    tma.store_wait(0)  # the stores and the last reduction have read shared memory before the program ends


@gluon.jit
def _start(k_desc, v_desc, k_s, v_s, ready, empty, kv_bar, row, col):
    """Initialise the Q/dO ring's barriers (``empty`` released by both consumers) and start the
    program's K/V tile loading (``kv_bar``); the fence also covers barriers the caller set up."""
    for i in gl.static_range(SLOTS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    mbarrier.init(kv_bar, count=1)
    fence_async_shared()
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [row, col], kv_bar, k_s)
    tma.async_copy_global_to_shared(v_desc, [row, col], kv_bar, v_s)


@gluon.jit
def _key_tile(seqlen_q, seqlen_k, window_left, window_right, kv_head0, chunk_kv_heads, num_n_blocks, head_group,
              tail_group, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BOUND_LEFT: gl.constexpr,
              BOUND_RIGHT: gl.constexpr):
    """This program's ``(b, kv_h, n0, key_pos0, left_pos0, m_begin, n_m)``: batch, KV head, first
    key, the first row that sees that key under the right bound (causal: its diagonal row) and
    the last under the left bound, and the Q tiles ``m_begin + [0, n_m) * BLOCK_M`` that see any
    of the program's keys (row i sees key k iff ``i + diag - window_left <= k <= i + diag +
    window_right``, each bound only where set; diag = seqlen_k - seqlen_q). Programs in
    hopper_order's order."""
    pid_bkv, n_rank = head_and_rank(gl.program_id(0), num_n_blocks, gl.num_programs(0) // num_n_blocks, head_group,
                                      tail_group)
    n0 = n_rank * BLOCK_N
    b = pid_bkv // chunk_kv_heads
    kv_h = kv_head0 + pid_bkv % chunk_kv_heads
    key_pos0 = n0 - (seqlen_k - seqlen_q) - window_right
    left_pos0 = n0 - (seqlen_k - seqlen_q) + window_left
    m_begin = 0
    m_end = seqlen_q
    if BOUND_RIGHT:
        m_begin = gl.minimum(gl.maximum(key_pos0, 0), seqlen_q) // BLOCK_M * BLOCK_M
    if BOUND_LEFT:
        m_end = gl.maximum(gl.minimum(left_pos0 + BLOCK_N, seqlen_q), m_begin)
    return b, kv_h, n0, key_pos0, left_pos0, m_begin, (m_end - m_begin + BLOCK_M - 1) // BLOCK_M


@gluon.constexpr_function
def _q_step(BLOCK_M, BOUND_LEFT, BOUND_RIGHT, CAST_DQ):
    """The step between the first rows of a program's consecutive Q tiles (the first tile's:
    ``m_first``). Under causal with CAST_DQ the tiles run backwards, from the last: the programs of
    a head then reach each tile at about the same step, instead of key tile 0's program reaching
    every tile last and converting them all after the longest loop (docs/performance.md, step 38)."""
    return -BLOCK_M if CAST_DQ and BOUND_RIGHT and not BOUND_LEFT else BLOCK_M


@gluon.jit
def _hopper_bwd_kernel(q_desc, do_desc, k_desc, v_desc, lse_ptr, delta_ptr, dq_desc, dq_acc_ptr, dq_ptr, counters,
                       dk_out, dv_out, seqlen_q, seqlen_k, n_heads, group_size, kv_head0, chunk_kv_heads, num_n_blocks,
                       head_group, tail_group, qk_scale, softcap_in, softmax_scale, window_left, window_right,
                       D: gl.constexpr, BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr,
                       CAST_DQ: gl.constexpr):
    # Flat grid (num_n_blocks * batch * chunk_kv_heads,) over KV heads kv_head0 + [0, chunk_kv_heads)
    # in hopper_order's order: head-major, causal in groups of heads with key tile 0 (the one most
    # rows see) first. q/dO are viewed as 2-D (B * Sq, H * D), k/v (B * Sk, Hk * D); dq_desc is
    # float32 (B * Sq, chunk_kv_heads * group_size * D), dq_acc_ptr its tensor. CAST_DQ: dq_ptr is dq
    # (B, Sq, H, D) in the input dtype and counters int32 (B, H, Sq / BLOCK_M), zeros; otherwise
    # neither is read.
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    b, kv_h, n0, key_pos0, left_pos0, m_begin, n_m = _key_tile(
        seqlen_q, seqlen_k, window_left, window_right, kv_head0, chunk_kv_heads, num_n_blocks, head_group, tail_group,
        BLOCK_M, 2 * HALF_N, BOUND_LEFT, BOUND_RIGHT)

    k_s = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    v_s = gl.allocate_shared_memory(v_desc.dtype, v_desc.block_type.shape, v_desc.layout)
    q_ring = gl.allocate_shared_memory(q_desc.dtype, [SLOTS] + q_desc.block_type.shape, q_desc.layout)
    do_ring = gl.allocate_shared_memory(do_desc.dtype, [SLOTS] + do_desc.block_type.shape, do_desc.layout)
    # P (each warpgroup its own half, single-buffered) and dS (both halves read by both, so one
    # buffer per parity of the tile index), [BLOCK_M rows, 128 keys] each.
    pds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 2 * HALF_N], q_desc.dtype)
    p_s = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, 2 * HALF_N], pds_layout)
    ds_s = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_M, 2 * HALF_N], pds_layout)
    # Each consumer's float32 dQ columns on their way to the TMA reduction.
    dq_s = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, D // 2], dq_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(ds_bar.index(0), count=2)  # both consumers' halves of dS^T stored
    mbarrier.init(ds_bar.index(1), count=2)
    mbarrier.init(kv_done, count=2)  # both consumers' last products have run
    # CAST_DQ: the counting warp's notices (a ring of NOTES (full, empty) pairs per consumer) and
    # its list of the tiles this program converts.
    full0 = gl.allocate_shared_memory(gl.int64, [NOTES, 1], mbarrier.MBarrierLayout())
    empty0 = gl.allocate_shared_memory(gl.int64, [NOTES, 1], mbarrier.MBarrierLayout())
    full1 = gl.allocate_shared_memory(gl.int64, [NOTES, 1], mbarrier.MBarrierLayout())
    empty1 = gl.allocate_shared_memory(gl.int64, [NOTES, 1], mbarrier.MBarrierLayout())
    owned = gl.allocate_shared_memory(gl.int32, [MAX_OWNED, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    owned_len = gl.allocate_shared_memory(gl.int32, [1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    owned_done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    if CAST_DQ:
        gl.static_assert(not BOUND_LEFT, "dQ is cast in the kernel only without a left bound")
        for i in gl.static_range(NOTES):
            mbarrier.init(full0.index(i), count=1)
            mbarrier.init(empty0.index(i), count=1)
            mbarrier.init(full1.index(i), count=1)
            mbarrier.init(empty1.index(i), count=1)
        mbarrier.init(owned_done, count=1)
    _start(k_desc, v_desc, k_s, v_s, ready, empty, kv_bar, b * seqlen_k + n0, kv_h * D)
    M_STEP: gl.constexpr = _q_step(BLOCK_M, BOUND_LEFT, BOUND_RIGHT, CAST_DQ)
    m_first = m_begin if M_STEP > 0 else m_begin + (n_m - 1) * BLOCK_M

    h0 = kv_h * group_size
    dq_h0 = (kv_h - kv_head0) * group_size
    acc_heads = chunk_kv_heads * group_size
    # (Gluon takes the partitions only as literals: the two lists repeat the first three.)
    if CAST_DQ:
        gl.warp_specialize([
            (_consume, (0, q_ring, do_ring, k_s, v_s, p_s, ds_s, ready, empty, ds_bar, kv_bar, kv_done, lse_ptr,
                        delta_ptr, dq_desc, dq_s, full0, empty0, owned, owned_len, owned_done, dq_acc_ptr, dq_ptr,
                        acc_heads, dk_out, dv_out, b, kv_h, dq_h0, n0, key_pos0, left_pos0, m_first, n_m,
                        group_size, n_heads, seqlen_q, seqlen_k, qk_scale, softcap_in, softmax_scale, D, BOUND_LEFT,
                        BOUND_RIGHT, SOFTCAP, CAST_DQ, M_STEP)),
            (_consume, (1, q_ring, do_ring, k_s, v_s, p_s, ds_s, ready, empty, ds_bar, kv_bar, kv_done, lse_ptr,
                        delta_ptr, dq_desc, dq_s, full1, empty1, owned, owned_len, owned_done, dq_acc_ptr, dq_ptr,
                        acc_heads, dk_out, dv_out, b, kv_h, dq_h0, n0, key_pos0, left_pos0, m_first, n_m,
                        group_size, n_heads, seqlen_q, seqlen_k, qk_scale, softcap_in, softmax_scale, D, BOUND_LEFT,
                        BOUND_RIGHT, SOFTCAP, CAST_DQ, M_STEP)),
            (_produce_q_do, (q_desc, do_desc, q_ring, do_ring, ready, empty, b * seqlen_q, m_first, n_m,
                             group_size * n_m, h0, M_STEP)),
            (_count_tiles, (full0, empty0, full1, empty1, counters, owned, owned_len, owned_done, b, h0, n_heads,
                            seqlen_q, m_first, n_m, group_size * n_m, n0 - key_pos0, num_n_blocks, BLOCK_M, M_STEP,
                            BOUND_RIGHT)),
        ], [4, 1, 1], [CONSUMER_REGS, 24, 24])
    else:
        gl.warp_specialize([
            (_consume, (0, q_ring, do_ring, k_s, v_s, p_s, ds_s, ready, empty, ds_bar, kv_bar, kv_done, lse_ptr,
                        delta_ptr, dq_desc, dq_s, full0, empty0, owned, owned_len, owned_done, dq_acc_ptr, dq_ptr,
                        acc_heads, dk_out, dv_out, b, kv_h, dq_h0, n0, key_pos0, left_pos0, m_first, n_m,
                        group_size, n_heads, seqlen_q, seqlen_k, qk_scale, softcap_in, softmax_scale, D, BOUND_LEFT,
                        BOUND_RIGHT, SOFTCAP, CAST_DQ, M_STEP)),
            (_consume, (1, q_ring, do_ring, k_s, v_s, p_s, ds_s, ready, empty, ds_bar, kv_bar, kv_done, lse_ptr,
                        delta_ptr, dq_desc, dq_s, full1, empty1, owned, owned_len, owned_done, dq_acc_ptr, dq_ptr,
                        acc_heads, dk_out, dv_out, b, kv_h, dq_h0, n0, key_pos0, left_pos0, m_first, n_m,
                        group_size, n_heads, seqlen_q, seqlen_k, qk_scale, softcap_in, softmax_scale, D, BOUND_LEFT,
                        BOUND_RIGHT, SOFTCAP, CAST_DQ, M_STEP)),
            (_produce_q_do, (q_desc, do_desc, q_ring, do_ring, ready, empty, b * seqlen_q, m_first, n_m,
                             group_size * n_m, h0, M_STEP)),
        ], [4, 1], [CONSUMER_REGS, 24])


def hopper_bwd_eligible(q, k, v, dout, features, varlen) -> bool:
    """Whether a backward takes this kernel: see the module docstring. Pure host checks."""
    if not configs.GLUON_BWD or features.deterministic or varlen is not None:
        return False
    # The size rules first: they turn away short calls, whose host time matters most, cheaply.
    _, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    min_seqlen_k = configs.SM90_GLUON_BWD.get((head_dim, features.masked))
    if min_seqlen_k is None or seqlen_k < min_seqlen_k:
        return False
    if features.softcap > 0 and (head_dim, features.masked) in configs.SM90_GLUON_BWD_NO_SOFTCAP:
        return False
    block_n = _kernel_for(head_dim).block_n
    if not (seqlen_q % BLOCK_M == 0 and seqlen_k % block_n == 0 and seqlen_k >= block_n
            and seqlen_q * n_heads * head_dim < 2**31):
        return False
    if not gluon_applies(q, k, features, varlen, q, k, v, dout, any_window=True):
        return False
    return mask_admitted(features, seqlen_q, seqlen_k, configs.SM90_GLUON_BWD_WINDOW_MIN_KEYS.get(head_dim))


class BackwardKernel(NamedTuple):
    kernel: object  # the Gluon kernel
    launch: FastLaunch  # launches it
    block_n: int  # keys per program
    # dK and dV leave by TMA stores of 64-key boxes (``dk_out``/``dv_out`` descriptors) without a
    # mask, and with one where this is set; otherwise they are pointers to dk and dv.
    masked_tma_store: bool = True
    # The kernel can convert dQ to the input dtype itself (this module's: CAST_DQ, its arguments
    # after dq_desc the float32 buffer, dq and the counters); otherwise the launcher casts it.
    can_cast_dq: bool = True


_HOPPER_BWD = BackwardKernel(_hopper_bwd_kernel, FastLaunch(_hopper_bwd_kernel), BLOCK_N)


# Head dims at which the kernel converts dQ itself, by mask (cast_dq_in_kernel): where that measured
# faster than the cast kernel (docs/performance.md, steps 37 and 38).
CAST_DQ_HEAD_DIMS = {"none": (128,), "causal": (128,)}


def cast_dq_in_kernel(head_dim: int, window_left: int, window_right: int, group_size: int, seqlen_q: int,
                      seqlen_k: int) -> bool:
    """Whether this module's kernel converts dQ to the input dtype itself (CAST_DQ): at the head dims
    of ``CAST_DQ_HEAD_DIMS`` for the call's mask, none or causal (a right bound alone, which every
    query row sees key 0 under: ``seqlen_k - seqlen_q + window_right >= 0``), and where every
    program's Q tiles fit the list of tiles it may convert. Windows with a left bound keep the cast
    kernel: a tile's programs are counted from the right bound only."""
    if window_left < 0 and window_right < 0:
        mask = "none"
    elif window_left < 0 and seqlen_k - seqlen_q + window_right >= 0:
        mask = "causal"
    else:
        return False
    return head_dim in CAST_DQ_HEAD_DIMS[mask] and group_size * (seqlen_q // BLOCK_M) <= MAX_OWNED.value


def _kernel_for(head_dim: int) -> BackwardKernel:
    """Head dim 256 takes ``bwd_hopper_wide``'s kernel (whole dK and dV rows of 64 keys would not
    fit one warpgroup's registers), the others this module's."""
    if head_dim == 256:
        from flashtile.ops import bwd_hopper_wide

        return bwd_hopper_wide.WIDE_BWD
    return _HOPPER_BWD


def head_chunks(n_kv_heads: int, programs_per_kv_head: int, sm_count: int, seqlen_q: int) -> list[tuple[int, int]]:
    """``(first KV head, KV heads)`` per launch. The float32 dQ buffer covers one launch's heads:
    two halves from ``configs.GLUON_BWD_SPLIT_DQ_MIN_SEQLEN`` query rows where each half still
    gives every SM two programs, otherwise one launch (see the constant for what each costs)."""
    half = n_kv_heads // 2
    if (seqlen_q >= configs.GLUON_BWD_SPLIT_DQ_MIN_SEQLEN and n_kv_heads % 2 == 0
            and half * programs_per_kv_head >= 2 * sm_count):
        return [(0, half), (half, half)]
    return [(0, n_kv_heads)]


def hopper_bwd(dout, q, k, v, out, lse, features):
    """``(dq, dk, dv)`` for an eligible call (``hopper_bwd_eligible``); ``out`` and ``lse`` are the
    forward's."""
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    group_size = n_heads // n_kv_heads
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    kernel = _kernel_for(head_dim)
    launch, block_n = kernel.launch, kernel.block_n
    q_block, kv_block = (BLOCK_M, head_dim), (block_n, head_dim)
    q_rows = (batch * seqlen_q, n_heads * head_dim)
    dq_block = (BLOCK_M, 32)  # 32 dQ columns: float32 rows of 128 bytes, the swizzle's width
    kv_rows = (batch * seqlen_k, n_kv_heads * head_dim)
    q_desc = descriptor(q, q_rows, q_block)
    do_desc = descriptor(dout, q_rows, q_block)
    k_desc = descriptor(k, kv_rows, kv_block)
    v_desc = descriptor(v, kv_rows, kv_block)
    # dK and dV leave by TMA stores of 64 keys (each consumer's in this module's kernel, each
    # program's in bwd_hopper_wide's), or from the accumulators (BackwardKernel.masked_tma_store).
    if kernel.masked_tma_store or not features.masked:
        dk_out = descriptor(dk, kv_rows, (HALF_N.value, head_dim))
        dv_out = descriptor(dv, kv_rows, (HALF_N.value, head_dim))
    else:
        dk_out, dv_out = dk, dv
    num_n_blocks = seqlen_k // block_n
    sm_count = configs.sm_count(q.device)
    q_do_bytes = 2 * group_size * seqlen_q * head_dim * q.element_size()  # streamed per program's KV head
    chunks = head_chunks(n_kv_heads, num_n_blocks * batch, sm_count, seqlen_q)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    # One launch for every head: its float32 dQ accumulator is zeroed by the delta kernel, in the
    # pass that reads O and dO anyway. Split launches zero each chunk's as it is allocated.
    whole = torch.empty(q.shape, dtype=torch.float32, device=q.device) if len(chunks) == 1 else None
    cast_in_kernel = kernel.can_cast_dq and cast_dq_in_kernel(
        head_dim, features.window_left, features.window_right, group_size, seqlen_q, seqlen_k)
    dq, counts = _dq_output(q, cast_in_kernel, whole is None)
    launch_delta(out, dout, delta, zero=whole, counts=counts)
    for kv_head0, chunk in chunks:
        order_group = head_group(features.masked, batch * chunk, q_do_bytes)
        order_tail = tail_group(features.masked, batch * chunk, num_n_blocks, order_group, sm_count)
        heads = slice(kv_head0 * group_size, (kv_head0 + chunk) * group_size)
        dq_acc = whole if whole is not None else torch.zeros(
            (batch, seqlen_q, chunk * group_size, head_dim), dtype=torch.float32, device=q.device)
        dq_desc = descriptor(dq_acc, (batch * seqlen_q, chunk * group_size * head_dim), dq_block)
        # This module's kernel takes the float32 buffer, dq and the counters after dq_desc (without
        # CAST_DQ stand-ins, unread) and CAST_DQ last; bwd_hopper_wide's takes neither.
        if kernel.can_cast_dq:
            dq_args = (dq_acc, dq, counts) if cast_in_kernel else (dq_acc, dq_acc, delta)
            flags = (cast_in_kernel,)
        else:
            dq_args = flags = ()
        launch[(num_n_blocks * batch * chunk,)](
            q_desc, do_desc, k_desc, v_desc, lse, delta, dq_desc, *dq_args, dk_out, dv_out, seqlen_q, seqlen_k,
            n_heads, group_size, kv_head0, chunk, num_n_blocks, order_group, order_tail, *softcap_scales(features),
            features.softmax_scale, features.window_left, features.window_right, head_dim,
            features.window_left >= 0, features.window_right >= 0, features.softcap > 0, *flags,
            num_warps=NUM_WARPS)
        if not cast_in_kernel:
            if dq is None:  # one launch for every head: dQ is its buffer, cast (no slice assignment)
                dq = dq_acc.to(q.dtype)
            else:
                dq[:, :, heads] = dq_acc
        # Before the next chunk's buffer is allocated, or both would be alive at once (the
        # descriptor holds a reference to its tensor).
        del dq_acc, dq_desc, dq_args
    return dq, dk, dv


def _dq_output(q, in_kernel, split):
    """``(dq, counters)``. A kernel that converts dQ itself writes every tile of dq, counting each
    tile's completed reductions in ``counters`` (int32 (B, H, Sq / BLOCK_M)), which the delta kernel
    zeroes. Otherwise the launcher casts dQ: into ``dq`` for split launches, as a new tensor (dq
    None here) for one."""
    if not in_kernel:
        return (torch.empty(q.shape, dtype=q.dtype, device=q.device) if split else None), None
    batch, seqlen_q, n_heads, _ = q.shape
    counts = torch.empty(batch * n_heads * (seqlen_q // BLOCK_M), dtype=torch.int32, device=q.device)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), counts
