"""FlashAttention-2's extra features -- varlen, sliding window, softcap, ALiBi, dropout -- alone
and in every pair, with causal masks and GQA, forward and backward, against the float64 oracle
under the tolerance rule. Each case runs both the Triton kernels (under the interpreter
without a GPU) and the CPU path."""

import contextlib
import itertools

import pytest
import torch
from helpers import check_against_oracle, make_qkv

import flashtile
from flashtile import philox
from flashtile.autograd import use_triton_on_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FEATURES = ("causal", "window", "softcap", "alibi", "dropout", "varlen")
COMBOS = [(f,) for f in FEATURES] + list(itertools.combinations(FEATURES, 2))
DROPOUT_P = 0.25
CALL_SEED = 1234  # torch.manual_seed right before each call, so the test can rebuild the mask

# Small enough for the interpreter, shaped to cross its 16-wide tiles: Sq != Sk; varlen with
# sequences of length 0 and 1, and a sequence with keys but no queries (and the reverse).
DENSE = dict(batch=2, seqlen_q=37, seqlen_k=45)
VARLEN_Q = [5, 0, 33, 1, 17]
VARLEN_K = [9, 4, 20, 1, 0]


def path(name):
    """The Triton kernels (interpreter on CPU tensors) or, on CPU tensors, the PyTorch path."""
    if name == "triton" and DEVICE == "cpu":
        return use_triton_on_cpu()
    return contextlib.nullcontext()


def cu_seqlens(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def dropout_mask(batch, heads, seqlen_q, seqlen_k):
    """The keep mask of a call made right after torch.manual_seed(CALL_SEED)."""
    torch.manual_seed(CALL_SEED)
    return philox.keep_mask_dense(philox.new_seed(), DROPOUT_P, batch, heads, seqlen_q, seqlen_k).to(DEVICE)


def build_case(features, dtype, heads_q=4, heads_k=2, head_dim=32, dense=DENSE, varlen=(VARLEN_Q, VARLEN_K),
               window=(6, 3)):
    """(run, q, k, v, oracle keyword arguments) for a feature set."""
    api, oracle = {}, {}
    if "varlen" in features:
        lengths_q, lengths_k = varlen
        batch, max_q, max_k = len(lengths_q), max(lengths_q), max(lengths_k)
        q, k, v = (t[0] for t in make_qkv(1, sum(lengths_q), sum(lengths_k), heads_q, heads_k, head_dim, dtype, DEVICE))
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        oracle["varlen"] = (cu_seqlens(lengths_q), cu_seqlens(lengths_k))
    else:
        batch, max_q, max_k = dense["batch"], dense["seqlen_q"], dense["seqlen_k"]
        q, k, v = make_qkv(batch, max_q, max_k, heads_q, heads_k, head_dim, dtype, DEVICE)
    if "causal" in features:
        api["causal"] = oracle["causal"] = True
    if "window" in features:
        # Default: right bound 3 unless causal overrides it with 0; left 6 cuts 16-wide tiles.
        api["window_size"] = oracle["window_size"] = window
    if "softcap" in features:
        api["softcap"] = oracle["softcap"] = 2.0
    if "alibi" in features:
        # (B, H) slopes under varlen (each sequence its own), (H,) otherwise.
        shape = (batch, heads_q) if "varlen" in features else (heads_q,)
        api["alibi_slopes"] = oracle["alibi_slopes"] = torch.rand(shape, device=DEVICE)
    if "dropout" in features:
        api["dropout_p"] = oracle["dropout_p"] = DROPOUT_P
        oracle["dropout_mask"] = dropout_mask(batch, heads_q, max_q, max_k)

    def run(q, k, v):
        torch.manual_seed(CALL_SEED)
        if "varlen" in features:
            cu_q, cu_k = oracle["varlen"]
            out, lse, _ = flashtile.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k,
                                                           return_attn_probs=True, **api)
        else:
            out, lse, _ = flashtile.flash_attn_func(q, k, v, return_attn_probs=True, **api)
        return out, lse

    return run, q, k, v, oracle


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("impl", ["triton", "cpu"])
@pytest.mark.parametrize("features", COMBOS, ids="+".join)
def test_feature_pairs_match_oracle(features, impl, dtype):
    if impl == "cpu" and DEVICE == "cuda":
        pytest.skip("the CPU path runs on CPU tensors")
    run, q, k, v, oracle = build_case(features, dtype)
    with path(impl):
        check_against_oracle(run, q, k, v, **oracle)


@pytest.mark.parametrize("head_dim", [1, 8, 40, 64, 128, 256])
def test_all_features_at_once_every_head_dim(head_dim):
    run, q, k, v, oracle = build_case(("causal", "window", "softcap", "alibi", "dropout", "varlen"),
                                      torch.float32, heads_q=3, heads_k=1, head_dim=head_dim)
    with path("triton"):
        check_against_oracle(run, q, k, v, **oracle)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cpu_path_all_features_every_dtype(dtype):
    if DEVICE == "cuda":
        pytest.skip("the CPU path runs on CPU tensors")
    run, q, k, v, oracle = build_case(("causal", "window", "softcap", "alibi", "dropout"), dtype)
    check_against_oracle(run, q, k, v, **oracle)


@pytest.mark.parametrize("window", [(0, 0), (0, -1), (-1, 0), (3, -1), (-1, 2), (1000, 1000), (0, 5)],
                         ids=lambda w: f"w{w[0]}_{w[1]}")
@pytest.mark.parametrize("seqlens", [(37, 45), (45, 20), (1, 30), (30, 1)], ids=lambda s: f"sq{s[0]}-sk{s[1]}")
def test_window_shapes(window, seqlens):
    """Edge windows: only the diagonal, one side open, wider than the sequence; Sq > Sk leaves
    rows that see no key (zeros, LSE +inf)."""
    q, k, v = make_qkv(1, *seqlens, 4, 2, 16, torch.float32, DEVICE)

    def run(q, k, v):
        out, lse, _ = flashtile.flash_attn_func(q, k, v, window_size=window, return_attn_probs=True)
        return out, lse

    with path("triton"):
        check_against_oracle(run, q, k, v, window_size=window)


def test_causal_is_window_left_unbounded_right_zero():
    q, k, v = make_qkv(2, 40, 50, 4, 2, 16, torch.float16, DEVICE, grad=False)
    with path("triton"):
        assert torch.equal(flashtile.flash_attn_func(q, k, v, causal=True),
                           flashtile.flash_attn_func(q, k, v, window_size=(-1, 0)))
        # causal overrides a right bound, as in FlashAttention-2
        assert torch.equal(flashtile.flash_attn_func(q, k, v, causal=True, window_size=(7, 5)),
                           flashtile.flash_attn_func(q, k, v, window_size=(7, 0)))


def test_window_skips_tiles_it_does_not_need():
    """A narrow window must not read keys far outside it: poison them with NaN and rows whose
    window lies elsewhere stay finite and unchanged. Rows >= 384 need keys >= 376, so no tile
    (at most 128 wide) of theirs touches keys < 256; a loaded NaN would reach them through P V."""
    q, k, v = make_qkv(1, 512, 512, 2, 2, 16, torch.float32, DEVICE, grad=False)
    k2, v2 = k.clone(), v.clone()
    k2[:, :256], v2[:, :256] = float("nan"), float("nan")
    with path("triton"):
        clean = flashtile.flash_attn_func(q[:, 384:], k, v, window_size=(8, 0))
        poisoned = flashtile.flash_attn_func(q[:, 384:], k2, v2, window_size=(8, 0))
    assert torch.isfinite(poisoned).all()
    assert torch.equal(poisoned, clean)


def test_softcap_gradient_matches_autograd_of_tanh():
    """The capped score's gradient (1 - tanh^2) against float64 autograd through torch.tanh."""
    q, k, v = make_qkv(1, 30, 30, 2, 2, 16, torch.float32, DEVICE, std=3.0)

    def run(q, k, v):
        out, lse, _ = flashtile.flash_attn_func(q, k, v, softcap=1.5, return_attn_probs=True)
        return out, lse

    with path("triton"):
        check_against_oracle(run, q, k, v, softcap=1.5)


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (16, 64), (32, 128)])
def test_dropout_kernel_mask_equals_the_numpy_definition(block):
    """The kernels' mask, at every tile shape they use (partial and whole 64-key chunks)."""
    from flashtile.ops.dropout_mask import keep_mask

    seed = 2**40 + 99
    with path("triton"):
        ours = keep_mask(seed, 0.3, 3, 2, 37, 140, DEVICE, block=block)
    expected = philox.keep_mask_dense(seed, 0.3, 1, 2, 37, 140, batch_offset=3)[0]
    assert torch.equal(ours.cpu(), expected)


@pytest.mark.parametrize("impl", ["triton", "cpu"])
def test_dropout_s_dmask_encoding(impl):
    """S_dmask is P (softmax before dropout) with the sign bit set where dropped."""
    if impl == "cpu" and DEVICE == "cuda":
        pytest.skip("the CPU path runs on CPU tensors")
    q, k, v = make_qkv(2, 20, 24, 4, 2, 16, torch.float32, DEVICE, grad=False)
    with path(impl):
        torch.manual_seed(CALL_SEED)
        out, lse, s_dmask = flashtile.flash_attn_func(q, k, v, dropout_p=DROPOUT_P, causal=True,
                                                      return_attn_probs=True)
    mask = dropout_mask(2, 4, 20, 24)
    probs = torch.softmax(torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(2, 2)) * 16**-0.5
                          + torch.where(flashtile.reference.causal_visible(20, 24, DEVICE), 0.0, float("-inf")), -1)
    assert s_dmask.shape == (2, 4, 20, 24) and s_dmask.dtype == q.dtype
    assert torch.allclose(s_dmask.abs(), probs, atol=1e-6)
    positive = probs > 0
    assert torch.equal((s_dmask >= 0)[positive], mask[positive])


def test_dropout_is_reproducible_and_seeded():
    q, k, v = make_qkv(2, 40, 40, 4, 2, 16, torch.float16, DEVICE)
    dout = torch.randn(2, 40, 4, 16, dtype=torch.float16, device=DEVICE)

    def run(seed):
        torch.manual_seed(seed)
        out = flashtile.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    with path("triton"):
        first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_dropout_keep_rate():
    mask = philox.keep_mask_dense(2**41 + 5, 0.17, 4, 8, 256, 256)
    rate, n = mask.float().mean().item(), mask.numel()
    expected = philox.keep_probability(0.17)
    assert expected == 1 - 44 / 256 and abs(expected - 0.83) < 1 / 512
    assert abs(rate - expected) < 5 * (expected * (1 - expected) / n) ** 0.5


def test_dropout_is_unbiased():
    """Averaged over seeds, the dropout output approaches the dropout-free output (E[Z / keep rate] = 1)."""
    if DEVICE == "cuda":
        pytest.skip("statistics run on the CPU path; the GPU file repeats this at scale")
    q, k, v = make_qkv(1, 16, 16, 2, 2, 8, torch.float32, "cpu", grad=False)
    exact = flashtile.flash_attn_func(q, k, v)
    runs = torch.stack([flashtile.flash_attn_func(q, k, v, dropout_p=0.5) for _ in range(400)])
    stderr = runs.std(dim=0) / 400**0.5
    z = (runs.mean(dim=0) - exact) / stderr
    assert z.abs().max() < 5.0
    assert (z.abs() < 2).float().mean() > 0.85  # roughly normal, not biased to one side


def test_deterministic_flag_bitwise_for_every_feature():
    run, q, k, v, _ = build_case(("causal", "window", "softcap", "alibi", "dropout"), torch.float16)
    dout = torch.randn(*q.shape, dtype=q.dtype, device=DEVICE)
    results = []
    with path("triton"):
        for _ in range(2):
            torch.manual_seed(CALL_SEED)
            out = flashtile.flash_attn_func(q, k, v, causal=True, window_size=(6, 3), softcap=2.0, dropout_p=0.25,
                                            alibi_slopes=torch.ones(4, device=DEVICE) * 0.1, deterministic=True)
            results.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*results):
        assert torch.equal(a, b)
