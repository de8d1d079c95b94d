"""Host-side helpers shared by the kernel launchers."""

import contextlib
import importlib
from typing import NamedTuple

import torch
import triton
from triton.runtime import _allocation

from flashtile import configs, philox

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)


# The triton release line the Gluon kernels (ops/fwd_hopper.py, ops/bwd_hopper.py) were written and
# tested against. Gluon is experimental and its API moves between releases, so other versions take
# the tl kernels rather than risk a compile error at the first call.
GLUON_TRITON = (3, 6)


def on_gluon_triton() -> bool:
    """Whether the installed triton is the GLUON_TRITON release line (read at each call)."""
    return tuple(int(part) for part in triton.__version__.split(".")[:2]) == GLUON_TRITON


def load_gluon_module(name: str):
    """``flashtile.ops.<name>``, a Gluon kernel module, or None where the installed triton is not
    the GLUON_TRITON line or has no usable Gluon (flashtile supports triton 3.2 and later):
    every call then takes the ``tl`` kernels."""
    if not on_gluon_triton():
        return None
    try:
        return importlib.import_module(f"flashtile.ops.{name}")
    except ImportError:
        return None


def gluon_applies(q, k, features, varlen, *tensors, any_window=False) -> bool:
    """What both Hopper Gluon kernels require of a call (each launcher adds its table and tile
    rules): CUDA on sm90, 16-bit, dense (not varlen), non-empty, plain or causal attention
    (causal only with seqlen_k >= seqlen_q: no fully masked rows) or, with ``any_window``, any
    sliding window, softcap or not, no ALiBi or dropout, and ``tensors`` contiguous
    ``(B, S, H, D)`` and 16-byte aligned for TMA. Pure host checks."""
    if not (q.is_cuda and varlen is None and q.dtype in (torch.bfloat16, torch.float16)):
        return False
    batch, seqlen_q, n_heads, _ = q.shape
    causal = features.window_left < 0 and features.window_right == 0 and k.shape[1] >= seqlen_q
    return ((any_window or causal or not features.masked) and features.dropout_p == 0 and features.alibi_slopes is None
            and seqlen_q > 0 and batch * n_heads > 0
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)
            and configs.arch(q.device) == (9, 0))


def mask_admitted(features, seqlen_q, seqlen_k, window_min_keys) -> bool:
    """A Gluon kernel's mask rule: no mask, or causal with every row seeing key 0 (Sk >= Sq),
    always; any other window (causal with Sk < Sq included) when a row sees at least
    ``window_min_keys`` keys (each unbounded side counting seqlen_k; None: never)."""
    left, right = features.window_left, features.window_right
    if not features.masked or (left < 0 and right == 0 and seqlen_k >= seqlen_q):
        return True
    keys = min((left if left >= 0 else seqlen_k) + (right if right >= 0 else seqlen_k) + 1, seqlen_k)
    return window_min_keys is not None and keys >= window_min_keys


def padded_head_dim(head_dim: int) -> int:
    """Tile width for a head dim: the next power of two, at least 16 (the MMA minimum).

    The tile is padded, never the tensor: loads and stores mask the extra columns.
    """
    return max(16, 1 << (head_dim - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """Ceiling division for grid sizes. (``triton.cdiv`` is a constexpr function in triton 3.6
    and costs ~8 µs per host call, which every launch would pay.)"""
    return -(-a // b)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 dots: tf32 would miss the tolerance rule by ~10x."""
    return "ieee" if dtype == torch.float32 else "tf32"


def device_guard(t: torch.Tensor):
    """Launch on the tensor's device, not on whatever device is current."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _tma_allocator(size: int, alignment: int, stream):
    """Scratch for device-side tensor descriptors (128 bytes per program), from torch's cache."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator():
    """Device-side descriptors need triton's scratch allocator; install ours only where none is
    set, so a user's own allocator is left alone."""
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_tma_allocator)


def tma_aligned(*tensors) -> bool:
    """The hardware's rule for a tensor descriptor: a 16-byte aligned base address and every
    stride but the last a multiple of 16 bytes."""
    return all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


def stream_by_tma(cfg, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a kernel's loop reads its streamed tiles ``a`` and ``b`` (K/V, or Q/dO) through TMA
    descriptors: where the tile entry asks for it (``TileConfig.tma``: Hopper entries for long
    loops only), for 16-bit CUDA tensors with an unpadded head dim that are ``tma_aligned``."""
    head_dim = a.shape[-1]
    if not (cfg.tma and a.is_cuda and a.dtype != torch.float32 and head_dim == padded_head_dim(head_dim)):
        return False
    aligned = tma_aligned(a, b)
    if aligned:
        ensure_allocator()
    return aligned


def shared_strides(a: torch.Tensor, b: torch.Tensor):
    """The kernels address K and V with one set of strides, which keeps one int32 offset tile
    in registers instead of two. When their strides differ (rare: views of one packed tensor
    share strides, as do two contiguous tensors) both are made contiguous."""
    if a.stride() == b.stride():
        return a, b
    return a.contiguous(), b.contiguous()


class SequenceLayout(NamedTuple):
    """How a launch walks its sequences: dense ``(B, S, H, D)`` or packed varlen ``(total, H, D)``.

    Varlen tensors are addressed as one batch entry of length ``total`` with batch stride 0;
    each program adds its sequence's start from ``cu_seqlens``. (A NamedTuple: built on every
    launch, and cheaper to build than a frozen dataclass.)
    """
    batch: int
    max_seqlen_q: int
    max_seqlen_k: int
    total_q: int
    cu_seqlens_q: torch.Tensor  # int32 (B + 1,); any tensor (never read) when dense
    cu_seqlens_k: torch.Tensor
    is_varlen: bool
    seq_order: torch.Tensor  # int32 (B,): batch entries by decreasing seqlen_q (varlen launch order)

    def strides(self, t):
        """(batch, sequence, head) strides of q/k/v/out-like tensors."""
        strides = t.stride()
        if self.is_varlen:
            return 0, strides[0], strides[1]
        return strides[0], strides[1], strides[2]

    def lse_shape(self, n_heads):
        if self.is_varlen:
            return (n_heads, self.total_q)
        return (self.batch, n_heads, self.max_seqlen_q)

    def lse_strides(self, n_heads):
        """(batch, head) strides of the LSE (and of the backward's delta); rows are contiguous."""
        if self.is_varlen:
            return 0, self.total_q
        return n_heads * self.max_seqlen_q, self.max_seqlen_q


def sequence_layout(q, k, varlen) -> SequenceLayout:
    if varlen is None:
        return SequenceLayout(q.shape[0], q.shape[1], k.shape[1], q.shape[0] * q.shape[1], q, q, False, q)
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = varlen
    # Longest first: a long sequence launched last leaves a tail where few SMs work.
    seq_order = torch.argsort(cu_seqlens_q[1:] - cu_seqlens_q[:-1], descending=True, stable=True).to(torch.int32)
    return SequenceLayout(cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, q.shape[0],
                          cu_seqlens_q, cu_seqlens_k, True, seq_order)


class KernelFeatures(NamedTuple):
    """A call's ``Features`` as kernel arguments: the ALiBi slopes pointer and batch stride
    (positional), runtime scalars and constexpr flags (keywords)."""
    alibi: torch.Tensor  # the slopes; q when there are none (never read without HAS_ALIBI)
    stride_alibi_b: int
    runtime: dict
    flags: dict


def softcap_scales(features) -> tuple[float, float]:
    """``(qk_scale, softcap_in)``: scores are ``qk * qk_scale`` in base 2, or with softcap
    ``tanh(qk * softcap_in) * qk_scale`` (ops/score.py's ``scores_base2``)."""
    if features.softcap > 0:
        return features.softcap * LOG2E, features.softmax_scale / features.softcap
    return features.softmax_scale * LOG2E, 0.0


def feature_args(features, q) -> KernelFeatures:
    """The kernels' arguments for one call's ``Features``."""
    f = features
    slopes = f.alibi_slopes
    if f.softcap == 0 and slopes is None and f.dropout_p == 0:
        # The common case, kept cheap: this runs on every launch (three per training step).
        runtime = dict(qk_scale=f.softmax_scale * LOG2E, softcap_in=0.0,
                       window_left=max(f.window_left, 0), window_right=max(f.window_right, 0),
                       seed=0, dropout_threshold=0, dropout_scale=1.0)
        flags = dict(BOUND_LEFT=f.window_left >= 0, BOUND_RIGHT=f.window_right >= 0, SOFTCAP=0,
                     HAS_ALIBI=False, HAS_DROPOUT=False)
        return KernelFeatures(q, 0, runtime, flags)
    qk_scale, softcap_in = softcap_scales(f)
    runtime = dict(
        qk_scale=qk_scale, softcap_in=softcap_in,
        window_left=max(f.window_left, 0), window_right=max(f.window_right, 0),
        seed=f.seed, dropout_threshold=philox.threshold(f.dropout_p), dropout_scale=1.0 / philox.keep_probability(f.dropout_p),
    )
    softcap_mode = 0 if f.softcap == 0 else 2 if q.is_cuda and q.dtype != torch.float32 else 1
    flags = dict(BOUND_LEFT=f.window_left >= 0, BOUND_RIGHT=f.window_right >= 0, SOFTCAP=softcap_mode,
                 HAS_ALIBI=slopes is not None, HAS_DROPOUT=f.dropout_p > 0)
    if slopes is None:
        return KernelFeatures(q, 0, runtime, flags)
    return KernelFeatures(slopes, slopes.stride(0) if slopes.dim() == 2 else 0, runtime, flags)
