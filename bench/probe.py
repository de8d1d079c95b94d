"""Probes behind kernel choices that the tile table does not cover (bf16, one process, H100
figures quoted in docs/performance.md). Each probe times the same call under the choices it
compares; nothing here changes the library's defaults.

    PYTHONPATH=src python3 bench/probe.py --out /tmp/probe.json [varlen dropout tma feature_tiles]

* ``varlen``: forward tile configs for varlen at head dim 64 non-causal (bench_features' lengths).
* ``dropout``: the dK/dV loop's two operand orientations (``TileConfig.kv_as_b``) with dropout.
* ``feature_tiles``: softcap and dropout at head dim 64 under other tile shapes.
* ``tma``: the forward with K/V by TMA tensor descriptors (``TileConfig.tma``) against the
  pointer loads, with SDPA's FA2 and cuDNN backends on the same inputs. (Triton 3.6's automatic
  warp specialization, ``tl.range(..., warp_specialize=True)``, was probed here too: -2% to +5%
  non-causal, and its Hopper pass asserts on the causal loops.)
"""

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_features import VARLEN_LENGTHS, rand, timed  # noqa: E402
from common import banner, environment, median_ms, write_json  # noqa: E402

import flashtile  # noqa: E402
from flashtile import configs  # noqa: E402
from flashtile.ops import bwd  # noqa: E402


def dense_inputs(head_dim, seqlen=4096):
    batch, heads = 16384 // seqlen, 2048 // head_dim
    q, k, v = (rand(batch, seqlen, heads, head_dim) for _ in range(3))
    return q, k, v, torch.randn_like(q)


def probe_varlen():
    rows = []
    head_dim, heads = 64, 32
    total, longest = sum(VARLEN_LENGTHS), max(VARLEN_LENGTHS)
    q, k, v = (rand(total, heads, head_dim).detach() for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(VARLEN_LENGTHS).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    qd, kd, vd = (rand(len(VARLEN_LENGTHS), total // len(VARLEN_LENGTHS), heads, head_dim).detach() for _ in range(3))
    key = ("fwd", 64, False)
    real = configs.SM90[key]
    for cfg in (real, configs.TileConfig(64, 64, 4, 3), configs.TileConfig(128, 128, 8, 3),
                configs.TileConfig(128, 64, 4, 3), configs.TileConfig(128, 64, 8, 2)):
        configs.SM90[key] = cfg
        varlen = median_ms(lambda: flashtile.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest))
        dense = median_ms(lambda: flashtile.flash_attn_func(qd, kd, vd))
        rows.append(dict(probe="varlen", config=dataclasses.astuple(cfg), varlen_ms=varlen, dense_ms=dense))
        print(rows[-1], flush=True)
    configs.SM90[key] = real
    return rows


def probe_dropout():
    rows = []
    real = bwd.tile_config
    for head_dim in (64, 128):
        q, k, v, dout = dense_inputs(head_dim)
        for kv_as_b in (False, True):
            bwd.tile_config = lambda *a, kv_as_b=kv_as_b, **kw: dataclasses.replace(real(*a, **kw), kv_as_b=kv_as_b)
            for p in (0.0, 0.1):
                _, bwd_ms = timed(lambda: flashtile.flash_attn_func(q, k, v, dropout_p=p), (q, k, v), dout)
                rows.append(dict(probe="dropout", head_dim=head_dim, kv_as_b=kv_as_b, dropout_p=p, bwd_ms=bwd_ms))
                print(rows[-1], flush=True)
    bwd.tile_config = real
    return rows


def probe_tma():
    """Forward with K/V by TMA descriptors against the pointer loads, with the SDPA baselines
    of the same inputs."""
    from common import sdpa

    from flashtile.ops import fwd

    rows = []
    real = fwd.tile_config
    for head_dim in (64, 128):
        for seqlen in (4096, 16384):
            q, k, v, _ = dense_inputs(head_dim, seqlen)
            q, k, v = q.detach(), k.detach(), v.detach()
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            for causal in (False, True):
                row = dict(probe="tma", head_dim=head_dim, seqlen=seqlen, causal=causal)
                for name, tma in (("plain", False), ("tma", True)):
                    fwd.tile_config = lambda *a, tma=tma, **kw: dataclasses.replace(real(*a, **kw), tma=tma)
                    row[name] = median_ms(lambda: flashtile.flash_attn_func(q, k, v, causal=causal))
                fwd.tile_config = real
                for backend in ("sdpa_flash", "sdpa_cudnn"):
                    row[backend] = median_ms(lambda: sdpa(backend)(qt, kt, vt, causal))
                rows.append(row)
                print(row, flush=True)
    return rows


def probe_feature_tiles():
    """Head dim 64 non-causal, seqlen 4096: softcap and dropout under other forward and dK/dV
    tiles than the plain kernel's (which they use), against the plain kernel with its own."""
    from flashtile.ops import fwd

    rows = []
    q, k, v, dout = dense_inputs(64)
    fwd_real, bwd_real = fwd.tile_config, bwd.tile_config
    plain = timed(lambda: flashtile.flash_attn_func(q, k, v), (q, k, v), dout)
    rows.append(dict(probe="feature_tiles", feature="plain", fwd_ms=plain[0], bwd_ms=plain[1]))
    print(rows[-1], flush=True)
    fwd_tiles = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 3)]
    dkdv_tiles = [(32, 128, 8, 1), (32, 64, 4, 1), (64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 1), (16, 128, 4, 2)]
    for feature, kwargs in (("softcap", dict(softcap=30.0)), ("dropout", dict(dropout_p=0.1))):
        for i in range(max(len(fwd_tiles), len(dkdv_tiles))):
            f_cfg = configs.TileConfig(*fwd_tiles[i % len(fwd_tiles)])
            b_cfg = configs.TileConfig(*dkdv_tiles[i])
            fwd.tile_config = lambda *a, c=f_cfg, **kw: c
            bwd.tile_config = lambda *a, c=b_cfg, **kw: c if a[3] == "dkdv" else bwd_real(*a, **kw)
            f_ms, b_ms = timed(lambda: flashtile.flash_attn_func(q, k, v, **kwargs), (q, k, v), dout)
            rows.append(dict(probe="feature_tiles", feature=feature, fwd_tile=dataclasses.astuple(f_cfg),
                             dkdv_tile=dataclasses.astuple(b_cfg), fwd_ms=f_ms, bwd_ms=b_ms))
            print(rows[-1], flush=True)
    fwd.tile_config, bwd.tile_config = fwd_real, bwd_real
    return rows


PROBES = {"varlen": probe_varlen, "dropout": probe_dropout, "tma": probe_tma, "feature_tiles": probe_feature_tiles}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probes", nargs="*", default=list(PROBES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    env = environment()
    print(banner(env), flush=True)
    records = [row for name in args.probes for row in PROBES[name]()]
    if args.out:
        write_json(args.out, {"environment": env, "dtype": "bfloat16", "records": records})


if __name__ == "__main__":
    main()
