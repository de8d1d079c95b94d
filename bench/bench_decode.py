"""Decoding: how fast one decode step reads the KV cache, flashtile against SDPA FLASH_ATTENTION.

One query token per sequence, Llama-style GQA (32 query heads, 8 KV heads, head dim 128), bf16,
every sequence at the full KV length. Reported per (batch, KV length, layout): the GB/s of K/V
read (bytes of the cache's K and V over the time of the step) and its fraction of the
device-to-device copy bandwidth measured in the same run ((read + write bytes) / time of a
1 GiB ``copy_``). Layouts: a contiguous cache, and the same storage read as pages of 16, 64 and
256 tokens through a block table in shuffled order (so pages are not in memory order).

Each step is timed two ways, for both libraries: in a CUDA graph (``graph``: the GPU's time, as
serving engines run decode steps; the figures the targets are judged on) and as an eager call
(``eager``: at small batch a decode step's GPU work is shorter than a Python call, so this
measures the host). The graph holds one attention call per layer of a model, each layer with a
cache of its own (as many layers as fit in 2 GiB, at most 16), and the time per call is the
replay's time over the layers: a replay alone costs ~10 us of fixed overhead, as long as a
small call's whole transfer. ``do_bench`` clears the L2 cache between repetitions, so the cache
is read from HBM. flashtile runs with ``num_splits=0`` (the heuristic) and
``configs.CHECK_CACHE_INDICES`` off (inside a graph capture the check is skipped anyway; its
eager cost, a device sync, is reported once as ``check_us``). SDPA gets the same cache as
(B, Hk, S, D) views and ``enable_gqa=True``.

    PYTHONPATH=src python3 bench/bench_decode.py --out bench/results/h100_decode.json
    PYTHONPATH=src python3 bench/bench_decode.py --probe     # tile and split alternatives
"""

import argparse
import os
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

sys.path.insert(0, os.path.dirname(__file__))
from common import banner, environment, median_ms, write_json  # noqa: E402

from flashtile import configs, flash_attn_with_kvcache  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def graph_ms(steps) -> float:
    """Time per call of ``steps`` (one call per layer, each on its own cache) captured in one CUDA
    graph: the do_bench median of a replay over the number of layers."""
    def run_all():
        for step in steps:
            step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_all()  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    return median_ms(graph.replay) / len(steps)


def layer_count(kv_bytes) -> int:
    return max(1, min(16, (2 << 30) // kv_bytes))


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def make_cache(batch, seqlen):
    k_cache = torch.randn(batch, seqlen, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, seqlens


def page_order(batch, seqlen, page_size):
    """A block table that visits each sequence's pages in a shuffled order."""
    pages = batch * seqlen // page_size
    return torch.randperm(pages, device="cuda").int().view(batch, seqlen // page_size)


def flashtile_step(q, k_cache, v_cache, seqlens, block_table=None, num_splits=0):
    """One decode step; with a block table, the same storage read as (num_pages, page_size, Hk, D)."""
    if block_table is None:
        return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=num_splits)
    page_size = k_cache.shape[1] // block_table.shape[1]
    k_pages = k_cache.view(-1, page_size, KV_HEADS, HEAD_DIM)
    v_pages = v_cache.view(-1, page_size, KV_HEADS, HEAD_DIM)
    return lambda: flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=block_table,
                                           num_splits=num_splits)


def sdpa_step(q, k_cache, v_cache):
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    return run


def check_cost_us(q, k_cache, v_cache, seqlens) -> float:
    """Host time per call with the index checks on (wall clock over 50 synchronised calls)."""
    configs.CHECK_CACHE_INDICES = True
    try:
        for _ in range(5):
            flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / 50 * 1e6
    finally:
        configs.CHECK_CACHE_INDICES = False


def run_grid(batches, lengths, page_sizes, copy_gbs):
    records = []
    for batch in batches:
        for seqlen in lengths:
            first = make_cache(batch, seqlen)
            kv_bytes = 2 * first[1].numel() * first[1].element_size()
            layers = [first] + [make_cache(batch, seqlen) for _ in range(layer_count(kv_bytes) - 1)]
            q, k_cache, v_cache, seqlens = first
            ref = sdpa_step(q, k_cache, v_cache)().transpose(1, 2)
            out = flashtile_step(q, k_cache, v_cache, seqlens)()
            err = (out.float() - ref.float()).abs().max().item()
            sdpa_ms = {"graph": graph_ms([sdpa_step(*layer[:3]) for layer in layers]),
                       "eager": median_ms(sdpa_step(q, k_cache, v_cache))}
            for layout, page_size in [("contiguous", None)] + [(f"page{p}", p) for p in page_sizes if seqlen % p == 0]:
                steps = [flashtile_step(*layer, page_order(batch, seqlen, page_size) if page_size else None)
                         for layer in layers]
                ms = {"graph": graph_ms(steps), "eager": median_ms(steps[0])}
                gbs = {mode: kv_bytes / t / 1e6 for mode, t in ms.items()}
                sdpa_gbs = {mode: kv_bytes / t / 1e6 for mode, t in sdpa_ms.items()}
                record = dict(batch=batch, seqlen=seqlen, layout=layout, kv_bytes=kv_bytes, layers=len(layers), ms=ms,
                              gbs=gbs, copy_fraction={m: g / copy_gbs for m, g in gbs.items()},
                              sdpa_flash_ms=sdpa_ms, sdpa_flash_gbs=sdpa_gbs,
                              speedup_vs_sdpa_flash={m: sdpa_ms[m] / ms[m] for m in ms}, max_abs_diff_vs_sdpa=err)
                records.append(record)
                print(f"B={batch:3d} KV={seqlen:6d} {layout:10s} graph: flashtile {ms['graph'] * 1e3:7.1f} us "
                      f"{gbs['graph']:5.0f} GB/s ({gbs['graph'] / copy_gbs:4.0%} of copy), SDPA FA2 "
                      f"{sdpa_ms['graph'] * 1e3:7.1f} us, {sdpa_ms['graph'] / ms['graph']:5.2f}x | eager: "
                      f"{ms['eager'] * 1e3:7.1f} vs {sdpa_ms['eager'] * 1e3:7.1f} us | max|diff| {err:.1e}", flush=True)
            del layers, first, q, k_cache, v_cache, seqlens
            torch.cuda.empty_cache()
    return records


def probe(copy_gbs, tile_specs):
    """Tiles and split counts: GB/s (per-layer graph time) for each alternative."""
    rows = []
    shapes = [(1, 4096), (1, 8192), (1, 32768), (8, 32768), (64, 4096)]
    tiles = [tuple(int(x) for x in t.split("x")) for t in tile_specs.split(",") if t]
    saved = dict(configs.DECODE_TILES)

    def measure(label, layers, table_size=None, splits=0):
        kv_bytes = 2 * layers[0][1].numel() * layers[0][1].element_size()
        batch, seqlen = layers[0][1].shape[:2]
        steps = [flashtile_step(*layer, page_order(batch, seqlen, table_size) if table_size else None, splits)
                 for layer in layers]
        gbs = kv_bytes / graph_ms(steps) / 1e6
        rows.append(dict(batch=batch, seqlen=seqlen, label=label, page_size=table_size, splits=splits, gbs=gbs))
        print(f"B={batch} KV={seqlen} {label}: {gbs:6.0f} GB/s ({gbs / copy_gbs:5.1%})", flush=True)

    for batch, seqlen in shapes:
        first = make_cache(batch, seqlen)
        layers = [first] + [make_cache(batch, seqlen) for _ in range(layer_count(2 * first[1].numel() * 2) - 1)]
        for tile in tiles:
            configs.DECODE_TILES[128] = tile
            for page_size in (None, 64):
                measure(f"tile {tile} {'page64' if page_size else 'contiguous'}", layers, page_size)
        configs.DECODE_TILES.update(saved)
        if batch == 1:
            for splits in (16, 24, 33, 48, 64):
                measure(f"splits {splits}", layers, None, splits)
        saved_pdl = configs.DECODE_PDL
        for pdl in (True, False):
            configs.DECODE_PDL = pdl
            measure(f"combine {'with' if pdl else 'without'} PDL", layers)
        configs.DECODE_PDL = saved_pdl

        del layers, first
        torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--lengths", default="1024,4096,8192,16384,32768,131072")
    parser.add_argument("--pages", default="16,64,256")
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--probe-tiles", default="32x4x3,32x4x4,64x4x3,128x8x3",
                        help="block_n x warps x stages candidates for --probe")
    args = parser.parse_args()
    env = environment()
    print(banner(env))
    configs.CHECK_CACHE_INDICES = False
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    payload = dict(environment=env, copy_gbs=copy_gbs, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                   dtype="bfloat16")
    if args.probe:
        payload["probe"] = probe(copy_gbs, args.probe_tiles)
    else:
        q, k_cache, v_cache, seqlens = make_cache(1, 4096)
        payload["check_us"] = check_cost_us(q, k_cache, v_cache, seqlens)
        print(f"host time per call with the index checks on (B=1, 4k, synchronised): {payload['check_us']:.0f} us")
        payload["records"] = run_grid([int(b) for b in args.batches.split(",")],
                                      [int(s) for s in args.lengths.split(",")],
                                      [int(p) for p in args.pages.split(",")], copy_gbs)
    if args.out:
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
