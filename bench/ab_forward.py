"""A/B of the Hopper Gluon forward (``ops/fwd_hopper.py``): variants timed against the current
kernel in one process, interleaved round by round (``ab_backward.py`` does the same for the
backward; see there why). bf16, batch x seqlen = 16384, heads x head dim = 2048 (or ``--shapes``).
Every length runs the Gluon kernel, whatever the table's thresholds say (the A/B is of the kernel,
not of the dispatch), with the tile the call is dispatched to (``configs.SM90_GLUON_FWD_SHORT``'s
below their bounds); configurations whose call the kernel does not take (query lengths, windows
narrower than its window threshold) are skipped.

A variant is ``NAME=PATH``: a copy of ``ops/fwd_hopper.py`` with an edit (or the committed one,
``git show HEAD:src/flashtile/ops/fwd_hopper.py > bench/_old.py``), loaded as its own module; it
reads the same ``configs`` tables. Prints, per configuration, each variant's median ms, its speed
relative to the current kernel (> 1: the variant is faster) and the largest difference of its
output and LSE from the current kernel's (the forward is deterministic: 0 for the same arithmetic).

    PYTHONPATH=src python3 bench/ab_forward.py --variant old=bench/_old.py [--masks full,causal,window]

``NAME=:entry-tiles`` is the current kernel with ``configs.SM90_GLUON_FWD_SHORT`` off: each entry's own
tile at every length, against the short tiles as dispatched (an A/B of that table).
"""

import dataclasses
import statistics
import sys

import torch

from ab_backward import MASKS, load_variant, parse_args, run
from common import median_ms
from flashtile import configs
from flashtile.features import Features
from flashtile.ops import fwd_hopper


def compare(variants, head_dim, mask, batch, seqlen, heads, rounds):
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    window_left, window_right = MASKS[mask](seqlen)
    features = Features(head_dim ** -0.5, window_left=window_left, window_right=window_right)
    if not fwd_hopper.hopper_fwd_eligible(q, k, v, features, None):
        return None
    runs = {name: [] for name in variants}
    for _ in range(rounds):
        for name, forward in variants.items():
            runs[name].append(median_ms(lambda: forward(q, k, v, features)))
    reference = fwd_hopper.hopper_fwd(q, k, v, features)
    row = dict(head_dim=head_dim, mask=mask, window=[window_left, window_right], batch=batch, seqlen=seqlen,
               heads=heads, ms={}, speed={}, max_diff={})
    for name, forward in variants.items():
        result = forward(q, k, v, features)
        row["ms"][name] = statistics.median(runs[name])
        row["speed"][name] = statistics.median(runs["current"]) / row["ms"][name]
        row["max_diff"][name] = max((a.float() - b.float()).abs().max().item() for a, b in zip(result, reference))
    return row


ENTRY_TILES = ":entry-tiles"


def entry_tiles_forward(q, k, v, features):
    """The current kernel on each table entry's own tile (``configs.SM90_GLUON_FWD_SHORT`` off)."""
    short, configs.SM90_GLUON_FWD_SHORT = configs.SM90_GLUON_FWD_SHORT, {}
    try:
        return fwd_hopper.hopper_fwd(q, k, v, features)
    finally:
        configs.SM90_GLUON_FWD_SHORT = short


def main():
    args = parse_args(__doc__, "512,1024,2048,4096,16384")
    for key, tile in list(configs.SM90_GLUON_FWD.items()):  # every length: see the module docstring
        configs.SM90_GLUON_FWD[key] = dataclasses.replace(tile, min_seqlen_k=1, softcap_min_seqlen_k=None)
    configs.SM90_GLUON_FWD_WINDOW_MIN_KEYS = dict.fromkeys(configs.SM90_GLUON_FWD_WINDOW_MIN_KEYS, 1)
    variants = dict([("current", fwd_hopper.hopper_fwd)]
                    + [(spec.partition("=")[0], entry_tiles_forward) if spec.endswith("=" + ENTRY_TILES)
                       else load_variant(spec, "hopper_fwd") for spec in args.variant])
    return run(args, variants, compare, "max_diff")


if __name__ == "__main__":
    sys.exit(main())
