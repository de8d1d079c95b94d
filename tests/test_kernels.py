"""The Triton kernels against the float64 oracle, through the public API.

On a machine without a GPU the kernels run under Triton's interpreter on CPU tensors (fp16 and
fp32: the interpreter's bf16 dot is wrong, see DESIGN.md); with a GPU the same tests run the
compiled kernels, bf16 included. Larger shapes live in test_gpu.py.
"""

import contextlib

import pytest
import torch
from helpers import SMALL_SHAPES, case_id, check_against_oracle, make_qkv

import flashtile
from flashtile.autograd import use_triton_on_cpu

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# fp16 runs under the interpreter in CI; on a GPU this matrix runs bf16 (fp16 at real sizes is
# in test_gpu.py), which keeps the number of kernel compilations down.
DTYPES = [torch.bfloat16] if HAS_CUDA else [torch.float16]


def kernels():
    """Route CPU tensors through the Triton kernels (under the interpreter)."""
    return contextlib.nullcontext() if HAS_CUDA else use_triton_on_cpu()


def kernel_attention(causal, softmax_scale=None):
    def attn(q, k, v):
        with kernels():
            out, lse, _ = flashtile.flash_attn_func(
                q, k, v, causal=causal, softmax_scale=softmax_scale, return_attn_probs=True
            )
        return out, lse

    return attn


def backward_with_kernels(out, inputs, dout):
    with kernels():
        return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=[case_id(*s) for s in SMALL_SHAPES])
def test_matches_oracle(shape, causal, dtype):
    q, k, v = make_qkv(*shape, dtype=dtype, device=DEVICE)
    with kernels():
        check_against_oracle(kernel_attention(causal), q, k, v, causal=causal)


FP32_SHAPES = [(1, 65, 65, 2, 1, 64), (1, 17, 129, 2, 2, 40), (2, 129, 63, 3, 1, 128)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", FP32_SHAPES, ids=[case_id(*s) for s in FP32_SHAPES])
def test_fp32_matches_oracle(shape, causal):
    q, k, v = make_qkv(*shape, dtype=torch.float32, device=DEVICE)
    with kernels():
        check_against_oracle(kernel_attention(causal), q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_large_scores_and_custom_scale(causal):
    """std-4 inputs give scores in the hundreds: the online softmax must not overflow."""
    q, k, v = make_qkv(2, 65, 80, 4, 2, 32, dtype=torch.float16, device=DEVICE, std=4.0)
    with kernels():
        check_against_oracle(kernel_attention(causal, 0.3), q, k, v, causal=causal, softmax_scale=0.3)


def test_packed_qkv_views_read_in_place():
    """q, k, v unbound from one (B, S, 3, H, D) tensor have row stride 3*H*D; no copy is made
    and the gradient lands in the packed tensor."""
    qkv = torch.randn(2, 65, 3, 4, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    q, k, v = qkv.unbind(2)
    assert q.stride(1) == 3 * 4 * 32
    with kernels():
        check_against_oracle(kernel_attention(True), q, k, v, causal=True)
        out = flashtile.flash_attn_qkvpacked_func(qkv, causal=True)
        out.sum().backward()
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()


def test_fully_masked_rows_are_zero_with_zero_gradients():
    """Causal with seqlen_q > seqlen_k: the first Sq - Sk rows see no key."""
    q, k, v = make_qkv(1, 40, 9, 2, 2, 32, dtype=torch.float16, device=DEVICE)
    with kernels():
        out, lse, _ = flashtile.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        dq, dk, dv = backward_with_kernels(out, (q, k, v), torch.randn_like(out))
    masked = slice(0, 40 - 9)
    assert torch.equal(out[:, masked], torch.zeros_like(out[:, masked]))
    assert torch.isinf(lse[:, :, masked]).all() and (lse[:, :, masked] > 0).all()
    assert torch.equal(dq[:, masked], torch.zeros_like(dq[:, masked]))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize(
    "shape",
    [(0, 16, 16, 2, 2, 32), (2, 0, 16, 2, 2, 32), (2, 16, 0, 2, 2, 32), (2, 0, 0, 2, 2, 32)],
    ids=["batch0", "seqlen_q0", "seqlen_k0", "both0"],
)
def test_empty_inputs(shape):
    q, k, v = make_qkv(*shape, dtype=torch.float16, device=DEVICE)
    with kernels():
        out, lse, _ = flashtile.flash_attn_func(q, k, v, return_attn_probs=True)
        dq, dk, dv = backward_with_kernels(out, (q, k, v), torch.randn_like(out))
    assert out.shape == q.shape and lse.shape == (shape[0], shape[3], shape[1])
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not out.isnan().any() and torch.equal(out, torch.zeros_like(out))  # no keys: zeros
    assert torch.isinf(lse).all()
    for g in (dq, dk, dv):
        assert torch.equal(g, torch.zeros_like(g))


def test_delta_kernel_zero_fills_the_dq_accumulator():
    """``launch_delta``'s zero fill (the Gluon backward's float32 dQ accumulator, zeroed in the
    pass that computes delta): every element zero, partial row blocks and padded head dims too,
    and delta as without it."""
    from flashtile.ops.bwd import launch_delta

    dtype = DTYPES[0]
    out, dout = (torch.randn(2, 40, 3, 24, device=DEVICE).to(dtype) for _ in range(2))
    zero = torch.full(out.shape, float("nan"), dtype=torch.float32, device=DEVICE)
    delta, plain = (torch.full((2, 3, 40), float("nan"), device=DEVICE) for _ in range(2))
    with kernels():
        launch_delta(out, dout, delta, zero=zero)
        launch_delta(out, dout, plain)
    assert torch.equal(zero, torch.zeros_like(zero))
    assert torch.equal(delta, plain)
    torch.testing.assert_close(delta, (out.float() * dout.float()).sum(-1).transpose(1, 2))


def test_backward_is_bitwise_reproducible():
    q, k, v = make_qkv(2, 70, 90, 6, 2, 48, dtype=torch.float16, device=DEVICE)
    dout = torch.randn(2, 70, 6, 48, device=DEVICE, dtype=torch.float16)
    grads = []
    for _ in range(2):
        with kernels():
            out = flashtile.flash_attn_func(q, k, v, causal=True, deterministic=True)
            grads.append(backward_with_kernels(out, (q, k, v), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kv_as_b", [False, True], ids=["kv-as-a", "kv-as-b"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dkdv_operand_orientations(kv_as_b, causal, monkeypatch):
    """Both orientations of the dK/dV loop (a TileConfig choice) meet the tolerance rule."""
    import dataclasses

    from flashtile.ops import bwd

    real = bwd.tile_config
    monkeypatch.setattr(bwd, "tile_config", lambda *a, **kw: dataclasses.replace(real(*a, **kw), kv_as_b=kv_as_b))
    q, k, v = make_qkv(2, 70, 45, 4, 2, 40, dtype=torch.float16, device=DEVICE)
    with kernels():
        check_against_oracle(kernel_attention(causal), q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradient_layout_does_not_matter(causal):
    """dO laid out unlike Q (here heads-first) takes the kernels' separate-stride path, with no
    copy; it must give bitwise the gradients of a contiguous dO."""
    q, k, v = make_qkv(2, 50, 70, 6, 2, 32, dtype=torch.float16, device=DEVICE)
    dout = torch.randn(2, 50, 6, 32, device=DEVICE, dtype=torch.float16)
    dout_heads_first = dout.transpose(1, 2).contiguous().transpose(1, 2)
    assert dout_heads_first.stride() != q.stride()
    with kernels():
        out = flashtile.flash_attn_func(q, k, v, causal=causal)
        expected = backward_with_kernels(out, (q, k, v), dout)
        out = flashtile.flash_attn_func(q, k, v, causal=causal)
        got = backward_with_kernels(out, (q, k, v), dout_heads_first)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
