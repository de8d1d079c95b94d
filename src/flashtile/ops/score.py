"""@triton.jit helpers that turn a tile of ``Q K^T`` into masked, transformed scores.

Shared by the forward and both backward kernels, so every kernel applies the same rules
(docs/semantics.md): scale, softcap, ALiBi, the causal/window mask, dropout. Scores are kept
in base 2 (``exp2``): the launchers fold ``log2(e)`` into the scale.

Masks are written for the query-major orientation ``[rows, keys]``; the dK/dV kernel passes
its ``[keys, rows]`` tiles by broadcasting its index vectors the other way.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def tanh(x, HARDWARE: tl.constexpr):
    """tanh of an fp32 tile.

    HARDWARE: the GPU's ``tanh.approx.f32`` (one MUFU op, relative error < 2**-10.9): for
    fp16/bf16 inputs, whose scores carry larger rounding errors anyway. Otherwise (fp32 inputs,
    and Triton's interpreter, which has neither inline PTX nor libdevice) the stable form
    ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)``, within a few fp32 ulps of 1.
    """
    if HARDWARE:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        e = tl.math.exp2(-2.0 * LOG2E * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)


@triton.jit
def span(first, last, n_other, lo_offset, hi_offset, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
         BLOCK: tl.constexpr):
    """Tiles of the other axis that rows ``first..last`` (inclusive, all valid) need.

    Row ``r`` sees positions ``r + lo_offset <= x <= r + hi_offset`` (each bound only if its flag
    is set) and ``0 <= x < n_other``. Returns ``(start, full_start, full_end, end)``: tiles in
    ``[start, full_start)`` and ``[full_end, end)`` need the mask, those in
    ``[full_start, full_end)`` are seen whole by every row. Tile starts are multiples of BLOCK;
    nothing outside ``[start, end)`` is ever loaded.
    """
    lo = 0
    full_lo = 0
    hi = n_other
    full_hi = n_other
    if HAS_LO:
        lo = tl.maximum(first + lo_offset, 0)
        full_lo = tl.maximum(last + lo_offset, 0)
    if HAS_HI:
        hi = tl.maximum(tl.minimum(last + hi_offset + 1, n_other), 0)
        full_hi = tl.maximum(tl.minimum(first + hi_offset + 1, n_other), 0)
    start = lo // BLOCK * BLOCK
    full_start = tl.minimum(tl.maximum(start, (full_lo + BLOCK - 1) // BLOCK * BLOCK), hi)
    full_end = tl.maximum(full_start, full_hi // BLOCK * BLOCK)
    return start, full_start, full_end, hi


@triton.jit
def visible(rows, cols, seqlen_k, diag_offset, window_left, window_right,
            BOUND_LEFT: tl.constexpr, BOUND_RIGHT: tl.constexpr):
    """Query ``rows`` sees key ``cols`` iff ``cols < seqlen_k`` and
    ``rows + diag - left <= cols <= rows + diag + right`` (bounds only where set)."""
    seen = cols < seqlen_k
    if BOUND_RIGHT:
        seen = seen & (cols <= rows + diag_offset + window_right)
    if BOUND_LEFT:
        seen = seen & (cols >= rows + diag_offset - window_left)
    return seen


@triton.jit
def scores_base2(qk, rows, cols, qk_scale, softcap_in, alibi_slope, diag_offset,
                 SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scores in base 2 from raw ``qk = Q K^T`` and, with softcap, the tanh the backward needs:
    ``s = softcap * tanh(scale * qk / softcap) - slope * |rows + diag - cols|``, times log2(e).

    SOFTCAP: 0 = none, 1 = exact tanh, 2 = hardware tanh (see ``tanh``). With softcap the
    launcher passes ``softcap_in = scale / softcap`` and ``qk_scale = softcap * log2(e)``;
    without it ``qk_scale = scale * log2(e)``. ``alibi_slope`` is already times log2(e).
    ``rows``/``cols`` are broadcastable int vectors ([M, 1] and [1, N], or the transpose).
    """
    if SOFTCAP:
        capped = tanh(qk * softcap_in, SOFTCAP == 2)
        s = capped * qk_scale
    else:
        capped = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        # Integer distance, converted per score: measured faster on the H100 than converting
        # the index vectors first and subtracting in float (d64 forward +14% vs +50%).
        s = s - alibi_slope * tl.abs(rows + diag_offset - cols).to(tl.float32)
    return s, capped


@triton.jit
def recomputed_probs(qk, rows, cols, lse2, seqlen_k, diag_offset, window_left, window_right,
                     qk_scale, softcap_in, alibi_slope,
                     MASKED: tl.constexpr, BOUND_LEFT: tl.constexpr, BOUND_RIGHT: tl.constexpr,
                     SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """The backward's ``P = exp2(s - lse2)`` from raw ``qk``, 0 where hidden (MASKED tiles), and
    the tanh that softcap's gradient needs. ``rows``, ``cols`` and ``lse2`` come broadcastable
    to qk's orientation ([M, 1] / [1, N] / [M, 1], or transposed for P^T)."""
    s, capped = scores_base2(qk, rows, cols, qk_scale, softcap_in, alibi_slope, diag_offset, SOFTCAP, HAS_ALIBI)
    p = tl.math.exp2(s - lse2)
    if MASKED:
        seen = visible(rows, cols, seqlen_k, diag_offset, window_left, window_right, BOUND_LEFT, BOUND_RIGHT)
        p = tl.where(seen, p, 0.0)
    return p, capped


@triton.jit
def dropout_keep(seed, dropout_threshold, pid_b, pid_h, row_start, col_start,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bool ``[BLOCK_M, BLOCK_N]`` keep mask for queries ``row_start + [0, BLOCK_M)`` and keys
    ``col_start + [0, BLOCK_N)``: the definition in ``flashtile/philox.py``. ``row_start`` is a
    multiple of 16 and ``col_start`` of ``min(BLOCK_N, 64)`` (tile starts are).

    The tile is viewed as ``[BLOCK_M // 16, 2, 8, chunks, 8, 8]`` (row = 16 R + 8 h + a,
    key = 64 C + 8 g + t); one Philox call per (R, a, C, t) feeds the 2 x 8 scores over (h, g).
    In the accumulator layout (h, g) live in one thread's registers, so the compiler folds the
    byte selection into constants and each call is made once."""
    if BLOCK_N >= 64:
        CHUNKS: tl.constexpr = BLOCK_N // 64
        GROUPS: tl.constexpr = 8
        group = tl.arange(0, 8)  # key bits 3..5; the tile starts a 64-key chunk
    else:
        CHUNKS: tl.constexpr = 1
        GROUPS: tl.constexpr = BLOCK_N // 8
        group = (col_start // 8) % 8 + tl.arange(0, GROUPS)  # part of a chunk
    r = tl.arange(0, BLOCK_M // 16)[:, None, None, None, None, None]
    a = tl.arange(0, 8)[None, None, :, None, None, None]
    c = tl.arange(0, CHUNKS)[None, None, None, :, None, None]
    t = tl.arange(0, 8)[None, None, None, None, None, :]
    shape: tl.constexpr = [BLOCK_M // 16, 1, 8, CHUNKS, 1, 8]
    c0 = tl.broadcast_to(((col_start // 64 + c) * 8 + t).to(tl.uint32), shape)
    c1 = tl.broadcast_to((row_start + 16 * r + a).to(tl.uint32), shape)
    c2 = tl.zeros(shape, dtype=tl.uint32) + pid_h.to(tl.uint32)
    c3 = tl.zeros(shape, dtype=tl.uint32) + pid_b.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, n_rounds=7)
    h = tl.arange(0, 2)[None, :, None, None, None, None]
    g = group[None, None, None, None, :, None]
    word_index = 2 * h + g // 4  # byte (8 h + g) lies in word (8 h + g) // 4
    word = tl.where(word_index < 2, tl.where(word_index == 0, w0, w1), tl.where(word_index == 2, w2, w3))
    # byte >= threshold, compared in place: mask the byte, shift the threshold instead (one AND
    # and one compare per score; the shifted thresholds are loop invariants).
    shift = ((g % 4) * 8).to(tl.uint32)
    keep = (word & (0xFF << shift)) >= (dropout_threshold.to(tl.uint32) << shift)  # [R, 2, 8, CHUNKS, GROUPS, 8]
    return tl.reshape(keep, [BLOCK_M, BLOCK_N])
