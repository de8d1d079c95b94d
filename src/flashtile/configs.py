"""Tile sizes per (architecture, dtype, head dim, mode).

Every entry names the measurement that chose it. `python bench/tune.py` (opt-in, GPU only)
times the candidates and prints table rows in this format (``--long``: the rows of
``SM90_LONG``); nobody pays for tuning at run time, and a new sequence length never triggers a
search or a recompile.

Modes: ``fwd`` (forward), ``dkdv`` (backward, one K/V tile per program) and ``dq``
(backward, one Q tile per program). ``block_m`` always counts query rows and ``block_n``
keys, whatever the mode. The ``causal`` key means "some key is masked": sliding windows use
the causal entries too (not tuned separately). ALiBi uses the entries of its mask type;
softcap and dropout at head dim <= 64 use the masked ones (``HEAVY_SCORE_MODES``), varlen has
a forward entry of its own (``SM90_VARLEN``), both from bench/probe.py; bench/bench_features.py
measures every feature's cost. Long loops (``TMA_MIN_SEQLEN`` streamed rows or more: keys for
fwd and dq, queries for dkdv) take ``SM90_LONG`` where it has an entry: their tiles arrive
through TMA descriptors.

The Gluon kernels (``ops/fwd_hopper.py``, ``ops/bwd_hopper.py``) have tables of their own:
``SM90_GLUON_FWD`` (tile and minimum key length per head dim and mask) and ``SM90_GLUON_BWD``
(minimum key length), regenerated from ``bench/gluon_fwd_probe.py --coverage`` and
``bench/gluon_bwd_probe.py`` (``bash bench/gpu_session.sh gluon``), which time them against the
``tl`` kernels on every length and print the ratios the entries quote. Shorter key loops of an
entry may take a tile of their own (``SM90_GLUON_FWD_SHORT``, ``gluon_forward_tile``), chosen
from ``bench/gluon_fwd_probe.py --tiles``.
"""

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # dkdv only: make K and V the B operand of the loop's dots (computing P rather than P^T),
    # which keeps them in shared memory instead of registers. Wins at head dim 256.
    kv_as_b: bool = False
    # Hopper: the tiles the kernel's loop streams (fwd and dq: K and V; dkdv: Q and dO) arrive
    # through TMA tensor descriptors (ops/common.stream_by_tma) instead of pointer loads: no
    # address registers, no staging through registers (far fewer spills, docs/performance.md).
    tma: bool = False


# Under the Triton interpreter (CPU tensors, tests): small tiles so that tiny test shapes
# still cross several tile boundaries, and numpy does not spend time on padding.
INTERPRETER = TileConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)

# Any CUDA GPU without a tuned entry. Not measured: modest tiles chosen to fit Ampere's
# 164 KB of shared memory; run bench/tune.py on such a GPU to replace them with measured ones.
GENERIC = {
    "fwd": {64: TileConfig(128, 64, 4, 3), 128: TileConfig(128, 64, 8, 3), 256: TileConfig(64, 32, 4, 2)},
    "dkdv": {64: TileConfig(32, 128, 4, 2), 128: TileConfig(32, 128, 8, 2), 256: TileConfig(16, 64, 8, 1)},
    "dq": {64: TileConfig(128, 32, 4, 2), 128: TileConfig(128, 32, 8, 2), 256: TileConfig(64, 16, 8, 1)},
}

# Hopper (sm90), fp16/bf16. Key: (mode, padded head dim, causal). Chosen by bench/tune.py on
# an H100 80GB HBM3 (torch 2.11, triton 3.6.0), 2026-11-24 00:52 UTC: bf16, B*S = 16384,
# H*D = 2048; the comment gives the kernel's own TFLOP/s at S = 1024 / 16384 (dkdv counts its
# 4 matmuls, dq its 3). Head dims 16 and 32 use the 64 entries (not measured separately).
_TUNED_H100 = {
    ("fwd", 64, False): TileConfig(128, 64, 8, 3),  # 395 / 447
    ("fwd", 64, True): TileConfig(64, 64, 4, 3),  # 298 / 408
    ("fwd", 128, False): TileConfig(128, 128, 8, 3),  # 402 / 496
    ("fwd", 128, True): TileConfig(128, 128, 8, 3),  # 292 / 510
    ("fwd", 256, False): TileConfig(128, 64, 8, 2),  # 368 / 458
    ("fwd", 256, True): TileConfig(128, 64, 8, 2),  # 279 / 444
    ("dkdv", 64, False): TileConfig(32, 128, 8, 1),  # 346 / 415
    ("dkdv", 64, True): TileConfig(32, 64, 4, 1),  # 301 / 374
    ("dkdv", 128, False): TileConfig(32, 64, 4, 3),  # 385 / 440
    ("dkdv", 128, True): TileConfig(64, 128, 8, 1),  # 286 / 429
    ("dkdv", 256, False): TileConfig(64, 64, 8, 1, kv_as_b=True),  # 195 / 197 (P^T orientation: 120 / 127)
    ("dkdv", 256, True): TileConfig(32, 64, 8, 2),  # 169 / 208
    ("dq", 64, False): TileConfig(128, 32, 8, 3),  # 479 / 571
    ("dq", 64, True): TileConfig(64, 32, 4, 3),  # 393 / 532
    ("dq", 128, False): TileConfig(128, 64, 8, 3),  # 486 / 593
    ("dq", 128, True): TileConfig(128, 64, 8, 3),  # 386 / 583
    ("dq", 256, False): TileConfig(128, 32, 8, 3),  # 497 / 582
    ("dq", 256, True): TileConfig(128, 32, 8, 3),  # 392 / 603
}
# Loops of at least TMA_MIN_SEQLEN streamed rows (keys for fwd and dq, queries for dkdv) take
# these entries, whose tiles arrive by TMA. Shorter loops keep the pointer loads of the table
# above: each program builds its descriptors (a global-memory write and a fence), which short
# loops do not repay (bench_attention 05:18 UTC, head dim 128 forward TFLOP/s pointer loads ->
# TMA: causal 199 -> 177 at 512, 292 -> 279 at 1024, 379 -> 382 at 2048, 498 -> 550 at 16384).
TMA_MIN_SEQLEN = 2048
SM90_LONG = {
    # bench/tune.py --long (H100, 2026-11-24 06:42-06:55 UTC), TFLOP/s at seqlen 2048 / 16384 in
    # the kernel's own share; the best pointer-load candidate of the same sweep in brackets.
    # Forward, head dim 128 (at 64, TMA was mixed in bench/probe.py tma: -5.5% to +1.8%).
    ("fwd", 128, False): TileConfig(128, 128, 8, 3, tma=True),  # 464 / 518 (128x64: 457 / 500)
    ("fwd", 128, True): TileConfig(128, 128, 8, 3, tma=True),  # 379 / 542 (128x128: 385 / 506)
    # dK/dV: pointer-loaded Q/dO tiles were what spilled (ptxas, head dim 128 causal 64x128 tiles:
    # 4556 -> 632 bytes of spill stores). At head dim 64 the pointer tiles stay ahead.
    ("dkdv", 128, False): TileConfig(64, 64, 4, 2, tma=True),  # 501 / 572 (32x64/4 warps: 421 / 446)
    ("dkdv", 128, True): TileConfig(64, 64, 4, 2, tma=True),  # 399 / 488 (64x128/8 warps: 346 / 439)
    # Head dim 256 (07:14 UTC; its table entries in brackets).
    ("dkdv", 256, False): TileConfig(64, 64, 8, 2, kv_as_b=True, tma=True),  # 228 / 227 (198 / 194)
    ("dkdv", 256, True): TileConfig(64, 64, 8, 2, kv_as_b=True, tma=True),  # 196 / 236 (182 / 208)
    ("dq", 64, False): TileConfig(128, 64, 8, 3, tma=True),  # 526 / 641 (128x32: 523 / 563)
    ("dq", 64, True): TileConfig(128, 64, 8, 3, tma=True),  # 453 / 566 (128x32: 430 / 520)
    ("dq", 128, False): TileConfig(128, 64, 8, 3, tma=True),  # 553 / 623 (same tile: 576 / 569)
    ("dq", 128, True): TileConfig(128, 64, 8, 3, tma=True),  # 473 / 607 (same tile: 474 / 596)
}
# Head dims 16 and 32 use the 64 entries (not measured separately).
SM90_LONG.update({(mode, small, causal): SM90_LONG[(mode, 64, causal)]
                  for (mode, d, causal) in list(SM90_LONG) if d == 64 for small in (16, 32)})

# The Gluon forward (ops/fwd_hopper.py: warp-specialized, ping-pong consumers) for the calls it
# covers (SM90_GLUON_FWD): first measured by bench/gluon_fwd_probe.py, H100, 2026-11-24 08:03 UTC,
# head dim 128 non-causal, TFLOP/s at B=4 S=4096 / B=1 S=16384: 582 / 598, against the tl
# kernel's 494 / 485 and cuDNN's 610 / 593 in the same run. Set to False to time the tl kernel on
# the same shapes.
GLUON_FWD = True
# The Gluon forward's persistent grid: one program per SM, each running work tiles in turn (True),
# or one program per work tile (False). Causal and window calls take it where their table entry
# says ``queue`` (ops/fwd_hopper.program_count; docs/performance.md, steps 17 and 18).
GLUON_FWD_PERSISTENT = True


@dataclass(frozen=True)
class GluonForwardTile:
    block_n: int  # keys per K/V tile (each program has 128 query rows: two warpgroups of 64)
    k_slots: int  # depth of the shared-memory K ring the producer fills
    v_slots: int  # depth of the V ring
    min_seqlen_k: int  # shorter key loops take the tl kernel
    # The two consumer warpgroups take turns to issue their MMAs (FlashAttention-3's ping-pong);
    # False: each issues as soon as its tile is ready.
    pingpong: bool = True
    # Masked entries: the persistent grid, each program taking the next work tile from a queue
    # (an atomic counter) as it finishes one; False: one program per work tile.
    queue: bool = False
    # Consumer warpgroups of 64 query rows per work tile: 2, or 3 (FlashAttention-3's head-dim-64
    # tile: each K/V tile serves 192 rows; 160 registers per consumer; no ping-pong).
    consumers: int = 2
    # With softcap (a second transcendental per score, in both kernels) the shortest key length
    # from which this tile beats the tl kernel, where that differs from min_seqlen_k.
    softcap_min_seqlen_k: int | None = None
    # The output leaves by TMA stores (two consumers), staged in the work tile's last K slot where
    # it has 128 keys (each consumer's 64 rows fill half the slot), else in a 64-row buffer the two
    # consumers take in turns (head dim 256: 32 KB of the 35 its rings and Q leave); False: stores
    # from the accumulators' layout.
    o_tma: bool = False
    # Q buffers per consumer: 2 lets the producer load the next work tile's Q while the consumers
    # still read this one's (worth it where work tiles are short: few key tiles each).
    q_slots: int = 1


# (head dim, causal) the Gluon forward covers, with its tile and the key length from which it
# runs at least as fast as the tl kernel at that length and every longer one (bench/common.py
# min_winning_seqlen over bench/gluon_fwd_probe.py --coverage, H100, 2026-11-24 21:31 UTC, head
# dim 64 2026-11-25 03:07, bench/results/h100_gluon_fwd.json; batch x seqlen = 16384, heads x head
# dim = 2048; Gluon / tl kernel time ratio at seqlen 512 / 1024 / 2048 / 4096 / 8192 / 16384).
# Shared memory: Q (64 x consumers) x D plus (k_slots + v_slots) x block_n x D, 16-bit, within an
# H100 SM's 227 KB. The ring depths and ping-pong were chosen by bench/gluon_fwd_probe.py --tiles (16:30 UTC,
# bench/results/h100_gluon_fwd_tiles.json: TFLOP/s at 1024 / 4096 / 16384 keys, in one process).
SM90_GLUON_FWD = {
    # Head dim 64 is bound by the exponentials (as many per score as at 128, half the MMA work):
    # without ping-pong +1.0-3.1% in all six cells of --tiles (4-deep rings: -0.5% to +1.1%).
    # Non-causal with two consumers: 8192 keys at 16:42 (0.68 0.83 0.89 1.00 1.01 1.03), 1024 at
    # 20:11 on the persistent grid (0.97 1.03 1.04 1.05 1.03 1.05), 16384 at 21:31 (one cell at
    # 0.99). Three consumers (192 rows per tile, 2026-11-25 03:07 UTC, --tiles
    # bench/results/h100_gluon_fwd_tiles64_0307.json, 3 / 2 consumers at 1024 ... 16384: 0.97 1.05
    # 1.06 1.09 1.14; causal 0.66 0.73 0.78 0.92 1.02: the masked tiles spill at 160 registers) and
    # the coverage run after it (bench/results/h100_gluon_fwd_64_0307.json): from 2048 keys.
    # With softcap 30 (--tiles --softcap 30, 03:41, bench/results/h100_gluon_fwd_tiles64_softcap_0341.json,
    # tl / Gluon time at 2048 / 4096 / 8192 / 16384): 0.995 1.02 1.09 1.08, from 4096; again after
    # steps 31 and 33 (12:09-12:10, h100_gluon_fwd_tiles64_softcap.json): 0.990 1.057 1.110 1.103.
    (64, False): GluonForwardTile(128, 3, 3, 2048, pingpong=False, consumers=3,
                                  softcap_min_seqlen_k=4096),  # 0.92 0.97 1.07 1.09 1.13 1.10
    # The queue (step 18, queue / one program per tile, 21:29 UTC, causal 8192 / 16384, window
    # (1024, 0) at 8192): head dim 64 1.023 / 1.028, window 0.978; 256 (512 ... 16384) 0.92 1.04 1.00
    # 1.00 1.01 1.00, window 0.986: within the noise but for 256 at 512, so only head dim 128 takes it.
    # --tiles at 22:15 (bench/results/h100_gluon_fwd_tiles_2215.json, causal 1024 / 4096 / 16384, the
    # Gluon kernel forced): 64 1.22 / 1.05 / 0.99 (it runs from 8192 only), 128 1.14 / 1.03 / 0.99,
    # 256 1.03 / 1.01 / 1.00.
    # Head dim 64 causal with the queue (03:07 --tiles, queue / one program per tile at 1024 ...
    # 16384: 1.17 1.10 1.07 1.02 1.08; 1.02-1.03 at 8192-16384 at 21:29): from 4096 keys (was 8192;
    # 0.75 0.82 0.97 1.06 1.10 1.06 at 03:07). From 2048 since step 31's masks (--coverage --head-dims
    # 64, 2026-11-25 10:21 UTC, bench/results/h100_gluon_fwd_64_1021.json, merged into h100_gluon_fwd.json).
    # With softcap 30 (--tiles --softcap 30 after steps 31 and 33, 2026-11-25 12:09 and 12:10 UTC,
    # bench/results/h100_gluon_fwd_tiles64_softcap.json, tl / Gluon time at 2048 / 4096 / 8192 / 16384:
    # 0.991 1.051 1.044 1.071; 4096 again in the second run: 1.049): from 4096 (was 8192 at 03:41,
    # before step 31: 0.89 0.95 1.001 1.02, now bench/results/h100_gluon_fwd_tiles64_softcap_0341.json).
    (64, True): GluonForwardTile(128, 3, 3, 2048, pingpong=False, queue=True,
                                 softcap_min_seqlen_k=4096, o_tma=True),  # 0.86 0.96 1.06 1.12 1.11 1.04
    # 2 slots: 502 / 475 TFLOP/s, 3: 582 / 598 (probe 08:03 above, B4 S4096 / B1 S16384); K 4 / V 2
    # and no ping-pong were within -3% / +4% of these (--tiles), K 4 / V 2 lost half at 1024 causal.
    (128, False): GluonForwardTile(128, 3, 3, 512, o_tma=True),  # 1.34 1.26 1.33 1.22 1.16 1.09
    # Queue / one program per tile at 1024 ... 16384: 1.15 1.11 1.07 1.02 1.04, window 1.03; with
    # the queue the entry starts at 512 keys (was 1024: 0.91 1.03 1.13 1.14 1.19 1.10 at 20:11).
    (128, True): GluonForwardTile(128, 3, 3, 512, queue=True, o_tma=True),  # 1.11 1.19 1.23 1.19 1.20 1.13
    # 64-key tiles, 2 slots each: 128-key tiles would need 128 KB per K/V pair. Separate K and V
    # barriers took this entry from 1.02-1.08x the tl kernel (14:14) to 1.29-1.54x; K 3 / V 2 and
    # no ping-pong were within -13% / +15% of it, no consistent winner (--tiles). The output by TMA
    # stores (step 28, bench/results/h100_ab_step28.json, new / old speed at 512 ... 4096 and 16384,
    # bitwise-equal output): 1.19 1.16 1.08 1.04 1.00, causal 1.17 1.13 1.04 1.01 0.98.
    (256, False): GluonForwardTile(64, 2, 2, 512, o_tma=True),  # 1.42 1.52 1.59 1.56 1.57 1.47
    (256, True): GluonForwardTile(64, 2, 2, 512, o_tma=True),  # 1.23 1.37 1.44 1.47 1.55 1.45
}


class ShortTile(NamedTuple):
    """An SM90_GLUON_FWD entry's tile for its shorter key loops: key lengths below ``below`` take
    ``tile`` (from the tile's own min_seqlen_k; shorter ones take the tl kernel)."""
    below: int
    tile: GluonForwardTile


# Shorter key loops of an entry, without softcap, take a tile of their own (gluon_forward_tile):
# where work tiles have few key tiles, their fixed costs weigh, and a second Q buffer (the producer
# loads the next work tile's Q while the consumers still read this one's) takes the Q load off the
# consumers' path; at long lengths its shared memory costs K/V ring depth, which loses. Chosen by
# bench/gluon_fwd_probe.py --tiles (H100), each entry's tile against the candidates in one process,
# two runs after step 33's half diagonal tile: bench/results/h100_gluon_fwd_tiles_1221_run1.json and
# _run2.json (2026-11-25 12:21 UTC). ``below``: the first length measured from the tile's
# min_seqlen_k up at which the short tile was not at least 1% faster than the entry's in both runs;
# ``min_seqlen_k``: where it beats the tl kernel from, in both runs; of the candidates, the one with
# the highest bound (bench/common.short_tiles; ``bench/gluon_fwd_probe.py --short-tiles RUN1.json
# RUN2.json`` prints these entries from the runs, a CPU test holds the table to them). The runs
# before (after step 31: bench/results/h100_gluon_fwd_tiles_1048_run{1,2}.json, 10:43 / 10:47) gave
# the same table but for head dim 128 causal, whose K 2 / V 2 tile read 1.033 / 0.753 at 512 there
# and was dropped; before step 31 (h100_gluon_fwd_tiles_q2_run{1,2}.json, 09:01-09:03) it had held
# below 4096 keys. Softcap calls keep the entry's tile: the head-dim-64 short tile without its
# second Q buffer lost to the tl kernel with softcap 30
# (bench/results/h100_gluon_fwd_tiles64_short_softcap.json, 275 / 308 against 297 / 313 TFLOP/s at
# 512 / 1024 keys), and no other was measured with it. Ratios below: entry's time / this tile's,
# runs 1 / 2, and the tl kernel's time / this tile's.
SM90_GLUON_FWD_SHORT = {
    # Two consumers (not three), TMA output stores, two Q buffers: 1.247 / 1.260, 1.121 / 1.166,
    # 0.991 / 0.966 at 512 / 1024 / 2048 keys; tl 1.15 / 1.16 at 512, 1.09 / 1.11 at 1024 (390 / 391
    # TFLOP/s at 512 against cuDNN's 385 / 385). Without the second Q buffer (--tiles 08:44 and
    # 08:50): 1.03-1.05x the tl kernel.
    (64, False): ShortTile(2048, GluonForwardTile(128, 3, 3, 512, pingpong=False, o_tma=True, q_slots=2)),
    # The causal entry's tile with two Q buffers: 1.099 / 1.086, 1.069 / 1.052, 1.029 / 1.016, 1.069 /
    # 0.969 at 512 / 1024 / 2048 / 4096; tl 0.99 / 0.98 at 512 (it keeps those), 1.03 / 1.04 at 1024
    # (307 / 304 TFLOP/s against cuDNN's 342 / 335).
    (64, True): ShortTile(4096, GluonForwardTile(128, 3, 3, 1024, pingpong=False, queue=True, o_tma=True, q_slots=2)),
    # K 3 / V 2 slots beside two Q buffers (229792 bytes of shared memory): 1.036 / 1.036, 0.980 /
    # 1.031 at 512 / 1024: the rule stops at 1024; tl 1.54 / 1.54 at 512.
    (128, False): ShortTile(1024, GluonForwardTile(128, 3, 2, 512, o_tma=True, q_slots=2)),
    # K 2 / V 2 slots beside two Q buffers: 1.061 / 1.064, 1.001 / 1.028 at 512 / 1024: the rule stops
    # at 1024; tl 1.46 / 1.47 at 512 (291 / 290 TFLOP/s against cuDNN's 317 / 312).
    (128, True): ShortTile(1024, GluonForwardTile(128, 2, 2, 512, queue=True, o_tma=True, q_slots=2)),
}


def gluon_forward_tile(head_dim: int, masked: bool, seqlen_k: int, softcap: bool = False) -> GluonForwardTile | None:
    """The Gluon forward's tile for a call with ``seqlen_k`` keys: the SM90_GLUON_FWD entry of
    (head dim, masked), or below its SM90_GLUON_FWD_SHORT bound (without softcap) the short tile;
    None without an entry. Whether the call is long enough for the tile (its min_seqlen_k,
    softcap's threshold) is fwd_hopper.hopper_fwd_eligible's rule."""
    key = (head_dim, masked)
    short = SM90_GLUON_FWD_SHORT.get(key)
    if short is not None and seqlen_k < short.below and not softcap:
        return short.tile
    return SM90_GLUON_FWD.get(key)


# Sliding windows (and causal with Sq > Sk) take the Gluon forward with the causal entry's tile
# when a row sees at least this many keys (ops/common.mask_admitted): the smallest W from
# which the Gluon kernel beat the tl kernel at every larger W measured, windows (W - 1, 0) and
# (W / 2, W / 2 - 1) at 8192 tokens (bench/gluon_fwd_probe.py --windows, H100, 2026-11-24 16:49
# UTC, bench/results/h100_gluon_fwd_windows.json; the worse of the two windows' Gluon / tl time
# ratios at W = 128 / 256 / 512 / 1024 / 2048 / 4096). Head dims 128 and 256 lost one cell at
# 256 amid wins (0.75, 0.94), which the rule follows. Head dim 64 re-measured 2026-11-25 03:24 UTC
# with its causal entry's work queue (step 23; was 0.44 0.58 0.67 0.79 0.91 1.07): still 4096 (0.52
# 0.75 0.85 0.93 0.91 1.12). Head dims 64 and 128 re-measured after step 31's cheaper masks
# (2026-11-25 10:22 UTC, bench/results/h100_gluon_fwd_windows_1022.json, merged into the file above;
# head dim 128 was 1.06 0.75 1.12 1.12 1.09 1.10, from 512). Head dim 256 re-measured after steps 31
# and 33 (2026-11-25 12:09 UTC, bench/results/h100_gluon_fwd_windows_256_1209.json, merged likewise;
# was 1.18 0.94 1.28 1.29 1.27 1.25, from 512).
SM90_GLUON_FWD_WINDOW_MIN_KEYS = {
    64: 1024,  # 0.74 0.92 0.96 1.02 1.10 1.11
    128: 128,  # 1.73 1.71 1.56 1.36 1.18 1.14
    256: 128,  # 1.38 1.38 1.39 1.35 1.31 1.27
}

# The same rule for the Gluon backward's windows (bench/gluon_bwd_probe.py --windows, H100,
# 2026-11-24 17:31 UTC, bench/results/h100_gluon_bwd_windows.json; Gluon / tl time ratios at
# W = 128 / 256 / 512 / 1024 / 2048 / 4096, the worse of the two windows).
SM90_GLUON_BWD_WINDOW_MIN_KEYS = {
    64: 1024,  # 0.76 0.80 0.91 1.02 1.20 1.24
    128: 512,  # 0.75 0.96 1.07 1.16 1.23 1.26
    256: 128,  # 1.03 1.08 1.15 1.21 1.25 1.24
}

# The Gluon backward (ops/bwd_hopper.py: dK, dV and dQ in one pass, dQ by float32 TMA reductions;
# head dim 256 in ops/bwd_hopper_wide.py): (head dim, causal) it covers -> the key length from
# which it runs at least as fast as the tl kernels at that length and every longer one
# (min_winning_seqlen over bench/gluon_bwd_probe.py, H100, 2026-11-25 06:25 UTC,
# bench/results/h100_gluon_bwd.json; batch x seqlen = 16384, heads x head dim = 2048; Gluon / tl
# time ratio at seqlen 512 / 1024 / 2048 / 4096 / 8192 / 16384). Causal head dim 128 started at
# 8192 before the TMA reductions and the grouped causal grid (ops/hopper_order.py); causal head
# dim 256 at 1024 before its split-role kernel. The 2026-11-24 19:28 run
# (bench/results/h100_gluon_bwd_1928.json, before the one-launch dQ buffer and the TMA dK/dV
# stores) started head dims 64 and 128 at 1024 / 2048 / 1024 / 1024 keys. Set GLUON_BWD to False
# to time the tl kernels on the same shapes; deterministic=True always takes them.
GLUON_BWD = True
# The Gluon backward's float32 dQ buffer (4 bytes per element of q) is split over two launches of
# half the heads each from this many query rows (bwd_hopper.head_chunks). H100, bf16, batch x
# seqlen = 16384, heads x head dim = 2048, 2026-11-24 23:02-23:05 UTC: extra peak memory of a
# forward + backward 386 MiB in one launch, 322 MiB split (cuDNN 387), the same at 1024 and 16384
# tokens; one launch's backward kernels 1.00-1.06x as fast at 2048-8192 tokens (head dims 64, 128,
# 256) and 1.00-1.01x at 16384, and at 512-1024 tokens the split's second launch, zero fill and
# slice copy cost 0.35-0.5 ms of host time per call (bench/host_bound.py, 22:59).
GLUON_BWD_SPLIT_DQ_MIN_SEQLEN = 16384
SM90_GLUON_BWD = {
    (64, False): 512,  # 1.01 1.16 1.24 1.21 1.24 1.30
    (64, True): 1024,  # 0.90 1.06 1.22 1.26 1.28 1.34
    (128, False): 512,  # 1.18 1.27 1.21 1.19 1.19 1.21
    (128, True): 512,  # 1.15 1.28 1.27 1.30 1.31 1.28
    (256, False): 512,  # 1.52 1.65 1.59 1.63 1.69 1.74
    (256, True): 512,  # 1.23 1.50 1.61 1.69 1.73 1.73
}
# Entries of SM90_GLUON_BWD whose softcap calls take the tl kernels: head dim 128 causal spills
# 516 bytes per thread with the tanh kept for dS (ptxas), and lost to the tl kernels at every
# length (H100, softcap 30, one process, 2026-11-24 14:33 UTC: 172 / 225 / 259 / 299 TFLOP/s
# against 184 / 259 / 290 / 347 at seqlen 1024 / 2048 / 4096 / 16384). Every other entry won or
# tied with softcap.
SM90_GLUON_BWD_NO_SOFTCAP = {(128, True)}

SM90 = {
    **_TUNED_H100,
    **{(mode, small, causal): _TUNED_H100[(mode, 64, causal)]
       for mode in ("fwd", "dkdv", "dq") for small in (16, 32) for causal in (False, True)},
}

# Varlen batches, where they differ (bench/probe.py varlen, H100, 2026-11-24 04:50 UTC; 8
# sequences of 512..3584 tokens, head dim 64, non-causal forward): many programs are short or
# empty (each batch entry gets cdiv(max_seqlen, BLOCK_M) Q tiles), and two 4-warp CTAs per SM
# hide one's start-up behind the other's loop. 0.837 ms against 1.041 ms with the dense entry
# (which keeps dense batches faster: 0.612 vs 0.660 ms at 8 x 2048).
SM90_VARLEN = {("fwd", d, False): TileConfig(128, 64, 4, 3) for d in (16, 32, 64)}


def _generic(mode: str, block_d: int) -> TileConfig:
    table = GENERIC[mode]
    return table[min((d for d in table if d >= block_d), default=256)]


def arch(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device (cached)."""
    return _arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launchers ask on every call)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Softcap and dropout add per-score work (a tanh; Philox and a compare). At head dim <= 64 their
# forward and dK/dV kernels take the masked (4-warp) entries even when nothing is masked
# (bench/probe.py feature_tiles, H100, 2026-11-24 05:44 UTC, head dim 64 non-causal, seqlen 4096,
# fwd / bwd ms; plain kernel 1.196 / 4.066): softcap 1.643 / 6.540 with the non-causal entries,
# 1.528 / 5.031 with these; dropout 2.077 / 8.400 -> 1.921 / 7.056. (dQ not probed: unchanged.)
HEAVY_SCORE_MODES = ("fwd", "dkdv")


def tile_config(device: torch.device, dtype: torch.dtype, block_d: int, mode: str, causal: bool,
                varlen: bool = False, heavy_scores: bool = False, long_loop: bool = False) -> TileConfig:
    """The tile configuration for one kernel launch. ``heavy_scores``: softcap or dropout;
    ``long_loop``: the kernel streams at least TMA_MIN_SEQLEN rows (see SM90_LONG)."""
    if device.type != "cuda":
        return INTERPRETER
    if dtype == torch.float32:
        # fp32 dots run at a fraction of the 16-bit rate and need twice the shared memory.
        return TileConfig(64, 32, 4, 2) if block_d <= 128 else TileConfig(32, 32, 4, 1)
    if heavy_scores and block_d <= 64 and mode in HEAVY_SCORE_MODES:
        causal = True
    key = (mode, block_d, causal)
    if arch(device) == (9, 0) and key in SM90:
        if varlen and key in SM90_VARLEN:
            return SM90_VARLEN[key]
        if long_loop and key in SM90_LONG:
            return SM90_LONG[key]
        return SM90[key]
    return _generic(mode, block_d)


# KV-cache attention (ops/decode.py, decoding and paged prefill): (block_n, num_warps, num_stages)
# per padded head dim, any CUDA GPU. 128: bench/bench_decode.py --probe on the H100, 2026-11-24
# 11:56 UTC (bf16, 32/8 heads, per-layer CUDA-graph time; % of copy bandwidth, contiguous / page 64):
# (32, 4, 3) 38.6/38.2 B1x4k, 55.9/54.9 B1x8k, 83.8/82.5 B1x32k, 97.3/95.8 B8x32k, 99.1/98.0 B64x4k;
# (64, 4, 3) 39.9/39.0, 55.6/55.3, 83.4/82.9, 94.4/93.8, 95.4/92.6; (64, 4, 2), (128, 4, 2) and
# (128, 8, 3) each lost somewhere by 3-15%. The other head dims: not measured, same bytes per stage.
DECODE_TILES = {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3), 128: (32, 4, 3), 256: (16, 4, 3)}
# Split-KV decoding on sm90+: launch the combine kernel as a programmatic dependent of the split
# kernel (PDL), so its launch overlaps the split kernel. bench/bench_decode.py --probe compares.
DECODE_PDL = True

# flash_attn_with_kvcache and paged varlen range-check the values of cache_seqlens,
# cache_batch_idx, cache_leftpad and block_table in one device-to-host copy per call (skipped
# while capturing a CUDA graph). False skips it: for serving loops that build those indices
# themselves and cannot afford the wait; an out-of-range index then reads or writes outside the cache.
CHECK_CACHE_INDICES = True

# The tl kernels (forward, backward, decode, cache append) launch through ops/launch.FastLaunch:
# triton's own launch path re-binds and re-specializes every argument on every call (49 us per
# forward launch on the H100 host, bench/overhead.py). False launches through triton's path.
FAST_LAUNCH = True
