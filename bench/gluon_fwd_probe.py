"""Probe behind ops/fwd_hopper.py (docs/performance.md, issue 4 step 5): the Gluon forward's
schedule one technique at a time, non-causal, head dim 128, bf16, against the tl kernel and SDPA.

* ``ws``: warp specialization alone -- the library's 1-warp TMA producer (``_produce_kv``) and one
  8-warp consumer partition (two warpgroups in lockstep, 64 query rows each) running S = Q K^T,
  the online softmax in the MMA accumulator's layout, O += P V with P as a register operand;
* ``ws_overlap``: plus FlashAttention-3's intra-warpgroup overlap (S_j and P_{j-1} V_{j-1} issued
  asynchronously, the softmax of S_j while the second still runs);
* ``pingpong``: the library kernel -- two consumer warpgroups taking turns to issue.

``--coverage`` instead times the library kernel (each entry's tile at every length: the
``SM90_GLUON_FWD_SHORT`` tiles are off in this tool) against the tl kernel and SDPA on every head dim
of ``configs.SM90_GLUON_FWD``, causal and not, seqlen 512..16384 (batch x seqlen = 16384, heads
x head dim = 2048): what decides the head dims and the minimum key length it is dispatched for.
``--tiles`` times each head dim's table tile against other ring depths and without ping-pong
(``TILE_CANDIDATES``) and, causal, with its ``queue`` switched; ``--short-tiles RUN.json ...``
prints ``configs.SM90_GLUON_FWD_SHORT`` from two or more such runs (``bench/common.short_tiles``);
``--windows`` times sliding windows against the tl kernel.

    PYTHONPATH=src python3 bench/gluon_fwd_probe.py [--coverage | --tiles | --windows] [--out results.json]
"""

import argparse
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from flashtile import configs
from flashtile.features import Features
from flashtile.ops.fwd import flash_fwd
from flashtile.ops.fwd_hopper import _produce_kv, hopper_fwd

LOG2E = 1.4426950408889634


@gluon.jit
def _attend(q_smem, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, n_tiles, qk_scale,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, SLOTS: gl.constexpr,
            NUM_WARPS: gl.constexpr):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=mma)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, mma))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, mma))
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
    for j in range(n_tiles):
        slot = j % SLOTS
        mbarrier.wait(k_ready.index(slot), (j // SLOTS) & 1)
        mbarrier.wait(v_ready.index(slot), (j // SLOTS) & 1)
        s = warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), zero, use_acc=False)
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_ring.index(slot), acc)
        mbarrier.arrive(k_empty.index(slot), count=1)
        mbarrier.arrive(v_empty.index(slot), count=1)
        m_i = m_new
    return acc, l_i


@gluon.jit
def _attend_overlapped(q_smem, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, n_tiles, qk_scale,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, SLOTS: gl.constexpr,
                       NUM_WARPS: gl.constexpr):
    """FlashAttention-3's intra-warpgroup overlap: S_j = Q K_j^T and O += P_{j-1} V_{j-1} are issued
    together (asynchronously, in that order); the softmax of S_j runs while P_{j-1} V_{j-1} is still
    on the tensor cores, and O is rescaled once that MMA has retired."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=mma)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), zero, use_acc=False)
    mbarrier.arrive(k_empty.index(0), count=1)
    m_i = gl.max(s, axis=1) * qk_scale
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, axis=1)
    for j in range(1, n_tiles):
        slot = j % SLOTS
        prev = (j - 1) % SLOTS
        mbarrier.wait(k_ready.index(slot), (j // SLOTS) & 1)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // SLOTS) & 1)
        s_tok = warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc_tok = warpgroup_mma(p_op, v_ring.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        mbarrier.arrive(k_empty.index(slot), count=1)
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc, p_op = warpgroup_mma_wait(0, deps=[acc_tok, p_op])
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * alpha[:, None]
        m_i = m_new
    last = (n_tiles - 1) % SLOTS
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // SLOTS) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_ring.index(last), acc)
    mbarrier.arrive(v_empty.index(last), count=1)
    return acc, l_i


@gluon.jit
def gluon_fwd(q_desc, k_desc, v_desc, out_ptr, seqlen, n_heads, qk_scale,
              D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SLOTS: gl.constexpr,
              NUM_WARPS: gl.constexpr, OVERLAP: gl.constexpr):
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q_row0 = b * seqlen + pid_m * BLOCK_M
    col0 = h * D

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], k_desc.dtype)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [SLOTS, BLOCK_N, D], kv_layout)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [SLOTS, BLOCK_N, D], kv_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(SLOTS):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(v_empty.index(s), count=1)
    mbarrier.init(q_bar, count=1)
    fence_async_shared()
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0, col0], q_bar, q_smem)
    mbarrier.wait(q_bar, 0)

    n_tiles = seqlen // BLOCK_N
    ring0 = n_tiles * 0  # the producer's first ring position, as a run-time value (its loop carries it)
    if OVERLAP:
        acc, l_i = gl.warp_specialize([
            (_attend_overlapped, (q_smem, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, n_tiles, qk_scale,
                                  BLOCK_M, BLOCK_N, D, SLOTS, NUM_WARPS)),
            (_produce_kv, (k_desc, v_desc, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, b, col0, 0, n_tiles,
                          ring0)),
        ], [1], [24])
    else:
        acc, l_i = gl.warp_specialize([
            (_attend, (q_smem, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, n_tiles, qk_scale, BLOCK_M, BLOCK_N,
                       D, SLOTS, NUM_WARPS)),
            (_produce_kv, (k_desc, v_desc, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, b, col0, 0, n_tiles,
                          ring0)),
        ], [1], [24])

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    out = acc / l_i[:, None]
    rows = (q_row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))).to(gl.int64)
    cols = col0 + gl.arange(0, D, layout=gl.SliceLayout(0, mma))
    gl.store(out_ptr + rows[:, None] * (n_heads * D) + cols[None, :], out.to(gl.bfloat16))


def gluon_attention(q, k, v, overlap=False, block_m=128, num_warps=8):
    tile = configs.SM90_GLUON_FWD[(128, False)]  # the library's tile (the producer is the library's)
    block_n, slots = tile.block_n, tile.k_slots
    batch, seqlen, heads, d = q.shape
    assert d == 128 and seqlen % block_m == 0 and seqlen % block_n == 0 and q.is_contiguous()
    out = torch.empty_like(q)
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, d], gl.bfloat16)
    q_desc = TensorDescriptor.from_tensor(q.view(batch * seqlen, heads * d), [block_m, d], q_layout)
    kv_box = [1, block_n, d]  # the library producer's 3-D (batch, key, column) boxes
    kv_layout = gl.NVMMASharedLayout.get_default_for(kv_box, gl.bfloat16)
    k_desc = TensorDescriptor.from_tensor(k.view(batch, seqlen, heads * d), kv_box, kv_layout)
    v_desc = TensorDescriptor.from_tensor(v.view(batch, seqlen, heads * d), kv_box, kv_layout)
    grid = (seqlen // block_m, batch * heads)
    gluon_fwd[grid](q_desc, k_desc, v_desc, out, seqlen, heads, d ** -0.5 * LOG2E, d, block_m, block_n, slots,
                    num_warps, overlap, num_warps=num_warps)
    return out


SOFTCAP = 0.0  # --softcap: the flashtile calls' softcap (the SDPA baselines have none)


def _features(q, causal):
    return Features(q.shape[-1] ** -0.5, window_right=0 if causal else -1, softcap=SOFTCAP)


def tl_forward(q, k, v, causal=False):
    """flashtile's forward launcher with the Gluon path switched off (the tl kernel of ops/fwd.py):
    ``(out, lse)``."""
    configs.GLUON_FWD = False
    try:
        return flash_fwd(q, k, v, _features(q, causal))
    finally:
        configs.GLUON_FWD = True


def library_kernel(q, k, v, causal=False):
    """ops/fwd_hopper.py called directly, whatever the dispatch rule says: ``(out, lse)``."""
    return hopper_fwd(q, k, v, _features(q, causal))


def run_variant(q, k, v, pingpong=False, **kw):
    if pingpong:
        return library_kernel(q, k, v)[0]
    return gluon_attention(q, k, v, **kw)


def coverage(out_path, head_dims=None):
    """Library kernel vs tl kernel vs SDPA per head dim, causal and not, seqlen 512..16384."""
    from common import attention_flops, environment, gluon_table_rows, median_ms, sdpa, write_json

    env = environment()
    rows, ok = [], True
    for head_dim in sorted({d for d, _ in configs.SM90_GLUON_FWD}):
        if head_dims and head_dim not in head_dims:
            continue
        heads = 2048 // head_dim
        for causal in (False, True):
            for seqlen in (512, 1024, 2048, 4096, 8192, 16384):
                batch = 16384 // seqlen
                torch.manual_seed(0)
                q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                           for _ in range(3))
                out, lse = library_kernel(q, k, v, causal)
                ref_out, ref_lse = tl_forward(q, k, v, causal)  # tested against the float64 oracle
                err = (out.float() - ref_out.float()).abs().max().item()
                lse_err = (lse - ref_lse).abs().max().item()
                ok &= err < 2e-2 and lse_err < 1e-3
                bhsd = [t.transpose(1, 2) for t in (q, k, v)]
                ms = {"gluon": median_ms(lambda: library_kernel(q, k, v, causal)),
                      "tl": median_ms(lambda: tl_forward(q, k, v, causal)),
                      "sdpa_cudnn": median_ms(lambda: sdpa("sdpa_cudnn")(*bhsd, causal)),
                      "sdpa_flash": median_ms(lambda: sdpa("sdpa_flash")(*bhsd, causal))}
                flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, "fwd")
                tflops = {name: round(flops / t / 1e9, 1) for name, t in ms.items()}
                rows.append(dict(head_dim=head_dim, causal=causal, batch=batch, seqlen=seqlen, heads=heads,
                                 max_err_vs_tl=err, lse_err_vs_tl=lse_err, ms=ms, tflops=tflops))
                print(f"d{head_dim} {'causal' if causal else 'full  '} B{batch:<2} S{seqlen:<5} err {err:.1e}/{lse_err:.1e}"
                      f" TFLOP/s " + " ".join(f"{n} {t:.0f}" for n, t in tflops.items())
                      + f" | gluon/cudnn {ms['sdpa_cudnn'] / ms['gluon']:.2f} gluon/tl {ms['tl'] / ms['gluon']:.2f}",
                      flush=True)
    print("Gluon / tl time ratios per length and the shortest winning length (configs entries):")
    for line in gluon_table_rows(rows):
        print("    " + line)
    write_json(out_path, {"env": env, "rows": rows})
    return ok


# Tile candidates per (head dim, causal) for ``--tiles``: the table's entry is always timed first.
TILE_CANDIDATES = {
    64: [dict(consumers=2), dict(consumers=2, o_tma=True), dict(consumers=2, o_tma=True, pingpong=True),
         dict(consumers=2, o_tma=True, q_slots=2), dict(consumers=2, o_tma=True, q_slots=2, pingpong=True),
         dict(consumers=3, pingpong=False),
         dict(consumers=3, pingpong=False, queue=True)],
    128: [dict(k_slots=4, v_slots=2), dict(pingpong=False), dict(q_slots=2, k_slots=2, v_slots=2),
          dict(q_slots=2, k_slots=3, v_slots=2)],
    256: [dict(k_slots=3, v_slots=2), dict(pingpong=False), dict(k_slots=3, v_slots=2, pingpong=False)],
}


def tiles(out_path, seqlens, head_dims=None):
    """Each head dim's table tile against the candidates above (ring depths, ping-pong or not) and,
    causal, against its own tile with the work queue switched (``queue``), in one process with SDPA
    cuDNN and the tl kernel: TFLOP/s and time ratios to the table's tile."""
    import dataclasses

    from common import attention_flops, environment, median_ms, sdpa, write_json

    rows, ok = [], True
    for head_dim, candidates in TILE_CANDIDATES.items():
        if head_dims and head_dim not in head_dims:
            continue
        heads = 2048 // head_dim
        for causal in (False, True):
            table_tile = configs.SM90_GLUON_FWD[(head_dim, causal)]
            variants = [table_tile] + [dataclasses.replace(table_tile, **c) for c in candidates]
            if causal:
                variants.append(dataclasses.replace(table_tile, queue=not table_tile.queue))
            for seqlen in seqlens:
                batch = 16384 // seqlen
                torch.manual_seed(0)
                q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                           for _ in range(3))
                ref_out = tl_forward(q, k, v, causal)[0]
                flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, "fwd")
                bhsd = [t.transpose(1, 2) for t in (q, k, v)]
                cudnn_ms = median_ms(lambda: sdpa("sdpa_cudnn")(*bhsd, causal))
                tl_ms = median_ms(lambda: tl_forward(q, k, v, causal))
                times = []
                for tile in variants:
                    configs.SM90_GLUON_FWD[(head_dim, causal)] = tile
                    err = (library_kernel(q, k, v, causal)[0].float() - ref_out.float()).abs().max().item()
                    ok &= err < 2e-2
                    times.append(median_ms(lambda: library_kernel(q, k, v, causal)))
                    rows.append(dict(head_dim=head_dim, causal=causal, seqlen=seqlen, tile=dataclasses.asdict(tile),
                                     ms=times[-1], tflops=flops / times[-1] / 1e9, cudnn_ms=cudnn_ms, tl_ms=tl_ms,
                                     softcap=SOFTCAP, max_err_vs_tl=err))
                configs.SM90_GLUON_FWD[(head_dim, causal)] = table_tile
                mask = "causal" if causal else "full  "
                print(f"d{head_dim} {mask} S{seqlen:<5} cuDNN {flops / cudnn_ms / 1e9:.0f} "
                      f"tl {flops / tl_ms / 1e9:.0f} ({times[0] / tl_ms:.3f}) | "
                      + " | ".join(f"{t.block_n}/{t.k_slots}/{t.v_slots}/{'pp' if t.pingpong else 'no-pp'}"
                                   f"{'/%dwg' % t.consumers if t.consumers != 2 else ''}"
                                   f"{'/queue' if t.queue and causal else ''}{'/o-tma' if t.o_tma else ''}"
                                   f"{'/q%d' % t.q_slots if t.q_slots > 1 else ''} "
                                   f"{flops / ms / 1e9:.0f} ({times[0] / ms:.3f})" for t, ms in zip(variants, times)),
                      flush=True)
    write_json(out_path, {"env": environment(), "rows": rows})
    return ok


def windows(out_path, seqlen=8192, keys_per_row=(128, 256, 512, 1024, 2048, 4096), head_dims=None):
    """The Gluon forward against the tl kernel on sliding windows: a row sees W keys, one-sided
    (W - 1, 0) and two-sided (W / 2, W / 2 - 1), at 8192 tokens (batch 2, heads x head dim =
    2048): what decides configs.SM90_GLUON_FWD_WINDOW_MIN_KEYS (the smallest W from which the
    Gluon kernel wins at every larger W measured, both shapes)."""
    from common import environment, median_ms, window_min_keys, write_json

    rows, ok = [], True
    for head_dim in sorted({d for d, _ in configs.SM90_GLUON_FWD}):
        if head_dims and head_dim not in head_dims:
            continue
        heads = 2048 // head_dim
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for keys in keys_per_row:
            for left, right in ((keys - 1, 0), (keys // 2, keys // 2 - 1)):
                features = Features(head_dim ** -0.5, window_left=left, window_right=right)
                out = hopper_fwd(q, k, v, features)[0]
                configs.GLUON_FWD = False
                try:
                    ref = flash_fwd(q, k, v, features)[0]
                    tl_ms = median_ms(lambda: flash_fwd(q, k, v, features))
                finally:
                    configs.GLUON_FWD = True
                err = (out.float() - ref.float()).abs().max().item()
                ok &= err < 2e-2
                gluon_ms = median_ms(lambda: hopper_fwd(q, k, v, features))
                rows.append(dict(head_dim=head_dim, seqlen=seqlen, window=[left, right], keys_per_row=keys,
                                 ms={"gluon": gluon_ms, "tl": tl_ms}, max_err_vs_tl=err))
                print(f"d{head_dim} window ({left}, {right}) err {err:.1e} gluon {gluon_ms:.3f} ms tl {tl_ms:.3f} ms "
                      f"gluon/tl {tl_ms / gluon_ms:.2f}", flush=True)
    print("configs.SM90_GLUON_FWD_WINDOW_MIN_KEYS:", window_min_keys(rows))
    write_json(out_path, {"env": environment(), "rows": rows})
    return ok


def main():
    sys.path.insert(0, "bench")
    from common import median_ms, sdpa

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coverage", action="store_true")
    parser.add_argument("--tiles", action="store_true", help="the table tiles against TILE_CANDIDATES")
    parser.add_argument("--windows", action="store_true", help="sliding windows, against the tl kernel")
    parser.add_argument("--seqlens", default="1024,4096,16384", help="--tiles: comma-separated")
    parser.add_argument("--head-dims", help="--tiles, --coverage, --windows: comma-separated (default: all)")
    parser.add_argument("--softcap", type=float, default=0.0, help="--tiles: flashtile's calls with this softcap")
    parser.add_argument("--short-tiles", nargs="+", metavar="RUN_JSON",
                        help="print configs.SM90_GLUON_FWD_SHORT from --tiles runs' JSON (no GPU needed)")
    parser.add_argument("--out", default="bench/results/h100_gluon_fwd.json")
    args = parser.parse_args()
    global SOFTCAP
    SOFTCAP = args.softcap
    head_dims = set(map(int, args.head_dims.split(","))) if args.head_dims else None
    if args.short_tiles:
        import json

        from common import short_tile_rows

        runs = []
        for path in args.short_tiles:
            with open(path) as f:
                runs.append(json.load(f)["rows"])
        print("\n".join(short_tile_rows(runs)))
        return
    # Each entry's own tile at every length: what --coverage's thresholds and --tiles' candidates are
    # measured on (a configs.SM90_GLUON_FWD_SHORT tile is one of TILE_CANDIDATES).
    configs.SM90_GLUON_FWD_SHORT = {}
    if args.coverage:
        sys.exit(0 if coverage(args.out, head_dims) else 1)
    if args.tiles:
        sys.exit(0 if tiles(args.out, tuple(map(int, args.seqlens.split(","))), head_dims) else 1)
    if args.windows:
        sys.exit(0 if windows(args.out, head_dims=head_dims) else 1)
    torch.manual_seed(0)
    ok = True
    for batch, seqlen in ((4, 4096), (1, 16384)):
        heads, d = 16, 128
        q, k, v = (torch.randn(batch, seqlen, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = tl_forward(q, k, v)[0]  # the tl kernel, tested against the float64 oracle
        variants = {"ws": dict(), "ws_overlap": dict(overlap=True), "pingpong (ops/fwd_hopper.py)": dict(pingpong=True)}
        errs = []
        for kw in variants.values():
            errs.append((run_variant(q, k, v, **kw).float() - ref.float()).abs().max().item())
        err = max(errs)
        ok &= err < 2e-2
        flops = 4 * batch * heads * seqlen * seqlen * d
        bhsd = [t.transpose(1, 2) for t in (q, k, v)]
        row = {f"gluon_{name}": median_ms(lambda kw=kw: run_variant(q, k, v, **kw)) for name, kw in variants.items()}
        row |= {
            "flashtile_tl": median_ms(lambda: tl_forward(q, k, v)),
            "sdpa_cudnn": median_ms(lambda: sdpa("sdpa_cudnn")(*bhsd, False)),
            "sdpa_flash": median_ms(lambda: sdpa("sdpa_flash")(*bhsd, False))}
        print(f"B={batch} S={seqlen} H={heads} D={d} non-causal fwd: max |gluon - tl| {errs}; TFLOP/s "
              + ", ".join(f"{name} {flops / ms / 1e9:.0f}" for name, ms in row.items()), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
