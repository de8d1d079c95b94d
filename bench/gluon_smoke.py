"""Gluon smoke probes on Hopper (not part of the package; the first step of issue 4's Gluon work).

Two kernels checked against torch, each printing its error and whether the PTX holds wgmma, TMA
(cp.async.bulk.tensor) and setmaxnreg:

* ``qk_tile``: one 128x128 tile of Q K^T -- TMA loads into NVMMA-swizzled shared memory, an
  mbarrier, a warpgroup MMA.
* ``qk_sum``: warp specialization -- a 1-warp producer streams K tiles by TMA into a 2-slot ring
  (ready/empty mbarriers), the 4-warp default partition multiplies Q by each and accumulates:
  ``out = sum_j Q K_j^T``. (The default partition must return a tuple: warp_specialize
  flattens its results.)

    PYTHONPATH=src python3 bench/gluon_smoke.py     # needs an sm90 GPU
"""

import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def qk_tile(q_desc, k_desc, out_ptr, BLOCK: gl.constexpr, D: gl.constexpr):
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    fence_async_shared()
    mbarrier.expect(bar, q_desc.block_type.nbytes + k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [0, 0], bar, q_smem)
    tma.async_copy_global_to_shared(k_desc, [0, 0], bar, k_smem)
    mbarrier.wait(bar, 0)
    mbarrier.invalidate(bar)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK, 16])
    acc = gl.zeros([BLOCK, BLOCK], gl.float32, layout=mma)
    acc = warpgroup_mma(q_smem, k_smem.permute((1, 0)), acc)
    rows = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, mma))
    gl.store(out_ptr + rows[:, None] * BLOCK + cols[None, :], acc)


@gluon.jit
def _producer(k_desc, k_ring, ready, empty, n_tiles, BLOCK: gl.constexpr, SLOTS: gl.constexpr):
    for j in range(n_tiles):
        slot = j % SLOTS
        phase = (j // SLOTS) & 1
        mbarrier.wait(empty.index(slot), phase ^ 1, pred=j >= SLOTS)  # slot freed by the consumer
        mbarrier.expect(ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [j * BLOCK, 0], ready.index(slot), k_ring.index(slot))


@gluon.jit
def _consumer(q_smem, k_ring, ready, empty, n_tiles, BLOCK: gl.constexpr, SLOTS: gl.constexpr):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK, 16])
    acc = gl.zeros([BLOCK, BLOCK], gl.float32, layout=mma)
    for j in range(n_tiles):
        slot = j % SLOTS
        mbarrier.wait(ready.index(slot), (j // SLOTS) & 1)
        acc = warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), acc)
        mbarrier.arrive(empty.index(slot), count=1)
    return (acc,)  # warp_specialize flattens the default partition's results: a tuple


@gluon.jit
def qk_sum(q_desc, k_desc, out_ptr, n_tiles, BLOCK: gl.constexpr, SLOTS: gl.constexpr):
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [SLOTS] + k_desc.block_type.shape, k_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    qbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(SLOTS):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    mbarrier.init(qbar, count=1)
    fence_async_shared()
    mbarrier.expect(qbar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [0, 0], qbar, q_smem)
    mbarrier.wait(qbar, 0)
    acc, = gl.warp_specialize([
        (_consumer, (q_smem, k_ring, ready, empty, n_tiles, BLOCK, SLOTS)),
        (_producer, (k_desc, k_ring, ready, empty, n_tiles, BLOCK, SLOTS)),
    ], [1], [40])
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK, 16])
    rows = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, mma))
    gl.store(out_ptr + rows[:, None] * BLOCK + cols[None, :], acc)


def check(name, out, ref, compiled):
    err = (out - ref).abs().max().item()
    ptx = compiled.asm["ptx"]
    print(f"{name}: max abs err {err:.2e} (ref max {ref.abs().max().item():.1f}) | wgmma {'wgmma' in ptx} | "
          f"tma {'cp.async.bulk.tensor' in ptx} | setmaxnreg {'setmaxnreg' in ptx}")
    return err <= 1e-5 * ref.abs().max().item() + 1e-3


def main():
    block, d, n_tiles = 128, 128, 16
    q = torch.randn(block, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(block * n_tiles, d, device="cuda", dtype=torch.bfloat16)
    layout = gl.NVMMASharedLayout.get_default_for([block, d], gl.bfloat16)
    q_desc = TensorDescriptor.from_tensor(q, [block, d], layout)
    k_desc = TensorDescriptor.from_tensor(k, [block, d], layout)
    out = torch.empty(block, block, device="cuda", dtype=torch.float32)
    compiled = qk_tile[(1,)](q_desc, k_desc, out, block, d, num_warps=4)
    ok = check("qk_tile", out, q.float() @ k[:block].float().T, compiled)
    ref = sum(q.float() @ k[j * block:(j + 1) * block].float().T for j in range(n_tiles))
    compiled = qk_sum[(1,)](q_desc, k_desc, out, n_tiles, block, 2, num_warps=4)
    ok &= check("qk_sum (warp-specialized)", out, ref, compiled)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
