"""A/B of the host's cost per call: flashtile's forward, backward and forward + backward issued
behind a sleep kernel (``host_bound.host_ms``: nothing waits on the GPU), with ``FastLaunch.launch``
taken from variants of ``ops/launch.py`` in turn, round by round in one process; SDPA's cuDNN
backend timed the same way as a yardstick (the H100 host's speed drifts by up to 2x between runs).

    PYTHONPATH=src python3 bench/host_ab.py --variant old=bench/_launch_old.py [--seqlens 128,512,1024]

A variant is ``NAME=PATH``: a copy of ``ops/launch.py`` (e.g. ``git show HEAD:src/flashtile/ops/launch.py``);
its ``FastLaunch.launch`` replaces the current one's while it is timed (the compiled-kernel cache
is shared: entries look the same in both). Batch x seqlen = 16384 from 512 tokens, batch 64 below.
"""

import argparse
import importlib.util
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import METHODS, make_inputs  # noqa: E402
from common import banner, environment  # noqa: E402
from host_bound import host_ms, modes  # noqa: E402

from flashtile.ops import launch  # noqa: E402

SLEEP = 150_000_000  # ~80 ms at H100 clocks: 20 forward + backward calls issue in ~25 ms on its host


def load_launch(spec: str):
    name, _, path = spec.partition("=")
    module_spec = importlib.util.spec_from_file_location(f"_host_ab_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return name, module.FastLaunch.launch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME=PATH")
    parser.add_argument("--seqlens", default="128,512,1024")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(banner(environment()))
    variants = dict([("current", launch.FastLaunch.launch)] + [load_launch(v) for v in args.variant])
    print(f"{'D':>4s} {'causal':>6s} {'S':>6s} {'mode':>8s}  host us per call: "
          + "  ".join(f"{name}" for name in variants) + "  sdpa_cudnn  (medians of rounds)")
    for head_dim in map(int, args.head_dims.split(",")):
        for causal in (False, True):
            for seqlen in map(int, args.seqlens.split(",")):
                batch, heads = (64 if seqlen < 512 else 16384 // seqlen), 2048 // head_dim
                ours = make_inputs("flashtile", batch, heads, seqlen, head_dim)
                theirs = make_inputs("sdpa_cudnn", batch, heads, seqlen, head_dim)
                our_modes = modes("flashtile", *ours, torch.randn_like(ours[0]), causal)
                their_modes = modes("sdpa_cudnn", *theirs, torch.randn_like(theirs[0]), causal)
                for mode in our_modes:
                    times = {name: [] for name in [*variants, "sdpa_cudnn"]}
                    for _ in range(args.rounds):
                        for name, fn in variants.items():
                            launch.FastLaunch.launch = fn
                            times[name].append(host_ms(our_modes[mode], sleep_cycles=SLEEP) * 1e3)
                        launch.FastLaunch.launch = variants["current"]
                        times["sdpa_cudnn"].append(host_ms(their_modes[mode], sleep_cycles=SLEEP) * 1e3)
                    print(f"{head_dim:4d} {'y' if causal else 'n':>6s} {seqlen:6d} {mode:>8s}  " + "  ".join(
                        f"{name} {statistics.median(t):7.1f}" for name, t in times.items()), flush=True)
                del ours, theirs, our_modes, their_modes
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
