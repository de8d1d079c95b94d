"""Opt-in tile tuning (GPU only): times candidate TileConfigs per (mode, head dim) and prints
the rows for flashtile/configs.py. Nobody pays for this at run time.

Shape: batch * seqlen = 16384 at seqlen 4096, nheads * headdim = 2048, bf16, not causal (the
same tiles serve causal). Candidates are compiled first in parallel processes (Triton's disk
cache keeps them), then timed one by one in this process.

    PYTHONPATH=src python3 bench/tune.py --out tune.json
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import attention_flops, banner, environment, median_ms, write_json  # noqa: E402

CANDIDATES = {
    # (block_m, block_n, num_warps, num_stages)
    "fwd": [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
            (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4), (64, 64, 4, 2), (128, 64, 8, 2)],
    "dkdv": [(32, 128, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 2),
             (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 4, 2), (64, 64, 8, 1), (32, 64, 4, 1)],
    "dq": [(128, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 4, 2), (64, 128, 4, 2),
           (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 1), (64, 32, 4, 1)],
}
HEAD_DIMS = (64, 128, 256)
SEQLEN = 4096


def _set(mode, head_dim, cfg):
    from flashtile import configs

    configs.SM90[(mode, head_dim)] = configs.TileConfig(*cfg)


def _inputs(head_dim, seqlen=SEQLEN):
    batch, heads = 16384 // seqlen, 2048 // head_dim
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return q, k, v, torch.randn_like(q)


def _run(mode, head_dim, cfg, q, k, v, dout):
    from flashtile.ops import flash_bwd, flash_fwd

    _set(mode, head_dim, cfg)
    scale = head_dim**-0.5
    if mode == "fwd":
        return lambda: flash_fwd(q, k, v, scale, False)
    out, lse = flash_fwd(q, k, v, scale, False)
    return lambda: flash_bwd(dout, q, k, v, out, lse, scale, False)


def _compile(jobs):
    """Worker: compile (and run once, tiny) each (mode, head_dim, cfg); report failures."""
    failed = []
    for mode, head_dim, cfg in jobs:
        try:
            _run(mode, head_dim, cfg, *_inputs(head_dim, seqlen=256))()
            torch.cuda.synchronize()
        except Exception as err:  # out of shared memory / registers: the candidate is dropped
            failed.append((mode, head_dim, cfg, f"{type(err).__name__}: {str(err)[:120]}"))
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    args = parser.parse_args()
    head_dims = [int(d) for d in args.head_dims.split(",")]
    env = environment()
    print(banner(env))

    jobs = [(m, d, c) for m in CANDIDATES for d in head_dims for c in CANDIDATES[m]]
    shards = [jobs[i::args.workers] for i in range(args.workers)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        failed = [f for fs in pool.map(_compile, shards) for f in fs]
    bad = {(m, d, c) for m, d, c, _ in failed}
    for f in failed:
        print("compile failed:", f)

    results = []
    best = {}
    for head_dim in head_dims:
        q, k, v, dout = _inputs(head_dim)
        batch, heads = q.shape[0], q.shape[2]
        for mode in ("fwd", "dkdv", "dq"):
            # dkdv and dq are timed as the whole backward, the other kernel held at its best
            # (or default) entry, so differences come from the kernel being tuned.
            flop_mode = "fwd" if mode == "fwd" else "bwd"
            flops = attention_flops(batch, heads, SEQLEN, SEQLEN, head_dim, False, flop_mode)
            timed = []
            for cfg in CANDIDATES[mode]:
                if (mode, head_dim, cfg) in bad:
                    continue
                ms = median_ms(_run(mode, head_dim, cfg, q, k, v, dout))
                timed.append((ms, cfg))
                results.append(dict(mode=mode, head_dim=head_dim, config=cfg, ms=ms, tflops=flops / ms / 1e9))
                print(f"{mode:5s} d={head_dim:3d} {cfg}: {ms:.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s", flush=True)
            ms, cfg = min(timed)
            best[(mode, head_dim)] = (cfg, flops / ms / 1e9)
            _set(mode, head_dim, cfg)
        del q, k, v, dout
        torch.cuda.empty_cache()

    print("\n# rows for flashtile/configs.py SM90 (bf16, B*S=16384, S=4096, H*D=2048, non-causal):")
    for (mode, head_dim), (cfg, tflops) in sorted(best.items()):
        print(f'    ("{mode}", {head_dim}): TileConfig{cfg},  # {tflops:.0f} TFLOP/s ({env["date"]})')
    if args.out:
        write_json(args.out, dict(environment=env, results=results, failed=failed))


if __name__ == "__main__":
    main()
