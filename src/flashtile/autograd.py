"""Autograd for the kernels, two ways over the same forward/backward implementations.

* Under ``torch.compile`` the kernels are ``torch.library`` custom ops (``flashtile::fwd``,
  ``flashtile::bwd``) with fake impls and registered autograd, so ``fullgraph=True`` sees two
  opaque ops and no graph break.
* In eager mode a plain ``torch.autograd.Function`` calls the same implementations: the
  custom-op dispatch costs ~100 us of CPU time per call (measured: 124 us vs 10 us for the
  bare launcher on the dev machine's CPU), which at short sequence lengths is longer than the
  kernel itself and left the GPU idle between calls.

The implementation is picked from the tensors' device: Triton kernels for CUDA tensors, the
blockwise PyTorch path (``cpu.py``) for CPU tensors, or the Triton kernels under Triton's
interpreter for CPU tensors while ``use_triton_on_cpu`` is set (tests).

``varlen`` is ``None`` for dense ``(B, S, H, D)`` inputs, or ``(cu_seqlens_q, cu_seqlens_k,
max_seqlen_q, max_seqlen_k)`` for packed ``(total, H, D)`` ones.
"""

import contextlib
import threading
from typing import Optional

import torch
from torch import Tensor

from flashtile import cpu
from flashtile.features import Features

_state = threading.local()

# The kernels step through a sequence with int32 increments of BLOCK * stride(1) (BLOCK <= 256);
# larger sequence strides are copied to a contiguous layout, whose stride is nheads * headdim.
MAX_SEQ_STRIDE = 2**31 // 256


def kernel_layout(t: Tensor) -> Tensor:
    """``t`` itself when the kernels can read it in place (unit stride in the head dim, sequence
    stride below MAX_SEQ_STRIDE), otherwise a contiguous copy. The sequence dim is -3."""
    return t if t.stride(-1) == 1 and t.stride(-3) < MAX_SEQ_STRIDE else t.contiguous()


@contextlib.contextmanager
def use_triton_on_cpu():
    """Run CPU tensors through the Triton kernels (needs ``TRITON_INTERPRET=1``, set before
    triton is first imported). For testing the kernels on machines without a GPU."""
    previous = getattr(_state, "triton_on_cpu", False)
    _state.triton_on_cpu = True
    try:
        yield
    finally:
        _state.triton_on_cpu = previous


def uses_triton(t: Tensor) -> bool:
    return t.is_cuda or getattr(_state, "triton_on_cpu", False)


def _run_forward(q, k, v, f: Features, varlen):
    if uses_triton(q):
        from flashtile.ops import flash_fwd

        return flash_fwd(q, k, v, f, varlen)
    if varlen is not None:
        return cpu.varlen_forward(q, k, v, f, *varlen[:2])
    return cpu.attention_forward(q, k, v, f)


def _run_backward(dout, q, k, v, out, lse, f: Features, varlen):
    dout = kernel_layout(dout)  # the gradient arrives in whatever layout autograd chose
    if uses_triton(q):
        from flashtile.ops import flash_bwd

        return flash_bwd(dout, q, k, v, out, lse, f, varlen)
    if varlen is not None:
        return cpu.varlen_backward(dout, q, k, v, out, lse, f, *varlen[:2])
    return cpu.attention_backward(dout, q, k, v, out, lse, f)


# The custom ops take the Features and varlen description as flat, schema-typed arguments.
def _features(softmax_scale, window_left, window_right, softcap, alibi_slopes, dropout_p, seed,
              deterministic) -> Features:
    return Features(softmax_scale, window_left, window_right, softcap, alibi_slopes, dropout_p,
                    0 if seed is None else int(seed), deterministic)


def _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    return None if cu_seqlens_q is None else (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@torch.library.custom_op("flashtile::fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int,
    softcap: float, alibi_slopes: Optional[Tensor], dropout_p: float, seed: Optional[Tensor], deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """Returns ``(out, lse)``; out shaped like q, lse float32 (B, Hq, Sq) or (Hq, total_q)."""
    f = _features(softmax_scale, window_left, window_right, softcap, alibi_slopes, dropout_p, seed, deterministic)
    return _run_forward(q, k, v, f, _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


@attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, *args):
    if cu_seqlens_q is None:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    else:
        lse_shape = (q.shape[1], q.shape[0])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("flashtile::bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
    dropout_p: float, seed: Optional[Tensor], deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv)``, contiguous, shaped like ``(q, k, v)``."""
    f = _features(softmax_scale, window_left, window_right, softcap, alibi_slopes, dropout_p, seed, deterministic)
    return _run_backward(dout, q, k, v, out, lse, f, _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


@attention_bwd.register_fake
def _(dout, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = options
    ctx.mark_non_differentiable(lse)


def _custom_op_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, *ctx.options)
    return (dq, dk, dv) + (None,) * len(ctx.options)


attention_fwd.register_autograd(_custom_op_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, f, varlen):
        out, lse = _run_forward(q, k, v, f, varlen)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.features, ctx.varlen = f, varlen
        ctx.mark_non_differentiable(lse)
        # lse takes no gradient: without this autograd would fill a zero tensor for it on every
        # backward (a kernel launch, for an argument the backward ignores).
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _run_backward(dout, q, k, v, out, lse, ctx.features, ctx.varlen)
        return dq, dk, dv, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, f: Features, varlen=None) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` with autograd: the custom op when compiling, the cheaper Function in eager."""
    if torch.compiler.is_compiling():
        # The seed becomes a tensor input, drawn inside the graph from torch's generator.
        seed = torch.randint(2**32, 2**62, (), dtype=torch.int64) if f.dropout_p > 0 else None
        cu_q, cu_k, max_q, max_k = varlen if varlen is not None else (None, None, 0, 0)
        return attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, f.softmax_scale, f.window_left, f.window_right,
                             f.softcap, f.alibi_slopes, f.dropout_p, seed, f.deterministic)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(q, k, v, f, varlen)
    return _run_forward(q, k, v, f, varlen)  # inference: no autograd bookkeeping at all
