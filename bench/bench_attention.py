"""flashtile against PyTorch's attention backends, measured in one process.

Shapes follow the FlashAttention papers: batch * seqlen = 16384, nheads * headdim = 2048,
bf16. Reports forward, backward and forward+backward TFLOP/s for flashtile, standard PyTorch
attention and SDPA's FLASH_ATTENTION (FlashAttention-2), CUDNN_ATTENTION and
EFFICIENT_ATTENTION backends, the ratio of flashtile to each, and the extra peak memory of
forward+backward. Writes JSON for bench/plot.py.

    PYTHONPATH=src python3 bench/bench_attention.py --out bench/results/h100.json
    # short sequences at a fixed batch:
    PYTHONPATH=src python3 bench/bench_attention.py --seqlens 128,256 --batch 64 --out ...
    # one 131072-token causal forward+backward (B=1, H=16, D=128): times and peak memory
    PYTHONPATH=src python3 bench/bench_attention.py --long-context --out ...
"""

import argparse
import sys
import os

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import SDPA_BACKENDS, attention_flops, banner, environment, median_ms, sdpa, standard_attention, write_json  # noqa: E402

import flashtile  # noqa: E402

BASELINES = ["standard", *SDPA_BACKENDS]
MODES = ["fwd", "bwd", "fwd_bwd"]


def flashtile_native(q, k, v, causal):
    """flashtile on its native (B, S, H, D) tensors (see make_inputs)."""
    return flashtile.flash_attn_func(q, k, v, causal=causal)


METHODS = {"flashtile": flashtile_native, "standard": standard_attention, **{b: sdpa(b) for b in SDPA_BACKENDS}}


def make_inputs(method, batch, heads, seqlen, head_dim):
    """Each method gets its preferred contiguous layout and is called on it directly: (B, S, H, D)
    for flashtile, (B, H, S, D) for the others (before the 2026-11-25 06:35 UTC run flashtile was timed
    through (B, H, S, D) transposed views, whose autograd nodes added host time to its forward +
    backward). Random normal data (never zeros), fresh per shape."""
    def rand():
        if method == "flashtile":
            t = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        else:
            t = torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16)
        return t.requires_grad_()

    return rand(), rand(), rand()


def measure(methods, batch, heads, seqlen, head_dim, causal, repeats=2):
    """``{method: {mode: ms}}``: best of ``repeats`` medians per mode; the machine is shared, so
    one run can be hit by a neighbour. The methods take turns, round by round, so a slow stretch
    of the machine falls on all of them, not on one (before the 2026-11-25 11:56 UTC run each
    method ran its repeats back to back). Modes a method cannot run (unsupported / out of memory)
    are absent."""
    runs = {method: [] for method in methods}
    for _ in range(repeats):
        for method in methods:
            runs[method].append(measure_once(method, batch, heads, seqlen, head_dim, causal))
    return {method: {mode: min(run[mode] for run in method_runs) for mode in method_runs[0]
                     if all(mode in run for run in method_runs)}
            for method, method_runs in runs.items()}


def measure_once(method, batch, heads, seqlen, head_dim, causal):
    """Median ms per mode, for the modes the method can run."""
    fn = METHODS[method]
    result = {}
    try:
        q, k, v = make_inputs(method, batch, heads, seqlen, head_dim)
        dout = torch.randn_like(q)
        result["fwd"] = median_ms(lambda: fn(q, k, v, causal))
        out = fn(q, k, v, causal)
        result["bwd"] = median_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
        del out

        def fwd_bwd():
            torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)

        result["fwd_bwd"] = median_ms(fwd_bwd)
    except (RuntimeError, torch.OutOfMemoryError) as err:  # unsupported config or OOM
        print(f"  {method} S={seqlen} D={head_dim} causal={causal}: {type(err).__name__}: {str(err)[:100]}")
    finally:
        torch.cuda.empty_cache()
    return result


def peak_memory_mib(method, batch, heads, seqlen, head_dim, causal):
    """Extra peak memory of one forward+backward, above the inputs and dout."""
    q, k, v = make_inputs(method, batch, heads, seqlen, head_dim)
    dout = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        grads = torch.autograd.grad(METHODS[method](q, k, v, causal), (q, k, v), dout)
        del grads
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    except (RuntimeError, torch.OutOfMemoryError):
        return None
    finally:
        torch.cuda.empty_cache()


def time_few(fn, runs=3):
    """Median ms of ``runs`` calls after one warm-up, by CUDA events: for calls of seconds,
    where do_bench's estimate-then-repeat would take minutes."""
    fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def long_context(methods, seqlen=131072, heads=16, head_dim=128):
    """One long causal sequence on one GPU: forward and forward+backward ms, TFLOP/s and extra
    peak memory per method (``standard`` would need seqlen^2 scores and is skipped)."""
    rows = []
    for method in methods:
        if method == "standard":
            continue
        row = dict(method=method, batch=1, heads=heads, seqlen=seqlen, head_dim=head_dim, causal=True)
        try:
            fn = METHODS[method]
            q, k, v = make_inputs(method, 1, heads, seqlen, head_dim)
            dout = torch.randn_like(q)
            row["fwd_ms"] = time_few(lambda: fn(q, k, v, True))
            row["fwd_bwd_ms"] = time_few(lambda: torch.autograd.grad(fn(q, k, v, True), (q, k, v), dout))
            for mode in ("fwd", "fwd_bwd"):
                flops = attention_flops(1, heads, seqlen, seqlen, head_dim, True, mode)
                row[f"{mode}_tflops"] = flops / row[f"{mode}_ms"] / 1e9
            del q, k, v, dout
        except (RuntimeError, torch.OutOfMemoryError) as err:
            print(f"  {method} S={seqlen}: {type(err).__name__}: {str(err)[:100]}")
        finally:
            torch.cuda.empty_cache()
        row["peak_memory_fwd_bwd_mib"] = peak_memory_mib(method, 1, heads, seqlen, head_dim, True)
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/<gpu>.json)")
    parser.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int, default=None, help="fixed batch (default: 16384 // seqlen)")
    parser.add_argument("--long-context", action="store_true", help="only the 131072-token causal run")
    args = parser.parse_args()

    env = environment()
    print(banner(env))
    if args.long_context:
        rows = long_context(args.methods.split(","))
        write_json(args.out or "long_context.json", dict(environment=env, dtype="bfloat16", long_context=rows))
        return
    seqlens = [int(s) for s in args.seqlens.split(",")]
    head_dims = [int(d) for d in args.head_dims.split(",")]
    methods = args.methods.split(",")
    records = []
    for head_dim in head_dims:
        heads = 2048 // head_dim
        for causal in (False, True):
            for seqlen in seqlens:
                batch = args.batch or max(1, 16384 // seqlen)
                for method, times in measure(methods, batch, heads, seqlen, head_dim, causal).items():
                    for mode, ms in times.items():
                        flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, mode)
                        records.append(dict(method=method, mode=mode, batch=batch, heads=heads, seqlen=seqlen,
                                            head_dim=head_dim, causal=causal, ms=ms, tflops=flops / ms / 1e9))

    memory = {}
    if not args.batch:  # the papers' shapes: also the peak-memory comparison
        for method in methods:
            memory[method] = peak_memory_mib(method, 1, 16, 16384, 128, True)

    shape = f"batch {args.batch}" if args.batch else "batch x seqlen = 16k"
    payload = dict(environment=env, dtype="bfloat16", records=records, shape=f"{shape}, heads x headdim = 2048",
                   peak_memory_fwd_bwd_mib=dict(shape="B=1 H=16 S=16384 D=128 causal", **memory))
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   env["gpu"].lower().replace(" ", "_") + ".json")
    write_json(out, payload)
    print_table(records, memory)
    print(f"wrote {out}")


def print_table(records, memory):
    from rich.console import Console
    from rich.table import Table

    index = {(r["method"], r["mode"], r["seqlen"], r["head_dim"], r["causal"]): r["tflops"] for r in records}
    table = Table(title="flashtile TFLOP/s (bf16) and ratio to each baseline, same run")
    for col in ["D", "causal", "S", "mode", "flashtile", *[f"/{b}" for b in BASELINES]]:
        table.add_column(col, justify="right")
    keys = sorted({(r["head_dim"], r["causal"], r["seqlen"], r["mode"]) for r in records},
                  key=lambda x: (x[0], x[1], x[3], x[2]))
    for head_dim, causal, seqlen, mode in keys:
        ours = index.get(("flashtile", mode, seqlen, head_dim, causal))
        cells = []
        for b in BASELINES:
            theirs = index.get((b, mode, seqlen, head_dim, causal))
            cells.append(f"{ours / theirs:.2f}x" if ours and theirs else "-")
        table.add_row(str(head_dim), "y" if causal else "n", str(seqlen), mode,
                      f"{ours:.0f}" if ours else "-", *cells)
    Console(width=160).print(table)
    if not memory:
        return
    print("extra peak memory, fwd+bwd, B=1 H=16 S=16384 D=128 causal (MiB):",
          ", ".join(f"{m}={v:.0f}" if v is not None else f"{m}=OOM" for m, v in memory.items()))


if __name__ == "__main__":
    main()
