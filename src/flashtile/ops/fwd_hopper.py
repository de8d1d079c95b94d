"""Hopper forward in Gluon (``triton.experimental.gluon``): FlashAttention-3's ping-pong schedule.

A work tile is 64 query rows of one head per consumer warpgroup (two; three in the head-dim-64
unmasked entry: ``GluonForwardTile.consumers``). The grid is persistent: one program per SM runs
work tiles in turn, its producer loading the next tile's Q and first K/V tiles while the consumers
finish the last one. Without a mask each program runs every G-th tile (+5-18% at 512-2048 tokens
at head dim 128, +2-7% at 256); under a causal or window mask, whose tiles differ in length, the
producer takes the next tile from a queue (an atomic counter) and posts its index to the
consumers in shared memory (+7-15% at 1024-4096 tokens, causal head dim 128), or, where the
table entry does not take the queue, one program per work tile is launched (``program_count``).
Three partitions (warp specialization):

* a 1-warp producer loads each work tile's Q (once every consumer has released the last one)
  and streams K and V tiles (``block_n`` keys) by TMA into two rings of
  shared-memory slots, each slot guarded by a ``ready`` (filled) and an ``empty`` (released by
  every consumer) mbarrier. K and V have their own barriers: a K slot is free as soon as every
  consumer's S = Q K^T has run, half an iteration before the V slot of the same tile (at head
  dim 256, where two slots are all that fit, this took the kernel from 1.02-1.08x to 1.29-1.50x
  the ``tl`` kernel);
* two (or three) consumer warpgroups own 64 query rows each. Every iteration a consumer issues
  ``S_j = Q K_j^T`` and ``O += P_{j-1} V_{j-1}`` asynchronously and runs the online softmax of
  ``S_j`` while the second product is still on the tensor cores (intra-warpgroup overlap); with
  ``pingpong`` the two consumers take turns issuing (``turn`` mbarriers), so one's softmax runs
  while the other's products occupy the tensor cores. Three consumers share each K/V tile among
  192 rows (FlashAttention-3's head-dim-64 tile) on 160 registers each, where the bound is the
  exponentials rather than the tensor cores: a third warpgroup's softmax to overlap, and a third
  less shared-memory traffic per score (+3-14% at 2048-16384 tokens, docs/performance.md
  step 23). At head dim 64 each row's sum of P comes from a third product issued with P V,
  ``P @ ones`` (``_row_sums_by_mma``; 1.01-1.04x, step 36), not from adds in registers.

Each consumer's output rows leave by pointer stores from the accumulator's layout (4 bytes per
thread and row piece), or, where the table entry says ``o_tma`` (two consumers: head dims 128
and 256, and 64 causal), by one TMA store: staged in its half of the work tile's last K slot
where the slots hold 128 keys (``_store_out``), else in one buffer the two consumers take in turns
(``_store_out_in_turns``, head dim 256). Without the stores the head-dim-128 forward ran 1.17x as
fast at 512 tokens and 1.04x at 4096, head dim 256 1.31x and 1.06x; the TMA stores gave back
1.03-1.14x at head dim 128 and 1.00-1.19x at 256 (docs/performance.md, steps 27 and 28).

K/V tiles are 3-D TMA boxes (batch entry, key, column): a last tile that runs past the entry's
keys reads zeros there, never the next entry's keys, and its keys past the end are masked, so
every key length runs. Causal: the tiles the diagonal cuts (the last one or two of each program)
apply the mask, and where a work tile's first 64 rows see none of its last key tile's second
half, their consumer multiplies only the first (``_half_diagonal``; 1.01-1.03x at 512-1024
tokens, head dim 128); work tiles go head-major with each head's longest Q tiles first. Sliding
windows (and causal with ``seqlen_k < seqlen_q``) run one loop that masks the tiles an edge cuts,
and rows that see no key give out 0 and LSE +inf. Covers what the schedule was measured on
(docs/performance.md, issue 4 steps 5, 6, 12 and 13): 16-bit inputs, the (head dim, causal)
entries of ``configs.SM90_GLUON_FWD`` (head dims 64, 128, 256; each with its tile and the key
length from which it beats the ``tl`` kernel; shorter key loops without softcap take the entry's
``configs.SM90_GLUON_FWD_SHORT`` tile where it has one), softcap or not, windows from
``configs.SM90_GLUON_FWD_WINDOW_MIN_KEYS`` keys per row, no ALiBi or dropout, dense batches with
query lengths a multiple of 128 (64 with three consumers: the last work tile's rows past the end
are computed and not stored), q/k/v contiguous in ``(B, S, H, D)``. Everything else takes the ``tl``
kernel of ``fwd.py``; ``hopper_fwd_eligible`` is that decision. Gluon has no interpreter, so this
module is only imported for CUDA tensors.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.runtime import driver

from flashtile import configs
from flashtile.ops.common import LOG2E as _LOG2E, gluon_applies, mask_admitted, softcap_scales
from flashtile.ops.descriptors import descriptor
from flashtile.ops.hopper_order import head_and_rank, head_group, tail_group
from flashtile.ops.launch import FastLaunch

LOG2E = gl.constexpr(_LOG2E)
HALF_M = gl.constexpr(64)  # query rows per consumer warpgroup (two or three per program)
PLAIN, MASKED, EDGES = gl.constexpr(0), gl.constexpr(1), gl.constexpr(2)  # how a loop's tiles take the mask
CONSUMER_REGS = gl.constexpr(232)  # setmaxnreg for each consumer warpgroup; the producer gets 24
CONSUMER_REGS_3 = gl.constexpr(160)  # the same with three consumers: (64K - 128 * 24) / 3 / 128, rounded down to 8
SUM_N = gl.constexpr(8)  # the narrowest warpgroup MMA: P times a [keys, 8] tile whose column 0 is ones


@gluon.constexpr_function
def _row_sums_by_mma(head_dim):
    """Whether the consumers sum each row of P by a warpgroup MMA, ``P @ ones`` (N = 8, column 0
    ones), issued with ``P V``, instead of adding its elements in registers: at head dim 64 the
    softmax is bound by instruction issue (docs/performance.md, step 34), and the adds are a sixth
    of its instructions. The sums are of the 16-bit P that P V uses. At head dim 128 it spilled
    (ptxas: 4 -> 252 bytes unmasked, 60 spill stores in the loop; step 36). The rule is written
    here, not in a module-level constant, because triton's cache keys on this function's source
    and not on the globals it reads."""
    return head_dim == 64


@gluon.jit
def tanh_approx(x):
    """tanh by the GPU's ``tanh.approx.f32`` (one MUFU op, relative error < 2**-10.9): what the
    ``tl`` kernels use for 16-bit inputs (ops/score.py), the only ones these kernels take."""
    return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _produce(q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
             work_slot, work_counter, seqlen_q, seqlen_k, n_heads, group_size, num_m_blocks, n_work, head_group,
             tail_group, lo_off, hi_off, BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr, QUEUE: gl.constexpr):
    """For each of the program's work tiles (``_work``): each consumer's 64 rows of Q into the
    tile's Q slot (work tile d takes slot d % Q_SLOTS, once every consumer has released the tile
    that held it before: ``q_empty``) and its K/V tiles into their rings (K and V
    each with its own depth and mbarriers: a K slot is free once every consumer's S = Q K^T has
    run, a V slot only after their P V). Ring positions run on across work tiles, so the next tile's
    loads start while the consumers finish this one. The K/V descriptors are 3-D (batch, key,
    column) with one batch entry per box, so the keys of a tile that runs past the entry's last
    key arrive as zeros (TMA's out-of-bounds fill), never as the next entry's keys."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    Q_SLOTS: gl.constexpr = q_ready.shape[0]
    CONSUMERS: gl.constexpr = q_smem.shape[0] // Q_SLOTS
    ring = 0  # K/V tiles loaded so far
    done = 0  # work tiles so far
    work = gl.program_id(0)
    while work < n_work:
        b, h, first_row, first_tile, full_start, full_end, end_tile = _work(
            work, seqlen_q, seqlen_k, n_heads, num_m_blocks, n_work, head_group, tail_group, lo_off, hi_off, BOUND_LEFT,
            BOUND_RIGHT, BLOCK_N, CONSUMERS * HALF)
        q_row0 = b * seqlen_q + first_row
        q_slot = _wait_q_slot(q_empty, done, True)
        if QUEUE:  # the consumers read the tile's index once Q has arrived (q_ready orders the store)
            post_scalar(work_slot.index(q_slot), work)
        mbarrier.expect(q_ready.index(q_slot), CONSUMERS * q_desc.block_type.nbytes)
        for c in gl.static_range(CONSUMERS):
            tma.async_copy_global_to_shared(q_desc, [q_row0 + c * HALF, h * D], q_ready.index(q_slot),
                                            q_smem.index(q_slot * CONSUMERS + c))
        ring = _produce_kv(k_desc, v_desc, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, b,
                           (h // group_size) * D, first_tile, end_tile - first_tile, ring)
        done += 1
        work = _next_work(work, work_counter, n_work, QUEUE)
    if QUEUE:  # no tile left: the consumers read n_work and stop
        q_slot = _wait_q_slot(q_empty, done, True)
        post_scalar(work_slot.index(q_slot), n_work)
        mbarrier.arrive(q_ready.index(q_slot), count=1)


@gluon.jit
def _next_work(work, work_counter, n_work, QUEUE: gl.constexpr):
    """The producer's next work tile: G on (G programs, each starting at its own index), or with
    QUEUE the next one no program has taken yet (``work_counter`` counts those taken past the
    first G): programs that drew short tiles come back sooner, and tiles still start in order."""
    if QUEUE:
        taken = gl.atomic_add(work_counter, 1)
        # A launch takes from the counter n_work times in all (the tiles past the programs' first,
        # then one take past the end per program): the last take resets it, so the next launch
        # on the stream finds it at zero (hopper_fwd keeps one per stream).
        if taken == n_work - 1:
            gl.atomic_xchg(work_counter, 0)
        return gl.num_programs(0) + taken
    return work + gl.num_programs(0)


@gluon.jit
def post_scalar(slot, value):
    """One warp writes an int32 to a one-element shared slot (the producer's work tile index for
    the consumers; bwd_hopper's counting warp uses it too)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    slot.store(gl.full([1], value, gl.int32, layout))


@gluon.jit
def read_scalar(slot):
    """A warpgroup reads the int32 ``post_scalar`` wrote."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    return gl.max(slot.load(layout), axis=0)


@gluon.jit
def _wait_q_slot(barriers, done, FREE: gl.constexpr):
    """Wait on work tile ``done``'s Q slot (``done % Q_SLOTS``): for its Q to arrive (``q_ready``),
    or with FREE for every consumer to have released the tile that held the slot before
    (``q_empty``; the first use of each slot does not wait). Returns the slot."""
    Q_SLOTS: gl.constexpr = barriers.shape[0]
    slot = done % Q_SLOTS
    if FREE:
        mbarrier.wait(barriers.index(slot), ((done // Q_SLOTS) & 1) ^ 1, pred=done >= Q_SLOTS)
    else:
        mbarrier.wait(barriers.index(slot), (done // Q_SLOTS) & 1)
    return slot


@gluon.jit
def _produce_kv(k_desc, v_desc, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, batch, kv_col0, first_tile,
                n_tiles, ring):
    """K/V tiles ``first_tile + i`` (i < n_tiles) of one batch entry into their rings at ring
    positions ``ring + i``; returns the next free position."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    K_SLOTS: gl.constexpr = k_ring.shape[0]
    V_SLOTS: gl.constexpr = v_ring.shape[0]
    box: gl.constexpr = k_desc.block_type.shape
    for j in range(first_tile, first_tile + n_tiles):
        key0 = j * BLOCK_N
        k_slot = ring % K_SLOTS
        mbarrier.wait(k_empty.index(k_slot), ((ring // K_SLOTS) & 1) ^ 1, pred=ring >= K_SLOTS)
        mbarrier.expect(k_ready.index(k_slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [batch, key0, kv_col0], k_ready.index(k_slot),
                                        k_ring.index(k_slot)._reinterpret(k_ring.dtype, box, k_desc.layout))
        v_slot = ring % V_SLOTS
        mbarrier.wait(v_empty.index(v_slot), ((ring // V_SLOTS) & 1) ^ 1, pred=ring >= V_SLOTS)
        mbarrier.expect(v_ready.index(v_slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [batch, key0, kv_col0], v_ready.index(v_slot),
                                        v_ring.index(v_slot)._reinterpret(v_ring.dtype, box, v_desc.layout))
        ring += 1
    return ring


@gluon.jit
def _masked_scores(s, key0, row0, lo_off, hi_off, seqlen_k, qk_scale, BOUND_LEFT: gl.constexpr,
                   BOUND_RIGHT: gl.constexpr, KEY_TAIL: gl.constexpr):
    """Base-2 scores of the tile whose first key is ``key0`` (rows from ``row0``), with the keys a
    row does not see set to -inf after scaling (a scale of 0 gives 0 and -inf, never NaN): row r
    sees keys ``r + lo_off <= key <= r + hi_off`` (each bound only where set) and
    ``key < seqlen_k`` (checked only with KEY_TAIL: a tile running past the last key)."""
    HALF_M: gl.constexpr = s.shape[0]
    BLOCK_N: gl.constexpr = s.shape[1]
    # Each bound is one value per row (the scalars folded into the row vector), compared with the
    # constant columns 0 .. BLOCK_N - 1: folding them into the columns instead made the compiler
    # build per-column offsets and bit masks, a third more instructions per masked tile (step 31).
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))[None, :]
    rows = gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s.type.layout))
    t = s * qk_scale
    if BOUND_RIGHT:
        t = gl.where(cols <= (rows + (row0 + hi_off - key0))[:, None], t, float("-inf"))
    if BOUND_LEFT:
        t = gl.where(cols >= (rows + (row0 + lo_off - key0))[:, None], t, float("-inf"))
    if KEY_TAIL:
        t = gl.where(cols < seqlen_k - key0, t, float("-inf"))
    return t


@gluon.jit
def _softmax_masked(s, m_i, key0, row0, lo_off, hi_off, seqlen_k, qk_scale, BOUND_LEFT: gl.constexpr,
                    BOUND_RIGHT: gl.constexpr, KEY_TAIL: gl.constexpr, GUARD: gl.constexpr):
    """``(p, m_new, m_sub)`` of one tile's scores ``s`` under the mask, against the running max
    ``m_i`` (base 2); ``m_sub`` is what was subtracted. GUARD: a row may have seen no key yet (a
    window); its max stays -inf and 0 is subtracted instead, so its p and rescale factor are 0,
    never NaN."""
    t = _masked_scores(s, key0, row0, lo_off, hi_off, seqlen_k, qk_scale, BOUND_LEFT, BOUND_RIGHT, KEY_TAIL)
    m_new = gl.maximum(m_i, gl.max(t, axis=1))
    if GUARD:
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    return gl.exp2(t - m_sub[:, None]), m_new, m_sub


@gluon.jit
def _softmax_plain(s, m_i, qk_scale):
    """``_softmax_masked`` for a tile every row sees whole: the scale folded into exp2's argument
    (one FMA per score)."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    return gl.exp2(s * qk_scale - m_new[:, None]), m_new, m_new


@gluon.jit
def _softmax_step(s, m_i, key0, row0, lo_off, hi_off, seqlen_k, qk_scale, tile_masked, MASK: gl.constexpr,
                  BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr, KEY_TAIL: gl.constexpr, GUARD: gl.constexpr):
    """One tile's softmax step: MASK is PLAIN, MASKED, or EDGES (masked when ``tile_masked``, a
    per-tile decision at run time: a window's edge tiles are masked, its middle is not)."""
    if MASK == EDGES:
        if tile_masked:
            p, m_new, m_sub = _softmax_masked(s, m_i, key0, row0, lo_off, hi_off, seqlen_k, qk_scale, BOUND_LEFT,
                                              BOUND_RIGHT, KEY_TAIL, GUARD)
        else:
            p, m_new, m_sub = _softmax_plain(s, m_i, qk_scale)
    elif MASK == MASKED:
        p, m_new, m_sub = _softmax_masked(s, m_i, key0, row0, lo_off, hi_off, seqlen_k, qk_scale, BOUND_LEFT,
                                          BOUND_RIGHT, KEY_TAIL, GUARD)
    else:
        p, m_new, m_sub = _softmax_plain(s, m_i, qk_scale)
    return p, m_new, m_sub


@gluon.jit
def _fold_tile(i, turn_phase, key0, C: gl.constexpr, q, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, turn,
               ones, acc, p, m_i, l_i, row0, lo_off, hi_off, seqlen_k, qk_scale, softcap_in, tile_masked, last_pos,
               MASK: gl.constexpr, BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr, KEY_TAIL: gl.constexpr,
               GUARD: gl.constexpr, SOFTCAP: gl.constexpr, PINGPONG: gl.constexpr, P_OPERAND: gl.constexpr,
               KEEP_LAST_K: gl.constexpr, KEYS: gl.constexpr):
    """Consumer C's iteration at ring position i (the tile whose first key is ``key0``; its turn
    barrier's phase ``turn_phase``): issue S_i = Q K_i^T and O += P_{i-1} V_{i-1} asynchronously
    (on its turn when PINGPONG), then fold S_i into the online softmax while the second product
    still runs. MASK: whether to hide the keys the rows do not
    see (``_softmax_step``). SOFTCAP: scores ``tanh(S * softcap_in)``, and ``qk_scale`` is
    ``softcap * log2(e)``. P_OPERAND: ``p`` comes and goes as the 16-bit A operand of P V, not as
    float32 scores (at the start of an iteration the float32 P of the last tile and the next S
    would be live together: 64 registers more, which three consumers' 160 do not have).
    KEEP_LAST_K: the K slot at ring position ``last_pos`` (the work tile's last) is kept for the
    output (``_store_out``). KEYS: S takes the K tile's first KEYS keys only (the slot's BLOCK_N,
    or half of it on the diagonal: ``_half_diagonal``); the returned P is ``[HALF_M, KEYS]``.
    ``l_i``: the row sums of P so far, [HALF_M]; with ``_row_sums_by_mma`` a [HALF_M, SUM_N]
    accumulator (column 0) that ``P_{i-1} @ ones`` updates with P_{i-1} V_{i-1}."""
    K_SLOTS: gl.constexpr = k_ring.shape[0]
    V_SLOTS: gl.constexpr = v_ring.shape[0]
    o_layout: gl.constexpr = acc.type.layout
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    k_slot = i % K_SLOTS
    v_slot = (i - 1) % V_SLOTS
    mbarrier.wait(k_ready.index(k_slot), (i // K_SLOTS) & 1)
    mbarrier.wait(v_ready.index(v_slot), ((i - 1) // V_SLOTS) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(C), turn_phase)  # this warpgroup's turn to issue
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, KEYS, 16])
    s_tok = warpgroup_mma(q, _first_keys(k_ring.index(k_slot), KEYS).permute((1, 0)),
                          gl.zeros([HALF_M, KEYS], gl.float32, s_layout), use_acc=False, is_async=True)
    # Row statistics in the layout of this S's rows (the same threads at any KEYS: a no-op
    # conversion, needed because the type names the tile's width), and back on return.
    SUM_MMA: gl.constexpr = _row_sums_by_mma(q.shape[1])
    carried: gl.constexpr = m_i.type.layout
    m_i = gl.convert_layout(m_i, gl.SliceLayout(1, s_layout))
    if not SUM_MMA:
        l_i = gl.convert_layout(l_i, gl.SliceLayout(1, s_layout))
    if P_OPERAND:
        p_op = p
    else:
        p_op = gl.convert_layout(p.to(q.dtype), p_layout)
    if SUM_MMA:  # issued before P V, so that the wait below leaves P V alone running
        l_tok = _add_row_sums(l_i, p_op, ones, True)
    acc_tok = warpgroup_mma(p_op, v_ring.index(v_slot), acc, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - C), count=1)
    if SUM_MMA:
        s, l_i = warpgroup_mma_wait(1, deps=[s_tok, l_tok])  # S_i and P_{i-1}'s row sums done
    else:
        s = warpgroup_mma_wait(1, deps=[s_tok])  # S_i done; P_{i-1} V_{i-1} may still run
    _release_k(k_empty, i, last_pos, KEEP_LAST_K)
    if SOFTCAP:
        s = tanh_approx(s * softcap_in)
    p, m_new, m_sub = _softmax_step(s, m_i, key0, row0, lo_off, hi_off, seqlen_k, qk_scale, tile_masked, MASK,
                                    BOUND_LEFT, BOUND_RIGHT, KEY_TAIL, GUARD)
    alpha = gl.exp2(m_i - m_sub)
    if not SUM_MMA:
        l_i = l_i * alpha + gl.sum(p, axis=1)
    acc, p_op = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
    mbarrier.arrive(v_empty.index(v_slot), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    if P_OPERAND:
        p = gl.convert_layout(p.to(q.dtype), p_layout)
    if SUM_MMA:  # P_i's sums are added with P_i V_i, in the next iteration or _last_product
        l_i = l_i * gl.convert_layout(alpha, gl.SliceLayout(1, l_i.type.layout))[:, None]
    else:
        l_i = gl.convert_layout(l_i, carried)
    return acc, p, gl.convert_layout(m_new, carried), l_i


@gluon.jit
def _consume(C: gl.constexpr, q_smem, k_ring, v_ring, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
             s_done, o_stage, o_turn, ones, work_slot, out_ptr, out_desc, lse_ptr, seqlen_q, seqlen_k,
             n_heads, num_m_blocks, n_work, head_group, tail_group, lo_off, hi_off, qk_scale, softcap_in,
             D: gl.constexpr, BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr, KEY_TAIL: gl.constexpr,
             GUARD: gl.constexpr, SOFTCAP: gl.constexpr, PINGPONG: gl.constexpr, QUEUE: gl.constexpr,
             ROW_TAIL: gl.constexpr, O_TMA: gl.constexpr):
    """Consumer warpgroup C over the program's work tiles (``_work``), in the producer's order:
    ``ring`` counts the K/V tiles consumed so far (ring positions), ``done`` the work tiles; each
    tile of n key tiles runs n - 1 loop iterations, each one phase of the turn barriers."""
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    Q_SLOTS: gl.constexpr = q_ready.shape[0]
    ROWS: gl.constexpr = q_smem.shape[0] // Q_SLOTS * HALF_M
    ring = 0
    done = 0
    work = gl.program_id(0)
    if QUEUE:
        mbarrier.wait(q_ready.index(0), 0)
        work = read_scalar(work_slot.index(0))
    while work < n_work:
        b, h, first_row, first_tile, full_start, full_end, end_tile = _work(
            work, seqlen_q, seqlen_k, n_heads, num_m_blocks, n_work, head_group, tail_group, lo_off, hi_off, BOUND_LEFT,
            BOUND_RIGHT, BLOCK_N, ROWS)
        if not QUEUE:
            _wait_q_slot(q_ready, done, False)
        _attend(C, ring, ring - done, done, q_smem, k_ring, v_ring, q_empty, k_ready, k_empty, v_ready, v_empty,
                turn, s_done, o_stage, o_turn, ones, out_ptr, out_desc, lse_ptr, b * seqlen_q + first_row, h * D,
                n_heads * D, (b * n_heads + h).to(gl.int64) * seqlen_q + first_row, first_row, lo_off, hi_off,
                seqlen_q, seqlen_k, first_tile, full_start, full_end, end_tile, qk_scale, softcap_in, D, BOUND_LEFT,
                BOUND_RIGHT, KEY_TAIL, GUARD, SOFTCAP, PINGPONG, ROW_TAIL, O_TMA)
        ring += end_tile - first_tile
        done += 1
        if QUEUE:  # the next tile's Q, or the producer's stop
            work = read_scalar(work_slot.index(_wait_q_slot(q_ready, done, False)))
        else:
            work += gl.num_programs(0)


@gluon.jit
def _attend(C: gl.constexpr, ring, turns, done, q_smem, k_ring, v_ring, q_empty, k_ready, k_empty, v_ready, v_empty,
            turn, s_done, o_stage, o_turn, ones, out_ptr, out_desc, lse_ptr, q_row0, q_col0, row_stride, lse_row0,
            first_row, lo_off, hi_off, seqlen_q, seqlen_k, first_tile, full_start, full_end, end_tile, qk_scale,
            softcap_in, D: gl.constexpr, BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr, KEY_TAIL: gl.constexpr,
            GUARD: gl.constexpr, SOFTCAP: gl.constexpr, PINGPONG: gl.constexpr, ROW_TAIL: gl.constexpr,
            O_TMA: gl.constexpr):
    """Consumer warpgroup C on one work tile: query rows ``q_row0 + C * HALF_M + [0, HALF_M)``
    (``first_row``: the tile's first row's position); writes their output and LSE. Key tiles
    ``[first_tile, end_tile)``, the first at ring position ``ring``: those in ``[full_start,
    full_end)`` every row sees whole, the others (and the first, always) take the mask (consumer 0
    may take only the last tile's first 64 keys: ``_half_diagonal``); ``turns``:
    the loop iterations run before this tile (the turn barriers' phase). GUARD: rows may see no
    key at all (out 0, LSE +inf). ROW_TAIL: the tile may run past the last query row (rows from
    ``seqlen_q`` on are computed on whatever Q holds there and not stored). Reads Q from the work
    tile's slot (``done % Q_SLOTS``) and releases it (``q_empty``) once its last product has run.
    O_TMA: the output leaves by a TMA store, staged in the tile's last K slot where two consumers'
    rows fill it (``_store_out``; the slot is released after the store), else in ``o_stage``
    (``_store_out_in_turns``)."""
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    MASK: gl.constexpr = MASKED if BOUND_LEFT or BOUND_RIGHT or KEY_TAIL else PLAIN
    KEEP_LAST_K: gl.constexpr = _out_in_last_k_slot(O_TMA, BLOCK_N)
    # Accumulator layouts of the two products: S = Q K^T is [HALF_M, BLOCK_N], O is [HALF_M, D];
    # each takes one wgmma as wide as its tile (their rows sit on the same threads).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    Q_SLOTS: gl.constexpr = q_empty.shape[0]
    CONSUMERS: gl.constexpr = q_smem.shape[0] // Q_SLOTS
    q_slot = done % Q_SLOTS
    q = q_smem.index(q_slot * CONSUMERS + C)
    row0 = first_row + C * HALF_M
    acc = gl.zeros([HALF_M, D], gl.float32, layout=o_layout)
    K_SLOTS: gl.constexpr = k_ring.shape[0]
    V_SLOTS: gl.constexpr = v_ring.shape[0]
    k_slot = ring % K_SLOTS
    mbarrier.wait(k_ready.index(k_slot), (ring // K_SLOTS) & 1)
    s = warpgroup_mma(q, k_ring.index(k_slot).permute((1, 0)),
                      gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=s_layout), use_acc=False)
    last_pos = ring + end_tile - first_tile - 1  # the work tile's last K/V tile's ring position
    _release_k(k_empty, ring, last_pos, KEEP_LAST_K)
    if SOFTCAP:
        s = tanh_approx(s * softcap_in)
    # The first tile may be cut by any bound; without GUARD every row sees one of its keys.
    p, m_i, _ = _softmax_step(s, gl.full([HALF_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout)),
                              first_tile * BLOCK_N, row0, lo_off, hi_off, seqlen_k, qk_scale, True, MASK, BOUND_LEFT,
                              BOUND_RIGHT, KEY_TAIL, GUARD)
    SUM_MMA: gl.constexpr = _row_sums_by_mma(D)
    if SUM_MMA:  # the sums come with each P V (_fold_tile, _last_product)
        l_i = gl.zeros([HALF_M, SUM_N], gl.float32, layout=gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, SUM_N, 16]))
    else:
        l_i = gl.sum(p, axis=1)
    P_OPERAND: gl.constexpr = CONSUMERS == 3  # three consumers' registers (_fold_tile)
    if P_OPERAND:
        p = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    ring0 = ring - first_tile  # key tile j sits at ring position ring0 + j
    turn0 = turns - first_tile - 1  # its loop iteration takes the turn barriers' phase (turn0 + j) & 1
    if BOUND_LEFT:
        # Masked tiles at both ends: one loop that decides per tile (a loop per kind spilled).
        for j in range(first_tile + 1, end_tile):
            acc, p, m_i, l_i = _fold_tile(ring0 + j, (turn0 + j) & 1, j * BLOCK_N, C, q, k_ring, v_ring, k_ready,
                                          k_empty, v_ready, v_empty, turn, ones, acc, p, m_i, l_i, row0, lo_off, hi_off,
                                          seqlen_k, qk_scale, softcap_in, (j < full_start) | (j >= full_end), last_pos,
                                          EDGES, BOUND_LEFT, BOUND_RIGHT, KEY_TAIL, GUARD, SOFTCAP, PINGPONG,
                                          P_OPERAND, KEEP_LAST_K, BLOCK_N)
        acc, l_i = _last_product(acc, l_i, p, ones, v_ring, v_ready, v_empty, q_empty, s_done, q_slot, last_pos,
                                 KEEP_LAST_K, P_OPERAND)
    else:
        for j in range(gl.maximum(full_start, first_tile + 1), full_end):  # tiles every row sees whole
            acc, p, m_i, l_i = _fold_tile(ring0 + j, (turn0 + j) & 1, j * BLOCK_N, C, q, k_ring, v_ring, k_ready,
                                          k_empty, v_ready, v_empty, turn, ones, acc, p, m_i, l_i, row0, lo_off, hi_off,
                                          seqlen_k, qk_scale, softcap_in, False, last_pos, PLAIN, BOUND_LEFT,
                                          BOUND_RIGHT, KEY_TAIL, GUARD, SOFTCAP, PINGPONG, P_OPERAND, KEEP_LAST_K,
                                          BLOCK_N)
        # The diagonal / right edge, and a last tile past the last key; on the diagonal consumer 0
        # may need only the last tile's first half (_half_diagonal), which runs after the loop.
        HALF_DIAG: gl.constexpr = _half_diagonal_applies(C, BOUND_RIGHT, BLOCK_N, CONSUMERS)
        half = 0  # 1: the last tile runs as a half tile after the loop
        if HALF_DIAG:
            half = _half_diagonal(row0, hi_off, seqlen_k, first_tile, end_tile, BLOCK_N).to(gl.int32)
        if MASK == MASKED:
            for j in range(gl.maximum(full_end, first_tile + 1), end_tile - half):
                acc, p, m_i, l_i = _fold_tile(ring0 + j, (turn0 + j) & 1, j * BLOCK_N, C, q, k_ring, v_ring,
                                              k_ready, k_empty, v_ready, v_empty, turn, ones, acc, p, m_i, l_i, row0,
                                              lo_off, hi_off, seqlen_k, qk_scale, softcap_in, True, last_pos, MASKED,
                                              BOUND_LEFT, BOUND_RIGHT, KEY_TAIL, GUARD, SOFTCAP, PINGPONG, P_OPERAND,
                                              KEEP_LAST_K, BLOCK_N)
        if half != 0:  # decided at compile time where HALF_DIAG is off (half is the constant 0)
            j = end_tile - 1
            acc, p_half, m_i, l_i = _fold_tile(ring0 + j, (turn0 + j) & 1, j * BLOCK_N, C, q, k_ring, v_ring,
                                               k_ready, k_empty, v_ready, v_empty, turn, ones, acc, p, m_i, l_i, row0,
                                               lo_off, hi_off, seqlen_k, qk_scale, softcap_in, True, last_pos, MASKED,
                                               BOUND_LEFT, BOUND_RIGHT, KEY_TAIL, GUARD, SOFTCAP, PINGPONG, P_OPERAND,
                                               KEEP_LAST_K, HALF_M)
            acc, l_i = _last_product(acc, l_i, p_half, ones, v_ring, v_ready, v_empty, q_empty, s_done, q_slot,
                                     last_pos, KEEP_LAST_K, P_OPERAND)
        else:
            acc, l_i = _last_product(acc, l_i, p, ones, v_ring, v_ready, v_empty, q_empty, s_done, q_slot, last_pos,
                                     KEEP_LAST_K, P_OPERAND)

    if SUM_MMA:  # column 0 holds the sums, the others 0
        l_i = gl.convert_layout(gl.sum(l_i, axis=1), gl.SliceLayout(1, s_layout))
    if GUARD:  # rows that saw no key: out 0, LSE +inf (FlashAttention-2's convention)
        has_keys = l_i > 0.0
        safe_l = gl.where(has_keys, l_i, 1.0)
        inv_l = gl.where(has_keys, 1.0 / safe_l, 0.0)
        lse = gl.where(has_keys, (m_i + gl.log2(safe_l)) / LOG2E, float("inf"))
    else:
        inv_l = 1.0 / l_i
        lse = (m_i + gl.log2(l_i)) / LOG2E
    rows = C * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, o_layout))
    cols = q_col0 + gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    out = acc * gl.convert_layout(inv_l, gl.SliceLayout(1, o_layout))[:, None]
    out_rows = (q_row0 + rows).to(gl.int64)
    lse_rows = C * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s_layout))
    if ROW_TAIL:
        gl.store(out_ptr + out_rows[:, None] * row_stride + cols[None, :], out.to(q_smem.dtype),
                 mask=(first_row + rows < seqlen_q)[:, None])
        gl.store(lse_ptr + lse_row0 + lse_rows, lse, mask=first_row + lse_rows < seqlen_q)
    elif O_TMA:
        gl.store(lse_ptr + lse_row0 + lse_rows, lse)
        if KEEP_LAST_K:
            _store_out(C, out.to(q_smem.dtype), k_ring, k_empty, s_done, done, last_pos % K_SLOTS, out_desc, q_row0,
                       q_col0)
        else:
            _store_out_in_turns(C, out.to(q_smem.dtype), o_stage, o_turn, done, out_desc, q_row0, q_col0)
    else:
        gl.store(out_ptr + out_rows[:, None] * row_stride + cols[None, :], out.to(q_smem.dtype))
        gl.store(lse_ptr + lse_row0 + lse_rows, lse)


@gluon.jit
def _last_product(acc, l_i, p, ones, v_ring, v_ready, v_empty, q_empty, s_done, q_slot, last_pos,
                  KEEP_LAST_K: gl.constexpr, P_OPERAND: gl.constexpr):
    """The work tile's last ``O += P V`` (V: the first ``p.shape[1]`` keys of the last V slot; P
    as float32 scores, or already the 16-bit operand with P_OPERAND), after releasing the tile's Q
    slot (``q_empty``: every S = Q K^T has run) and, with KEEP_LAST_K, the last K slot to the
    output staging (``s_done``). Returns ``(acc, l_i)``: with ``_row_sums_by_mma`` this P's row
    sums are added to ``l_i`` too."""
    V_SLOTS: gl.constexpr = v_ring.shape[0]
    mbarrier.arrive(q_empty.index(q_slot), count=1)
    if KEEP_LAST_K:
        mbarrier.arrive(s_done, count=1)
    v_slot = last_pos % V_SLOTS
    mbarrier.wait(v_ready.index(v_slot), (last_pos // V_SLOTS) & 1)
    if not P_OPERAND:
        p = gl.convert_layout(p.to(v_ring.dtype), gl.DotOperandLayout(operand_index=0, parent=acc.type.layout,
                                                                       k_width=2))
    if _row_sums_by_mma(acc.shape[1]):
        l_i = _add_row_sums(l_i, p, ones, False)
    acc = warpgroup_mma(p, _first_keys(v_ring.index(v_slot), p.shape[1]), acc)
    mbarrier.arrive(v_empty.index(v_slot), count=1)
    return acc, l_i


@gluon.jit
def _add_row_sums(l_acc, p_op, ones, IS_ASYNC: gl.constexpr):
    """``l_acc += P @ ones``: P (the 16-bit A operand of P V, [HALF_M, keys], in the same registers:
    an MMA's A layout does not depend on its N) against the first keys of ``ones`` ([SUM_N,
    BLOCK_N], row 0 ones, read transposed); ``l_acc`` is [HALF_M, SUM_N], its column 0 the row
    sums, the others 0. IS_ASYNC: as ``warpgroup_mma``'s (a token to wait on)."""
    a = gl.convert_layout(p_op, gl.DotOperandLayout(operand_index=0, parent=l_acc.type.layout, k_width=2))
    return warpgroup_mma(a, _first_keys(ones, p_op.shape[1], 1).permute((1, 0)), l_acc, is_async=IS_ASYNC)


@gluon.jit
def _first_keys(tile, KEYS: gl.constexpr, DIM: gl.constexpr = 0):
    """A tile's first KEYS keys along dimension DIM (a K or V slot's rows; the ones tile's columns):
    the whole tile where KEYS is its extent."""
    if KEYS == tile.shape[DIM]:
        return tile
    return tile.slice(0, KEYS, dim=DIM)


@gluon.constexpr_function
def _half_diagonal_applies(C, BOUND_RIGHT, BLOCK_N, CONSUMERS):
    """Whether consumer C may take only the first half of the work tile's last key tile
    (``_half_diagonal``): consumer 0 of two under a right bound, with 128-key tiles (two
    consumers' 64 rows each: its rows end half a tile before consumer 1's). Asked only where no
    left bound is set (a left bound takes the loop that decides per tile)."""
    return C == 0 and BOUND_RIGHT and CONSUMERS == 2 and BLOCK_N == 2 * HALF_M.value


@gluon.jit
def _half_diagonal(row0, hi_off, seqlen_k, first_tile, end_tile, BLOCK_N: gl.constexpr):
    """Whether rows ``row0 .. row0 + HALF_M - 1`` see none of the last key tile's second half
    (keys past ``row + hi_off`` or ``seqlen_k`` are hidden) and the tile is not the work tile's
    first (which runs before the loop): then S and P V take its first HALF_M keys only, half the
    products (a square causal call's every diagonal tile but a head's first)."""
    last_key = gl.minimum(row0 + HALF_M - 1 + hi_off, seqlen_k - 1)
    return (end_tile - first_tile > 1) & (last_key < (end_tile - 1) * BLOCK_N + HALF_M)


@gluon.constexpr_function
def _out_in_last_k_slot(O_TMA, BLOCK_N):
    """Whether the output by TMA stores is staged in the work tile's last K slot (``_store_out``):
    where two consumers' 64 rows fill a slot of BLOCK_N keys; else in a buffer of its own
    (``_store_out_in_turns``)."""
    return O_TMA and BLOCK_N == 2 * HALF_M.value


@gluon.jit
def _release_k(k_empty, pos, last_pos, KEEP_LAST_K: gl.constexpr):
    """Release the K slot of ring position ``pos`` once this consumer's S = Q K^T has read it; with
    KEEP_LAST_K the work tile's last slot (``last_pos``) is kept for the output and released by
    ``_store_out``."""
    K_SLOTS: gl.constexpr = k_empty.shape[0]
    if KEEP_LAST_K:
        mbarrier.arrive(k_empty.index(pos % K_SLOTS), count=1, pred=pos != last_pos)
    else:
        mbarrier.arrive(k_empty.index(pos % K_SLOTS), count=1)


@gluon.jit
def _store_out(C: gl.constexpr, out, k_ring, k_empty, s_done, done, k_slot, out_desc, q_row0, q_col0):
    """Consumer C's output rows by a TMA store (whole 128-byte lines; without the stores from the
    accumulator's layout, 4 bytes per thread and row piece, the head-dim-128 forward ran 1.04-1.17x
    as fast at 512-4096 tokens), staged in its 64 rows of the work tile's last K slot once every
    consumer's last S = Q K^T has read that slot (``s_done``); the producer refills it only after the
    store has read it (the consumers' ``k_empty`` arrivals for that slot wait until here)."""
    HALF: gl.constexpr = out.shape[0]
    mbarrier.wait(s_done, done & 1)
    rows = k_ring.index(k_slot).slice(C * HALF, HALF, dim=0)
    rows.store(out)
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [q_row0 + C * HALF, q_col0], rows)
    tma.store_wait(0)
    mbarrier.arrive(k_empty.index(k_slot), count=1)


@gluon.jit
def _store_out_in_turns(C: gl.constexpr, out, o_stage, o_turn, done, out_desc, q_row0, q_col0):
    """Consumer C's output rows by a TMA store staged in ``o_stage``, one buffer of 64 rows the two
    consumers take in turns (where the K slots are too narrow for ``_store_out``: head dim 256's
    64-key slots, with room left for one warpgroup's rows only): consumer 0 then 1 on every work
    tile, each waiting on its ``o_turn`` barrier and passing the buffer on once its store has read
    it."""
    HALF: gl.constexpr = out.shape[0]
    mbarrier.wait(o_turn.index(C), done & 1)
    o_stage.store(out)
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [q_row0 + C * HALF, q_col0], o_stage)
    tma.store_wait(0)
    mbarrier.arrive(o_turn.index(1 - C), count=1)


@gluon.jit
def _work(work, seqlen_q, seqlen_k, n_heads, num_m_blocks, n_work, head_group, tail_group, lo_off, hi_off,
          BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr, BLOCK_N: gl.constexpr, ROWS: gl.constexpr):
    """Work tile ``work`` (of ``n_work``, in hopper_order's order: head-major so a head's tiles
    share its K/V in L2; with a right bound, causal, in groups of heads, their longest Q tiles,
    the last, first): ``(b, h, first_row)`` and its key tiles (``_key_tiles``); ROWS query rows
    per work tile."""
    pid_bh, pid_m = head_and_rank(work, num_m_blocks, n_work // num_m_blocks, head_group, tail_group)
    if BOUND_RIGHT:
        pid_m = num_m_blocks - 1 - pid_m
    first_row = pid_m * ROWS
    first_tile, full_start, full_end, end_tile = _key_tiles(first_row, seqlen_k, lo_off, hi_off, BOUND_LEFT,
                                                            BOUND_RIGHT, BLOCK_N, ROWS)
    return pid_bh // n_heads, pid_bh % n_heads, first_row, first_tile, full_start, full_end, end_tile


@gluon.jit
def _key_tiles(first_row, seqlen_k, lo_off, hi_off, BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr,
               BLOCK_N: gl.constexpr, ROWS: gl.constexpr):
    """The key tiles rows ``first_row .. first_row + ROWS - 1`` need (row r sees keys ``r + lo_off ..
    r + hi_off``, each bound only where set, and ``0 .. seqlen_k - 1``): ``(first_tile, full_start,
    full_end, end_tile)``, tiles in ``[full_start, full_end)`` seen whole by every row. At least one
    tile: rows that see no key run one masked tile (and get out 0, LSE +inf)."""
    last_row = first_row + ROWS - 1
    lo = 0
    full_lo = 0
    hi = seqlen_k
    full_hi = seqlen_k
    if BOUND_LEFT:
        lo = gl.minimum(gl.maximum(first_row + lo_off, 0), seqlen_k)
        full_lo = gl.maximum(last_row + lo_off, 0)
    if BOUND_RIGHT:
        hi = gl.maximum(gl.minimum(last_row + hi_off + 1, seqlen_k), 0)
        full_hi = gl.maximum(gl.minimum(first_row + hi_off + 1, seqlen_k), 0)
    first_tile = lo // BLOCK_N
    end_tile = gl.maximum((hi + BLOCK_N - 1) // BLOCK_N, first_tile + 1)
    full_start = gl.minimum(gl.maximum(first_tile, (full_lo + BLOCK_N - 1) // BLOCK_N), end_tile)
    full_end = gl.minimum(gl.maximum(full_start, full_hi // BLOCK_N), end_tile)
    return first_tile, full_start, full_end, end_tile


@gluon.jit
def _hopper_fwd_kernel(q_desc, k_desc, v_desc, out_ptr, out_desc, lse_ptr, work_counter, seqlen_q, seqlen_k, n_heads,
                       group_size, num_m_blocks, n_work, head_group, tail_group, qk_scale, softcap_in, window_left,
                       window_right, D: gl.constexpr, K_SLOTS: gl.constexpr, V_SLOTS: gl.constexpr,
                       BOUND_LEFT: gl.constexpr, BOUND_RIGHT: gl.constexpr, KEY_TAIL: gl.constexpr, GUARD: gl.constexpr,
                       SOFTCAP: gl.constexpr, PINGPONG: gl.constexpr, QUEUE: gl.constexpr, CONSUMERS: gl.constexpr,
                       ROW_TAIL: gl.constexpr, O_TMA: gl.constexpr, Q_SLOTS: gl.constexpr):
    # Program p runs work tiles p, p + G, p + 2G, ... of the n_work = num_m_blocks * batch *
    # n_heads, or with QUEUE tile p and then the next untaken one (work_counter counts those past
    # the first G), G programs (program_count), the producer loading a tile's Q and first K/V
    # while the consumers finish the previous one. q is viewed as 2-D
    # (B * S, H * D), k and v as 3-D (B, S, H * D). Row i sees keys i + diag - window_left ..
    # i + diag + window_right (bottom-right aligned, diag = seqlen_k - seqlen_q; BOUND_LEFT /
    # BOUND_RIGHT: the bound is set). KEY_TAIL: seqlen_k is not a multiple of the key tile.
    # GUARD: some row may see no key (not plain causal). CONSUMERS warpgroups of 64 query rows (2
    # or 3; ping-pong takes 2); ROW_TAIL: seqlen_q is not a multiple of the work tile's rows.
    # O_TMA: out_desc is a TMA descriptor over out (B * S, H * D) with 64-row boxes, through which
    # the output leaves (two consumers; staged in the last K slot where a K tile has 128 rows, else
    # in o_stage); otherwise out_ptr takes stores. Q_SLOTS: work tiles' Q buffers (2: the producer
    # loads the next tile's Q while the consumers still read this one's).
    gl.static_assert(CONSUMERS == 2 or (CONSUMERS == 3 and not PINGPONG))
    gl.static_assert(not O_TMA or (CONSUMERS == 2 and not ROW_TAIL))
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    lo_off = seqlen_k - seqlen_q - window_left
    hi_off = seqlen_k - seqlen_q + window_right

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [Q_SLOTS * CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    # The rings hold 2-D tiles (what the MMAs read); the producer views each slot as its 3-D box.
    kv_tile: gl.constexpr = [BLOCK_N, D]
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(kv_tile, k_desc.dtype)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [K_SLOTS] + kv_tile, kv_layout)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [V_SLOTS] + kv_tile, kv_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [K_SLOTS, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [K_SLOTS, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [V_SLOTS, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [V_SLOTS, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
    s_done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    OWN_STAGE: gl.constexpr = O_TMA and not _out_in_last_k_slot(O_TMA, BLOCK_N)
    if OWN_STAGE:  # the output's staging buffer, taken in turns (_store_out_in_turns)
        o_stage = gl.allocate_shared_memory(out_desc.dtype, out_desc.block_type.shape, out_desc.layout)
        o_turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    else:  # staged in the last K slot (_store_out), or not staged: unused
        o_stage = q_smem
        o_turn = turn
    work_slot = gl.allocate_shared_memory(gl.int32, [Q_SLOTS, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    if _row_sums_by_mma(D):  # [SUM_N, BLOCK_N], row 0 ones: P @ ones^T gives P's row sums
        ones_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        first = gl.arange(0, SUM_N, layout=gl.SliceLayout(1, ones_layout))[:, None] == 0
        ones_value = gl.where(first, gl.full([SUM_N, BLOCK_N], 1.0, gl.float32, ones_layout), 0.0)
        ones = gl.allocate_shared_memory(k_desc.dtype, [SUM_N, BLOCK_N],
                                         gl.NVMMASharedLayout.get_default_for([SUM_N, BLOCK_N], k_desc.dtype),
                                         ones_value.to(k_desc.dtype))
    else:  # unused
        ones = k_ring
    for i in gl.static_range(K_SLOTS):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)  # released by every consumer
    for i in gl.static_range(V_SLOTS):
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    for i in gl.static_range(Q_SLOTS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=CONSUMERS)  # released by every consumer
    mbarrier.init(s_done, count=CONSUMERS)  # every consumer's last S of the work tile has run (O_TMA)
    if OWN_STAGE:
        mbarrier.init(o_turn.index(0), count=1)
        mbarrier.init(o_turn.index(1), count=1)
    fence_async_shared()
    mbarrier.arrive(turn.index(0), count=1)  # consumer 0 issues first
    if OWN_STAGE:
        mbarrier.arrive(o_turn.index(0), count=1)  # ... and stages its output first

    # One call per consumer count, written out: a kernel cannot hold a JIT function in a variable,
    # and a tuple of the shared arguments turns their constexprs into tensors (both tried).
    if CONSUMERS == 3:
        gl.warp_specialize([
            (_consume, (0, q_smem, k_ring, v_ring, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
                        s_done, o_stage, o_turn, ones, work_slot, out_ptr, out_desc, lse_ptr, seqlen_q, seqlen_k,
                        n_heads, num_m_blocks, n_work, head_group, tail_group, lo_off, hi_off, qk_scale, softcap_in, D,
                        BOUND_LEFT, BOUND_RIGHT, KEY_TAIL, GUARD, SOFTCAP, PINGPONG, QUEUE, ROW_TAIL, O_TMA)),
            (_consume, (1, q_smem, k_ring, v_ring, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
                        s_done, o_stage, o_turn, ones, work_slot, out_ptr, out_desc, lse_ptr, seqlen_q, seqlen_k,
                        n_heads, num_m_blocks, n_work, head_group, tail_group, lo_off, hi_off, qk_scale, softcap_in, D,
                        BOUND_LEFT, BOUND_RIGHT, KEY_TAIL, GUARD, SOFTCAP, PINGPONG, QUEUE, ROW_TAIL, O_TMA)),
            (_consume, (2, q_smem, k_ring, v_ring, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
                        s_done, o_stage, o_turn, ones, work_slot, out_ptr, out_desc, lse_ptr, seqlen_q, seqlen_k,
                        n_heads, num_m_blocks, n_work, head_group, tail_group, lo_off, hi_off, qk_scale, softcap_in, D,
                        BOUND_LEFT, BOUND_RIGHT, KEY_TAIL, GUARD, SOFTCAP, PINGPONG, QUEUE, ROW_TAIL, O_TMA)),
            (_produce, (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_ready, q_empty, k_ready, k_empty, v_ready,
                        v_empty, work_slot, work_counter, seqlen_q, seqlen_k, n_heads, group_size, num_m_blocks,
                        n_work, head_group, tail_group, lo_off, hi_off, BOUND_LEFT, BOUND_RIGHT, QUEUE)),
        ], [4, 4, 1], [CONSUMER_REGS_3, CONSUMER_REGS_3, 24])
    else:
        gl.warp_specialize([
            (_consume, (0, q_smem, k_ring, v_ring, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
                        s_done, o_stage, o_turn, ones, work_slot, out_ptr, out_desc, lse_ptr, seqlen_q, seqlen_k,
                        n_heads, num_m_blocks, n_work, head_group, tail_group, lo_off, hi_off, qk_scale, softcap_in, D,
                        BOUND_LEFT, BOUND_RIGHT, KEY_TAIL, GUARD, SOFTCAP, PINGPONG, QUEUE, ROW_TAIL, O_TMA)),
            (_consume, (1, q_smem, k_ring, v_ring, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
                        s_done, o_stage, o_turn, ones, work_slot, out_ptr, out_desc, lse_ptr, seqlen_q, seqlen_k,
                        n_heads, num_m_blocks, n_work, head_group, tail_group, lo_off, hi_off, qk_scale, softcap_in, D,
                        BOUND_LEFT, BOUND_RIGHT, KEY_TAIL, GUARD, SOFTCAP, PINGPONG, QUEUE, ROW_TAIL, O_TMA)),
            (_produce, (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_ready, q_empty, k_ready, k_empty, v_ready,
                        v_empty, work_slot, work_counter, seqlen_q, seqlen_k, n_heads, group_size, num_m_blocks,
                        n_work, head_group, tail_group, lo_off, hi_off, BOUND_LEFT, BOUND_RIGHT, QUEUE)),
        ], [4, 1], [CONSUMER_REGS, 24])


_hopper_fwd_launch = FastLaunch(_hopper_fwd_kernel)


def _rows(tile) -> int:
    """Query rows per work tile: 64 per consumer warpgroup."""
    return tile.consumers * HALF_M.value


def hopper_fwd_eligible(q, k, v, features, varlen) -> bool:
    """Whether a forward takes this kernel: see the module docstring. Pure host checks."""
    if not configs.GLUON_FWD or varlen is not None:
        return False
    # The size rules first: they turn away short calls, whose host time matters most, cheaply.
    seqlen_q, head_dim, seqlen_k = q.shape[1], q.shape[3], k.shape[1]
    tile = configs.gluon_forward_tile(head_dim, features.masked, seqlen_k, features.softcap > 0)
    if tile is None:
        return False
    min_seqlen_k = tile.min_seqlen_k
    if features.softcap > 0 and tile.softcap_min_seqlen_k is not None:
        min_seqlen_k = tile.softcap_min_seqlen_k
    if seqlen_k < min_seqlen_k:
        return False
    # Two consumers take whole 128-row tiles; three any multiple of 64 rows (the last 192-row tile
    # runs past the end: ROW_TAIL).
    if seqlen_q % (HALF_M.value if tile.consumers == 3 else _rows(tile)):
        return False
    if not gluon_applies(q, k, features, varlen, q, k, v, any_window=True):
        return False
    return mask_admitted(features, seqlen_q, seqlen_k, configs.SM90_GLUON_FWD_WINDOW_MIN_KEYS.get(head_dim))


def o_by_tma(tile) -> bool:
    """Whether the kernel stores this tile's output by TMA: where the table entry asks for it and
    there are two consumers, staged in the last K slot where their 64 rows fill one 128-key slot
    (``_store_out``), else in a buffer they take in turns (``_store_out_in_turns``)."""
    return tile.o_tma and tile.consumers == 2


def program_count(n_work: int, masked: bool, queue: bool, device) -> tuple[int, bool]:
    """``(programs, queue)`` of the grid. Unmasked attention, whose work tiles are all equally
    long: one program per SM, each running every G-th tile in turn. Under a causal or window
    mask tiles differ in length, and a fixed G-th share measured up to 33% slower (the shares
    sample a periodic pattern of lengths, so some programs draw mostly long tiles): one program
    per SM taking tiles from a queue where the table entry says ``queue``, else one program per
    work tile (the hardware hands each SM the next as one ends). One program per tile with
    ``configs.GLUON_FWD_PERSISTENT`` off."""
    if not configs.GLUON_FWD_PERSISTENT or (masked and not queue):
        return n_work, False
    programs = min(n_work, configs.sm_count(device))
    return programs, masked and programs < n_work


# The queue's counters (tiles taken past each program's first), one per (device, stream): zero
# before every launch, as each launch's last take resets its counter. PyTorch draws streams from
# a fixed pool per device, so there are few; none is freed (a launch may still be using it).
_work_counters = {}


def _work_counter(device) -> torch.Tensor:
    """The queue counter for a launch on ``device``'s current stream. Launches on different
    streams may overlap, so each stream has its own; while a CUDA graph is being captured a new
    zeroed one (the graph's replays may run on any stream; the zero fill is part of the graph)."""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, dtype=torch.int32, device=device)
    key = (device.index, driver.active.get_current_stream(device.index))
    counter = _work_counters.get(key)
    if counter is None:
        counter = _work_counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def hopper_fwd(q, k, v, features):
    """``(out, lse)`` for an eligible call (``hopper_fwd_eligible``)."""
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    left, right = features.window_left, features.window_right
    tile = configs.gluon_forward_tile(head_dim, features.masked, seqlen_k, features.softcap > 0)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, seqlen_q), dtype=torch.float32, device=q.device)
    q_block, kv_box = (HALF_M.value, head_dim), (1, tile.block_n, head_dim)
    q_desc = descriptor(q, (batch * seqlen_q, n_heads * head_dim), q_block)
    k_desc = descriptor(k, (batch, seqlen_k, n_kv_heads * head_dim), kv_box)
    v_desc = descriptor(v, (batch, seqlen_k, n_kv_heads * head_dim), kv_box)
    rows = _rows(tile)
    num_m_blocks = -(-seqlen_q // rows)
    group_size = n_heads // n_kv_heads
    bound_left, bound_right = left >= 0, right >= 0
    # Rows may see no key (or none in their first tile): any left bound, or a right bound that
    # hides every key from the first rows.
    guard = bound_left or (bound_right and seqlen_k - seqlen_q + right < 0)
    order_group = head_group(bound_right, batch * n_heads, 2 * seqlen_k * head_dim * q.element_size() // group_size)
    order_tail = tail_group(bound_right, batch * n_heads, num_m_blocks, order_group, configs.sm_count(q.device))
    n_work = num_m_blocks * batch * n_heads
    programs, queue = program_count(n_work, bound_left or bound_right, tile.queue, q.device)
    work_counter = _work_counter(q.device) if queue else lse
    row_tail = seqlen_q % rows != 0
    o_tma = o_by_tma(tile) and not row_tail
    out_desc = descriptor(out, (batch * seqlen_q, n_heads * head_dim), q_block) if o_tma else out
    _hopper_fwd_launch[(programs,)](
        q_desc, k_desc, v_desc, out, out_desc, lse, work_counter, seqlen_q, seqlen_k, n_heads, group_size, num_m_blocks,
        n_work, order_group, order_tail, *softcap_scales(features), left, right, head_dim, tile.k_slots, tile.v_slots,
        bound_left, bound_right, seqlen_k % tile.block_n != 0, guard, features.softcap > 0, tile.pingpong, queue,
        tile.consumers, row_tail, o_tma, tile.q_slots, num_warps=4)
    return out, lse
