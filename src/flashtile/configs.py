"""Tile sizes per (architecture, dtype, head dim, mode).

Every entry names the measurement that chose it. `python bench/tune.py` (opt-in, GPU only)
times the candidates and prints table rows in this format; nobody pays for tuning at run
time, and a new sequence length never triggers a search or a recompile.

Modes: ``fwd`` (forward), ``dkdv`` (backward, one K/V tile per program) and ``dq``
(backward, one Q tile per program). ``block_m`` always counts query rows and ``block_n``
keys, whatever the mode.
"""

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

# Any CUDA GPU without a tuned entry: modest tiles that fit Ampere's shared memory.
GENERIC = {
    "fwd": {64: TileConfig(128, 64, 4, 3), 128: TileConfig(128, 64, 8, 3), 256: TileConfig(64, 32, 4, 2)},
    "dkdv": {64: TileConfig(32, 128, 4, 2), 128: TileConfig(32, 128, 8, 2), 256: TileConfig(16, 64, 8, 1)},
    "dq": {64: TileConfig(128, 32, 4, 2), 128: TileConfig(128, 32, 8, 2), 256: TileConfig(64, 16, 8, 1)},
}

# Hopper (sm90), fp16/bf16. Key: (mode, padded head dim).
SM90 = {
    ("fwd", 16): TileConfig(128, 64, 4, 3),
    ("fwd", 32): TileConfig(128, 64, 4, 3),
    ("fwd", 64): TileConfig(128, 64, 4, 3),
    ("fwd", 128): TileConfig(128, 64, 8, 3),
    ("fwd", 256): TileConfig(64, 64, 4, 2),
    ("dkdv", 16): TileConfig(64, 128, 4, 2),
    ("dkdv", 32): TileConfig(64, 128, 4, 2),
    ("dkdv", 64): TileConfig(64, 128, 4, 2),
    ("dkdv", 128): TileConfig(64, 128, 8, 2),
    ("dkdv", 256): TileConfig(64, 64, 8, 1),
    ("dq", 16): TileConfig(128, 64, 4, 2),
    ("dq", 32): TileConfig(128, 64, 4, 2),
    ("dq", 64): TileConfig(128, 64, 4, 2),
    ("dq", 128): TileConfig(128, 64, 8, 2),
    ("dq", 256): TileConfig(64, 64, 8, 1),
}


def _generic(mode: str, block_d: int) -> TileConfig:
    table = GENERIC[mode]
    return table[min((d for d in table if d >= block_d), default=256)]


def tile_config(device: torch.device, dtype: torch.dtype, block_d: int, mode: str) -> TileConfig:
    """The tile configuration for one kernel launch."""
    if device.type != "cuda":
        return INTERPRETER
    arch = torch.cuda.get_device_capability(device)
    if dtype == torch.float32:
        # fp32 dots run at a fraction of the 16-bit rate and need twice the shared memory.
        return TileConfig(64, 32, 4, 2)
    if arch == (9, 0) and (mode, block_d) in SM90:
        return SM90[(mode, block_d)]
    return _generic(mode, block_d)
