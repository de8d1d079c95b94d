"""Input builders and the FlashAttention tolerance rule, shared by the test files."""

import torch

from flashtile.reference import attention_ref, attention_varlen_ref


def make_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, dtype, device="cpu", std=1.0, grad=True):
    def rand(seqlen, heads):
        t = (torch.randn(batch, seqlen, heads, head_dim, device=device) * std).to(dtype)
        return t.requires_grad_(grad)

    return rand(seqlen_q, heads_q), rand(seqlen_k, heads_k), rand(seqlen_k, heads_k)


def max_abs_diff(a, b):
    """Largest |a - b| over the entries where b is finite (0.0 when there are none)."""
    finite = torch.isfinite(b)
    if not finite.any():
        return 0.0
    return (a.double() - b.double())[finite].abs().max().item()


def assert_tolerance_rule(name, ours, oracle, lowp):
    """FlashAttention's rule: ``max|ours - oracle| <= 2 * max|lowp - oracle| + 1e-5``.

    ``lowp`` is the same reference computed in the input precision: one tensor, or a pair
    computed in two operation orders (as FlashAttention's tests do with ``reorder_ops``), in
    which case PyTorch's error is the larger of the two. NaN never passes, and the +inf
    entries (LSE of fully masked rows) must sit exactly where the oracle has them.
    """
    lowps = lowp if isinstance(lowp, (tuple, list)) else (lowp,)
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    assert not torch.isnan(ours).any(), f"{name} contains NaN"
    inf_ours, inf_oracle = torch.isinf(ours), torch.isinf(oracle)
    assert torch.equal(inf_ours, inf_oracle), f"{name}: infinities differ from the oracle's"
    assert torch.equal(ours[inf_ours] > 0, oracle[inf_oracle] > 0), f"{name}: signs of infinities differ"
    err = max_abs_diff(ours, oracle)
    base = max(max_abs_diff(lo, oracle) for lo in lowps)
    assert err <= 2 * base + 1e-5, f"{name}: max error {err:.3e} > 2 * {base:.3e} + 1e-5 (PyTorch's own error)"


def check_against_oracle(attn, q, k, v, causal=False, softmax_scale=None, grads=True, varlen=None, **features):
    """Run ``attn(q, k, v) -> (out, lse)`` forward (and backward) and apply the tolerance rule
    to out, lse, dq, dk and dv. The oracle differentiates float64 copies of the inputs, so its
    gradients are not rounded back to the input dtype.

    ``varlen``: ``(cu_seqlens_q, cu_seqlens_k)`` for packed inputs. ``features``: the oracle's
    keyword arguments (window_size, softcap, alibi_slopes, dropout_p, dropout_mask).
    """
    out, lse = attn(q, k, v)
    if varlen is None:
        def oracle(*tensors, **kwargs):
            return attention_ref(*tensors, **kwargs)
    else:
        def oracle(*tensors, **kwargs):
            return attention_varlen_ref(*tensors, *varlen, **kwargs)
    kwargs = dict(causal=causal, softmax_scale=softmax_scale, **features)
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    ref_out, ref_lse = oracle(q64, k64, v64, **kwargs)
    lowp = [oracle(q, k, v, upcast=False, reorder_ops=r, **kwargs) for r in (False, True)]
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_tolerance_rule("out", out, ref_out, [lo[0] for lo in lowp])
    assert_tolerance_rule("lse", lse, ref_lse, [lo[1] for lo in lowp])
    if not grads:
        return
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    low = [torch.autograd.grad(lo[0], (q, k, v), dout) for lo in lowp]
    for i, (name, g, r, t) in enumerate(zip(("dq", "dk", "dv"), got, ref, (q, k, v))):
        assert g.dtype == t.dtype, f"{name} has dtype {g.dtype}, expected {t.dtype}"
        assert_tolerance_rule(name, g, r, [lo[i] for lo in low])


def case_id(batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim):
    return f"b{batch}-sq{seqlen_q}-sk{seqlen_k}-h{heads_q}x{heads_k}-d{head_dim}"


# (batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim): small enough for Triton's
# interpreter, shaped to cross tile boundaries (interpreter tiles are 16 wide).
SMALL_SHAPES = (
    [(1, s, s, 4, 2, 64) for s in (1, 2, 17, 63, 65, 127, 129)]  # seqlens around tile edges
    + [(1, 17, 129, 2, 2, 64), (1, 129, 17, 2, 2, 64), (1, 1, 65, 2, 2, 64), (1, 65, 1, 2, 2, 64),
       (2, 63, 200, 2, 1, 64)]  # seqlen_q != seqlen_k both ways
    + [(1, 47, 33, 2, 1, d) for d in (32, 40, 64, 80, 96, 128, 160, 192, 256)]  # head dims
    + [(1, 40, 40, 3, 1, 8), (1, 40, 40, 8, 1, 16), (1, 40, 40, 3, 3, 24), (3, 31, 50, 6, 2, 64)]  # GQA/MQA, odd batch
    + [(2, 33, 20, 4, 2, 1), (2, 20, 33, 4, 4, 3)]  # head dims below the 16-wide minimum tile
)
