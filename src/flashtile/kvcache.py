"""Inference over a KV cache: ``flash_attn_with_kvcache`` and paged ``flash_attn_varlen_func``.

Both validate everything before anything is written, describe the cache as a
``features.KVCache`` and run ``ops.decode.cache_attention`` (CUDA, or Triton's interpreter
in tests) or ``cpu.cache_forward`` (CPU tensors). Forward only: there is no gradient.

The values inside the index tensors (``cache_seqlens``, ``cache_batch_idx``,
``cache_leftpad``, ``block_table``) are range-checked too, in one device-to-host copy when
they live on the GPU. That copy waits for the GPU, so it is skipped while a CUDA graph is
being captured or under ``torch.compile``, and can be switched off with
``flashtile.configs.CHECK_CACHE_INDICES = False`` (serving loops that build their indices
themselves); an out-of-range index then reads or writes outside the cache.
"""

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from flashtile import configs, cpu
from flashtile.autograd import uses_triton
from flashtile.features import Features, KVCache
from flashtile.interface import (
    MAX_HEAD_DIM, _check_alibi, _check_cu_seqlens, _check_options, _check_tensor, _features,
)
from flashtile.rotary import apply_rotary

_LAYOUT = "(batch, seqlen, nheads, headdim)"


def _check_index_tensor(name, t, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as in FlashAttention-2), got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _check_cache_tensors(q, k_cache, v_cache, paged, names=("k_cache", "v_cache")):
    """Dtypes, devices, strides and shapes of the caches against q (dense or packed)."""
    layout = "(num_blocks, page_block_size, nheads_k, headdim)" if paged else \
        "(batch_size_cache, seqlen_cache, nheads_k, headdim)"
    k_name, v_name = names
    for name, t in ((k_name, k_cache), (v_name, v_cache)):
        _check_tensor(name, t, 4, layout)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have stride 1 in its last dim (it is read and written in place), "
                             f"got strides {t.stride()}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{v_name} has shape {tuple(v_cache.shape)} but {k_name} has {tuple(k_cache.shape)}; "
                         f"they must be equal")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q is on {q.device}; flashtile runs on CUDA GPUs and on the CPU")
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    if k_cache.shape[-1] != head_dim:
        raise ValueError(f"{k_name} has head dim {k_cache.shape[-1]} but q has {head_dim}; they must be equal")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {head_dim}; flashtile supports head dims 1 to {MAX_HEAD_DIM}")
    n_kv_heads = k_cache.shape[2]
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(f"the number of heads in q ({n_heads}) must be a multiple of the number in {k_name} "
                         f"and {v_name} ({n_kv_heads}) (GQA/MQA)")
    if paged and k_cache.shape[1] == 0:
        raise ValueError(f"{k_name} has page_block_size 0; pages must hold at least one token")


def _check_block_table(block_table, batch, device):
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor or None, got {type(block_table).__name__}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must have shape (batch_size, max_num_blocks_per_seq) with batch_size = "
                         f"{batch}, got {tuple(block_table.shape)}")
    _check_index_tensor("block_table", block_table, tuple(block_table.shape), device)


def _check_new_kv(q, k_cache, k, v):
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values to append), or both None")
    if k is None:
        return
    batch, n_kv_heads, head_dim = q.shape[0], k_cache.shape[2], q.shape[3]
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t, 4, _LAYOUT)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
        if t.shape[0] != batch or t.shape[2] != n_kv_heads or t.shape[3] != head_dim:
            raise ValueError(f"{name} must have shape (batch_size, seqlen_new, nheads_k, headdim) = ({batch}, "
                             f"seqlen_new, {n_kv_heads}, {head_dim}), got {tuple(t.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; they must be equal")


def _check_rotary(q, k, rotary_cos, rotary_sin, rotary_interleaved):
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {type(rotary_interleaved).__name__}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together, or both None")
    if rotary_cos is None:
        return
    if k is None:
        raise ValueError("rotary_cos/rotary_sin need the new k and v to append (as in FlashAttention-2): the "
                         "cached keys were rotated when they were appended")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (seqlen_ro, rotary_dim / 2), got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"rotary_sin has shape {tuple(rotary_sin.shape)} but rotary_cos has "
                         f"{tuple(rotary_cos.shape)}; they must be equal")
    rotary_dim = 2 * rotary_cos.shape[1]
    if not 0 < rotary_dim <= q.shape[-1]:
        raise ValueError(f"rotary_cos has {rotary_cos.shape[1]} columns, so rotary_dim = {rotary_dim}; it must be "
                         f"between 2 and headdim = {q.shape[-1]}")


def _check_cache_lengths(cache_seqlens, cache_leftpad, cache_batch_idx, batch, device):
    if cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor):
        if not isinstance(cache_seqlens, int) or isinstance(cache_seqlens, bool):
            raise TypeError(f"cache_seqlens must be an int, an int32 tensor of shape (batch_size,) or None, got "
                            f"{type(cache_seqlens).__name__}")
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
    if isinstance(cache_seqlens, torch.Tensor):
        _check_index_tensor("cache_seqlens", cache_seqlens, (batch,), device)
    for name, t in (("cache_leftpad", cache_leftpad), ("cache_batch_idx", cache_batch_idx)):
        if t is not None:
            _check_index_tensor(name, t, (batch,), device)


def _host_values(tensors):
    """The int32 tensors' values as NumPy arrays, through one device-to-host copy if on the GPU."""
    if not tensors[0].is_cuda:
        return [t.numpy() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu().numpy()
    sizes = [t.numel() for t in tensors]
    parts = np.split(flat, np.cumsum(sizes)[:-1])
    return [part.reshape(t.shape) for part, t in zip(parts, tensors)]


def _check_index_values(cache: KVCache, device, seqlen_ro=None, max_rotated_offset=0):
    """Range checks on the values of the index tensors, read in one device-to-host copy (none
    for Python ints and CPU tensors) and checked with NumPy. Rotated positions are
    ``seqlens[b] + j`` for ``j <= max_rotated_offset``; ``seqlen_ro``: rows of rotary_cos (None
    without rotary)."""
    if not configs.CHECK_CACHE_INDICES or torch.compiler.is_compiling():
        return
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    capacity, num_rows = cache.capacity, cache.k_cache.shape[0]
    names = [name for name in ("seqlens", "leftpad", "batch_idx", "block_table") if getattr(cache, name) is not None]
    values = dict(zip(names, _host_values([getattr(cache, name) for name in names]))) if names else {}
    begins = values.get("seqlens", np.array([cache.seqlen - cache.seqlen_new]))
    if begins.size == 0:
        return  # batch 0
    begins = begins.astype(np.int64)
    ends = begins + cache.seqlen_new
    if begins.min() < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {begins.min()}")
    if ends.max() > capacity:
        raise ValueError(f"cache_seqlens + seqlen_new reaches {ends.max()} but the cache holds {capacity} positions "
                         f"per sequence")
    if "leftpad" in values and ((values["leftpad"] < 0).any() or (values["leftpad"] > begins).any()):
        raise ValueError("cache_leftpad must satisfy 0 <= cache_leftpad[b] <= cache_seqlens[b]")
    for name, table, what in (("cache_batch_idx", values.get("batch_idx"), "sequences"),
                              ("block_table", values.get("block_table"), "pages")):
        if table is None:
            continue
        if name == "block_table":  # only the slots below each sequence's end are read
            page_size = cache.k_cache.shape[1]
            table = table[np.arange(table.shape[1])[None, :] < -(-ends // page_size)[:, None]]
        if table.size and (table.min() < 0 or table.max() >= num_rows):
            raise ValueError(f"{name} must index k_cache's {num_rows} {what} (0 to {num_rows - 1})"
                             f"{' in every slot a sequence uses' if name == 'block_table' else ''}, got values from "
                             f"{table.min()} to {table.max()}")
    if seqlen_ro is not None and begins.max() + max_rotated_offset >= seqlen_ro:
        raise ValueError(f"rotary_cos/rotary_sin have {seqlen_ro} rows but position {begins.max() + max_rotated_offset} "
                         f"is rotated; they need a row for every position up to cache_seqlens + seqlen - 1")


def flash_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
    cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
    window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
    return_softmax_lse=False,
):
    """Attention of q over a KV cache, after appending the new k and v to it in place.

    FlashAttention-2's ``flash_attn_with_kvcache``, for decoding (``seqlen_q = 1``), speculative
    decoding and chunked prefill (``seqlen_q > 1``). Inference only: no gradient.

    If k and v are given, they are written into ``k_cache``/``v_cache`` at positions
    ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1`` of sequence b (rotated first when
    ``rotary_cos``/``rotary_sin`` are given), and attention covers the cache *including* them:
    sequence b attends cache positions ``[cache_leftpad[b], cache_seqlens[b] + seqlen_new)``.
    Nothing else in the cache is touched, and ``cache_seqlens`` is not updated: the caller
    advances it. Masks are bottom-right aligned: with ``causal=True``, query i (of seqlen_q)
    sees the keys up to position ``cache_seqlens[b] + seqlen_new - seqlen_q + i``.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim), float16, bfloat16 or float32.
        k_cache, v_cache: (batch_size_cache, seqlen_cache, nheads_k, headdim) without a block
            table, or (num_blocks, page_block_size, nheads_k, headdim) with one (any page size
            >= 1; powers of two such as 16, 64 or 256 are the usual choice). Same dtype as q,
            stride 1 in the last dim; written in place when k and v are given.
        k, v: (batch_size, seqlen_new, nheads_k, headdim) or None: new keys and values to append.
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) or None. Rotary embedding of the
            first rotary_dim dims of q and k (the rest pass through), in float32; k at positions
            ``cache_seqlens + j``, q at ``cache_seqlens + i`` when causal or windowed, else all
            at ``cache_seqlens``. Needs k and v.
        cache_seqlens: int, int32 tensor (batch_size,), or None: each sequence's length in the
            cache before the append. None: the whole cache (seqlen_cache, or the block table's
            pages) is valid, and k/v cannot be given.
        cache_batch_idx: int32 (batch_size,) or None: the cache row of each sequence (default b).
            Not with block_table.
        cache_leftpad: int32 (batch_size,) or None: the first valid cache position of each
            sequence (left padding); positions before it are ignored.
        block_table: int32 (batch_size, max_num_blocks_per_seq) or None: paged cache; position p
            of sequence b lives in page ``block_table[b, p // page_block_size]``.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as in ``flash_attn_func``
            (masks relative to each sequence's end as above).
        rotary_interleaved: bool. Rotate pairs (0, 1), (2, 3), ... (GPT-J) if True, else the
            halves (i, i + rotary_dim / 2) (GPT-NeoX).
        num_splits: int >= 0. Slices the keys are split into, each a program, merged in float32
            afterwards: 1 = no split, 0 = chosen from the batch, heads and cache length
            (``ops/decode.py``'s ``split_count``, docs/semantics.md).
        return_softmax_lse: bool. Also return the float32 (batch_size, nheads, seqlen_q) LSE.
    Return:
        out: (batch_size, seqlen_q, nheads, headdim), q's dtype; and softmax_lse if asked
            (+inf for rows that see no key, whose output is 0).
    """
    _check_tensor("q", q, 4, _LAYOUT)
    _check_cache_tensors(q, k_cache, v_cache, paged=block_table is not None)
    batch, seqlen_q, n_heads, _ = q.shape
    if block_table is not None:
        _check_block_table(block_table, batch, q.device)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be used with block_table (each sequence's pages already "
                             "come from its block_table row), as in FlashAttention-2")
    elif cache_batch_idx is None and k_cache.shape[0] < batch:
        raise ValueError(f"k_cache holds {k_cache.shape[0]} sequences but q has batch size {batch}; pass "
                         f"cache_batch_idx to pick rows, or a cache with at least batch_size rows")
    _check_new_kv(q, k_cache, k, v)
    _check_rotary(q, k, rotary_cos, rotary_sin, rotary_interleaved)
    _check_options(0.0, softmax_scale, causal, window_size, softcap, alibi_slopes, False, False)
    if not isinstance(return_softmax_lse, bool):
        raise TypeError(f"return_softmax_lse must be a bool, got {type(return_softmax_lse).__name__}")
    if not isinstance(num_splits, int) or isinstance(num_splits, bool):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0 = heuristic), got {num_splits}")
    _check_cache_lengths(cache_seqlens, cache_leftpad, cache_batch_idx, batch, q.device)
    _check_alibi(alibi_slopes, q, batch, n_heads)
    if k is not None and cache_seqlens is None:
        raise ValueError("cache_seqlens is needed to append k and v: it says where each sequence's new tokens go")

    seqlen_new = 0 if k is None else k.shape[1]
    is_tensor = isinstance(cache_seqlens, torch.Tensor)
    # ``seqlen`` (every sequence's end) only matters without a seqlens tensor: an int cache_seqlens
    # plus the new tokens, or the whole cache.
    cache = KVCache(k_cache, v_cache, cache_seqlens if is_tensor else None,
                    cache_seqlens + seqlen_new if isinstance(cache_seqlens, int) else 0, seqlen_new,
                    cache_batch_idx, cache_leftpad, block_table)
    if cache_seqlens is None:
        cache = cache._replace(seqlen=cache.capacity)
    capacity = cache.capacity
    # FlashAttention-2's rule for rotating each query at its own position: causal or local.
    left, right = window_size
    local = causal or 0 <= left < capacity or 0 <= right < capacity
    rotated_queries = seqlen_q if local else 1
    _check_index_values(cache, q.device, None if rotary_cos is None else rotary_cos.shape[0],
                        max(seqlen_new, rotated_queries) - 1)

    f = _features(q, 0.0, softmax_scale, causal, window_size, softcap, alibi_slopes, False, seqlen_q, capacity)
    if torch.compiler.is_compiling():  # one opaque op in the graph (the cache mutation declared)
        out, lse = kvcache_attention(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved, local,
                                     cache.seqlens, cache.seqlen, seqlen_new, cache_batch_idx, cache_leftpad,
                                     block_table, f.softmax_scale, f.window_left, f.window_right, f.softcap,
                                     f.alibi_slopes, num_splits)
    else:
        out, lse = _run(q, k, v, cache, f, rotary_cos, rotary_sin, rotary_interleaved, local, num_splits)
    return (out, lse) if return_softmax_lse else out


def _run(q, k, v, cache, f, rotary_cos, rotary_sin, rotary_interleaved, local, num_splits, varlen_q=None,
         max_keys=None):
    """Append (and rotate), then attend: the kernels for CUDA tensors (or the interpreter), else the
    CPU path. ``varlen_q``: ``(cu_seqlens_q, max_seqlen_q)`` for packed queries (paged varlen, no
    append); ``max_keys``: the longest sequence's end if the caller knows it."""
    rotary = None if rotary_cos is None else (rotary_cos, rotary_sin, rotary_interleaved)
    if uses_triton(q):  # the kernels write fresh tensors: no autograd graph to switch off
        seqlens = cache.seqlens
        if max_keys is None and seqlens is None:
            max_keys = cache.seqlen
        elif max_keys is None and not seqlens.is_cuda and seqlens.numel():  # known without a device sync
            max_keys = int(seqlens.max()) + cache.seqlen_new
        return _run_triton(q, k, v, cache, f, rotary, local, num_splits, max_keys, varlen_q)
    with torch.no_grad():
        return _run_cpu(q, k, v, cache, f, rotary, local, varlen_q)


# Under torch.compile the call is this custom op (its arguments already validated by the caller).
# Eager calls skip it: the custom-op dispatch costs ~100 us per call (autograd.py).
@torch.library.custom_op("flashtile::kvcache_attention", mutates_args=("k_cache", "v_cache"))
def kvcache_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
    rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], rotary_interleaved: bool, rotate_per_query: bool,
    cache_seqlens: Optional[Tensor], seqlen: int, seqlen_new: int, cache_batch_idx: Optional[Tensor],
    cache_leftpad: Optional[Tensor], block_table: Optional[Tensor], softmax_scale: float, window_left: int,
    window_right: int, softcap: float, alibi_slopes: Optional[Tensor], num_splits: int,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of flash_attn_with_kvcache; k/v (if given) appended into the caches in place."""
    cache = KVCache(k_cache, v_cache, cache_seqlens, seqlen, seqlen_new, cache_batch_idx, cache_leftpad, block_table)
    f = Features(softmax_scale, window_left, window_right, softcap, alibi_slopes)
    return _run(q, k, v, cache, f, rotary_cos, rotary_sin, rotary_interleaved, rotate_per_query, num_splits)


@kvcache_attention.register_fake
def _(q, *args):
    batch, seqlen_q, n_heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, n_heads, seqlen_q), dtype=torch.float32)


def _run_triton(q, k, v, cache, f, rotary, local, num_splits, max_keys, varlen_q):
    from flashtile.ops.append import rotary_store
    from flashtile.ops.decode import cache_attention

    def unit_stride(t):  # the kernels read rows with unit stride in the last dim; others are copied
        return t if t is None or t.stride(-1) == 1 else t.contiguous()

    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    if rotary is not None:
        rotary = (unit_stride(rotary[0]), unit_stride(rotary[1]), rotary[2])
    base = cache.seqlens if cache.seqlens is not None else cache.seqlen - cache.seqlen_new
    if k is not None:
        rotary_store(k, cache.k_cache, base, rotary, cache)
        rotary_store(v, cache.v_cache, base, None, cache)
    if rotary is not None:
        q = rotary_store(q, torch.empty(q.shape, dtype=q.dtype, device=q.device), base, rotary, None,
                         position_step=1 if local else 0)
    return cache_attention(q, cache, f, num_splits, varlen_q, max_keys)


def _run_cpu(q, k, v, cache, f, rotary, local, varlen_q):
    if k is None and rotary is None:
        return cpu.cache_forward(q, cache, f, varlen_q)
    batch, seqlen_q = q.shape[:2]
    base = cache.seqlens.tolist() if cache.seqlens is not None else [cache.seqlen - cache.seqlen_new] * batch
    if rotary is not None:
        cos, sin, interleaved = rotary
        starts = torch.tensor(base, dtype=torch.long)[:, None]
        k = apply_rotary(k, cos, sin, starts + torch.arange(k.shape[1]), interleaved)
        q = apply_rotary(q, cos, sin, starts + torch.arange(seqlen_q) * int(local), interleaved)
    if k is not None:
        cpu.cache_append(k, cache.k_cache, cache, base)
        cpu.cache_append(v, cache.v_cache, cache, base)
    return cpu.cache_forward(q, cache, f)


def paged_varlen_attention(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           block_table, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           return_attn_probs):
    """``flash_attn_varlen_func`` with ``block_table``: packed queries over a paged K/V cache.
    Sequence b's keys are positions ``[0, cu_seqlens_k[b + 1] - cu_seqlens_k[b])`` of its pages.
    Forward only (as the ``block_table`` path of FlashAttention-2)."""
    _check_tensor("q", q, 3, "(total_q, nheads, headdim)")
    _check_cache_tensors(q, k_cache, v_cache, paged=True, names=("k", "v"))
    _check_options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, False, return_attn_probs)
    if dropout_p > 0:
        raise ValueError(f"dropout_p must be 0 with block_table (paged K/V is forward only), got {dropout_p}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise ValueError("block_table (paged K/V) is forward only: call under torch.no_grad() or "
                         "torch.inference_mode(), or pass tensors that do not require grad")
    _check_cu_seqlens(q, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    batch = cu_seqlens_q.shape[0] - 1
    _check_block_table(block_table, batch, q.device)
    _check_alibi(alibi_slopes, q, batch, q.shape[1])
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    cache = KVCache(k_cache, v_cache, lengths, 0, 0, None, None, block_table)
    _check_index_values(cache, q.device)
    f = _features(q, 0.0, softmax_scale, causal, window_size, softcap, alibi_slopes, False, max_seqlen_q,
                  max_seqlen_k)
    out, lse = _run(q, None, None, cache, f, None, None, False, False, 0, varlen_q=(cu_seqlens_q, max_seqlen_q),
                    max_keys=max_seqlen_k)
    return (out, lse, None) if return_attn_probs else out
