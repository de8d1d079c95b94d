"""Hopper forward in Gluon (``triton.experimental.gluon``): FlashAttention-3's ping-pong schedule.

One program computes 128 query rows of one head. Three partitions (warp specialization):

* a 1-warp producer streams K and V tiles (``block_n`` keys) by TMA into two rings of
  shared-memory slots, each slot guarded by a ``ready`` (filled) and an ``empty`` (released by
  both consumers) mbarrier. K and V have their own barriers: a K slot is free as soon as both
  consumers' S = Q K^T has run, half an iteration before the V slot of the same tile (at head
  dim 256, where two slots are all that fit, this took the kernel from 1.02-1.08x to 1.29-1.50x
  the ``tl`` kernel);
* two consumer warpgroups own 64 query rows each. Every iteration a consumer issues
  ``S_j = Q K_j^T`` and ``O += P_{j-1} V_{j-1}`` asynchronously and runs the online softmax of
  ``S_j`` while the second product is still on the tensor cores (intra-warpgroup overlap); with
  ``pingpong`` the two consumers take turns issuing (``turn`` mbarriers), so one's softmax runs
  while the other's products occupy the tensor cores.

K/V tiles are 3-D TMA boxes (batch entry, key, column): a last tile that runs past the entry's
keys reads zeros there, never the next entry's keys, and its keys past the end are masked, so
every key length runs. Causal: the tiles the diagonal cuts (the last one or two of each program)
apply the mask; the grid is flat and head-major with each head's longest Q tiles first. Covers
what the schedule was measured on (docs/performance.md, issue 4 steps 5, 6 and 12): 16-bit
inputs, the (head dim, causal) entries of ``configs.SM90_GLUON_FWD`` (head dims 64, 128, 256;
each with its tile and the key length from which it beats the ``tl`` kernel), softcap or not, no
window, ALiBi or dropout, causal only with ``seqlen_k >= seqlen_q``, dense batches with query
lengths a multiple of 128, q/k/v contiguous in ``(B, S, H, D)``. Everything else takes the ``tl``
kernel of ``fwd.py``; ``hopper_fwd_eligible`` is that decision. Gluon has no interpreter, so this
module is only imported for CUDA tensors.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from flashtile.ops.common import LOG2E as _LOG2E, gluon_applies, softcap_scales
from flashtile.ops.hopper_order import head_and_rank, head_group

LOG2E = gl.constexpr(_LOG2E)
HALF_M = gl.constexpr(64)  # query rows per consumer warpgroup (two per program)
CONSUMER_REGS = gl.constexpr(232)  # setmaxnreg for each consumer warpgroup; the producer gets 24


@gluon.jit
def tanh_approx(x):
    """tanh by the GPU's ``tanh.approx.f32`` (one MUFU op, relative error < 2**-10.9): what the
    ``tl`` kernels use for 16-bit inputs (ops/score.py), the only ones these kernels take."""
    return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _produce_kv(k_desc, v_desc, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, batch, kv_col0, n_tiles):
    """K/V tiles 0 .. n_tiles-1 of one batch entry into their rings (K and V each with its own
    depth and mbarriers: a K slot is free once both consumers' S = Q K^T has run, a V slot only
    after their P V). The descriptors are 3-D (batch, key, column) with one batch entry per box,
    so the keys of a tile that runs past the entry's last key arrive as zeros (TMA's
    out-of-bounds fill), never as the next entry's keys."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    K_SLOTS: gl.constexpr = k_ring.shape[0]
    V_SLOTS: gl.constexpr = v_ring.shape[0]
    box: gl.constexpr = k_desc.block_type.shape
    for j in range(n_tiles):
        k_slot = j % K_SLOTS
        mbarrier.wait(k_empty.index(k_slot), ((j // K_SLOTS) & 1) ^ 1, pred=j >= K_SLOTS)
        mbarrier.expect(k_ready.index(k_slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [batch, j * BLOCK_N, kv_col0], k_ready.index(k_slot),
                                        k_ring.index(k_slot)._reinterpret(k_ring.dtype, box, k_desc.layout))
        v_slot = j % V_SLOTS
        mbarrier.wait(v_empty.index(v_slot), ((j // V_SLOTS) & 1) ^ 1, pred=j >= V_SLOTS)
        mbarrier.expect(v_ready.index(v_slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [batch, j * BLOCK_N, kv_col0], v_ready.index(v_slot),
                                        v_ring.index(v_slot)._reinterpret(v_ring.dtype, box, v_desc.layout))


@gluon.jit
def _fold_tile(j, C: gl.constexpr, q, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, turn, acc, p, m_i, l_i,
               last_key, qk_scale, softcap_in, MASKED: gl.constexpr, CAUSAL: gl.constexpr, SOFTCAP: gl.constexpr,
               PINGPONG: gl.constexpr):
    """Consumer C's iteration j: issue S_j = Q K_j^T and O += P_{j-1} V_{j-1} asynchronously (on
    its turn when PINGPONG), then fold S_j into the online softmax while the second product
    still runs. MASKED: hide the keys past ``last_key`` in S_j (``_masked_scores``).
    SOFTCAP: scores ``tanh(S * softcap_in)``, and ``qk_scale`` is ``softcap * log2(e)``."""
    K_SLOTS: gl.constexpr = k_ring.shape[0]
    V_SLOTS: gl.constexpr = v_ring.shape[0]
    o_layout: gl.constexpr = acc.type.layout
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    k_slot = j % K_SLOTS
    v_slot = (j - 1) % V_SLOTS
    mbarrier.wait(k_ready.index(k_slot), (j // K_SLOTS) & 1)
    mbarrier.wait(v_ready.index(v_slot), ((j - 1) // V_SLOTS) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(C), (j - 1) & 1)  # this warpgroup's turn to issue
    s_tok = warpgroup_mma(q, k_ring.index(k_slot).permute((1, 0)), gl.zeros_like(p), use_acc=False, is_async=True)
    p_op = gl.convert_layout(p.to(q.dtype), p_layout)
    acc_tok = warpgroup_mma(p_op, v_ring.index(v_slot), acc, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - C), count=1)
    s = warpgroup_mma_wait(1, deps=[s_tok])  # S_j done; P_{j-1} V_{j-1} may still run
    mbarrier.arrive(k_empty.index(k_slot), count=1)
    if SOFTCAP:
        s = tanh_approx(s * softcap_in)
    if MASKED:
        t = _masked_scores(s, j, last_key, qk_scale, CAUSAL)
        m_new = gl.maximum(m_i, gl.max(t, axis=1))
        p = gl.exp2(t - m_new[:, None])
    else:  # scale folded into exp2's argument (one FMA per score)
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    acc, p_op = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
    mbarrier.arrive(v_empty.index(v_slot), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    return acc, p, m_new, l_i


@gluon.jit
def _masked_scores(s, j, last_key, qk_scale, CAUSAL: gl.constexpr):
    """Base-2 scores of tile j with the keys past each row's last visible one set to -inf, after
    scaling, so a scale of 0 gives 0 and -inf, never NaN. Row r of the warpgroup sees keys up to
    ``last_key + r`` when CAUSAL, else up to ``last_key`` (the batch entry's last key: a tile
    running past it)."""
    HALF_M: gl.constexpr = s.shape[0]
    BLOCK_N: gl.constexpr = s.shape[1]
    keys = j * BLOCK_N - last_key + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
    if CAUSAL:
        rows = gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s.type.layout))
        visible = keys[None, :] <= rows[:, None]
    else:
        visible = keys[None, :] <= 0
    return gl.where(visible, s * qk_scale, float("-inf"))


@gluon.jit
def _consume(C: gl.constexpr, q_smem, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, turn, out_ptr, lse_ptr,
             q_row0, q_col0, row_stride, lse_row0, last_key0, n_tiles, n_full, qk_scale, softcap_in, D: gl.constexpr,
             CAUSAL: gl.constexpr, KEY_TAIL: gl.constexpr, SOFTCAP: gl.constexpr, PINGPONG: gl.constexpr):
    """Consumer warpgroup C: query rows ``q_row0 + C * HALF_M + [0, HALF_M)``; writes its rows of
    the output and the LSE. Tiles ``[n_full, n_tiles)`` take the mask: causal (``last_key0``: the
    last key row 0 of the program sees) or, with KEY_TAIL, the keys past the last one
    (``last_key0``) in a last tile that runs past it."""
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    MASKED: gl.constexpr = CAUSAL or KEY_TAIL
    # Accumulator layouts of the two products: S = Q K^T is [HALF_M, BLOCK_N], O is [HALF_M, D];
    # each takes one wgmma as wide as its tile (their rows sit on the same threads).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q = q_smem.index(C)
    last_key = last_key0 + C * HALF_M if CAUSAL else last_key0
    acc = gl.zeros([HALF_M, D], gl.float32, layout=o_layout)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q, k_ring.index(0).permute((1, 0)), gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=s_layout),
                      use_acc=False)
    mbarrier.arrive(k_empty.index(0), count=1)
    if SOFTCAP:
        s = tanh_approx(s * softcap_in)
    if MASKED:  # tile 0 may be on the diagonal or the last; key 0 is visible to every row (seqlen_k >= seqlen_q)
        t = _masked_scores(s, 0, last_key, qk_scale, CAUSAL)
        m_i = gl.max(t, axis=1)  # running max, base 2
        p = gl.exp2(t - m_i[:, None])
    else:
        m_i = gl.max(s, axis=1) * qk_scale
        p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, axis=1)
    for j in range(1, n_full):
        acc, p, m_i, l_i = _fold_tile(j, C, q, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, turn, acc, p,
                                      m_i, l_i, last_key, qk_scale, softcap_in, False, CAUSAL, SOFTCAP, PINGPONG)
    if MASKED:
        for j in range(gl.maximum(n_full, 1), n_tiles):
            acc, p, m_i, l_i = _fold_tile(j, C, q, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, turn, acc,
                                          p, m_i, l_i, last_key, qk_scale, softcap_in, True, CAUSAL, SOFTCAP,
                                          PINGPONG)
    last = (n_tiles - 1) % v_ring.shape[0]
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // v_ring.shape[0]) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(q_smem.dtype), p_layout), v_ring.index(last), acc)
    mbarrier.arrive(v_empty.index(last), count=1)

    rows = C * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, o_layout))
    cols = q_col0 + gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    out_rows = (q_row0 + rows).to(gl.int64)
    gl.store(out_ptr + out_rows[:, None] * row_stride + cols[None, :], out.to(q_smem.dtype))
    lse_rows = C * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s_layout))
    gl.store(lse_ptr + lse_row0 + lse_rows, (m_i + gl.log2(l_i)) / LOG2E)


@gluon.jit
def _hopper_fwd_kernel(q_desc, k_desc, v_desc, out_ptr, lse_ptr, seqlen_q, seqlen_k, n_heads, group_size,
                       num_m_blocks, head_group, qk_scale, softcap_in, D: gl.constexpr, K_SLOTS: gl.constexpr,
                       V_SLOTS: gl.constexpr, CAUSAL: gl.constexpr, KEY_TAIL: gl.constexpr, SOFTCAP: gl.constexpr,
                       PINGPONG: gl.constexpr):
    # Flat grid (num_m_blocks * batch * n_heads,) in hopper_order's order: head-major so a head's
    # programs share its K/V in L2; causal in groups of heads, their longest Q tiles (the last)
    # first. q is viewed as 2-D (B * S, H * D), k and v as 3-D (B, S, H * D).
    # KEY_TAIL: seqlen_k is not a multiple of the key tile (the last tile is partly masked).
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    pid_bh, pid_m = head_and_rank(gl.program_id(0), num_m_blocks, gl.num_programs(0) // num_m_blocks, head_group)
    if CAUSAL:
        pid_m = num_m_blocks - 1 - pid_m
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q_row0 = b * seqlen_q + pid_m * (2 * HALF_M)
    q_col0 = h * D
    kv_col0 = (h // group_size) * D
    lse_row0 = pid_bh.to(gl.int64) * seqlen_q + pid_m * (2 * HALF_M)
    if CAUSAL:  # bottom-right aligned: row i sees keys <= i + seqlen_k - seqlen_q (never past the last key)
        last_key0 = pid_m * (2 * HALF_M) + seqlen_k - seqlen_q
        n_tiles = (last_key0 + 2 * HALF_M + BLOCK_N - 1) // BLOCK_N
        n_full = (last_key0 + 1) // BLOCK_N  # tiles every row sees whole
    else:
        last_key0 = seqlen_k - 1
        n_tiles = (seqlen_k + BLOCK_N - 1) // BLOCK_N
        n_full = seqlen_k // BLOCK_N

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    # The ring holds 2-D tiles (what the MMAs read); the producer views each slot as its 3-D box.
    kv_tile: gl.constexpr = [BLOCK_N, D]
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(kv_tile, k_desc.dtype)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [K_SLOTS] + kv_tile, kv_layout)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [V_SLOTS] + kv_tile, kv_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [K_SLOTS, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [K_SLOTS, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [V_SLOTS, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [V_SLOTS, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(K_SLOTS):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # released by both consumers
    for i in gl.static_range(V_SLOTS):
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.init(q_bar, count=1)
    fence_async_shared()
    mbarrier.arrive(turn.index(0), count=1)  # consumer 0 issues first
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0, q_col0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row0 + HALF_M, q_col0], q_bar, q_smem.index(1))
    mbarrier.wait(q_bar, 0)

    row_stride = n_heads * D
    gl.warp_specialize([
        (_consume, (0, q_smem, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, turn, out_ptr, lse_ptr, q_row0,
                    q_col0, row_stride, lse_row0, last_key0, n_tiles, n_full, qk_scale, softcap_in, D, CAUSAL, KEY_TAIL, SOFTCAP,
                    PINGPONG)),
        (_consume, (1, q_smem, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, turn, out_ptr, lse_ptr, q_row0,
                    q_col0, row_stride, lse_row0, last_key0, n_tiles, n_full, qk_scale, softcap_in, D, CAUSAL, KEY_TAIL, SOFTCAP,
                    PINGPONG)),
        (_produce_kv, (k_desc, v_desc, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, b, kv_col0, n_tiles)),
    ], [4, 1], [CONSUMER_REGS, 24])


_ROWS = 2 * HALF_M.value  # query rows per program


def hopper_fwd_eligible(q, k, v, features, varlen) -> bool:
    """Whether a forward takes this kernel: see the module docstring. Pure host checks."""
    from flashtile import configs

    if not (configs.GLUON_FWD and gluon_applies(q, k, features, varlen, q, k, v)):
        return False
    seqlen_q, head_dim, seqlen_k = q.shape[1], q.shape[3], k.shape[1]
    tile = configs.SM90_GLUON_FWD.get((head_dim, features.masked))
    return tile is not None and seqlen_q % _ROWS == 0 and seqlen_k >= tile.min_seqlen_k


def hopper_fwd(q, k, v, features):
    """``(out, lse)`` for an eligible call (``hopper_fwd_eligible``)."""
    from flashtile import configs

    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    causal = features.masked  # eligibility leaves causal as the only mask
    tile = configs.SM90_GLUON_FWD[(head_dim, causal)]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, seqlen_q), dtype=torch.float32, device=q.device)
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_block, kv_box = [HALF_M.value, head_dim], [1, tile.block_n, head_dim]
    q_layout = gl.NVMMASharedLayout.get_default_for(q_block, dtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for(kv_box, dtype)
    q_desc = TensorDescriptor.from_tensor(q.view(batch * seqlen_q, n_heads * head_dim), q_block, q_layout)
    k_desc = TensorDescriptor.from_tensor(k.view(batch, seqlen_k, n_kv_heads * head_dim), kv_box, kv_layout)
    v_desc = TensorDescriptor.from_tensor(v.view(batch, seqlen_k, n_kv_heads * head_dim), kv_box, kv_layout)
    num_m_blocks = seqlen_q // _ROWS
    group_size = n_heads // n_kv_heads
    order_group = head_group(causal, batch * n_heads, 2 * seqlen_k * head_dim * q.element_size() // group_size)
    _hopper_fwd_kernel[(num_m_blocks * batch * n_heads,)](
        q_desc, k_desc, v_desc, out, lse, seqlen_q, seqlen_k, n_heads, group_size, num_m_blocks, order_group,
        *softcap_scales(features), head_dim, tile.k_slots, tile.v_slots, causal, seqlen_k % tile.block_n != 0, features.softcap > 0,
        tile.pingpong, num_warps=4)
    return out, lse
