"""The dropout mask, defined once: which attention probabilities are kept.

A probability at (batch ``b``, query head ``h``, query ``i``, key ``j``) -- positions within
its own sequence, also under varlen -- is kept iff a 16-bit random number ``r >= threshold``,
with ``threshold = round(dropout_p * 2**16)``. The numbers come from Philox4x32-10 keyed by
the 64-bit seed (low word, high word), at counter ``(j // 8, i, h, b)``: one call yields four
32-bit words, eight 16-bit numbers, used for keys ``8 * (j // 8) + t`` in order (word ``t // 2``,
low half first). The Triton kernels (``ops/score.py``) and this NumPy version produce
bitwise the same mask, so the CPU path and the GPU agree and the backward regenerates exactly
the forward's mask.

Each seed is drawn from torch's default (CPU) generator, so ``torch.manual_seed`` makes a
dropout call reproducible bit for bit.
"""

import numpy as np
import torch

ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers (Salmon et al., 2011)
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85  # its key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10
KEYS_PER_CALL = 8
_WORD = np.uint64(0xFFFFFFFF)


def threshold(dropout_p: float) -> int:
    """The 16-bit cut: a number below it drops. Keep rate is ``1 - threshold / 2**16``, within
    2**-17 of ``1 - dropout_p``."""
    return min(round(dropout_p * 65536), 65535)


def new_seed() -> int:
    """A fresh seed in [2**32, 2**62) from torch's default generator (always int64 for Triton)."""
    return int(torch.randint(2**32, 2**62, (), dtype=torch.int64))


def philox4x32(seed: int, c0, c1, c2, c3):
    """Philox4x32-10 on uint64 arrays holding 32-bit counters; returns the four output words."""
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
    words = philox4x32(seed, cols // KEYS_PER_CALL, rows, head_idx, batch_idx)
    lane = cols % KEYS_PER_CALL
    word = np.choose(lane // 2, words)
    number = (word >> (np.uint64(16) * (lane % 2).astype(np.uint64))) & np.uint64(0xFFFF)
    return torch.from_numpy(number >= np.uint64(threshold(dropout_p)))


def keep_mask_dense(seed, dropout_p, batch, heads, seqlen_q, seqlen_k, batch_offset=0) -> torch.Tensor:
    """Bool (batch, heads, Sq, Sk) keep mask; batch entry ``b`` uses batch index ``b + batch_offset``."""
    return keep_mask(seed, dropout_p,
                     (np.arange(batch) + batch_offset)[:, None, None, None], np.arange(heads)[None, :, None, None],
                     np.arange(seqlen_q)[None, None, :, None], np.arange(seqlen_k)[None, None, None, :])
