"""The ``flashtile`` command.

    flashtile info    versions, device, which path runs, and a compile-and-check of the kernels
    flashtile demo    standard attention vs flashtile at growing sequence lengths
"""

import argparse
import math
import os
import time

import torch

import flashtile
from flashtile.reference import attention_ref


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _path_description(device: torch.device) -> str:
    if device.type == "cpu":
        return "exact blockwise PyTorch path (flashtile/cpu.py)"
    arch = torch.cuda.get_device_capability(device)
    if arch != (9, 0):
        return f"Triton kernels, generic tile table (sm{arch[0]}{arch[1]})"
    from flashtile.ops.common import GLUON_TRITON, load_gluon_module

    if load_gluon_module("fwd_hopper") is not None and load_gluon_module("bwd_hopper") is not None:
        gluon = "Gluon forward/backward where measured faster"
    else:
        gluon = f"no Gluon kernels (they need triton {GLUON_TRITON[0]}.{GLUON_TRITON[1]})"
    return f"Triton kernels, tuned sm90 tile tables, {gluon} (sm90)"


def _sampled_error(q, k, v, out, causal, rows=64, lowp=False):
    """Max |out - float64 oracle| on the last ``rows`` query rows (the oracle of all rows
    would need the N x N matrix this library avoids). Bottom-right causal alignment makes the
    last rows of q attend exactly as they do in the full call. With ``lowp``, also PyTorch's
    own error there (the reference computed in the input dtype)."""
    tail = slice(q.shape[1] - min(rows, q.shape[1]), q.shape[1])
    ref, _ = attention_ref(q[:, tail], k, v, causal=causal)
    err = (out[:, tail].double() - ref).abs().max().item()
    if not lowp:
        return err
    low, _ = attention_ref(q[:, tail], k, v, causal=causal, upcast=False)
    return err, (low.double() - ref).abs().max().item()


def info(_args) -> int:
    import numpy

    device = _device()
    print(f"flashtile {flashtile.__version__}")
    print(f"torch     {torch.__version__}")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except ImportError:
        print("triton    not installed (CPU path only)")
    print(f"numpy     {numpy.__version__}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"device    {props.name}, {props.multi_processor_count} SMs, cuDNN {torch.backends.cudnn.version()}")
    else:
        print(f"device    CPU ({os.cpu_count()} cores); no CUDA GPU visible")
    print(f"path      {_path_description(device)}")

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(2, 300, 4, 64, device=device, dtype=dtype) for _ in range(3))
    start = time.perf_counter()
    out = flashtile.flash_attn_func(q, k, v, causal=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    err, torch_err = _sampled_error(q, k, v, out, causal=True, rows=300, lowp=True)
    ok = math.isfinite(err) and err <= 2 * torch_err + 1e-5  # FlashAttention's tolerance rule
    print(f"check     {'ok' if ok else 'FAILED'}: first call (compile + run) {elapsed:.2f} s, "
          f"max error vs float64 oracle {err:.2e} (PyTorch {str(dtype).replace('torch.', '')}: {torch_err:.2e})")
    return 0 if ok else 1


def _standard_attention(q, k, v, causal):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril(k.shape[1] - q.shape[1])
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vh).transpose(1, 2)


def _run_timed(fn, device):
    """(output, seconds, peak MiB above the inputs); one call, so a rough figure (the benchmark
    in bench/ is the careful one); peak is None on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return out, time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**20
    return out, time.perf_counter() - start, None


def demo(args) -> int:
    from rich.console import Console
    from rich.table import Table

    device = _device()
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    heads, head_dim = (16, 128) if on_gpu else (4, 64)
    seqlens = [int(s) for s in args.seqlens.split(",")] if args.seqlens else (
        [2048, 8192, 32768, 65536, 131072] if on_gpu else [1024, 4096, 16384, 32768])
    # On the CPU a failed allocation can get the process killed rather than raise, so standard
    # attention is only run where its N x N matrices fit in half of physical memory.
    cpu_budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    console = Console(width=120)
    console.print(f"[bold]flashtile demo[/] on {_path_description(device)}: batch 1, {heads} heads, "
                  f"head dim {head_dim}, causal, {str(dtype).replace('torch.', '')}, forward pass")
    table = Table()
    for col in ["seqlen", "standard ms", "standard MiB", "standard err", "flashtile ms", "flashtile MiB",
                "flashtile err"]:
        table.add_column(col, justify="right")
    first_oom = None
    for seqlen in seqlens:
        q, k, v = (torch.randn(1, seqlen, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
        # Warm-up (kernel compile, cuBLAS handles) so the timed calls measure the work itself.
        flashtile.flash_attn_func(q[:, :64], k[:, :64], v[:, :64], causal=True)
        _standard_attention(q[:, :64], k[:, :64], v[:, :64], causal=True)
        out, fast_s, fast_mib = _run_timed(lambda: flashtile.flash_attn_func(q, k, v, causal=True), device)
        fast_err = _sampled_error(q, k, v, out, causal=True)
        del out
        std_cells = ["out of memory"] * 3
        need = 2 * heads * seqlen * seqlen * torch.finfo(dtype).bits / 8  # scores + probabilities
        if on_gpu or need < cpu_budget:
            try:
                ref_out, std_s, std_mib = _run_timed(lambda: _standard_attention(q, k, v, causal=True), device)
                std_err = _sampled_error(q, k, v, ref_out, causal=True)
                std_cells = [f"{std_s * 1e3:.1f}", f"{std_mib:.0f}" if std_mib is not None else "-", f"{std_err:.1e}"]
                del ref_out
            except torch.OutOfMemoryError:
                pass
        else:
            std_cells = ["too big", f"needs {need / 2**30:.0f} GiB", "-"]
        if std_cells[0] != "-" and not std_cells[0][0].isdigit() and first_oom is None:
            first_oom = (seqlen, std_cells[0])
        if on_gpu:
            torch.cuda.empty_cache()
        table.add_row(str(seqlen), *std_cells, f"{fast_s * 1e3:.1f}", f"{fast_mib:.0f}" if fast_mib is not None else "-",
                      f"{fast_err:.1e}")
    console.print(table)
    console.print("err: max |out - float64 oracle| over the last 64 query rows. MiB: peak above the inputs "
                  "(CUDA only).")
    if first_oom:
        seqlen, why = first_oom
        reason = "runs out of memory" if why == "out of memory" else (
            "would need more than half of this machine's memory, so it was not run")
        console.print(f"At seqlen {seqlen} standard attention {reason}; flashtile keeps going.")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashtile", description="FlashAttention in Python (Triton + PyTorch)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, path, and a kernel compile check").set_defaults(func=info)
    demo_parser = sub.add_parser("demo", help="standard attention vs flashtile at growing lengths")
    demo_parser.add_argument("--seqlens", help="comma-separated sequence lengths")
    demo_parser.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
