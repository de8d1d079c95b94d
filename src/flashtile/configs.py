"""Tile sizes per (architecture, dtype, head dim, mode).

Every entry names the measurement that chose it. `python bench/tune.py` (opt-in, GPU only)
times the candidates and prints table rows in this format; nobody pays for tuning at run
time, and a new sequence length never triggers a search or a recompile.

Modes: ``fwd`` (forward), ``dkdv`` (backward, one K/V tile per program) and ``dq``
(backward, one Q tile per program). ``block_m`` always counts query rows and ``block_n``
keys, whatever the mode.
"""

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


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
# an H100 80GB HBM3 (torch 2.11, triton 3.6.0), 2026-11-24: bf16, B*S = 16384, H*D = 2048;
# the comment gives the kernel's own TFLOP/s at S = 1024 / 4096 (dkdv counts its 4 matmuls,
# dq its 3). Head dims 16 and 32 use the 64 entries (not measured separately).
_TUNED_H100 = {
    ("fwd", 64, False): TileConfig(128, 64, 8, 3),  # 382 / 411
    ("fwd", 64, True): TileConfig(128, 64, 8, 3),  # 269 / 362
    ("fwd", 128, False): TileConfig(128, 64, 8, 3),  # 395 / 450
    ("fwd", 128, True): TileConfig(128, 64, 8, 3),  # 283 / 401
    ("fwd", 256, False): TileConfig(128, 64, 8, 2),  # 352 / 428
    ("fwd", 256, True): TileConfig(128, 64, 8, 2),  # 243 / 361
    ("dkdv", 64, False): TileConfig(32, 64, 4, 1),  # 358 / 397
    ("dkdv", 64, True): TileConfig(32, 64, 4, 1),  # 299 / 354
    ("dkdv", 128, False): TileConfig(32, 64, 4, 3),  # 376 / 420
    ("dkdv", 128, True): TileConfig(32, 64, 4, 1),  # 292 / 363
    ("dkdv", 256, False): TileConfig(32, 64, 4, 1),  # 84 / 85 (register-bound; see notes)
    ("dkdv", 256, True): TileConfig(32, 128, 8, 2),  # 62 / 70
    ("dq", 64, False): TileConfig(64, 32, 4, 3),  # 449 / 488
    ("dq", 64, True): TileConfig(64, 32, 4, 3),  # 369 / 445
    ("dq", 128, False): TileConfig(64, 32, 4, 3),  # 435 / 487
    ("dq", 128, True): TileConfig(64, 32, 4, 3),  # 363 / 453
    ("dq", 256, False): TileConfig(128, 32, 8, 3),  # 449 / 509
    ("dq", 256, True): TileConfig(64, 32, 4, 3),  # 251 / 348
}
SM90 = {
    **_TUNED_H100,
    **{(mode, small, causal): _TUNED_H100[(mode, 64, causal)]
       for mode in ("fwd", "dkdv", "dq") for small in (16, 32) for causal in (False, True)},
}


def _generic(mode: str, block_d: int) -> TileConfig:
    table = GENERIC[mode]
    return table[min((d for d in table if d >= block_d), default=256)]


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def tile_config(device: torch.device, dtype: torch.dtype, block_d: int, mode: str, causal: bool) -> TileConfig:
    """The tile configuration for one kernel launch."""
    if device.type != "cuda":
        return INTERPRETER
    if dtype == torch.float32:
        # fp32 dots run at a fraction of the 16-bit rate and need twice the shared memory.
        return TileConfig(64, 32, 4, 2) if block_d <= 128 else TileConfig(32, 32, 4, 1)
    key = (mode, block_d, causal)
    if _arch(device.index if device.index is not None else torch.cuda.current_device()) == (9, 0) and key in SM90:
        return SM90[key]
    return _generic(mode, block_d)
