"""The order in which the Hopper Gluon kernels' flat grids visit (head, tile) pairs.

Under a causal mask the programs of one head differ in length (the forward's last Q tiles and
the backward's first key tiles see the most of the other side). Head by head, longest first
within each head, the last heads' long programs start last and run on alone: a tail of ~10% at
seqlen 4096 by a count of the tile visits. All heads' longest programs first removes that tail
but spreads the programs running together over as many heads as there are SMs, whose streamed
tensors no longer fit in L2 (measured slower). So heads are taken in groups sized to the L2
(``head_group``), and within a group all its heads' longest programs come first.

The last group can still leave a tail: its longest programs start only once the group before it
has been handed out. Where a simulation of the dispatch says so (``tail_group``), the last two
groups are taken as one, so that the last group's longest programs start beside the previous
group's: up to 9% faster on shapes whose last group falls badly. Merging everywhere measured
about 1% slower on shapes without such a tail, hence the simulation (docs/performance.md, step 39).
"""

import functools
import heapq

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

# Bytes of streamed tensors (the forward's K/V, the backward's Q/dO) per group of heads.
L2_GROUP_BYTES = 8 << 20
# The simulation in tail_group: a program's start and end cost, in tiles of its loop (the
# backward's ~4.4 us per program against ~2.4 us per 64-row tile, docs/performance.md step 39),
# and the gain it must predict for the merged tail (below that, measured no gain or a loss).
START_TILES = 2
MERGE_GAIN = 0.01
MAX_SIMULATED = 1 << 14  # programs; longer grids keep their last group (a tail is a small share of them)


@gluon.jit
def head_and_rank(pid, n_tiles, n_heads, group, tail):
    """``(head, rank)`` of program ``pid`` over ``n_heads * n_tiles`` programs: heads in groups
    of ``group``, from group ``tail`` on (``tail_group``) all the heads left as one group, each
    group's programs rank-major (rank 0, the longest, of every head of the group first).
    ``group == 1`` with ``tail == n_heads - 1`` is plain head-major order."""
    per_group = group * n_tiles
    g = gl.minimum(pid // per_group, tail)
    heads_in_group = gl.where(g == tail, n_heads - g * group, group)
    i = pid - g * per_group
    return g * group + i % heads_in_group, i // heads_in_group


def head_group(causal: bool, n_heads: int, bytes_per_head: int) -> int:
    """Heads per group for ``head_and_rank``: 1 (head-major) when every program of a head is
    as long as the others, else as many heads as ``L2_GROUP_BYTES`` holds (at least 1)."""
    if not causal:
        return 1
    return max(1, min(n_heads, L2_GROUP_BYTES // max(bytes_per_head, 1)))


@functools.lru_cache(maxsize=1024)
def tail_group(causal: bool, n_heads: int, n_tiles: int, group: int, sm_count: int) -> int:
    """``head_and_rank``'s ``tail``: the last group alone (``n_groups - 1``), or the last two as one
    (``n_groups - 2``) where, with causal programs (rank r lasting ``n_tiles - r`` tiles), a
    simulation of the dispatch finishes more than MERGE_GAIN sooner that way."""
    n_groups = -(-n_heads // group)
    if not causal or n_groups < 2 or n_heads * n_tiles > MAX_SIMULATED:
        return n_groups - 1
    plain = _simulated_finish(n_heads, n_tiles, group, n_groups - 1, sm_count)
    merged = _simulated_finish(n_heads, n_tiles, group, n_groups - 2, sm_count)
    return n_groups - 2 if merged < (1 - MERGE_GAIN) * plain else n_groups - 1


def _simulated_finish(n_heads: int, n_tiles: int, group: int, tail: int, sm_count: int) -> int:
    """When the last program ends if each of ``sm_count`` SMs takes the next program in
    ``head_and_rank``'s order as soon as it is free (the hardware hands out a flat grid's programs
    in order; the persistent forward's work queue does the same), program of rank r lasting
    ``n_tiles - r + START_TILES``."""
    heads_per_group = [group] * tail + [n_heads - tail * group]
    free = [0] * sm_count
    for heads in heads_per_group:
        for rank in range(n_tiles):
            for _ in range(heads):
                heapq.heappush(free, heapq.heappop(free) + n_tiles - rank + START_TILES)
    return max(free)
