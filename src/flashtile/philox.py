"""The dropout mask, defined once: which attention probabilities are kept.

A probability at (batch ``b``, query head ``h``, query ``i``, key ``j``) -- positions within its
own sequence, also under varlen -- is kept iff an 8-bit random number ``r >= threshold``, with
``threshold = min(round(dropout_p * 256), 255)``: the keep rate is ``1 - threshold / 256`` and
kept values are scaled by its inverse, so dropout stays unbiased. (FlashAttention-2 rounds
``dropout_p`` to 8 bits the same way.)

The numbers come from Philox4x32-7 (seven rounds, as FlashAttention-2 uses) keyed by the 64-bit
seed (low word, high word). One call yields 16 bytes for a block of 2 x 8 scores::

    counter = ((j // 64) * 8 + j % 8,  i with bit 3 cleared,  h,  b)
    byte    = ((i // 8) % 2) * 8 + (j // 8) % 8     -> word byte // 4, bits 8 * (byte % 4) up

i.e. queries ``{i, i + 8}`` times keys ``{j, j + 8, ..., j + 56}``. The grouping follows the
tensor cores' accumulator layout, where one thread holds rows ``i`` and ``i + 8`` and every 8th
key: in the forward and dQ kernels each thread's Philox calls serve only its own scores (no
call is computed twice, no data moves between threads), which is what makes dropout cheap.

The Triton kernels (``ops/score.py``) and this NumPy version produce bitwise the same mask, so
the CPU path and the GPU agree and the backward regenerates exactly the forward's mask. Each
seed is drawn from torch's default (CPU) generator, so ``torch.manual_seed`` makes a dropout
call reproducible bit for bit.
"""

import numpy as np
import torch

ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers (Salmon et al., 2011)
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85  # its key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 7
_WORD = np.uint64(0xFFFFFFFF)


def threshold(dropout_p: float) -> int:
    """The 8-bit cut: a number below it drops."""
    return min(round(dropout_p * 256), 255)


def keep_probability(dropout_p: float) -> float:
    """The exact keep rate of the mask, ``1 - threshold / 256`` (within 1/512 of ``1 - dropout_p``);
    kept values are scaled by its inverse."""
    return 1.0 - threshold(dropout_p) / 256


def new_seed() -> int:
    """A fresh seed in [2**32, 2**62) from torch's default generator (always int64 for Triton)."""
    return int(torch.randint(2**32, 2**62, (), dtype=torch.int64))


def philox4x32(seed: int, c0, c1, c2, c3):
    """Philox4x32-7 on uint64 arrays holding 32-bit counters; returns the four output words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _WORD for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(ROUNDS):
        prod_b = np.uint64(ROUND_B) * c2  # exact: 32 x 32 bits fit in 64
        prod_a = np.uint64(ROUND_A) * c0
        c0, c2 = (prod_b >> np.uint64(32)) ^ c1 ^ k0, (prod_a >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = prod_b & _WORD, prod_a & _WORD
        k0, k1 = (k0 + np.uint64(KEY_A)) & _WORD, (k1 + np.uint64(KEY_B)) & _WORD
    return c0, c1, c2, c3


def keep_mask(seed: int, dropout_p: float, batch_idx, head_idx, rows, cols) -> torch.Tensor:
    """Bool keep mask broadcast over the index arrays (NumPy-broadcastable int arrays)."""
    batch_idx, head_idx, rows, cols = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64)
                                                            for x in (batch_idx, head_idx, rows, cols)))
    words = philox4x32(seed, (cols // 64) * 8 + cols % 8, rows & ~8, head_idx, batch_idx)
    byte = ((rows // 8) % 2) * 8 + (cols // 8) % 8
    word = np.choose(byte // 4, words)
    number = (word >> (np.uint64(8) * (byte % 4).astype(np.uint64))) & np.uint64(0xFF)
    return torch.from_numpy(number >= np.uint64(threshold(dropout_p)))


def keep_mask_dense(seed, dropout_p, batch, heads, seqlen_q, seqlen_k, batch_offset=0) -> torch.Tensor:
    """Bool (batch, heads, Sq, Sk) keep mask; batch entry ``b`` uses batch index ``b + batch_offset``."""
    return keep_mask(seed, dropout_p,
                     (np.arange(batch) + batch_offset)[:, None, None, None], np.arange(heads)[None, :, None, None],
                     np.arange(seqlen_q)[None, None, :, None], np.arange(seqlen_k)[None, None, None, :])
