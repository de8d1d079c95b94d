"""Draw bench_attention.py's JSON as the README's chart: TFLOP/s per sequence length, one bar
per method, for forward, backward and forward+backward at each head dim / mask.

    python3 bench/plot.py bench/results/h100.json docs/bench_h100.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = [("flashtile", "flashtile", "#d62728"), ("sdpa_flash", "SDPA FlashAttention-2", "#1f77b4"),
           ("sdpa_cudnn", "SDPA cuDNN", "#2ca02c"), ("sdpa_efficient", "SDPA mem-efficient", "#9467bd"),
           ("standard", "PyTorch matmul+softmax", "#7f7f7f")]
MODES = [("fwd", "forward"), ("bwd", "backward"), ("fwd_bwd", "forward + backward")]


def main(src, dst):
    with open(src) as f:
        data = json.load(f)
    records = data["records"]
    panels = sorted({(r["head_dim"], r["causal"]) for r in records})
    seqlens = sorted({r["seqlen"] for r in records})
    index = {(r["method"], r["mode"], r["head_dim"], r["causal"], r["seqlen"]): r["tflops"] for r in records}
    methods = [m for m in METHODS if any(r["method"] == m[0] for r in records)]  # those the run measured
    fig, axes = plt.subplots(len(MODES), len(panels), figsize=(4.2 * len(panels), 3.2 * len(MODES)), squeeze=False)
    width = 0.8 / len(methods)
    for row, (mode, mode_name) in enumerate(MODES):
        for col, (head_dim, causal) in enumerate(panels):
            ax = axes[row][col]
            for i, (method, label, color) in enumerate(methods):
                values = [index.get((method, mode, head_dim, causal, s), 0.0) for s in seqlens]
                xs = [x + (i - len(methods) / 2 + 0.5) * width for x in range(len(seqlens))]
                ax.bar(xs, values, width, label=label, color=color)
            ax.set_xticks(range(len(seqlens)), [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
            ax.set_title(f"{mode_name}, head dim {head_dim}, {'causal' if causal else 'non-causal'}", fontsize=9)
            ax.set_ylabel("TFLOP/s" if col == 0 else "")
            ax.grid(axis="y", alpha=0.3)
    env = data["environment"]
    shape = data.get("shape", "batch x seqlen = 16k, heads x headdim = 2048")
    fig.suptitle(f"{env['gpu']}, bf16, {shape} "
                 f"(torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, {env['date']})", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
