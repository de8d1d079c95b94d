"""Variable-length batches: edge lengths, cu_seqlens validation, the packed variants, and the
padding helpers (unpad_input / pad_input)."""

import itertools

import pytest
import torch
from helpers import check_against_oracle
from test_features import path

import flashtile
from flashtile import (
    flash_attn_func, flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func,
    pad_input, unpad_input,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def packed(total, heads, head_dim=16, dtype=torch.float32):
    return torch.randn(total, heads, head_dim, dtype=dtype, device=DEVICE, requires_grad=True)


@pytest.mark.parametrize("impl", ["triton", "cpu"])
@pytest.mark.parametrize("lengths", [
    ([0, 1, 0, 0, 2], [1, 0, 3, 0, 2]),  # total < batch, empty sequences on either side
    ([0, 0], [0, 0]),  # nothing at all
    ([1], [1]),
    ([17, 3], [5, 40]),  # seqlen_q != seqlen_k both ways
], ids=["total-lt-batch", "all-empty", "single-token", "sq-ne-sk"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_edge_lengths(lengths, causal, impl):
    if impl == "cpu" and DEVICE == "cuda":
        pytest.skip("the CPU path runs on CPU tensors")
    lengths_q, lengths_k = lengths
    q, k, v = packed(sum(lengths_q), 4), packed(sum(lengths_k), 2), packed(sum(lengths_k), 2)
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)

    def run(q, k, v):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal,
                                             return_attn_probs=True)
        return out, lse

    with path(impl):
        if q.shape[0] == 0:
            out, lse = run(q, k, v)
            assert out.shape == (0, 4, 16) and lse.shape == (4, 0)
            out.sum().backward()
            assert k.grad is not None and torch.equal(k.grad, torch.zeros_like(k))
        else:
            check_against_oracle(run, q, k, v, causal=causal, varlen=(cu_q, cu_k))


def test_larger_max_seqlen_is_fine():
    q, k, v = packed(30, 2), packed(30, 2), packed(30, 2)
    cu_q = cu([10, 20])
    with path("triton"):
        exact = flash_attn_varlen_func(q, k, v, cu_q, cu_q, 20, 20, causal=True)
        loose = flash_attn_varlen_func(q, k, v, cu_q, cu_q, 64, 100, causal=True)
    assert torch.equal(exact, loose)


def _call(**overrides):
    q, k, v = packed(10, 2), packed(12, 2), packed(12, 2)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu([4, 6]), cu_seqlens_k=cu([5, 7]), max_seqlen_q=6, max_seqlen_k=7)
    args.update(overrides)
    return flash_attn_varlen_func(**args)


def i32(values, device=DEVICE):
    return torch.tensor(values, dtype=torch.int32, device=device)


@pytest.mark.parametrize("overrides, error, words", [
    (lambda: dict(cu_seqlens_q=[0, 4, 10]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    (lambda: dict(cu_seqlens_q=torch.tensor([0, 4, 10], device=DEVICE)), TypeError, "cu_seqlens_q must be int32"),
    (lambda: dict(cu_seqlens_k=i32([[0, 5, 12]])), ValueError, "cu_seqlens_k must be 1-D"),
    (lambda: dict(cu_seqlens_q=i32([0, 10])), ValueError, "cu_seqlens_q has 2 entries but cu_seqlens_k has 3"),
    (lambda: dict(cu_seqlens_q=i32([1, 4, 10])), ValueError, "cu_seqlens_q must start at 0"),
    (lambda: dict(cu_seqlens_q=i32([0, 7, 4])), ValueError, "cu_seqlens_q must be non-decreasing"),
    (lambda: dict(cu_seqlens_k=i32([0, 5, 11])), ValueError, r"cu_seqlens_k must end at the number of tokens \(12\)"),
    (lambda: dict(max_seqlen_q=5), ValueError, "max_seqlen_q is 5 but a sequence has 6 tokens"),
    (lambda: dict(max_seqlen_k=7.0), TypeError, "max_seqlen_k must be an int"),
    (lambda: dict(cu_seqlens_q=i32([0, 4, 10], "meta")), ValueError, "cu_seqlens_q is on meta but q is on"),
    (lambda: dict(q=torch.randn(2, 10, 2, 16, device=DEVICE)), ValueError,
     r"q must have 3 dimensions \(total_tokens, nheads, headdim\)"),
    (lambda: dict(alibi_slopes=torch.ones(3, 2, device=DEVICE)), ValueError, r"or \(batch_size, nheads\) = \(2, 2\)"),
    (lambda: dict(block_table=i32([[0], [1]])), ValueError, r"k must have 4 dimensions \(num_blocks, page_block_size"),
], ids=["list", "int64", "2d", "lengths-differ", "start", "decreasing", "end", "max-small", "max-float",
        "device", "rank", "alibi-batch", "block-table"])
def test_varlen_rejects_bad_cu_seqlens(overrides, error, words):
    with pytest.raises(error, match=words):
        _call(**overrides())


def test_varlen_packed_variants_equal_the_unpacked_call():
    lengths = [5, 0, 9]
    qkv = torch.randn(sum(lengths), 3, 4, 16, device=DEVICE, requires_grad=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(1))
    cu_q = cu(lengths)
    with path("triton"):
        out_packed = flash_attn_varlen_qkvpacked_func(qkv, cu_q, 9, causal=True)
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_q, 9, 9, causal=True)
        assert torch.equal(out_packed, out)
        dout = torch.randn_like(out)
        out_packed.backward(dout)
        out.backward(dout)
        assert torch.equal(qkv.grad, torch.stack([q.grad, k.grad, v.grad], dim=1))
        kv = torch.stack([k.detach(), v.detach()], dim=1)
        assert torch.equal(flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_q, 9, 9),
                           flash_attn_varlen_func(q, k, v, cu_q, cu_q, 9, 9))


def test_unpad_pad_round_trip():
    x = torch.randn(3, 7, 4, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    packed_x, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask)
    assert packed_x.shape == (mask.sum(), 4, 8)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 3, 10, 14]
    assert max_seqlen == 7 and seqused.tolist() == [3, 7, 4]
    back = pad_input(packed_x, indices, 3, 7)
    assert torch.equal(back, x * mask[:, :, None, None])
    back.sum().backward()  # differentiable both ways
    assert torch.equal(x.grad, mask[:, :, None, None].float().expand_as(x))


def test_unpad_rejects_bad_mask():
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        unpad_input(torch.randn(2, 5, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden_states has 3 rows but indices has 2"):
        pad_input(torch.randn(3, 4), torch.tensor([0, 1]), 1, 4)


def test_varlen_from_padding_mask():
    """The usual workflow: padded batch + mask -> unpad -> varlen -> pad equals running each
    sequence alone through flash_attn_func."""
    batch, seqlen, heads, head_dim = 3, 20, 4, 16
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=DEVICE) for _ in range(3))
    lengths = [20, 7, 13]
    mask = torch.arange(seqlen, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    q_u, indices, cu_seqlens, max_seqlen, _ = unpad_input(q, mask)
    k_u, v_u = unpad_input(k, mask)[0], unpad_input(v, mask)[0]
    with path("triton"):
        out = pad_input(flash_attn_varlen_func(q_u, k_u, v_u, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                               causal=True), indices, batch, seqlen)
        for b, n in enumerate(lengths):
            alone = flash_attn_func(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], causal=True)
            assert torch.equal(out[b, :n], alone[0])
            assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))
    assert flashtile.flash_attn_varlen_func is flash_attn_varlen_func


def test_cu_seqlens_checked_again_after_in_place_change():
    """Validation is cached per tensor version (no device sync per layer), never stale."""
    q, k, v = packed(10, 2), packed(10, 2), packed(10, 2)
    cu_q = cu([4, 6])
    with path("triton"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_q, 6, 6)
        cu_q[1] = 7  # now decreasing lengths are fine, but 7 > max_seqlen 6
        with pytest.raises(ValueError, match="max_seqlen_q is 6 but a sequence has 7 tokens"):
            flash_attn_varlen_func(q, k, v, cu_q, cu_q, 6, 6)
        cu_k = cu([4, 6])
        cu_k[2] = 9  # a different tensor: checked on its own
        with pytest.raises(ValueError, match="cu_seqlens_k must end at the number of tokens"):
            flash_attn_varlen_func(q, k, v, cu([4, 6]), cu_k, 6, 6)


def test_varlen_under_inference_mode():
    """Inference tensors have no version counter: cu_seqlens are then checked on every call."""
    with torch.inference_mode(), path("triton"):
        q = torch.randn(10, 2, 16, device=DEVICE)
        cu_q = cu([4, 6])
        out = flash_attn_varlen_func(q, q, q, cu_q, cu_q, 6, 6, causal=True)
        assert out.shape == q.shape and torch.isfinite(out).all()
        cu_q[1] = 3  # an in-place edit the version counter would not see
        with pytest.raises(ValueError, match="max_seqlen_q is 6 but a sequence has 7 tokens"):
            flash_attn_varlen_func(q, q, q, cu_q, cu_q, 6, 6)
