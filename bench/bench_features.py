"""What FlashAttention-2's extra features cost, measured in one process (bf16, H100 figures in
bench/results/h100_features.json):

* varlen: 8 sequences of mixed lengths summing to 16384 tokens against the dense kernel at
  the mean length (B=8, S=2048), in TFLOP/s counted over the real (unpadded) work;
* sliding window (1024, 0) + causal at seqlen 16384 against full causal attention, as a speedup;
* softcap, ALiBi, dropout, each alone, as a time ratio to the plain kernel
  (B * S = 16384, H * D = 2048).

    PYTHONPATH=src python3 bench/bench_features.py --out bench/results/h100_features.json
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import attention_flops, banner, environment, median_ms, write_json  # noqa: E402

import flashtile  # noqa: E402

VARLEN_LENGTHS = [512, 1024, 1536, 2048, 2560, 3072, 2048, 3584]  # sum 16384, mean 2048


def timed(run, tensors, dout):
    """(fwd ms, bwd ms): medians of do_bench; best of two runs (the machine is shared)."""
    out = run()
    times = []
    for _ in range(2):
        fwd = median_ms(run)
        bwd = median_ms(lambda: torch.autograd.grad(out, tensors, dout, retain_graph=True))
        times.append((fwd, bwd))
    return min(t[0] for t in times), min(t[1] for t in times)


def rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()


def bench_varlen(head_dim, causal):
    heads = 2048 // head_dim
    total = sum(VARLEN_LENGTHS)
    q, k, v = rand(total, heads, head_dim), rand(total, heads, head_dim), rand(total, heads, head_dim)
    cu = torch.tensor([0] + torch.tensor(VARLEN_LENGTHS).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    longest = max(VARLEN_LENGTHS)
    varlen = timed(lambda: flashtile.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=causal),
                   (q, k, v), torch.randn_like(q))
    flops = sum(attention_flops(1, heads, n, n, head_dim, causal, "fwd") for n in VARLEN_LENGTHS)

    mean = total // len(VARLEN_LENGTHS)
    qd, kd, vd = (rand(len(VARLEN_LENGTHS), mean, heads, head_dim) for _ in range(3))
    dense = timed(lambda: flashtile.flash_attn_func(qd, kd, vd, causal=causal), (qd, kd, vd), torch.randn_like(qd))
    dense_flops = attention_flops(len(VARLEN_LENGTHS), heads, mean, mean, head_dim, causal, "fwd")
    rows = []
    for i, mode in enumerate(("fwd", "bwd")):
        factor = 1.0 if mode == "fwd" else 2.5
        tf_var = factor * flops / varlen[i] / 1e9
        tf_dense = factor * dense_flops / dense[i] / 1e9
        rows.append(dict(bench="varlen", head_dim=head_dim, causal=causal, mode=mode, varlen_tflops=tf_var,
                         dense_tflops=tf_dense, ratio=tf_var / tf_dense, varlen_ms=varlen[i], dense_ms=dense[i]))
    return rows


def bench_window(head_dim, seqlen=16384, window=1024):
    heads = 2048 // head_dim
    q, k, v = (rand(1, seqlen, heads, head_dim) for _ in range(3))
    dout = torch.randn_like(q)
    full = timed(lambda: flashtile.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    local = timed(lambda: flashtile.flash_attn_func(q, k, v, causal=True, window_size=(window, 0)), (q, k, v), dout)
    noncausal = timed(lambda: flashtile.flash_attn_func(q, k, v), (q, k, v), dout)
    return [dict(bench="window", head_dim=head_dim, seqlen=seqlen, window=[window, 0], mode=mode,
                 causal_ms=full[i], window_ms=local[i], noncausal_ms=noncausal[i],
                 speedup_vs_causal=full[i] / local[i], speedup_vs_noncausal=noncausal[i] / local[i])
            for i, mode in enumerate(("fwd", "bwd"))]


def bench_overheads(head_dim, causal, seqlen):
    heads = 2048 // head_dim
    batch = 16384 // seqlen
    q, k, v = (rand(batch, seqlen, heads, head_dim) for _ in range(3))
    dout = torch.randn_like(q)
    slopes = torch.rand(heads, device="cuda", dtype=torch.float32) * 0.1
    variants = {"plain": {}, "softcap": dict(softcap=30.0), "alibi": dict(alibi_slopes=slopes),
                "dropout": dict(dropout_p=0.1)}
    times = {name: timed(lambda kw=kw: flashtile.flash_attn_func(q, k, v, causal=causal, **kw), (q, k, v), dout)
             for name, kw in variants.items()}
    rows = []
    for i, mode in enumerate(("fwd", "bwd")):
        plain = times["plain"][i]
        flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, mode)
        for name in ("softcap", "alibi", "dropout"):
            rows.append(dict(bench="overhead", feature=name, head_dim=head_dim, causal=causal, seqlen=seqlen,
                             mode=mode, plain_ms=plain, feature_ms=times[name][i],
                             overhead=times[name][i] / plain - 1.0, plain_tflops=flops / plain / 1e9))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--seqlens", default="2048,8192", help="for the softcap/ALiBi/dropout overheads")
    args = parser.parse_args()
    env = environment()
    print(banner(env))
    rows = []
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for causal in (False, True):
            rows += bench_varlen(head_dim, causal)
            for seqlen in (int(s) for s in args.seqlens.split(",")):
                rows += bench_overheads(head_dim, causal, seqlen)
        rows += bench_window(head_dim)
    for row in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "features.json")
    write_json(out, dict(environment=env, dtype="bfloat16", records=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
