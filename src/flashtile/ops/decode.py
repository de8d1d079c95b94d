"""Attention over a KV cache (contiguous or paged), split along the keys: decoding and paged prefill.

A decode step reads the whole cache for a handful of query rows, so it is bound by memory
bandwidth, and a grid of batch x KV heads programs leaves most of an H100's 132 SMs idle at
small batch. Here each program takes one KV head of one sequence, *all* the query rows that
share that head (``group = Hq / Hk`` heads x ``seqlen_q`` queries, packed as the rows of one
tile, so every K/V tile is read once per group) and one of ``num_splits`` slices of the keys.
With more than one split each program writes an unnormalised partial (float32 output and
base-2 LSE) and ``_combine_kernel`` merges the slices in float32.

Keys are addressed by their cache position (``features.KVCache``): contiguous caches through
a row per sequence, paged ones through the block table, one page lookup per key, so any page
size works and a tile may span pages. Sequence lengths, left padding and the block table are
read on the device: a new length never recompiles and nothing waits for the host.
"""

import torch
import triton
import triton.language as tl

from flashtile import configs
from flashtile.ops.common import LOG2E, cdiv, device_guard, dot_precision, feature_args, padded_head_dim
from flashtile.ops.launch import FastLaunch
from flashtile.ops.score import scores_base2, visible

# At most this many slices of the keys (the combine kernel reads all of them per row).
MAX_SPLITS = 128
# A split gets at least this many key tiles: fewer would spend more on the prologue and the
# combine than the split saves.
MIN_TILES_PER_SPLIT = 4


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "seqlen_new", "num_m_blocks", "num_splits", "total_tokens",
                               "window_left", "window_right"])
def _cache_attention_kernel(
    Q, K, V, OUT, LSE, O_PART, LSE_PART,
    SEQLENS, BATCH_IDX, LEFTPAD, BLOCK_TABLE, CU_SEQLENS_Q, ALIBI,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_table_b, stride_lse_b, stride_lse_h, stride_alibi_b,
    seqlen_q, seqlen_k, seqlen_new, n_heads, group_size, num_m_blocks, num_splits, total_tokens,
    qk_scale, softcap_in, window_left, window_right,
    VARLEN_Q: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
    BOUND_LEFT: tl.constexpr, BOUND_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grid: (num_m_blocks * num_splits * batch * n_kv_heads,), row tiles fastest, so the
    # programs that read one KV head's slice run side by side.
    # PAGE_SIZE: 0 for a contiguous cache. Rows of a tile are (query i, head g of the group)
    # pairs, row = i * group_size + g.
    if PDL:  # the combine kernel may be scheduled now; it waits for this grid's results itself
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_split = (pid // num_m_blocks) % num_splits
    pid_bk = pid // (num_m_blocks * num_splits)
    n_kv_heads = n_heads // group_size
    pid_b = pid_bk // n_kv_heads
    pid_kh = pid_bk % n_kv_heads

    if VARLEN_Q:
        token_begin = tl.load(CU_SEQLENS_Q + pid_b)
        q_len = tl.load(CU_SEQLENS_Q + pid_b + 1) - token_begin
        q_first = token_begin  # q's own sequence index of query 0 (batch stride 0)
    else:
        token_begin = pid_b * seqlen_q
        q_len = seqlen_q
        q_first = 0
    n_rows = q_len * group_size
    row_start = pid_m * BLOCK_M
    if row_start >= n_rows:  # varlen: a shorter sequence than the longest
        return

    if HAS_SEQLENS:
        k_end = tl.load(SEQLENS + pid_b) + seqlen_new
    else:
        k_end = seqlen_k
    k_begin = 0
    if HAS_LEFTPAD:
        k_begin = tl.load(LEFTPAD + pid_b)
    diag = k_end - q_len  # query i's diagonal is key i + diag (bottom-right alignment)

    offs_row = row_start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    mask_row = offs_row < n_rows
    offs_i = offs_row // group_size  # query index within the sequence
    heads = pid_kh * group_size + offs_row % group_size  # query head of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    # The keys some row of this tile sees, then this program's slice of them (whole tiles).
    last_i = (tl.minimum(row_start + BLOCK_M, n_rows) - 1) // group_size
    lo = k_begin
    hi = k_end
    if BOUND_LEFT:
        lo = tl.maximum(lo, row_start // group_size + diag - window_left)
    if BOUND_RIGHT:
        hi = tl.minimum(hi, last_i + diag + window_right + 1)
    tile_lo = lo // BLOCK_N * BLOCK_N
    n_tiles = tl.maximum(hi - tile_lo + BLOCK_N - 1, 0) // BLOCK_N
    tiles_per_split = (n_tiles + num_splits - 1) // num_splits
    start_n = tile_lo + pid_split * tiles_per_split * BLOCK_N
    end_n = tl.minimum(start_n + tiles_per_split * BLOCK_N, hi)

    q_ptrs = (Q + pid_b.to(tl.int64) * stride_qb + (q_first + offs_i).to(tl.int64)[:, None] * stride_qs
              + heads.to(tl.int64)[:, None] * stride_qh + offs_d[None, :])
    q = tl.load(q_ptrs, mask=mask_row[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(ALIBI + pid_b * stride_alibi_b + heads, mask=mask_row, other=0.0)[:, None]
        alibi_slope = alibi_slope * 1.4426950408889634

    k_head = K + pid_kh.to(tl.int64) * stride_kh
    v_head = V + pid_kh.to(tl.int64) * stride_vh
    if PAGE_SIZE == 0:
        cache_row = pid_b
        if HAS_BATCH_IDX:
            cache_row = tl.load(BATCH_IDX + pid_b)
        k_head += cache_row.to(tl.int64) * stride_kb
        v_head += cache_row.to(tl.int64) * stride_vb
    pages = BLOCK_TABLE + pid_b.to(tl.int64) * stride_table_b
    # Paged: each tile's page numbers are loaded one iteration ahead, so the K/V loads never wait
    # on the block table. WHOLE_PAGES (tiles never straddle a page): one number per tile, and the
    # tile's rows are addressed like a contiguous cache's.
    WHOLE_PAGES: tl.constexpr = PAGE_SIZE > 0 and PAGE_SIZE % BLOCK_N == 0
    if WHOLE_PAGES:
        next_page = tl.load(pages + start_n // PAGE_SIZE, mask=start_n < end_n, other=0)
    elif PAGE_SIZE > 0:
        first_keys = start_n + offs_n
        next_page = tl.load(pages + first_keys // PAGE_SIZE, mask=first_keys < end_n, other=0)  # [BLOCK_N]
    offs_kn = offs_n[:, None] * stride_ks + offs_d[None, :]  # [BLOCK_N, BLOCK_D] int32 offsets within a tile
    offs_vn = offs_n[:, None] * stride_vs + offs_d[None, :]
    k_tile = k_head + start_n.to(tl.int64) * stride_ks  # contiguous: the current tile's first row
    v_tile = v_head + start_n.to(tl.int64) * stride_vs

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for tile_start in range(start_n, end_n, BLOCK_N):
        offs_key = tile_start + offs_n  # [BLOCK_N] cache positions
        mask_key = (offs_key >= lo) & (offs_key < end_n)
        mask_kd = mask_key[:, None] & mask_d[None, :]
        if PAGE_SIZE == 0 or WHOLE_PAGES:
            if WHOLE_PAGES:
                page = next_page.to(tl.int64)
                next_page = tl.load(pages + (tile_start + BLOCK_N) // PAGE_SIZE, mask=tile_start + BLOCK_N < end_n,
                                    other=0)
                row = tile_start % PAGE_SIZE  # the tile's first row in its page (int32: < PAGE_SIZE)
                k_tile = k_head + page * stride_kb + row * stride_ks
                v_tile = v_head + page * stride_vb + row * stride_vs
            k = tl.load(k_tile + offs_kn, mask=mask_kd, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_tile + offs_vn, mask=mask_kd, other=0.0)  # [BLOCK_N, BLOCK_D]
        else:
            page = next_page.to(tl.int64)  # [BLOCK_N]
            next_keys = offs_key + BLOCK_N
            next_page = tl.load(pages + next_keys // PAGE_SIZE, mask=next_keys < end_n, other=0)
            in_page = offs_key % PAGE_SIZE
            k_rows = k_head + page * stride_kb + in_page * stride_ks
            v_rows = v_head + page * stride_vb + in_page * stride_vs
            k = tl.load(k_rows[:, None] + offs_d[None, :], mask=mask_kd, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_rows[:, None] + offs_d[None, :], mask=mask_kd, other=0.0)  # [BLOCK_N, BLOCK_D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        s, _ = scores_base2(qk, offs_i[:, None], offs_key[None, :], qk_scale, softcap_in, alibi_slope, diag,
                            SOFTCAP, HAS_ALIBI)
        seen = visible(offs_i[:, None], offs_key[None, :], k_end, diag, window_left, window_right,
                       BOUND_LEFT, BOUND_RIGHT) & mask_key[None, :]
        s = tl.where(seen, s, float("-inf"))  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: exp2 -> 0, not NaN
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        if PAGE_SIZE == 0:
            k_tile += BLOCK_N * stride_ks
            v_tile += BLOCK_N * stride_vs

    has_keys = l_i > 0.0
    safe_l = tl.where(has_keys, l_i, 1.0)
    out = acc * tl.where(has_keys, 1.0 / safe_l, 0.0)[:, None]  # [BLOCK_M, BLOCK_D]
    tokens = (token_begin + offs_i).to(tl.int64)  # [BLOCK_M] rows of the (tokens, Hq, D) output
    out_rows = tokens * n_heads + heads
    mask_out = mask_row[:, None] & mask_d[None, :]
    if SPLIT:
        part = pid_split.to(tl.int64) * total_tokens * n_heads + out_rows  # [BLOCK_M]
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_out)
        tl.store(LSE_PART + part, tl.where(has_keys, m_i + tl.math.log2(safe_l), float("-inf")), mask=mask_row)
    else:
        tl.store(OUT + out_rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=mask_out)
        lse = tl.where(has_keys, (m_i + tl.math.log2(safe_l)) / 1.4426950408889634, float("inf"))
        lse_ptrs = LSE + pid_b.to(tl.int64) * stride_lse_b + heads.to(tl.int64) * stride_lse_h + q_first + offs_i
        tl.store(lse_ptrs, lse, mask=mask_row)


_cache_attention_launch = FastLaunch(_cache_attention_kernel)


@triton.jit(do_not_specialize=["total_tokens", "num_splits", "seqlen_q"])
def _combine_kernel(
    O_PART, LSE_PART, OUT, LSE, total_tokens, n_heads, num_splits, seqlen_q, stride_lse_b, stride_lse_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    """One output row (token, head): the splits' outputs weighted by exp(lse_s - lse), in float32.
    Rows no split saw (every lse_s = -inf) get out = 0 and lse = +inf. PDL: launched as a
    programmatic dependent of the split kernel (its launch overlaps that kernel), so it first
    waits for the split kernel's writes."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)  # token * n_heads + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    parts = offs_s.to(tl.int64) * total_tokens * n_heads + row  # [BLOCK_S]
    lse_s = tl.load(LSE_PART + parts, mask=mask_s, other=float("-inf"))  # base 2
    lse_max = tl.max(lse_s, 0)
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.math.exp2(lse_s - shift)  # [BLOCK_S], 0 for empty splits
    total = tl.sum(weights, 0)
    o_s = tl.load(O_PART + parts[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=mask_s[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(o_s * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(OUT + row * HEAD_DIM + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM)
    token = row // n_heads
    head = row % n_heads
    lse = tl.where(total > 0.0, (shift + tl.math.log2(tl.where(total > 0.0, total, 1.0))) / 1.4426950408889634,
                   float("inf"))
    tl.store(LSE + (token // seqlen_q) * stride_lse_b + head * stride_lse_h + token % seqlen_q, lse)


_combine_launch = FastLaunch(_combine_kernel)


def _tile(q, head_dim, rows):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): rows of the packed tile (at least 16, the MMA's
    minimum; a decode step of one query per head uses group_size of them) and the keys' entry of
    ``configs.DECODE_TILES``."""
    if not q.is_cuda:  # the interpreter: tiny tiles that tiny test shapes still cross
        return 16, 16, 4, 1
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n, num_warps, num_stages = configs.DECODE_TILES[padded_head_dim(head_dim)]
    return block_m, block_n, num_warps, num_stages


def split_count(requested: int, work: int, max_keys: int, block_n: int, n_sms: int) -> int:
    """How many slices the keys are split into.

    ``requested`` > 0 is taken as given (capped at one tile per split and MAX_SPLITS). 0 picks:
    one slice when the ``work`` programs (batch x KV heads x row tiles) already give every SM
    two; otherwise enough slices that the grid does (``2 * n_sms`` programs), but no split shorter
    than MIN_TILES_PER_SPLIT tiles of the longest sequence (``max_keys``). Two programs per SM:
    at batch 1 (8 KV heads, 33 splits) this reached 40 / 55 / 83 / 97% of the copy bandwidth at
    4k / 8k / 32k / 128k keys; one per SM (17 splits) 31-45 / 70 / 80%, the extra programs
    leaving a tail (bench_decode.py, docs/performance.md)."""
    tiles = max(cdiv(max_keys, block_n), 1)
    if requested > 0:
        return max(1, min(requested, tiles, MAX_SPLITS))
    if work >= 2 * n_sms:
        return 1
    wanted = cdiv(2 * n_sms, max(work, 1))
    return max(1, min(wanted, tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))


def cache_attention(q, cache, features, num_splits=0, varlen_q=None, max_keys=None):
    """Attention of q over ``cache`` (a ``features.KVCache``), forward only.

    q: (B, Sq, Hq, D), or (total_q, Hq, D) with ``varlen_q = (cu_seqlens_q, max_seqlen_q)``.
    Returns ``(out, lse)``: out (B, Sq, Hq, D) / (total_q, Hq, D) in q's dtype, lse float32
    (B, Hq, Sq) / (Hq, total_q); rows that see no key get out = 0 and lse = +inf.
    ``max_keys``: the longest sequence's end where the caller knows it (the split heuristic's
    input), else the cache's capacity.
    """
    k_cache, v_cache = cache.k_cache, cache.v_cache
    head_dim, n_heads, n_kv_heads = q.shape[-1], q.shape[-2], k_cache.shape[2]
    group = n_heads // n_kv_heads
    if varlen_q is None:
        batch, seqlen_q = q.shape[0], q.shape[1]
        total_tokens = batch * seqlen_q
        lse = torch.empty((batch, n_heads, seqlen_q), dtype=torch.float32, device=q.device)
        stride_qb, stride_qs, stride_qh = q.stride()[:3]
        stride_lse_b, stride_lse_h, lse_seqlen = n_heads * seqlen_q, seqlen_q, seqlen_q
        cu_seqlens_q = q
    else:
        cu_seqlens_q, seqlen_q = varlen_q
        batch, total_tokens = cu_seqlens_q.shape[0] - 1, q.shape[0]
        lse = torch.empty((n_heads, total_tokens), dtype=torch.float32, device=q.device)
        stride_qb, (stride_qs, stride_qh) = 0, q.stride()[:2]
        stride_lse_b, stride_lse_h, lse_seqlen = 0, total_tokens, max(total_tokens, 1)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total_tokens == 0 or batch == 0 or n_heads == 0:
        return out, lse.fill_(float("inf"))

    rows = seqlen_q * group
    block_m, block_n, num_warps, num_stages = _tile(q, head_dim, rows)
    num_m_blocks = cdiv(rows, block_m)
    work = batch * n_kv_heads * num_m_blocks
    n_sms = configs.sm_count(q.device) if q.is_cuda else 4
    splits = split_count(num_splits, work, cache.capacity if max_keys is None else max_keys, block_n, n_sms)
    if splits > 1:
        o_part = torch.empty((splits, total_tokens, n_heads, head_dim), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, total_tokens, n_heads), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = lse
    args = feature_args(features, q)
    paged = cache.block_table is not None
    # Hopper's programmatic dependent launch for the combine kernel (configs.DECODE_PDL).
    pdl = splits > 1 and configs.DECODE_PDL and q.is_cuda and configs.arch(q.device) >= (9, 0)
    placeholder = cu_seqlens_q  # any tensor: pointers the flags say are never read
    with device_guard(q):
        _cache_attention_launch[(work * splits,)](
            q, k_cache, v_cache, out, lse, o_part, lse_part,
            placeholder if cache.seqlens is None else cache.seqlens,
            placeholder if cache.batch_idx is None else cache.batch_idx,
            placeholder if cache.leftpad is None else cache.leftpad,
            cache.block_table if paged else placeholder,
            cu_seqlens_q, args.alibi,
            stride_qb, stride_qs, stride_qh,
            *k_cache.stride()[:3], *v_cache.stride()[:3],
            cache.block_table.stride(0) if paged else 0, stride_lse_b, stride_lse_h, args.stride_alibi_b,
            seqlen_q, cache.seqlen, cache.seqlen_new, n_heads, group, num_m_blocks, splits, total_tokens,
            args.runtime["qk_scale"], args.runtime["softcap_in"], args.runtime["window_left"],
            args.runtime["window_right"],
            VARLEN_Q=varlen_q is not None, HAS_SEQLENS=cache.seqlens is not None,
            HAS_BATCH_IDX=cache.batch_idx is not None, HAS_LEFTPAD=cache.leftpad is not None,
            PAGE_SIZE=k_cache.shape[1] if paged else 0, SPLIT=splits > 1, PDL=pdl,
            BOUND_LEFT=args.flags["BOUND_LEFT"], BOUND_RIGHT=args.flags["BOUND_RIGHT"],
            SOFTCAP=args.flags["SOFTCAP"], HAS_ALIBI=args.flags["HAS_ALIBI"],
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=padded_head_dim(head_dim),
            DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
        )
        if splits > 1:
            _combine_launch[(total_tokens * n_heads,)](
                o_part, lse_part, out, lse, total_tokens, n_heads, splits, lse_seqlen, stride_lse_b, stride_lse_h,
                HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_S=max(2, 1 << (splits - 1).bit_length()),
                PDL=pdl, num_warps=4 if head_dim > 64 else 2, launch_pdl=pdl,
            )
    return out, lse
