"""Which benchmark cells the host bounds: per call, the time the benchmark measures (do_bench, as
bench_attention.py), the GPU's kernel time (torch.profiler, summed over the call's kernels) and
the host's time to issue the call (while a sleep kernel holds the GPU, so nothing waits on it).

    PYTHONPATH=src python3 bench/host_bound.py [--seqlens 512,1024] [--head-dims 64,128,256]
    PYTHONPATH=src python3 bench/host_bound.py --seqlens 2048,16384 --modes bwd --kernels

``--kernels`` also lists each cell's kernels with their device time per call (where a kernel-bound
cell's time goes: the attention kernel, or the passes around it); ``--profile`` the Python
functions with the most host time in flashtile's calls (cProfile, behind the same sleep kernel).

A cell whose measured time is well above its kernel time and near its host time is host-bound:
a faster kernel would not show there, a cheaper launch path would.
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import METHODS, make_inputs  # noqa: E402
from common import banner, environment, median_ms  # noqa: E402


def kernel_times(fn, calls=20) -> dict[str, float]:
    """Device time per call of each kernel ``fn`` runs, in ms, longest first (torch.profiler, no
    L2 flush between calls)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {event.key: event.self_device_time_total / calls / 1e3 for event in prof.key_averages()
             if event.self_device_time_total > 0}
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def host_ms(fn, calls=20, sleep_cycles=2_000_000_000) -> float:
    """Host time per call to issue ``fn``'s work, behind a sleep kernel that keeps the GPU busy
    (so no call waits for the device): ``sleep_cycles`` must outlast the calls' issue (the
    default, ~1 s at H100 clocks, does for any cell)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def profile_host(fn, calls=50, rows=25):
    """cProfile of ``calls`` calls issued behind a sleep kernel: the functions with the most own
    time, then the most cumulative time (what a host-bound cell's host time is made of)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).strip_dirs()
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)


def modes(method, q, k, v, dout, causal):
    fn = METHODS[method]
    out = fn(q, k, v, causal)
    return {
        "fwd": lambda: fn(q, k, v, causal),
        "bwd": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
        "fwd_bwd": lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", default="512,1024")
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--methods", default="flashtile,sdpa_cudnn")
    parser.add_argument("--modes", default="fwd,bwd,fwd_bwd")
    parser.add_argument("--kernels", action="store_true", help="list each cell's kernels and their time")
    parser.add_argument("--profile", action="store_true", help="cProfile flashtile's calls in each cell")
    args = parser.parse_args()
    print(banner(environment()))
    print(f"{'method':11s} {'D':>4s} {'causal':>6s} {'S':>6s} {'mode':>8s} {'bench ms':>9s} {'kernels':>8s} "
          f"{'host':>7s}")
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for causal in (False, True):
            for seqlen in (int(s) for s in args.seqlens.split(",")):
                batch, heads = max(1, 16384 // seqlen), 2048 // head_dim
                for method in args.methods.split(","):
                    q, k, v = make_inputs(method, batch, heads, seqlen, head_dim)
                    dout = torch.randn_like(q)
                    for mode, fn in modes(method, q, k, v, dout, causal).items():
                        if mode not in args.modes.split(","):
                            continue
                        kernels = kernel_times(fn)
                        print(f"{method:11s} {head_dim:4d} {'y' if causal else 'n':>6s} {seqlen:6d} {mode:>8s} "
                              f"{median_ms(fn):9.3f} {sum(kernels.values()):8.3f} {host_ms(fn):7.3f}", flush=True)
                        if args.kernels:
                            for name, ms in kernels.items():
                                print(f"{'':13s}{ms:9.3f}  {name[:110]}")
                        if args.profile and method == "flashtile":
                            profile_host(fn)
                    del q, k, v, dout
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
