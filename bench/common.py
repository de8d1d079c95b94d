"""Shared by the benchmark scripts: environment banner, timing, FLOP counts, baselines."""

import datetime
import json
import os
import platform

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def banner(env: dict) -> str:
    return (f"{env['gpu']} ({env['sm_count']} SMs) | torch {env['torch']} | triton {env['triton']} | "
            f"cuDNN {env['cudnn']} | CUDA {env['cuda']} | {env['date']}")


def median_ms(fn, warmup=25, rep=100) -> float:
    """Median of triton.testing.do_bench (CUDA events, warm-up excluded)."""
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def attention_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal, mode) -> float:
    """FlashAttention papers' count: forward 4*B*H*Sq*Sk*D (halved if causal), backward 2.5x."""
    fwd = 4 * batch * heads * seqlen_q * seqlen_k * head_dim / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


def standard_attention(q, k, v, causal):
    """Plain PyTorch: matmul + softmax + matmul on (B, H, S, D), the N x N matrix materialised."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
        mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device).tril(seqlen_k - seqlen_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            return scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def min_winning_seqlen(ratios: dict) -> int | None:
    """The shortest length from which a kernel wins at that length and every longer one measured:
    ``ratios`` maps seqlen -> (old kernel's time / new kernel's time). None if it loses at the
    longest. Used to turn the Gluon probes' rows into configs.SM90_GLUON_* entries."""
    winning = None
    for seqlen in sorted(ratios, reverse=True):
        if ratios[seqlen] < 1.0:
            break
        winning = seqlen
    return winning


def short_tile_below(runs: list[dict], margin: float = 1.01) -> int | None:
    """configs.SM90_GLUON_FWD_SHORT's ``below`` from ``--tiles`` runs: each run maps seqlen -> (the
    entry's tile time / the short tile's time) over the lengths from the short tile's min_seqlen_k
    up; the first length, ascending, at which some run that measured it has the short tile less than
    ``margin`` times as fast (None: ahead at every length measured)."""
    for seqlen in sorted(set().union(*runs)):
        if any(run[seqlen] < margin for run in runs if seqlen in run):
            return seqlen
    return None


# What distinguishes one Gluon forward tile's schedule from another in --tiles rows (older rows lack
# the later fields: their defaults).
SCHEDULE_DEFAULTS = {"block_n": None, "k_slots": None, "v_slots": None, "pingpong": True, "queue": False,
                     "consumers": 2, "o_tma": False, "q_slots": 1}


def schedule(tile: dict) -> tuple:
    """A --tiles row's tile as a comparable tuple of the fields in SCHEDULE_DEFAULTS."""
    return tuple(tile.get(field, default) for field, default in SCHEDULE_DEFAULTS.items())


def short_tiles(runs: list[list[dict]]) -> dict:
    """configs.SM90_GLUON_FWD_SHORT from ``--tiles`` runs (each a list of rows; per head dim, mask and
    length the first row is the entry's tile; rows with softcap are left out): per (head_dim, causal),
    among the candidates every run measured, those that beat the tl kernel in every run from some
    length up to their ``short_tile_below`` bound against the entry's tile; the one with the highest
    bound, then the highest mean speed-up over the entry below it. ``{key: (below, schedule,
    min_seqlen_k, speed-ups per run)}``; a key with no such candidate is absent."""
    chosen = {}
    for key in sorted({(r["head_dim"], r["causal"]) for rows in runs for r in rows}):
        groups = []  # per run: seqlen -> (the entry's row, {schedule: row})
        for rows in runs:
            run = {}
            for row in rows:
                if (row["head_dim"], row["causal"]) == key and not row["softcap"]:
                    entry, others = run.setdefault(row["seqlen"], (row, {}))
                    if row is not entry:
                        others.setdefault(schedule(row["tile"]), row)
            groups.append(run)
        best = None
        measured_by_all = set.intersection(*({c for _, others in run.values() for c in others} for run in groups))
        for candidate in sorted(measured_by_all):
            faster = [{s: entry["ms"] / others[candidate]["ms"] for s, (entry, others) in run.items()
                       if candidate in others} for run in groups]
            below = short_tile_below(faster)
            if below is None:  # ahead everywhere measured: a candidate for the entry itself, not a short tile
                continue
            over_tl = [{s: others[candidate]["tl_ms"] / others[candidate]["ms"] for s, (_, others) in run.items()
                        if candidate in others and s < below} for run in groups]
            starts = [min_winning_seqlen(ratios) for ratios in over_tl]
            if not all(over_tl) or None in starts:
                continue
            gains = [ratio for ratios in faster for s, ratio in ratios.items() if s < below]
            score = (below, sum(gains) / len(gains))
            if best is None or score > best[0]:
                best = (score, (below, candidate, max(starts), faster))
        if best is not None:
            chosen[key] = best[1]
    return chosen


def short_tile_rows(runs: list[list[dict]]) -> list[str]:
    """configs-style lines for SM90_GLUON_FWD_SHORT (``short_tiles``), with the speed-ups they quote."""
    lines = []
    for key, (below, candidate, start, faster) in short_tiles(runs).items():
        fields = ", ".join(f"{name}={value}" for name, value in zip(SCHEDULE_DEFAULTS, candidate))
        quoted = " ".join(f"{s}: " + " / ".join(f"{run[s]:.3f}" for run in faster if s in run)
                          for s in sorted(set().union(*faster)))
        lines.append(f"{key}: ShortTile({below}, GluonForwardTile({fields}, min_seqlen_k={start})),"
                     f"  # entry / this at {quoted}")
    return lines


def gluon_table_rows(rows, old="tl", new="gluon") -> list[str]:
    """configs-style lines ``(head_dim, causal): <min seqlen>,  # ratios`` from probe rows (dicts
    with head_dim, causal, seqlen and ms per kernel), one per (head dim, mask), in the format the
    Gluon tables quote; an entry that never wins is printed commented out."""
    lines = []
    for head_dim, causal in sorted({(r["head_dim"], r["causal"]) for r in rows}):
        ratios = {r["seqlen"]: r["ms"][old] / r["ms"][new] for r in rows
                  if r["head_dim"] == head_dim and r["causal"] == causal}
        shortest = min_winning_seqlen(ratios)
        quoted = " ".join(f"{ratios[s]:.2f}" for s in sorted(ratios))
        entry = f"({head_dim}, {causal}): {shortest},  # {quoted}"
        lines.append(entry if shortest is not None else f"# {entry}  (never wins)")
    return lines


def window_min_keys(rows) -> dict:
    """``{head_dim: W}`` from bench/gluon_fwd_probe.py --windows rows: the smallest keys-per-row W
    from which the Gluon forward beats the tl kernel at every larger W, taking the worse of the
    windows measured at each W (configs.SM90_GLUON_FWD_WINDOW_MIN_KEYS)."""
    worst = {}
    for r in rows:
        ratio = r["ms"]["tl"] / r["ms"]["gluon"]
        per_dim = worst.setdefault(r["head_dim"], {})
        per_dim[r["keys_per_row"]] = min(ratio, per_dim.get(r["keys_per_row"], ratio))
    return {head_dim: min_winning_seqlen(ratios) for head_dim, ratios in worst.items()}
