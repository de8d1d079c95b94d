"""CPU time per call (microseconds) of flashtile's Python layers against SDPA, on tiny inputs
where the GPU work is negligible: what a short-sequence call costs before any kernel runs.

    PYTHONPATH=src python3 bench/overhead.py
    PYTHONPATH=src python3 bench/overhead.py --profile   # + where a forward+backward's time goes
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

sys.path.insert(0, os.path.dirname(__file__))
from common import sdpa  # noqa: E402

import flashtile  # noqa: E402
from flashtile import configs  # noqa: E402
from flashtile.features import Features  # noqa: E402
from flashtile.ops import bwd, flash_bwd, flash_fwd  # noqa: E402
from flashtile.ops.common import sequence_layout  # noqa: E402


def sdpa_gqa(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return scaled_dot_product_attention(q, k, v, enable_gqa=True)


def per_call_us(fn, calls=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


class Identity(torch.autograd.Function):
    """The floor under any Python autograd.Function: the engine's bookkeeping and its hand-off to
    the device's backward thread, with no work on either side."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="cProfile a forward + backward call")
    args = parser.parse_args()
    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    qhg, khg, vhg = (t.clone().requires_grad_() for t in (qh, kh, vh))
    rows = {
        "flash_fwd launcher (kernel launch only)": lambda: flash_fwd(q, k, v, Features(0.125, window_right=0)),
        "flash_attn_func, no grad": lambda: flashtile.flash_attn_func(q, k, v, causal=True),
        "flash_attn_func, requires_grad": lambda: flashtile.flash_attn_func(qg, kg, vg, causal=True),
        "SDPA flash, no grad": lambda: sdpa("sdpa_flash")(qh, kh, vh, True),
        "SDPA flash, requires_grad": lambda: sdpa("sdpa_flash")(qhg, kh, vh, True),
    }
    # One decode step: 32 query heads over 8 KV heads, a 256-token cache.
    qd = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(1, 256, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.full((1,), 256, dtype=torch.int32, device="cuda")

    def decode(check):
        def run():
            configs.CHECK_CACHE_INDICES = check
            flashtile.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=lengths)
        return run

    rows["flash_attn_with_kvcache, index checks off"] = decode(False)
    rows["flash_attn_with_kvcache, index checks on"] = decode(True)
    rows["SDPA flash decode step (enable_gqa)"] = lambda: sdpa_gqa(qd.transpose(1, 2), kc.transpose(1, 2),
                                                                      vc.transpose(1, 2))

    def fwd_bwd():
        torch.autograd.grad(flashtile.flash_attn_func(qg, kg, vg, causal=True), (qg, kg, vg), q)

    rows["flash_attn_func forward + autograd.grad"] = fwd_bwd
    features = Features(0.125, window_right=0)
    out, lse = flash_fwd(q, k, v, features)
    rows["flash_bwd launcher (3 kernel launches)"] = lambda: flash_bwd(q, q, k, v, out, lse, features)
    layout = sequence_layout(q, k, None)
    delta, dq, dk, dv = torch.empty_like(lse), torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    rows["  of which launch_delta"] = lambda: bwd.launch_delta(out, q, delta)
    rows["  of which launch_dkdv"] = lambda: bwd.launch_dkdv(q, q, k, v, lse, delta, dk, dv, features, layout)
    rows["  of which launch_dq"] = lambda: bwd.launch_dq(q, q, k, v, lse, delta, dq, features, layout)
    rows["identity autograd.Function + autograd.grad"] = lambda: torch.autograd.grad(
        Identity.apply(qg), (qg,), q)
    rows["SDPA flash forward + autograd.grad"] = lambda: torch.autograd.grad(
        sdpa("sdpa_flash")(qhg, khg, vhg, True), (qhg, khg, vhg), qh)
    gluon = gluon_rows()
    rows.update(gluon)
    for name, fn in rows.items():
        print(f"{name:52s} {per_call_us(fn):7.1f} us/call")
    print("through triton's launch path (configs.FAST_LAUNCH = False):")
    configs.FAST_LAUNCH = False
    for name in ("flash_fwd launcher (kernel launch only)", "flash_attn_func, no grad",
                 "flash_attn_func forward + autograd.grad", "flash_attn_with_kvcache, index checks off",
                 *(name for name in gluon if not name.startswith("  "))):
        print(f"{name:52s} {per_call_us(rows[name]):7.1f} us/call")
    configs.FAST_LAUNCH = True
    print_fast_launch_caches()
    if args.profile:
        for name in ("flash_attn_func forward + autograd.grad", *list(gluon)[-2:-1]):
            profile(name, rows[name])
            trace(name, rows[name])


def gluon_rows() -> dict:
    """The Gluon kernels' launchers on one 1024-token head of dim 128 (both Gluon tables take it
    from 1024 keys; a few microseconds of GPU work): their host cost. Empty off Hopper."""
    from flashtile.ops import bwd_hopper, fwd_hopper
    from flashtile.ops.descriptors import descriptor

    q, k, v = (torch.randn(1, 1024, 1, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    features = Features(128**-0.5)
    if not (fwd_hopper.hopper_fwd_eligible(q, k, v, features, None)
            and bwd_hopper.hopper_bwd_eligible(q, k, v, q, features, None)):
        print("(no Gluon rows: this GPU or these shapes do not take the Gluon kernels)")
        return {}
    out, lse = fwd_hopper.hopper_fwd(q, k, v, features)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def fwd_bwd():
        torch.autograd.grad(flashtile.flash_attn_func(qg, kg, vg), (qg, kg, vg), q)

    # The same forward + backward as bench_attention.py times it: through (B, H, S, D) views, whose
    # transposes add autograd nodes of their own.
    qt, kt, vt = (t.transpose(1, 2) for t in (qg, kg, vg))

    def fwd_bwd_transposed():
        out_t = flashtile.flash_attn_func(qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2))
        torch.autograd.grad(out_t.transpose(1, 2), (qt, kt, vt), q.transpose(1, 2))

    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    delta = torch.empty_like(lse)
    rows_128 = (q.shape[1], q.shape[2] * q.shape[3])
    return {
        "hopper_fwd launcher (Gluon, 1024 keys, d128)": lambda: fwd_hopper.hopper_fwd(q, k, v, features),
        "hopper_bwd launcher (Gluon, 1024 keys, d128)": lambda: bwd_hopper.hopper_bwd(q, q, k, v, out, lse,
                                                                                      features),
        "  of which hopper_bwd_eligible": lambda: bwd_hopper.hopper_bwd_eligible(q, k, v, q, features, None),
        "  of which one descriptor (7 per call)": lambda: descriptor(q, rows_128, (64, 128)),
        "  of which one torch.empty (5 per call)": lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device),
        "  of which launch_delta with the zero fill": lambda: bwd.launch_delta(out, q, delta, zero=dq_acc),
        "  of which the dQ cast (.to)": lambda: dq_acc.to(q.dtype),
        "Gluon flash_attn_func forward + autograd.grad": fwd_bwd,
        "the same through (B, H, S, D) views (bench_attention)": fwd_bwd_transposed,
    }


def print_fast_launch_caches():
    """Compiled variants each FastLaunch holds after the rows above: a handful each (one per shape
    class and mask), or its key misses on every call and every launch takes triton's path."""
    from flashtile.ops import append, bwd_hopper, bwd_hopper_wide, decode, fwd, fwd_hopper
    from flashtile.ops.launch import FastLaunch

    for module in (fwd, bwd, decode, append, fwd_hopper, bwd_hopper, bwd_hopper_wide):
        for name, value in vars(module).items():
            launch = value.launch if isinstance(value, bwd_hopper.BackwardKernel) else value
            if isinstance(launch, FastLaunch):
                print(f"FastLaunch {module.__name__}.{name}: {len(launch.compiled)} compiled variants cached")


def trace(name, fn, calls=200):
    """torch.profiler over ``calls`` calls: host time per op (self), and the kernels' device time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(f"\n--- torch.profiler, {calls} calls of {name} ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


def profile(name, fn, calls=500):
    """cProfile of ``calls`` calls: the functions with the most own time, then the most cumulative."""
    for _ in range(50):
        fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler).strip_dirs()
    print(f"\n--- {calls} calls of {name}, by own time ---")
    stats.sort_stats("tottime").print_stats(30)
    print("--- by cumulative time ---")
    stats.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
