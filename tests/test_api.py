"""Argument validation, return values and the packed variants of the public API."""

import pytest
import torch
from helpers import make_qkv

import flashtile
from flashtile import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func


def qkv(dtype=torch.float16, **sizes):
    shape = dict(batch=2, seqlen_q=8, seqlen_k=8, heads_q=4, heads_k=2, head_dim=16)
    shape.update(sizes)
    return make_qkv(*shape.values(), dtype=dtype, grad=False)


def test_exports():
    assert set(flashtile.__all__) >= {"flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"}
    assert isinstance(flashtile.__version__, str)


@pytest.mark.parametrize(
    "mutate, error, words",
    [
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q, k.to(torch.int32), v), TypeError, "k must be float16, bfloat16 or float32"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "q must be float16"),
        (lambda q, k, v: (q, k, v.float()), TypeError, "v has dtype torch.float32 but q has torch.float16"),
        (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions"),
        (lambda q, k, v: (q, k.unsqueeze(0), v), ValueError, "k must have 4 dimensions"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "k has batch size 1 but q has 2"),
        (lambda q, k, v: (q, k, v[:, :5]), ValueError, "v has seqlen 5 but k has 8"),
        (lambda q, k, v: (q, k, v[:, :, :1]), ValueError, "v has 1 heads but k has 2"),
        (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "k has head dim 8 but q has 16"),
        (lambda q, k, v: (q, k, v[..., :8]), ValueError, "v has head dim 8 but q has 16"),
        (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "heads in q (3) must be a multiple"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, "heads in q (4) must be a multiple"),
        (lambda q, k, v: (q.to("meta"), k, v), ValueError, "k is on cpu but q is on meta"),
        (lambda q, k, v: (q.to("meta"), k.to("meta"), v.to("meta")), ValueError, "on meta; flashtile runs on"),
    ],
    ids=["q-not-tensor", "k-int", "fp64", "mixed-dtype", "q-rank", "k-rank", "batch", "kv-seqlen", "kv-heads",
         "k-headdim", "v-headdim", "gqa-ratio", "zero-kv-heads", "devices", "meta-device"],
)
def test_rejects_bad_tensors(mutate, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        flash_attn_func(*mutate(*qkv()))


def test_rejects_head_dim_over_256():
    q, k, v = qkv(head_dim=257)
    with pytest.raises(ValueError, match="q has head dim 257; flashtile supports head dims 1 to 256"):
        flash_attn_func(q, k, v)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a float or None"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a finite number >= 0"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite number"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(causal=None), TypeError, "causal must be a bool"),
        (dict(deterministic="yes"), TypeError, "deterministic must be a bool"),
        (dict(return_attn_probs=0), TypeError, "return_attn_probs must be a bool"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p="0"), TypeError, "dropout_p must be a float"),
        (dict(window_size=5), TypeError, "window_size must be a pair of ints"),
        (dict(window_size=(1.0, 2.0)), TypeError, "window_size must be a pair of ints"),
        (dict(softcap=None), TypeError, "softcap must be a float"),
        (dict(window_size=(4, -2)), ValueError, "window_size entries must be >= 0, or -1"),
        (dict(window_size=(True, 0)), TypeError, "window_size must be a pair of ints"),
        (dict(window_size=(1, 2, 3)), TypeError, "window_size must be a pair of ints"),
        (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
        (dict(softcap=float("inf")), ValueError, "softcap must be a finite number >= 0"),
        (dict(alibi_slopes=[1.0] * 4), TypeError, "alibi_slopes must be a torch.Tensor or None"),
        (dict(alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError, "alibi_slopes must be float32"),
        (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(nheads,\) = \(4,\)"),
        (dict(alibi_slopes=torch.ones(3, 4)), ValueError, r"or \(batch_size, nheads\) = \(2, 4\), got \(3, 4\)"),
        (dict(alibi_slopes=torch.ones(4, device="meta")), ValueError, "alibi_slopes is on meta but q is on cpu"),
    ],
    ids=lambda x: str(x) if not isinstance(x, dict) else "-".join(f"{k}={v}" for k, v in x.items())[:40],
)
def test_rejects_bad_options(kwargs, error, words):
    with pytest.raises(error, match=words):
        flash_attn_func(*qkv(), **kwargs)


def test_nothing_is_computed_before_validation(monkeypatch):
    import flashtile.interface as interface

    monkeypatch.setattr(interface, "attention", lambda *a: pytest.fail("kernel ran on bad input"))
    q, k, v = qkv()
    with pytest.raises(ValueError):
        flash_attn_func(q, k, v[:, :3])


def test_packed_shapes_are_checked():
    with pytest.raises(ValueError, match="qkv must have size 3 in dim 2"):
        flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="qkv must have 5 dimensions"):
        flash_attn_qkvpacked_func(torch.randn(1, 4, 3, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="kv must have size 2 in dim 2"):
        flash_attn_kvpacked_func(torch.randn(1, 4, 2, 8, dtype=torch.float16),
                                 torch.randn(1, 4, 3, 2, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match="kv must be a torch.Tensor"):
        flash_attn_kvpacked_func(torch.randn(1, 4, 2, 8, dtype=torch.float16), None)


def test_return_values():
    q, k, v = qkv()
    out = flash_attn_func(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype
    out2, lse, s_dmask = flash_attn_func(q, k, v, return_attn_probs=True)
    assert torch.equal(out, out2)
    assert lse.shape == (2, 4, 8) and lse.dtype == torch.float32
    assert s_dmask is None  # FlashAttention-2 returns S_dmask only with dropout


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = qkv()
    assert torch.equal(flash_attn_func(q, k, v), flash_attn_func(q, k, v, softmax_scale=16**-0.5))
    assert not torch.equal(flash_attn_func(q, k, v), flash_attn_func(q, k, v, softmax_scale=1.0))


def test_packed_variants_equal_the_unpacked_call():
    qkv_packed = torch.randn(2, 33, 3, 4, 16, dtype=torch.float16, requires_grad=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv_packed.unbind(2))
    out_packed = flash_attn_qkvpacked_func(qkv_packed, causal=True)
    out = flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out_packed, out)
    dout = torch.randn_like(out)
    out_packed.backward(dout)
    out.backward(dout)
    assert torch.equal(qkv_packed.grad, torch.stack([q.grad, k.grad, v.grad], dim=2))

    kv = torch.randn(2, 40, 2, 2, 16, dtype=torch.float16)
    q4 = torch.randn(2, 33, 4, 16, dtype=torch.float16)
    assert torch.equal(flash_attn_kvpacked_func(q4, kv), flash_attn_func(q4, kv[:, :, 0], kv[:, :, 1]))


def test_non_unit_last_stride_is_accepted():
    q, k, v = qkv()
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) != 1
    assert q_t.stride(-1) != 1
    assert torch.equal(flash_attn_func(q_t, k, v), flash_attn_func(q, k, v))


def test_lse_is_not_differentiable():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16, dtype=torch.float32)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.requires_grad and not lse.requires_grad


def test_rejects_too_many_heads_times_head_dim():
    q = torch.empty(1, 1, 2**15, 256, dtype=torch.float16).as_strided((1, 1, 2**15, 256), (1, 1, 0, 1))
    with pytest.raises(ValueError, match="q has nheads \\* headdim = 8388608"):
        flash_attn_func(q, q, q)


def test_huge_sequence_stride_is_copied_not_overflowed():
    """A view whose stride(1) times a tile height would overflow int32 is made contiguous."""
    big = torch.randn(2 * 2**23 + 64, dtype=torch.float16)
    q = big.as_strided((1, 2, 2, 16), (0, 2**23, 16, 1))
    assert q.stride(1) >= flashtile.autograd.MAX_SEQ_STRIDE
    assert torch.equal(flash_attn_func(q, q, q), flash_attn_func(q.contiguous(), q.contiguous(), q.contiguous()))


def test_gradient_with_huge_sequence_stride_is_copied():
    """The backward guards dO's layout the same way (autograd may hand over any strides)."""
    from flashtile.autograd import MAX_SEQ_STRIDE, kernel_layout

    q, k, v = make_qkv(1, 2, 2, 2, 2, 16, dtype=torch.float16)
    big = torch.randn(2 * 2**23 + 64, dtype=torch.float16)
    dout = big.as_strided((1, 2, 2, 16), (0, 2**23, 16, 1))
    assert dout.stride(1) >= MAX_SEQ_STRIDE and kernel_layout(dout).stride(1) < MAX_SEQ_STRIDE
    out = flash_attn_func(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), dout)
    expected = torch.autograd.grad(flash_attn_func(q, k, v), (q, k, v), dout.contiguous())
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
