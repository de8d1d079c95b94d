"""Host-side helpers shared by the kernel launchers."""

import contextlib

import torch
import triton

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)


def padded_head_dim(head_dim: int) -> int:
    """Tile width for a head dim: the next power of two, at least 16 (the MMA minimum).

    The tile is padded, never the tensor: loads and stores mask the extra columns.
    """
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 dots: tf32 would miss the tolerance rule by ~10x."""
    return "ieee" if dtype == torch.float32 else "tf32"


def device_guard(t: torch.Tensor):
    """Launch on the tensor's device, not on whatever device is current."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def shared_strides(a: torch.Tensor, b: torch.Tensor):
    """The kernels address K and V with one set of strides, which keeps one int32 offset tile
    in registers instead of two. When their strides differ (rare: views of one packed tensor
    share strides, as do two contiguous tensors) both are made contiguous."""
    if a.stride() == b.stride():
        return a, b
    return a.contiguous(), b.contiguous()
