"""The custom ops: schema/fake/autograd registration (opcheck) and torch.compile."""

import pytest
import torch
from helpers import make_qkv

import flashtile
from flashtile.autograd import attention_bwd, attention_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _options(features):
    """The custom ops' trailing arguments (see autograd.attention_fwd) for a few feature sets."""
    slopes = torch.rand(4, device=DEVICE) if "alibi" in features else None
    seed = torch.tensor(2**40 + 7) if "dropout" in features else None
    window = (5, 0) if "window" in features else (-1, 0) if "causal" in features else (-1, -1)
    return (0.25, *window, 2.0 if "softcap" in features else 0.0, slopes, 0.2 if "dropout" in features else 0.0, seed,
            "causal" in features)  # deterministic


FEATURE_SETS = [(), ("causal",), ("window", "softcap", "alibi", "dropout")]


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("features", FEATURE_SETS, ids=lambda f: "+".join(f) or "plain")
def test_opcheck(features, varlen):
    if varlen:
        q, k, v = (t[0] for t in make_qkv(1, 33, 40, 4, 2, 16, dtype=torch.float32, device=DEVICE))
        cu_q = torch.tensor([0, 13, 13, 33], dtype=torch.int32, device=DEVICE)
        cu_k = torch.tensor([0, 20, 25, 40], dtype=torch.int32, device=DEVICE)
        sequences = (cu_q, cu_k, 20, 20)
    else:
        q, k, v = make_qkv(2, 33, 40, 4, 2, 16, dtype=torch.float32, device=DEVICE)
        sequences = (None, None, 0, 0)
    options = _options(features)
    torch.library.opcheck(attention_fwd, (q, k, v, *sequences, *options))
    with torch.no_grad():
        out, lse = attention_fwd(q, k, v, *sequences, *options)
    dout = torch.randn_like(out)
    args = (dout, q.detach(), k.detach(), v.detach(), out, lse, *sequences, *options)
    torch.library.opcheck(attention_bwd, args)


class TinyBlock(torch.nn.Module):
    """One attention block; ``packed`` picks flash_attn_qkvpacked_func over flash_attn_func."""

    def __init__(self, packed, dim=32, heads=2):
        super().__init__()
        self.heads, self.packed = heads, packed
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        batch, seqlen, dim = x.shape
        qkv = self.qkv(x).view(batch, seqlen, 3, self.heads, dim // self.heads)
        if self.packed:
            out = flashtile.flash_attn_qkvpacked_func(qkv, causal=True)
        else:
            out = flashtile.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
        return self.proj(out.reshape(batch, seqlen, dim))


@pytest.mark.parametrize("packed", [False, True], ids=["flash_attn_func", "qkvpacked"])
def test_compile_fullgraph_forward_and_backward(packed):
    """No graph break, and compiled gradients equal eager ones."""
    torch._dynamo.reset()
    model = TinyBlock(packed).to(DEVICE)
    x = torch.randn(2, 40, 32, device=DEVICE)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # no C++ compile on CPU CI
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    assert torch.allclose(out, model(x), atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_compile_fullgraph_varlen_with_features():
    """varlen + window + softcap + ALiBi under torch.compile: no graph break, eager's gradients."""
    torch._dynamo.reset()
    q, k, v = (t[0] for t in make_qkv(1, 30, 30, 4, 2, 16, dtype=torch.float32, device=DEVICE))
    cu = torch.tensor([0, 7, 7, 30], dtype=torch.int32, device=DEVICE)
    slopes = torch.rand(3, 4, device=DEVICE)

    def step(q, k, v):
        return flashtile.flash_attn_varlen_func(q, k, v, cu, cu, 23, 23, causal=True, window_size=(4, 0),
                                                softcap=3.0, alibi_slopes=slopes).sum()

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    expected = torch.autograd.grad(step(q, k, v), (q, k, v))
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5)


def test_compile_fullgraph_dropout_is_seeded_by_torch():
    """Under torch.compile the dropout seed is drawn inside the graph from torch's generator:
    no graph break, the same manual_seed gives the same result, another seed another one."""
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 24, 24, 4, 2, 16, dtype=torch.float32, device=DEVICE)

    def step(q, k, v):
        return flashtile.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    torch.manual_seed(11)
    first = compiled(q, k, v)
    torch.manual_seed(11)
    again = compiled(q, k, v)
    torch.manual_seed(12)
    other = compiled(q, k, v)
    assert torch.equal(first, again) and not torch.equal(first, other)
    grads = torch.autograd.grad(first.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def _decode_inputs(paged):
    """A decode step's tensors: 2 sequences, 4 query heads over 2 KV heads, a new token each."""
    torch.manual_seed(5)
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    shape = (8, 16, 2, 16) if paged else (2, 64, 2, 16)
    k_cache, v_cache = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    k, v = torch.randn(2, 1, 2, 16, device=DEVICE), torch.randn(2, 1, 2, 16, device=DEVICE)
    angles = torch.rand(70, 4, device=DEVICE)
    extras = dict(cache_seqlens=torch.tensor([5, 40], dtype=torch.int32, device=DEVICE),
                  rotary_cos=angles.cos(), rotary_sin=angles.sin())
    if paged:
        extras["block_table"] = torch.tensor([[3, 1, 6, 0], [2, 7, 5, 4]], dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, k, v, extras


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_opcheck(paged):
    from flashtile.kvcache import kvcache_attention

    q, k_cache, v_cache, k, v, extras = _decode_inputs(paged)
    args = (q, k_cache, v_cache, k, v, extras["rotary_cos"], extras["rotary_sin"], True, True, extras["cache_seqlens"],
            0, 1, None, None, extras.get("block_table"), 0.25, -1, 0, 0.0, None, 0)
    torch.library.opcheck(kvcache_attention, args)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_compiles_without_graph_break(paged):
    """torch.compile(fullgraph=True) of a decode step (under no_grad: with grad mode on, inductor
    on the GPU rejects the op's in-place cache update, "a leaf Variable that requires grad is
    being used in an in-place operation"): same output and same cache as eager."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"

    def step(q, k_cache, v_cache, k, v, extras):
        return flashtile.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, causal=True, **extras)

    q, k_cache, v_cache, k, v, extras = _decode_inputs(paged)
    eager_caches = (k_cache.clone(), v_cache.clone())
    expected = step(q, *eager_caches, k, v, extras)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    with torch.no_grad():  # inference, as a serving loop runs it
        got = compiled(q, k_cache, v_cache, k, v, extras)
    assert torch.equal(got, expected)
    assert torch.equal(k_cache, eager_caches[0]) and torch.equal(v_cache, eager_caches[1])
