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
"""

import contextlib
import threading

import torch
from torch import Tensor

from flashtile import cpu

_state = threading.local()

# The kernels step through a sequence with int32 increments of BLOCK * stride(1) (BLOCK <= 256);
# larger sequence strides are copied to a contiguous layout, whose stride is nheads * headdim.
MAX_SEQ_STRIDE = 2**31 // 256


def kernel_layout(t: Tensor) -> Tensor:
    """``t`` itself when the kernels can read it in place (unit stride in the head dim, sequence
    stride below MAX_SEQ_STRIDE), otherwise a contiguous copy."""
    return t if t.stride(-1) == 1 and t.stride(1) < MAX_SEQ_STRIDE else t.contiguous()


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


def _uses_triton(t: Tensor) -> bool:
    return t.is_cuda or getattr(_state, "triton_on_cpu", False)


def _run_forward(q, k, v, softmax_scale, causal):
    if _uses_triton(q):
        from flashtile.ops import flash_fwd

        return flash_fwd(q, k, v, softmax_scale, causal)
    return cpu.attention_forward(q, k, v, softmax_scale, causal)


def _run_backward(dout, q, k, v, out, lse, softmax_scale, causal):
    dout = kernel_layout(dout)  # the gradient arrives in whatever layout autograd chose
    if _uses_triton(q):
        from flashtile.ops import flash_bwd

        return flash_bwd(dout, q, k, v, out, lse, softmax_scale, causal)
    return cpu.attention_backward(dout, q, k, v, out, lse, softmax_scale, causal)


@torch.library.custom_op("flashtile::fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """Returns ``(out, lse)``; out (B, Sq, Hq, D) contiguous, lse float32 (B, Hq, Sq)."""
    return _run_forward(q, k, v, softmax_scale, causal)


@attention_fwd.register_fake
def _(q, k, v, softmax_scale, causal):
    batch, seqlen_q, n_heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, n_heads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("flashtile::bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, softmax_scale: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv)``, contiguous, shaped like ``(q, k, v)``."""
    return _run_backward(dout, q, k, v, out, lse, softmax_scale, causal)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.mark_non_differentiable(lse)


def _custom_op_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal)
    return dq, dk, dv, None, None


attention_fwd.register_autograd(_custom_op_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal):
        output = _run_forward(q, k, v, softmax_scale, causal)
        _setup_context(ctx, (q, k, v, softmax_scale, causal), output)
        return output

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _run_backward(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal)
        return dq, dk, dv, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` with autograd: the custom op when compiling, the cheaper Function in eager."""
    if torch.compiler.is_compiling():
        return attention_fwd(q, k, v, softmax_scale, causal)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(q, k, v, softmax_scale, causal)
    return _run_forward(q, k, v, softmax_scale, causal)  # inference: no autograd bookkeeping at all
