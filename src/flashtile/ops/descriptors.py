"""TMA tensor descriptors for the Gluon kernels' launches (host side), built cheaply: short calls
are bound by the host (``bench/host_bound.py``), and a forward + backward builds eight.

* ``NVMMASharedLayout.get_default_for`` works a layout out in Python on every call (12 us on the
  dev CPU): the layouts are cached per (block, dtype), a handful in all.
* ``TensorDescriptor.from_tensor`` wants a view of the shape the kernel reads (a torch view costs
  ~5 us on the H100 host) and re-checks alignment and strides each time. The launchers hand
  ``descriptor`` the contiguous tensor and the row-major shape to read it as, which they have
  checked (``common.gluon_applies``: contiguous, 16-byte aligned; the head dims of the Gluon
  tables make every row a multiple of 16 bytes).
"""

import functools

import torch
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


@functools.lru_cache(maxsize=None)
def shared_layout(block: tuple, dtype: torch.dtype):
    """The swizzled shared-memory layout TMA and warpgroup MMAs use for ``block``-shaped tiles of
    ``dtype`` (bf16, fp16 or float32)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPES[dtype])


def descriptor(tensor: torch.Tensor, shape: tuple, block: tuple) -> TensorDescriptor:
    """A TMA descriptor over contiguous ``tensor`` read as the row-major ``shape`` (the same
    elements), moving ``block``-shaped boxes in ``shared_layout(block, tensor.dtype)``: what
    ``TensorDescriptor.from_tensor(tensor.view(shape), block, layout)`` builds, without the view
    and the checks (see the module docstring)."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides = tensor, list(shape), strides
    desc.block_shape, desc.layout, desc.padding = list(block), shared_layout(block, tensor.dtype), "zero"
    return desc
