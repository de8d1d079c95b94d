"""The custom ops: schema/fake/autograd registration (opcheck) and torch.compile."""

import pytest
import torch
from helpers import make_qkv

import flashtile
from flashtile.autograd import attention_bwd, attention_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_opcheck_forward(causal):
    q, k, v = make_qkv(2, 33, 40, 4, 2, 16, dtype=torch.float32, device=DEVICE)
    torch.library.opcheck(attention_fwd, (q, k, v, 0.25, causal))


def test_opcheck_backward():
    q, k, v = make_qkv(2, 33, 40, 4, 2, 16, dtype=torch.float32, device=DEVICE, grad=False)
    out, lse = attention_fwd(q, k, v, 0.25, True)
    dout = torch.randn_like(out)
    torch.library.opcheck(attention_bwd, (dout, q, k, v, out, lse, 0.25, True))


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
