"""The order in which the Hopper Gluon kernels' flat grids visit (head, tile) pairs.

Under a causal mask the programs of one head differ in length (the forward's last Q tiles and
the backward's first key tiles see the most of the other side). Head by head, longest first
within each head, the last heads' long programs start last and run on alone: a tail of ~10% at
seqlen 4096 by a count of the tile visits. All heads' longest programs first removes that tail
but spreads the programs running together over as many heads as there are SMs, whose streamed
tensors no longer fit in L2 (measured slower). So heads are taken in groups sized to the L2
(``head_group``), and within a group all its heads' longest programs come first.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

# Bytes of streamed tensors (the forward's K/V, the backward's Q/dO) per group of heads.
L2_GROUP_BYTES = 8 << 20


@gluon.jit
def head_and_rank(pid, n_tiles, n_heads, group):
    """``(head, rank)`` of program ``pid`` over ``n_heads * n_tiles`` programs: heads in groups
    of ``group`` (the last group may be smaller), each group's programs rank-major (rank 0, the
    longest, of every head of the group first). ``group == 1`` is plain head-major order."""
    per_group = group * n_tiles
    g = pid // per_group
    heads_in_group = gl.minimum(group, n_heads - g * group)
    i = pid - g * per_group
    return g * group + i % heads_in_group, i // heads_in_group


def head_group(causal: bool, n_heads: int, bytes_per_head: int) -> int:
    """Heads per group for ``head_and_rank``: 1 (head-major) when every program of a head is
    as long as the others, else as many heads as ``L2_GROUP_BYTES`` holds (at least 1)."""
    if not causal:
        return 1
    return max(1, min(n_heads, L2_GROUP_BYTES // max(bytes_per_head, 1)))
