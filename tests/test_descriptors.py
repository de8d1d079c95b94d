"""``ops/descriptors``: the Gluon launchers' TMA descriptors equal what triton's own
``TensorDescriptor.from_tensor`` builds on a view of the same shape (CPU: descriptors are host
objects until launch)."""

import pytest
import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.nvidia.compiler import CUDABackend
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from flashtile.ops.descriptors import descriptor, shared_layout

CASES = [  # (tensor shape, shape read as, block)
    ((2, 256, 4, 128), (512, 512), (64, 128)),  # q as (B * S, H * D)
    ((2, 256, 2, 64), (2, 256, 128), (1, 128, 64)),  # k as (B, S, Hk * D), one batch entry per box
    ((1, 128, 3, 256), (128, 768), (64, 32)),
]


def fields(desc):
    return (desc.base.data_ptr(), list(desc.shape), list(desc.strides), list(desc.block_shape), desc.layout,
            desc.padding)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "x".join(map(str, case[1])))
def test_descriptor_equals_triton_from_tensor_on_a_view(case, dtype):
    tensor_shape, shape, block = case
    tensor = torch.randn(tensor_shape).to(dtype)
    layout = gl.NVMMASharedLayout.get_default_for(list(block), {torch.bfloat16: gl.bfloat16, torch.float16:
                                                                gl.float16, torch.float32: gl.float32}[dtype])
    expected = TensorDescriptor.from_tensor(tensor.view(shape), list(block), layout)
    built = descriptor(tensor, shape, block)
    assert type(built) is TensorDescriptor
    assert fields(built) == fields(expected)
    # The compiled kernel is chosen by the descriptor's type string: the same one.
    assert (native_specialize_impl(CUDABackend, built, False, True, True)
            == native_specialize_impl(CUDABackend, expected, False, True, True))


def test_shared_layouts_are_cached_per_block_and_dtype():
    assert shared_layout((64, 128), torch.bfloat16) is shared_layout((64, 128), torch.bfloat16)
    assert shared_layout((64, 128), torch.bfloat16) != shared_layout((64, 32), torch.float32)
