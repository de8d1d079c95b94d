"""What one attention call computes, beyond q, k and v: the options every layer shares.

``interface.py`` validates the user's arguments and builds a ``Features``; the kernels'
launchers (``ops/``), the CPU path (``cpu.py``) and autograd all read this one description.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


@dataclass(frozen=True)
class Features:
    softmax_scale: float
    # Window bounds after normalisation (``normalized_window``): -1 = unbounded; causal is
    # right = 0. Query i sees key j iff i + Sk - Sq - left <= j <= i + Sk - Sq + right.
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None  # float32, (H,) or (B, H)
    dropout_p: float = 0.0
    seed: int = 0  # Philox key for dropout (flashtile/philox.py)
    # Bitwise-reproducible backward: excludes the Gluon backward, whose dQ sums by atomics.
    deterministic: bool = False

    @property
    def heavy_scores(self) -> bool:
        """Softcap or dropout: extra work per score, which favours other tiles (configs.py)."""
        return self.softcap > 0 or self.dropout_p > 0

    @property
    def masked(self) -> bool:
        """Some key is hidden from some query by causal or a window."""
        return self.window_left >= 0 or self.window_right >= 0


def normalized_window(causal: bool, window_size, max_seqlen_q: int, max_seqlen_k: int) -> tuple[int, int]:
    """``(left, right)`` with causal folded in (right = 0) and bounds that hide nothing dropped.

    A left bound ``>= Sk`` or a right bound ``>= Sq`` excludes no key under the rule above, so
    it becomes -1: the kernels then skip its arithmetic, and no bound reaches int32 overflow.
    """
    left, right = window_size
    if causal:
        right = 0
    if left >= max_seqlen_k:
        left = -1
    if right >= max_seqlen_q:
        right = -1
    return left, right


class KVCache(NamedTuple):
    """Where each sequence's keys and values live, for ``flash_attn_with_kvcache`` and paged varlen.

    Keys are numbered by their position in the cache. Sequence ``b`` attends the keys
    ``[start_b, end_b)``: ``start_b = leftpad[b]`` (0 without it) and ``end_b = seqlens[b] +
    seqlen_new`` (``seqlen`` for every sequence when ``seqlens`` is None). Contiguous caches hold
    sequence ``b`` in row ``batch_idx[b]`` (``b`` without it); paged ones (``block_table`` given)
    hold position ``p`` in page ``block_table[b, p // page_size]``, row ``p % page_size``.
    Masks are bottom-right aligned to ``end_b``, as for a ``seqlen_k = end_b - start_b`` call.
    """
    k_cache: torch.Tensor  # (batch_cache, seqlen_cache, Hk, D), or (num_pages, page_size, Hk, D)
    v_cache: torch.Tensor
    seqlens: Optional[torch.Tensor]  # int32 (B,)
    seqlen: int
    seqlen_new: int
    batch_idx: Optional[torch.Tensor]  # int32 (B,)
    leftpad: Optional[torch.Tensor]  # int32 (B,)
    block_table: Optional[torch.Tensor]  # int32 (B, pages per sequence)

    @property
    def capacity(self) -> int:
        """How many positions one sequence can address."""
        if self.block_table is None:
            return self.k_cache.shape[1]
        return self.block_table.shape[1] * self.k_cache.shape[1]
