"""Probe behind ops/bwd_hopper.py: the Gluon single-pass backward (dK, dV and dQ together, dQ by
atomics) against the tl backward (dK/dV and dQ kernels), SDPA FLASH_ATTENTION and
CUDNN_ATTENTION, per (head dim, causal) of ``configs.SM90_GLUON_BWD``, bf16,
batch x seqlen = 16384, heads x head dim = 2048. Backward only: the same forward's (out, lse)
feed both flashtile launchers; SDPA's backward is timed through autograd.

    PYTHONPATH=src python3 bench/gluon_bwd_probe.py [--seqlens 1024,...] [--out results.json]
    PYTHONPATH=src python3 bench/gluon_bwd_probe.py --windows --out results.json   # window thresholds
"""

import argparse
import sys

import torch

from flashtile import configs
from flashtile.features import Features
from flashtile.ops import bwd_hopper
from flashtile.ops.bwd import flash_bwd
from flashtile.ops.fwd import flash_fwd


def backward(gluon, dout, q, k, v, out, lse, features):
    previous = configs.GLUON_BWD
    configs.GLUON_BWD = gluon
    try:
        return flash_bwd(dout, q, k, v, out, lse, features)
    finally:
        configs.GLUON_BWD = previous


def windows(out_path, seqlen=8192, keys_per_row=(128, 256, 512, 1024, 2048, 4096)):
    """The Gluon backward against the tl kernels on sliding windows: a row sees W keys, one-sided
    (W - 1, 0) and two-sided (W / 2, W / 2 - 1), at 8192 tokens (batch 2, heads x head dim =
    2048): what decides configs.SM90_GLUON_BWD_WINDOW_MIN_KEYS (bench/common.window_min_keys)."""
    from common import environment, median_ms, window_min_keys, write_json

    configs.SM90_GLUON_BWD = dict.fromkeys(configs.SM90_GLUON_BWD, 0)
    configs.SM90_GLUON_BWD_WINDOW_MIN_KEYS = dict.fromkeys(configs.SM90_GLUON_BWD_WINDOW_MIN_KEYS, 1)
    rows, ok = [], True
    for head_dim in sorted({d for d, _ in configs.SM90_GLUON_BWD}):
        heads = 2048 // head_dim
        torch.manual_seed(0)
        q, k, v, dout = (torch.randn(2, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))
        for keys in keys_per_row:
            for left, right in ((keys - 1, 0), (keys // 2, keys // 2 - 1)):
                features = Features(head_dim ** -0.5, window_left=left, window_right=right)
                out, lse = flash_fwd(q, k, v, features)
                ours = backward(True, dout, q, k, v, out, lse, features)
                ref = backward(False, dout, q, k, v, out, lse, features)
                err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                          for a, b in zip(ours, ref))
                ok &= err < 2e-2
                ms = {"gluon": median_ms(lambda: backward(True, dout, q, k, v, out, lse, features)),
                      "tl": median_ms(lambda: backward(False, dout, q, k, v, out, lse, features))}
                rows.append(dict(head_dim=head_dim, seqlen=seqlen, window=[left, right], keys_per_row=keys, ms=ms,
                                 rel_err_vs_tl=err))
                print(f"d{head_dim} window ({left}, {right}) rel err {err:.1e} gluon {ms['gluon']:.3f} ms "
                      f"tl {ms['tl']:.3f} ms gluon/tl {ms['tl'] / ms['gluon']:.2f}", flush=True)
    print("configs.SM90_GLUON_BWD_WINDOW_MIN_KEYS:", window_min_keys(rows))
    write_json(out_path, {"env": environment(), "rows": rows})
    return ok


def main():
    sys.path.insert(0, "bench")
    from common import attention_flops, environment, gluon_table_rows, median_ms, sdpa, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--whole-dq", action="store_true",
                        help="one launch with a float32 dQ buffer for every head (no head_chunks split)")
    parser.add_argument("--windows", action="store_true", help="sliding windows, against the tl kernels")
    parser.add_argument("--out", default="bench/results/h100_gluon_bwd.json")
    args = parser.parse_args()
    if args.windows:
        sys.exit(0 if windows(args.out) else 1)
    if args.whole_dq:
        bwd_hopper.head_chunks = lambda n_kv_heads, *_: [(0, n_kv_heads)]
    env = environment()
    rows, ok = [], True
    configs.SM90_GLUON_BWD = dict.fromkeys(configs.SM90_GLUON_BWD, 0)  # every length: the probe sets the thresholds
    for head_dim, causal in sorted(configs.SM90_GLUON_BWD):
        if str(head_dim) not in args.head_dims.split(","):
            continue
        heads = 2048 // head_dim
        features = Features(head_dim ** -0.5, window_right=0 if causal else -1)
        for seqlen in map(int, args.seqlens.split(",")):
            batch = 16384 // seqlen
            torch.manual_seed(0)
            q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                             for _ in range(4))
            out, lse = flash_fwd(q, k, v, features)
            ours = backward(True, dout, q, k, v, out, lse, features)
            ref = backward(False, dout, q, k, v, out, lse, features)  # tested against the float64 oracle
            errs = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(ours, ref)]
            ok &= max(errs) < 2e-2 and all(torch.isfinite(g).all() for g in ours)
            bhsd = [t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v)]
            ms = {"gluon": median_ms(lambda: backward(True, dout, q, k, v, out, lse, features)),
                  "tl": median_ms(lambda: backward(False, dout, q, k, v, out, lse, features))}
            for name in ("sdpa_cudnn", "sdpa_flash"):
                o = sdpa(name)(*bhsd, causal)
                g = dout.transpose(1, 2)
                ms[name] = median_ms(lambda: torch.autograd.grad(o, bhsd, g, retain_graph=True))
            flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, "bwd")
            tflops = {name: round(flops / t / 1e9, 1) for name, t in ms.items()}
            rows.append(dict(head_dim=head_dim, causal=causal, batch=batch, seqlen=seqlen, heads=heads,
                             rel_err_vs_tl=errs, ms=ms, tflops=tflops))
            print(f"d{head_dim} {'causal' if causal else 'full  '} B{batch:<2} S{seqlen:<5} "
                  f"rel err dq/dk/dv {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e} TFLOP/s "
                  + " ".join(f"{n} {t:.0f}" for n, t in tflops.items())
                  + f" | gluon/cudnn {ms['sdpa_cudnn'] / ms['gluon']:.2f} gluon/tl {ms['tl'] / ms['gluon']:.2f}",
                  flush=True)
    print("Gluon / tl time ratios per length and the shortest winning length (configs entries):")
    for line in gluon_table_rows(rows):
        print("    " + line)
    write_json(args.out, {"env": env, "whole_dq": args.whole_dq, "rows": rows})
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
