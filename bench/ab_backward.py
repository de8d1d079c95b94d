"""A/B of the Hopper Gluon backward (``ops/bwd_hopper.py``): variants timed against the current
kernel in one process, interleaved round by round, since the H100 host's speed drifts between
runs and between hosts (docs/performance.md). Backward only: one forward's (out, lse) feed every
variant. bf16, batch x seqlen = 16384, heads x head dim = 2048, or the ``--shapes`` given.

A variant is ``NAME=PATH``: a copy of ``ops/bwd_hopper.py`` with an edit (or the committed
one, ``git show HEAD:src/flashtile/ops/bwd_hopper.py > bench/_old.py``), loaded as its own
module. Configurations whose call the kernel does not take are skipped. Prints, per
configuration, each variant's median ms and its speed relative to the current kernel (> 1: the
variant is faster), and the largest difference of its gradients from the current kernel's,
relative to their largest entry (the current kernel's own entry is its run-to-run difference: dQ's
reductions are unordered). Head dim 256 runs ``bwd_hopper_wide``'s kernel in every variant.

    PYTHONPATH=src python3 bench/ab_backward.py --variant old=bench/_old.py [--masks causal,window]
    PYTHONPATH=src python3 bench/ab_backward.py --variant old=bench/_old.py --head-dims 128 --shapes 2x4096x17
"""

import argparse
import importlib.util
import statistics
import sys

import torch

from common import banner, environment, median_ms, write_json
from flashtile.features import Features
from flashtile.ops import bwd_hopper
from flashtile.ops.fwd import flash_fwd


def load_variant(spec: str, entry: str = "hopper_bwd"):
    """``(name, the module's entry function)`` of a ``NAME=PATH`` variant."""
    name, sep, path = spec.partition("=")
    if not (name and sep and path):
        raise SystemExit(f"--variant {spec!r}: expected NAME=PATH")
    module_spec = importlib.util.spec_from_file_location(f"_ab_variant_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return name, getattr(module, entry)


# Masks by name: (window_left, window_right) for a sequence length; -1 is no bound.
MASKS = {"full": lambda seqlen: (-1, -1), "causal": lambda seqlen: (-1, 0),
         "window": lambda seqlen: (seqlen // 4 - 1, 0)}  # a sliding window of seqlen / 4 keys


def compare(variants, head_dim, mask, batch, seqlen, heads, rounds):
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    window_left, window_right = MASKS[mask](seqlen)
    features = Features(head_dim ** -0.5, window_left=window_left, window_right=window_right)
    if not bwd_hopper.hopper_bwd_eligible(q, k, v, dout, features, None):
        return None
    out, lse = flash_fwd(q, k, v, features)
    args = (dout, q, k, v, out, lse, features)
    runs = {name: [] for name in variants}
    for _ in range(rounds):
        for name, backward in variants.items():
            runs[name].append(median_ms(lambda: backward(*args)))
    reference = bwd_hopper.hopper_bwd(*args)
    row = dict(head_dim=head_dim, mask=mask, window=[window_left, window_right], batch=batch, seqlen=seqlen,
               heads=heads, ms={}, speed={}, rel_diff={})
    for name, backward in variants.items():
        grads = backward(*args)
        row["ms"][name] = statistics.median(runs[name])
        row["speed"][name] = statistics.median(runs["current"]) / row["ms"][name]
        row["rel_diff"][name] = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                    for a, b in zip(grads, reference))
    return row


def parse_args(doc: str, seqlens: str):
    """The options both A/B tools take (``ab_forward.py`` too)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME=PATH")
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--seqlens", default=seqlens)
    parser.add_argument("--shapes", help="BxSxH,... (batch x seqlen x heads, e.g. 2x4096x17) instead of --seqlens "
                                         "at batch x seqlen = 16384, heads x head dim = 2048")
    parser.add_argument("--masks", default="full,causal", help=f"comma-separated, of {', '.join(MASKS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    return parser.parse_args()


def run(args, variants, compare, diff_key: str) -> int:
    """Every (head dim, mask, length) of ``args`` through ``compare``: prints each row (variants'
    median ms, speed against the current kernel, ``row[diff_key]``) and writes them to ``--out``."""
    print(banner(environment()), flush=True)
    rows = []
    for head_dim in map(int, args.head_dims.split(",")):
        if args.shapes:
            shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
        else:
            shapes = [(16384 // seqlen, seqlen, 2048 // head_dim) for seqlen in map(int, args.seqlens.split(","))]
        for mask in args.masks.split(","):
            for batch, seqlen, heads in shapes:
                row = compare(variants, head_dim, mask, batch, seqlen, heads, args.rounds)
                if row is None:
                    continue
                rows.append(row)
                print(f"d{head_dim} {mask:6} {batch}x{seqlen}x{heads} " + " ".join(
                    f"{name} {row['ms'][name]:.4f} ms x{row['speed'][name]:.3f} diff {row[diff_key][name]:.1e}"
                    for name in variants), flush=True)
    if args.out:
        write_json(args.out, dict(environment=environment(), variants=args.variant, rows=rows))
    return 0


def main():
    args = parse_args(__doc__, "2048,4096,16384")
    variants = dict([("current", bwd_hopper.hopper_bwd)] + [load_variant(spec) for spec in args.variant])
    return run(args, variants, compare, "rel_diff")


if __name__ == "__main__":
    sys.exit(main())
