"""Draw bench_decode.py's JSON: GB/s of KV cache read per decode step (CUDA-graph time), one panel
per batch size, bars per KV length for flashtile (contiguous and paged) and SDPA FLASH_ATTENTION,
with the device-to-device copy bandwidth of the same run as a line.

    python3 bench/plot_decode.py bench/results/h100_decode.json docs/bench_h100_decode.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [("contiguous", "flashtile, contiguous", "#d62728"), ("page16", "flashtile, pages of 16", "#ff9896"),
          ("page64", "flashtile, pages of 64", "#e377c2"), ("page256", "flashtile, pages of 256", "#f7b6d2"),
          ("sdpa", "SDPA FlashAttention-2 (contiguous)", "#1f77b4")]


def main(src, dst):
    with open(src) as f:
        data = json.load(f)
    records = data["records"]
    batches = sorted({r["batch"] for r in records})
    lengths = sorted({r["seqlen"] for r in records})
    gbs = {(r["batch"], r["seqlen"], r["layout"]): r["gbs"]["graph"] for r in records}
    for r in records:
        gbs[(r["batch"], r["seqlen"], "sdpa")] = r["sdpa_flash_gbs"]["graph"]
    series = [s for s in SERIES if any(key[2] == s[0] for key in gbs)]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8), squeeze=False)
    width = 0.8 / len(series)
    for ax, batch in zip(axes[0], batches):
        for i, (layout, label, color) in enumerate(series):
            xs = [x + (i - len(series) / 2 + 0.5) * width for x in range(len(lengths))]
            ax.bar(xs, [gbs.get((batch, s, layout), 0.0) for s in lengths], width, label=label, color=color)
        ax.axhline(data["copy_gbs"], color="#555555", linestyle="--", linewidth=1, label="device copy (read + write)")
        ax.axhline(0.8 * data["copy_gbs"], color="#999999", linestyle=":", linewidth=1, label="80% of copy")
        ax.set_xticks(range(len(lengths)), [f"{s // 1024}k" for s in lengths])
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.set_xlabel("KV length (tokens)")
        ax.set_ylabel("GB/s of K/V read" if batch == batches[0] else "")
        ax.grid(axis="y", alpha=0.3)
    env = data["environment"]
    fig.suptitle(f"Decode step (1 query token, {data['heads']} / {data['kv_heads']} heads, head dim {data['head_dim']}, "
                 f"bf16), per-layer CUDA-graph time: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
                 f"{env['date']}", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
