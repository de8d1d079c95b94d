"""Opt-in tile tuning (GPU only): times candidate TileConfigs for each kernel (fwd, dkdv, dq),
head dim and causal flag, and prints the rows for flashtile/configs.py. Nobody pays for this
at run time.

Shapes: batch * seqlen = 16384, nheads * headdim = 2048, bf16; a candidate's score is the
geometric mean of its TFLOP/s over the sequence lengths. Candidates are first compiled in
parallel processes (Triton's disk cache keeps them), then timed in this one.

Two tables: ``SM90`` (default lengths 1024 and 16384, pointer loads), which serves every loop
length unless ``SM90_LONG`` has an entry, and with ``--long`` ``SM90_LONG``, for loops of at
least ``configs.TMA_MIN_SEQLEN`` streamed rows (default lengths 2048 and 16384), where the
candidates with ``tma`` read their streamed tiles through TMA descriptors.

    PYTHONPATH=src python3 bench/tune.py --out tune.json [--long] [--modes dkdv,dq] [--head-dims 128]
"""

import argparse
import concurrent.futures
import math
import multiprocessing
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import attention_flops, banner, environment, median_ms, write_json  # noqa: E402

CANDIDATES = {
    # TileConfig fields: (block_m, block_n, num_warps, num_stages[, kv_as_b[, tma]]). kv_as_b:
    # the dkdv operand orientation. Candidates with tma are timed only with --long. (A --long dkdv
    # sweep that also held 64x32/4 warps, 128x64/8 and 64x64/8 TMA tiles did not finish in 10
    # minutes on the H100; those were dropped, the rest have each run.)
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2),
            (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2),
            (128, 128, 8, 3, False, True), (128, 64, 8, 3, False, True), (128, 128, 8, 2, False, True),
            (64, 64, 4, 3, False, True), (128, 64, 4, 3, False, True)],
    "dkdv": [(32, 64, 4, 1, False), (32, 64, 8, 1, False), (32, 64, 8, 2, False), (16, 64, 4, 1, False),
             (32, 128, 8, 1, False), (64, 128, 8, 1, False), (32, 64, 4, 3, False),
             (32, 64, 4, 1, True), (32, 64, 8, 1, True), (32, 64, 8, 2, True), (32, 128, 8, 1, True),
             (16, 64, 4, 1, True), (64, 64, 8, 1, True),
             (64, 64, 4, 2, False, True), (64, 64, 4, 3, False, True), (64, 128, 8, 2, False, True),
             (32, 64, 4, 3, False, True), (32, 128, 8, 2, False, True), (32, 64, 4, 2, False, True),
             (64, 64, 8, 2, True, True), (32, 32, 4, 2, False, True)],
    "dq": [(64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2),
           (64, 32, 4, 2), (128, 64, 8, 3),
           (128, 64, 8, 3, False, True), (64, 64, 4, 3, False, True), (128, 128, 8, 2, False, True),
           (64, 32, 4, 3, False, True), (128, 32, 8, 3, False, True), (64, 64, 4, 4, False, True)],
}
HEAD_DIMS = (64, 128, 256)
SEQLENS = (1024, 16384)
LONG_SEQLENS = (2048, 16384)


def _candidates(mode, long):
    """Short loops never use TMA; long loops try every candidate."""
    return [cfg for cfg in CANDIDATES[mode] if long or not (len(cfg) > 5 and cfg[5])]


def _use_table(long):
    """Without --long the candidates go into SM90, which long loops must then read too."""
    from flashtile import configs

    if not long:
        configs.SM90_LONG.clear()


def _set(mode, head_dim, causal, cfg, long):
    from flashtile import configs

    (configs.SM90_LONG if long else configs.SM90)[(mode, head_dim, causal)] = configs.TileConfig(*cfg)


class Problem:
    """Inputs and forward outputs for one shape; ``kernel(mode)`` returns a launch closure."""

    def __init__(self, head_dim, seqlen, causal):
        from flashtile.features import Features
        from flashtile.ops import bwd, flash_fwd
        from flashtile.ops.common import sequence_layout

        self.batch, self.heads = max(1, 16384 // seqlen), 2048 // head_dim
        self.seqlen, self.head_dim, self.causal = seqlen, head_dim, causal
        shape = (self.batch, seqlen, self.heads, head_dim)
        self.q, self.k, self.v, self.dout = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        self.features = Features(head_dim**-0.5, window_right=0 if causal else -1)
        self.layout = sequence_layout(self.q, self.k, None)
        self.out, self.lse = flash_fwd(self.q, self.k, self.v, self.features)
        self.delta = torch.empty_like(self.lse)
        bwd.launch_delta(self.out, self.dout, self.delta)
        self.dq, self.dk, self.dv = (torch.empty_like(t) for t in (self.q, self.k, self.v))

    def kernel(self, mode):
        from flashtile.ops import bwd, flash_fwd

        if mode == "fwd":
            return lambda: flash_fwd(self.q, self.k, self.v, self.features)
        if mode == "dkdv":
            return lambda: bwd.launch_dkdv(self.dout, self.q, self.k, self.v, self.lse, self.delta, self.dk,
                                           self.dv, self.features, self.layout)
        return lambda: bwd.launch_dq(self.dout, self.q, self.k, self.v, self.lse, self.delta, self.dq,
                                     self.features, self.layout)

    def flops(self, mode):
        # dkdv does 4 of the backward's 7 matmuls and dq 3 (P and dP are recomputed in both);
        # count each kernel's own share of 2.5x forward so their TFLOP/s compare.
        share = {"fwd": ("fwd", 1.0), "dkdv": ("fwd", 2.0), "dq": ("fwd", 1.5)}[mode]
        return attention_flops(self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim, self.causal,
                               share[0]) * share[1]


def _compile(jobs, long):
    """Worker: compile and run once (small shape) each job; report the ones that fail."""
    from flashtile import configs

    _use_table(long)
    configs.TMA_MIN_SEQLEN = 0 if long else configs.TMA_MIN_SEQLEN  # compiled on a short problem
    failed = []
    for mode, head_dim, causal, cfg in jobs:
        try:
            _set(mode, head_dim, causal, cfg, long)
            Problem(head_dim, 256, causal).kernel(mode)()
            torch.cuda.synchronize()
        except Exception as err:  # out of shared memory or registers: the candidate is dropped
            failed.append((mode, head_dim, causal, cfg, f"{type(err).__name__}: {str(err)[:120]}"))
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    parser.add_argument("--seqlens", default=None, help="default: 1024,16384, or 2048,16384 with --long")
    parser.add_argument("--long", action="store_true", help="tune SM90_LONG (TMA_MIN_SEQLEN rows and more)")
    parser.add_argument("--configs", default=None,
                        help="candidates instead of the built-in list, e.g. '64,64,4,2,0,1;32,64,4,1' (one mode)")
    parser.add_argument("--modes", default=",".join(CANDIDATES))
    args = parser.parse_args()
    head_dims = [int(d) for d in args.head_dims.split(",")]
    seqlens = [int(s) for s in (args.seqlens or ",".join(map(str, LONG_SEQLENS if args.long else SEQLENS))).split(",")]
    from flashtile import configs

    if args.long and min(seqlens) < configs.TMA_MIN_SEQLEN:
        parser.error(f"--long tunes loops of at least {configs.TMA_MIN_SEQLEN} rows")
    _use_table(args.long)
    modes = args.modes.split(",")
    if args.configs:
        if len(modes) != 1:
            parser.error("--configs needs exactly one mode")
        CANDIDATES[modes[0]] = [tuple(int(x) if i < 4 else bool(int(x)) for i, x in enumerate(c.split(",")))
                                for c in args.configs.split(";")]
    env = environment()
    print(banner(env))

    jobs = [(m, d, c, cfg) for m in modes for d in head_dims for c in (False, True)
            for cfg in _candidates(m, args.long)]
    shards = [jobs[i::args.workers] for i in range(args.workers)]
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = [f for fs in pool.map(_compile, shards, [args.long] * len(shards)) for f in fs]
    bad = {f[:4] for f in failed}
    print(f"compiled {len(jobs)} candidates, {len(failed)} failed (resources)")

    results, best = [], {}
    for head_dim in head_dims:
        for causal in (False, True):
            problems = [Problem(head_dim, s, causal) for s in seqlens]
            for mode in modes:
                scored = []
                for cfg in _candidates(mode, args.long):
                    if (mode, head_dim, causal, cfg) in bad:
                        continue
                    _set(mode, head_dim, causal, cfg, args.long)
                    tflops = [p.flops(mode) / median_ms(p.kernel(mode)) / 1e9 for p in problems]
                    score = math.exp(sum(map(math.log, tflops)) / len(tflops))
                    scored.append((score, cfg, tflops))
                    results.append(dict(mode=mode, head_dim=head_dim, causal=causal, config=cfg,
                                        tflops=dict(zip(map(str, seqlens), tflops))))
                    print(f"{mode:4s} d={head_dim:3d} causal={causal:d} {cfg}: "
                          + " ".join(f"{t:6.1f}" for t in tflops), flush=True)
                score, cfg, tflops = max(scored)
                best[(mode, head_dim, causal)] = (cfg, tflops)
                _set(mode, head_dim, causal, cfg, args.long)
            del problems
            torch.cuda.empty_cache()

    table = "SM90_LONG" if args.long else "SM90"
    print(f"\n# {table} rows (bf16, B*S=16384, H*D=2048; TFLOP/s at S={seqlens}, {env['gpu']}, {env['date']}):")
    for (mode, head_dim, causal), (cfg, tflops) in sorted(best.items()):
        print(f'    ("{mode}", {head_dim}, {causal}): TileConfig{cfg},  # '
              + " / ".join(f"{t:.0f}" for t in tflops))
    if args.out:
        write_json(args.out, dict(environment=env, long=args.long, results=results, failed=failed))


if __name__ == "__main__":
    main()
