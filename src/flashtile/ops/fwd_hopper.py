"""Hopper forward in Gluon (``triton.experimental.gluon``): FlashAttention-3's ping-pong schedule.

One program computes 128 query rows of one head. Three partitions (warp specialization):

* a 1-warp producer streams K/V tiles (128 keys) by TMA into a ring of shared-memory slots,
  guarded by ``ready`` (filled) and ``empty`` (released by both consumers) mbarriers;
* two consumer warpgroups own 64 query rows each. Every iteration a consumer issues
  ``S_j = Q K_j^T`` and ``O += P_{j-1} V_{j-1}`` asynchronously and runs the online softmax of
  ``S_j`` while the second product is still on the tensor cores (intra-warpgroup overlap); the
  two consumers take turns issuing (``turn`` mbarriers), so one's softmax runs while the
  other's products occupy the tensor cores (ping-pong).

Covers what the schedule was measured on (docs/performance.md, issue 4 step 5): 16-bit inputs,
head dim 128, no mask, window, softcap, ALiBi or dropout, dense batches whose query and key
lengths are multiples of 128, q/k/v contiguous in ``(B, S, H, D)``. Everything else takes the
``tl`` kernel of ``fwd.py``; ``hopper_fwd_eligible`` is that decision. Gluon has no interpreter,
so this module is only imported for CUDA tensors.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from flashtile.ops.common import LOG2E as _LOG2E

LOG2E = gl.constexpr(_LOG2E)
HALF_M = gl.constexpr(64)  # query rows per consumer warpgroup (two per program)
BLOCK_N = gl.constexpr(128)  # keys per tile
SLOTS = gl.constexpr(3)  # K/V ring depth: 2 slots measured 502 / 475 TFLOP/s against 582 / 598 with 3
CONSUMER_REGS = gl.constexpr(232)  # setmaxnreg for each consumer warpgroup; the producer gets 24


@gluon.jit
def _produce_kv(k_desc, v_desc, k_ring, v_ring, ready, empty, kv_row0, kv_col0, n_tiles):
    for j in range(n_tiles):
        slot = j % SLOTS
        mbarrier.wait(empty.index(slot), ((j // SLOTS) & 1) ^ 1, pred=j >= SLOTS)  # both consumers released it
        mbarrier.expect(ready.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + j * BLOCK_N, kv_col0], ready.index(slot), k_ring.index(slot))
        tma.async_copy_global_to_shared(v_desc, [kv_row0 + j * BLOCK_N, kv_col0], ready.index(slot), v_ring.index(slot))


@gluon.jit
def _consume(C: gl.constexpr, q_smem, k_ring, v_ring, ready, empty, turn, out_ptr, lse_ptr, q_row0, q_col0,
             row_stride, lse_row0, n_tiles, qk_scale, D: gl.constexpr):
    """Consumer warpgroup C: query rows ``q_row0 + C * HALF_M + [0, HALF_M)``; writes its rows of
    the output and the LSE."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    q = q_smem.index(C)
    acc = gl.zeros([HALF_M, D], gl.float32, layout=mma)
    zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=mma)
    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma(q, k_ring.index(0).permute((1, 0)), zero, use_acc=False)
    m_i = gl.max(s, axis=1) * qk_scale  # running max, base 2
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, axis=1)
    for j in range(1, n_tiles):
        slot = j % SLOTS
        prev = (j - 1) % SLOTS
        mbarrier.wait(ready.index(slot), (j // SLOTS) & 1)
        mbarrier.wait(turn.index(C), (j - 1) & 1)  # this warpgroup's turn to issue
        s_tok = warpgroup_mma(q, k_ring.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
        p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        acc_tok = warpgroup_mma(p_op, v_ring.index(prev), acc, is_async=True)
        mbarrier.arrive(turn.index(1 - C), count=1)
        s = warpgroup_mma_wait(1, deps=[s_tok])  # S_j done; P_{j-1} V_{j-1} may still run
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc, p_op = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
        mbarrier.arrive(empty.index(prev), count=1)
        acc = acc * alpha[:, None]
        m_i = m_new
    last = (n_tiles - 1) % SLOTS
    acc = warpgroup_mma(gl.convert_layout(p.to(q_smem.dtype), p_layout), v_ring.index(last), acc)
    mbarrier.arrive(empty.index(last), count=1)

    rows = C * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, mma))
    cols = q_col0 + gl.arange(0, D, layout=gl.SliceLayout(0, mma))
    out = acc / l_i[:, None]
    out_rows = (q_row0 + rows).to(gl.int64)
    gl.store(out_ptr + out_rows[:, None] * row_stride + cols[None, :], out.to(q_smem.dtype))
    gl.store(lse_ptr + lse_row0 + rows, (m_i + gl.log2(l_i)) / LOG2E)


@gluon.jit
def _hopper_fwd_kernel(q_desc, k_desc, v_desc, out_ptr, lse_ptr, seqlen_q, seqlen_k, n_heads, group_size, qk_scale,
                       D: gl.constexpr):
    # Grid: (seqlen_q // (2 * HALF_M), batch * n_heads). q/k/v are viewed as 2-D (B * S, H * D).
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q_row0 = b * seqlen_q + pid_m * (2 * HALF_M)
    kv_row0 = b * seqlen_k
    q_col0 = h * D
    kv_col0 = (h // group_size) * D
    lse_row0 = pid_bh.to(gl.int64) * seqlen_q + pid_m * (2 * HALF_M)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [SLOTS] + k_desc.block_type.shape, k_desc.layout)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [SLOTS] + v_desc.block_type.shape, v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # released by both consumers
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.init(q_bar, count=1)
    fence_async_shared()
    mbarrier.arrive(turn.index(0), count=1)  # consumer 0 issues first
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0, q_col0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row0 + HALF_M, q_col0], q_bar, q_smem.index(1))
    mbarrier.wait(q_bar, 0)

    n_tiles = seqlen_k // BLOCK_N
    row_stride = n_heads * D
    gl.warp_specialize([
        (_consume, (0, q_smem, k_ring, v_ring, ready, empty, turn, out_ptr, lse_ptr, q_row0, q_col0, row_stride,
                    lse_row0, n_tiles, qk_scale, D)),
        (_consume, (1, q_smem, k_ring, v_ring, ready, empty, turn, out_ptr, lse_ptr, q_row0, q_col0, row_stride,
                    lse_row0, n_tiles, qk_scale, D)),
        (_produce_kv, (k_desc, v_desc, k_ring, v_ring, ready, empty, kv_row0, kv_col0, n_tiles)),
    ], [4, 1], [CONSUMER_REGS, 24])


_ROWS, _KEYS = 2 * HALF_M.value, BLOCK_N.value  # host-side tile sizes


def hopper_fwd_eligible(q, k, v, features, varlen) -> bool:
    """Whether a forward takes this kernel: see the module docstring. Pure host checks."""
    from flashtile import configs

    if not (configs.GLUON_FWD and q.is_cuda and varlen is None and q.dtype in (torch.bfloat16, torch.float16)):
        return False
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    plain = not features.masked and not features.heavy_scores and features.alibi_slopes is None
    return (plain and head_dim == 128 and seqlen_q % _ROWS == 0 and seqlen_k % _KEYS == 0
            and seqlen_q > 0 and seqlen_k >= configs.TMA_MIN_SEQLEN and 0 < batch * n_heads < 65536
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (q, k, v))
            and configs.arch(q.device) == (9, 0))


def hopper_fwd(q, k, v, softmax_scale):
    """``(out, lse)`` for an eligible call (``hopper_fwd_eligible``)."""
    batch, seqlen_q, n_heads, head_dim = q.shape
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, seqlen_q), dtype=torch.float32, device=q.device)
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_block, kv_block = [_ROWS // 2, head_dim], [_KEYS, head_dim]
    q_layout = gl.NVMMASharedLayout.get_default_for(q_block, dtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for(kv_block, dtype)
    q_desc = TensorDescriptor.from_tensor(q.view(batch * seqlen_q, n_heads * head_dim), q_block, q_layout)
    k_desc = TensorDescriptor.from_tensor(k.view(batch * seqlen_k, n_kv_heads * head_dim), kv_block, kv_layout)
    v_desc = TensorDescriptor.from_tensor(v.view(batch * seqlen_k, n_kv_heads * head_dim), kv_block, kv_layout)
    grid = (seqlen_q // _ROWS, batch * n_heads)
    _hopper_fwd_kernel[grid](q_desc, k_desc, v_desc, out, lse, seqlen_q, seqlen_k, n_heads, n_heads // n_kv_heads,
                             softmax_scale * _LOG2E, head_dim, num_warps=4)
    return out, lse
