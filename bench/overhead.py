"""CPU time per call (microseconds) of flashtile's Python layers against SDPA, on tiny inputs
where the GPU work is negligible: what a short-sequence call costs before any kernel runs.

    PYTHONPATH=src python3 bench/overhead.py
"""

import os
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
from flashtile.ops import flash_fwd  # noqa: E402


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


def main():
    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    qhg = qh.clone().requires_grad_()
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
    for name, fn in rows.items():
        print(f"{name:46s} {per_call_us(fn):7.1f} us/call")


if __name__ == "__main__":
    main()
