"""One launch each of flashtile's forward and SDPA cuDNN's on the benchmark's shapes (batch x
seqlen = 16384, heads x head dim = 2048, bf16), inside a profiler range, for Nsight Compute to
compare the two kernels (docs/performance.md, step 24):

    PYTHONPATH=src ncu --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        python3 bench/ncu_forward_pair.py 512 128 full
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import sdpa  # noqa: E402

import flashtile  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seqlen", type=int)
    parser.add_argument("head_dim", type=int)
    parser.add_argument("mask", choices=("full", "causal"))
    args = parser.parse_args()
    causal = args.mask == "causal"
    batch, heads = 16384 // args.seqlen, 2048 // args.head_dim
    q, k, v = (torch.randn(batch, args.seqlen, heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    bhsd = [t.transpose(1, 2) for t in (q, k, v)]
    for _ in range(3):  # compile and warm up outside the profiled range
        flashtile.flash_attn_func(q, k, v, causal=causal)
        sdpa("sdpa_cudnn")(*bhsd, causal)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    flashtile.flash_attn_func(q, k, v, causal=causal)
    sdpa("sdpa_cudnn")(*bhsd, causal)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
