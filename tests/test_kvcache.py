"""flash_attn_with_kvcache and paged flash_attn_varlen_func against the float64 oracle.

Each case runs on the CPU path and on the Triton kernels (under the interpreter without a GPU),
checks out and lse by the tolerance rule, and checks the cache: the appended rows equal the
(rotated) new keys and values, every other row is bitwise untouched.
"""

import math

import pytest
import torch

from flashtile import configs, flash_attn_varlen_func, flash_attn_with_kvcache
from flashtile.autograd import use_triton_on_cpu
from flashtile.ops.decode import MAX_SPLITS, MIN_TILES_PER_SPLIT, split_count
from flashtile.reference import attention_varlen_ref
from helpers import assert_tolerance_rule
from kvcache_oracle import kvcache_ref, sequence_rows

PATHS = ["cpu", "triton"]


def on_triton(fn, **kwargs):
    """``fn(**kwargs)`` on the Triton kernels: the interpreter without a GPU, else CUDA copies of
    the tensors (the caches copied back in place, the results returned on the CPU)."""
    if not torch.cuda.is_available():
        with use_triton_on_cpu():
            return fn(**kwargs)
    moved = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    result = fn(**moved)
    for name in ("k_cache", "v_cache"):
        if name in kwargs:
            kwargs[name].copy_(moved[name].cpu())
    if isinstance(result, tuple):
        return tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in result)
    return result.cpu()


def run(path, **kwargs):
    if path == "triton":
        return on_triton(flash_attn_with_kvcache, **kwargs)
    return flash_attn_with_kvcache(**kwargs)


def make_case(batch=2, seqlen_q=1, heads=4, kv_heads=2, head_dim=32, capacity=48, seqlens=(5, 33), seqlen_new=0,
              dtype=torch.float16, page_size=None, rotary_dim=None, leftpad=None, batch_idx=None, cache_rows=None,
              std=1.0):
    """Inputs as keyword arguments of flash_attn_with_kvcache. Paged caches get their pages in a
    shuffled order (plus spare pages), so a wrong page lookup cannot pass by luck."""
    def rand(*shape):
        return (torch.randn(*shape) * std).to(dtype)

    kwargs = dict(q=rand(batch, seqlen_q, heads, head_dim))
    rows = cache_rows or batch
    if page_size is None:
        kwargs["k_cache"] = rand(rows, capacity, kv_heads, head_dim)
        kwargs["v_cache"] = rand(rows, capacity, kv_heads, head_dim)
    else:
        pages_per_seq = math.ceil(capacity / page_size)
        n_pages = batch * pages_per_seq + 3
        kwargs["k_cache"] = rand(n_pages, page_size, kv_heads, head_dim)
        kwargs["v_cache"] = rand(n_pages, page_size, kv_heads, head_dim)
        kwargs["block_table"] = torch.randperm(n_pages)[:batch * pages_per_seq].reshape(batch, pages_per_seq).int()
    if seqlens is not None:
        kwargs["cache_seqlens"] = seqlens if isinstance(seqlens, int) else torch.tensor(seqlens, dtype=torch.int32)
    if seqlen_new:
        kwargs["k"] = rand(batch, seqlen_new, kv_heads, head_dim)
        kwargs["v"] = rand(batch, seqlen_new, kv_heads, head_dim)
    if rotary_dim:
        angles = torch.rand(capacity + seqlen_q + 4, rotary_dim // 2) * 2 * math.pi
        kwargs["rotary_cos"], kwargs["rotary_sin"] = angles.cos().to(dtype), angles.sin().to(dtype)
    if leftpad is not None:
        kwargs["cache_leftpad"] = torch.tensor(leftpad, dtype=torch.int32)
    if batch_idx is not None:
        kwargs["cache_batch_idx"] = torch.tensor(batch_idx, dtype=torch.int32)
    return kwargs


def oracle_kwargs(kwargs):
    return {k: v for k, v in kwargs.items() if k not in ("num_splits", "return_softmax_lse")}


def check_call(path, case, **options):
    """Run one call on copies of the caches and hold out, lse and the caches to the oracle."""
    inputs = {**case, "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()}
    out, lse = run(path, **inputs, **options, return_softmax_lse=True)
    ref_out, ref_lse, _, _ = kvcache_ref(**oracle_kwargs(case), **oracle_kwargs(options))
    lowp = [kvcache_ref(**oracle_kwargs(case), **oracle_kwargs(options), upcast=False, reorder_ops=r)
            for r in (False, True)]
    assert out.shape == case["q"].shape and out.dtype == case["q"].dtype
    assert_tolerance_rule("out", out, ref_out, [lo[0] for lo in lowp])
    assert_tolerance_rule("lse", lse, ref_lse, [lo[1] for lo in lowp])
    check_cache(case, inputs, lowp[0][2], lowp[0][3])
    return out, lse


def check_cache(case, after, ref_keys, ref_values):
    """Appended rows match the oracle's (rotated) rows to the rotary rounding; all else untouched."""
    batch_idx, table = case.get("cache_batch_idx"), case.get("block_table")
    seqlens = case.get("cache_seqlens")
    new = 0 if case.get("k") is None else case["k"].shape[1]
    for b in range(case["q"].shape[0]):
        begin = 0 if seqlens is None else int(seqlens if isinstance(seqlens, int) else seqlens[b])
        for name, ref in (("k_cache", ref_keys[b]), ("v_cache", ref_values[b])):
            got = sequence_rows(after[name], b, batch_idx, table)
            before = sequence_rows(case[name], b, batch_idx, table)
            assert torch.equal(got[:begin], before[:begin]), f"{name}: the prefix of sequence {b} changed"
            assert torch.equal(got[begin + new:], before[begin + new:]), f"{name}: the tail of sequence {b} changed"
            # One rounding of an fp32 rotation: at most one ulp apart from the oracle's.
            torch.testing.assert_close(got[begin:begin + new], ref[begin:begin + new], rtol=1e-2, atol=1e-2)
    if table is not None:  # pages no sequence owns are untouched
        spare = sorted(set(range(case["k_cache"].shape[0])) - set(table.flatten().tolist()))
        assert torch.equal(after["k_cache"][spare], case["k_cache"][spare])


CASES = {
    "decode-gqa": dict(),
    "decode-mqa-d40": dict(heads=3, kv_heads=1, head_dim=40),
    "append-causal": dict(seqlen_q=3, seqlen_new=3, seqlens=(0, 30)),
    "rotary-interleaved": dict(seqlen_q=2, seqlen_new=2, rotary_dim=32),
    "rotary-halves-partial": dict(seqlen_q=2, seqlen_new=3, rotary_dim=16),
    "paged16-append": dict(seqlen_q=2, seqlen_new=2, page_size=16, seqlens=(13, 40)),
    "paged-odd-size": dict(seqlen_q=1, seqlen_new=1, page_size=24, seqlens=(23, 24)),
    "leftpad-batch-idx": dict(seqlen_q=2, seqlen_new=1, leftpad=(3, 0), batch_idx=(2, 0), cache_rows=3),
    "paged-leftpad": dict(seqlen_q=2, seqlen_new=1, page_size=16, leftpad=(3, 17)),
    "int-seqlens": dict(seqlens=17, seqlen_new=2, seqlen_q=2),
    "whole-cache": dict(seqlens=None, capacity=37),
    "prefill-two-row-tiles": dict(seqlen_q=9, seqlen_new=9, seqlens=(0, 20)),
    "fp32": dict(dtype=torch.float32, seqlen_q=2, seqlen_new=2),
    "empty-batch": dict(batch=0, seqlens=()),
}
OPTIONS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(6, 0)),
    "softcap-alibi": dict(causal=True, softcap=3.0, alibi_slopes="per-batch"),
}


def with_alibi(case, options):
    if options.get("alibi_slopes") == "per-batch":
        options = {**options, "alibi_slopes": torch.rand(case["q"].shape[0], case["q"].shape[2]) * 0.5}
    return options


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", list(CASES))
def test_against_oracle(path, name, option):
    case = make_case(**CASES[name])
    if "rotary_cos" in case:
        case["rotary_interleaved"] = name != "rotary-halves-partial"
    check_call(path, case, **with_alibi(case, OPTIONS[option]))


@pytest.mark.parametrize("path", PATHS)
def test_fully_masked_rows_are_zero(path):
    # Causal with more queries than keys: the first queries see nothing.
    case = make_case(seqlen_q=6, seqlens=(0, 2), seqlen_new=2)
    out, lse = check_call(path, case, causal=True)
    assert torch.equal(out[0, :4], torch.zeros_like(out[0, :4]))
    assert torch.isinf(lse[0, :, :4]).all() and (lse[0, :, :4] > 0).all()


def column_major(t):
    """The same values with stride(-1) != 1 (a transposed copy, transposed back)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("path", PATHS)
def test_inputs_without_unit_stride(path):
    # q, the new k/v and the rotary tables in layouts the kernels cannot read in place.
    case = make_case(seqlen_q=2, seqlen_new=2, rotary_dim=16)
    for name in ("q", "k", "v", "rotary_cos", "rotary_sin"):
        case[name] = column_major(case[name])
        assert case[name].stride(-1) != 1
    check_call(path, case, causal=True)


@pytest.mark.parametrize("path", PATHS)
def test_every_split_count_agrees(path):
    # 3 splits of a 16-wide tile loop, 7 (more than some sequences' tiles), and the heuristic.
    case = make_case(seqlens=(5, 44), capacity=48, seqlen_q=2, seqlen_new=2)
    outs = [check_call(path, case, causal=True, num_splits=n)[0] for n in (1, 3, 7, 0)]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("path", PATHS)
def test_paged_equals_contiguous(path):
    """The same cache contents laid out in pages give bitwise the same output."""
    case = make_case(page_size=16, seqlens=(9, 47), seqlen_new=1, seqlen_q=1)
    table = case["block_table"]
    contiguous = {**case, "k_cache": case["k_cache"][table.long()].flatten(1, 2).clone(),
                  "v_cache": case["v_cache"][table.long()].flatten(1, 2).clone()}
    del contiguous["block_table"]
    paged_out = run(path, **{**case, "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()},
                    causal=True, num_splits=1)
    contiguous_out = run(path, **contiguous, causal=True, num_splits=1)
    assert torch.equal(paged_out, contiguous_out)


def test_split_heuristic_edges():
    # Work that gives every SM two programs: no split, whatever the length.
    assert split_count(0, work=264, max_keys=1 << 20, block_n=64, n_sms=132) == 1
    assert split_count(0, work=263, max_keys=1 << 20, block_n=64, n_sms=132) == 2
    # One program: enough splits to fill the GPU twice (capped at MAX_SPLITS)...
    assert split_count(0, work=1, max_keys=1 << 20, block_n=64, n_sms=132) == MAX_SPLITS
    assert split_count(0, work=8, max_keys=1 << 20, block_n=64, n_sms=132) == 33
    # ...but no split shorter than MIN_TILES_PER_SPLIT tiles.
    assert split_count(0, work=8, max_keys=64 * MIN_TILES_PER_SPLIT * 5, block_n=64, n_sms=132) == 5
    assert split_count(0, work=8, max_keys=64 * (MIN_TILES_PER_SPLIT * 5 - 1), block_n=64, n_sms=132) == 4
    assert split_count(0, work=8, max_keys=100, block_n=64, n_sms=132) == 1
    assert split_count(0, work=8, max_keys=0, block_n=64, n_sms=132) == 1
    # Requests are capped at one tile per split and MAX_SPLITS.
    assert split_count(5, work=1, max_keys=1 << 20, block_n=64, n_sms=132) == 5
    assert split_count(9, work=1, max_keys=130, block_n=64, n_sms=132) == 3
    assert split_count(1000, work=1, max_keys=1 << 20, block_n=64, n_sms=132) == MAX_SPLITS


@pytest.mark.parametrize("path", PATHS)
def test_paged_varlen_prefill(path):
    """flash_attn_varlen_func with block_table: packed queries over paged K/V."""
    torch.manual_seed(1)
    page_size, kv_heads, heads, head_dim = 16, 2, 4, 32
    q_lens, k_lens = [3, 0, 17], [40, 5, 17]
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), heads, head_dim).half()
    k_cache = torch.randn(11, page_size, kv_heads, head_dim).half()
    v_cache = torch.randn(11, page_size, kv_heads, head_dim).half()
    table = torch.randperm(11)[:9].reshape(3, 3).int()
    # The same keys packed contiguously, for the oracle.
    k = torch.cat([k_cache[table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(k_lens)])
    v = torch.cat([v_cache[table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(k_lens)])
    args = dict(q=q, k=k_cache, v=v_cache, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(q_lens),
                max_seqlen_k=max(k_lens), causal=True, return_attn_probs=True, block_table=table)
    if path == "triton":
        out, lse, s_dmask = on_triton(flash_attn_varlen_func, **args)
    else:
        out, lse, s_dmask = flash_attn_varlen_func(**args)
    assert s_dmask is None
    ref_out, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True)
    lowp = [attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, upcast=False, reorder_ops=r) for r in (False, True)]
    assert_tolerance_rule("out", out, ref_out, [lo[0] for lo in lowp])
    assert_tolerance_rule("lse", lse, ref_lse, [lo[1] for lo in lowp])


def test_paged_varlen_is_forward_only():
    q = torch.randn(4, 2, 16, requires_grad=True)
    cache = torch.randn(2, 16, 2, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    table = torch.tensor([[0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="forward only"):
        flash_attn_varlen_func(q, cache, cache, cu, cu, 4, 4, block_table=table)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_varlen_func(q.detach(), cache, cache, cu, cu, 4, 4, dropout_p=0.1, block_table=table)
    with torch.no_grad():
        assert flash_attn_varlen_func(q, cache, cache, cu, cu, 4, 4, block_table=table).shape == q.shape


def test_index_checks_can_be_switched_off(monkeypatch):
    case = make_case(seqlens=(5, 60))  # 60 > capacity 48
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(**case)
    monkeypatch.setattr(configs, "CHECK_CACHE_INDICES", False)
    case["cache_seqlens"] = torch.tensor([5, 40], dtype=torch.int32)
    flash_attn_with_kvcache(**case)  # valid input still runs without the checks


def _bad(**changes):
    case = make_case(seqlen_new=1, page_size=None, rotary_dim=16)
    for key, value in changes.items():
        if value is None:
            case.pop(key, None)
        else:
            case[key] = value(case) if callable(value) else value
    return case


BAD_INPUTS = {
    "q-rank": (_bad(q=lambda c: c["q"][0]), ValueError, "q must have 4 dimensions"),
    "cache-dtype": (_bad(k_cache=lambda c: c["k_cache"].float()), TypeError, "k_cache has dtype"),
    "cache-stride": (_bad(k_cache=lambda c: c["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
                     ValueError, "k_cache must have stride 1"),
    "cache-shapes": (_bad(v_cache=lambda c: c["v_cache"][:, :40]), ValueError, "v_cache has shape"),
    "head-dim": (_bad(q=lambda c: c["q"][..., :16]), ValueError, "head dim"),
    "gqa": (_bad(q=lambda c: c["q"][:, :, :3]), ValueError, "multiple of the number in k_cache"),
    "k-without-v": (_bad(v=None), ValueError, "k and v must be given together"),
    "k-heads": (_bad(k=lambda c: c["k"][:, :, :1], v=lambda c: c["v"][:, :, :1]), ValueError, "k must have shape"),
    "seqlens-dtype": (_bad(cache_seqlens=lambda c: c["cache_seqlens"].long()), TypeError, "cache_seqlens must be int32"),
    "seqlens-shape": (_bad(cache_seqlens=lambda c: c["cache_seqlens"][:1]), ValueError, "cache_seqlens must have shape"),
    "seqlens-negative": (_bad(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, ">= 0"),
    "seqlens-overflow": (_bad(cache_seqlens=torch.tensor([5, 48], dtype=torch.int32)), ValueError,
                         "cache holds 48 positions"),
    "seqlens-int-overflow": (_bad(cache_seqlens=48), ValueError, "cache holds 48 positions"),
    "seqlens-float": (_bad(cache_seqlens=3.0), TypeError, "cache_seqlens must be an int"),
    "append-without-seqlens": (_bad(cache_seqlens=None), ValueError, "cache_seqlens is needed"),
    "rotary-without-k": (_bad(k=None, v=None), ValueError, "need the new k and v"),
    "rotary-one-half": (_bad(rotary_sin=None), ValueError, "rotary_cos and rotary_sin"),
    "rotary-too-wide": (_bad(rotary_cos=lambda c: torch.ones(60, 17), rotary_sin=lambda c: torch.ones(60, 17)),
                        ValueError, "rotary_dim = 34"),
    "rotary-too-short": (_bad(rotary_cos=lambda c: c["rotary_cos"][:30], rotary_sin=lambda c: c["rotary_sin"][:30]),
                         ValueError, "rotary_cos/rotary_sin have 30 rows"),
    "rotary-interleaved-type": (_bad(rotary_interleaved=1), TypeError, "rotary_interleaved must be a bool"),
    "batch-idx-range": (_bad(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), ValueError,
                        "cache_batch_idx must index"),
    "leftpad-past-seqlens": (_bad(cache_leftpad=torch.tensor([6, 0], dtype=torch.int32)), ValueError,
                             "cache_leftpad"),
    "num-splits": (_bad(num_splits=-1), ValueError, "num_splits"),
    "num-splits-type": (_bad(num_splits=2.0), TypeError, "num_splits"),
    "lse-flag": (_bad(return_softmax_lse=1), TypeError, "return_softmax_lse"),
    "window": (_bad(window_size=(-2, 0)), ValueError, "window_size"),
    "alibi-shape": (_bad(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    "cache-rows": (_bad(k_cache=lambda c: c["k_cache"][:1], v_cache=lambda c: c["v_cache"][:1]), ValueError,
                   "k_cache holds 1 sequences but q has batch size 2"),
    "rotary-int": (_bad(rotary_cos=lambda c: c["rotary_cos"].int(), rotary_sin=lambda c: c["rotary_sin"].int()),
                   TypeError, "rotary_cos must be a floating-point tensor"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_rejected_before_writing(name):
    case, error, message = BAD_INPUTS[name]
    k_before, v_before = case["k_cache"].clone(), case["v_cache"].clone()
    with pytest.raises(error, match=message):
        flash_attn_with_kvcache(**case)
    assert torch.equal(case["k_cache"], k_before) and torch.equal(case["v_cache"], v_before)


PAGED_BAD = {
    "page-out-of-range": (lambda c: c["block_table"].clone().index_fill_(1, torch.tensor([0]), 99), ValueError,
                          "block_table must index"),
    "page-negative": (lambda c: c["block_table"].clone().index_fill_(1, torch.tensor([1]), -1), ValueError,
                      "block_table must index"),
    "table-rows": (lambda c: c["block_table"][:1], ValueError, "block_table must have shape"),
    "table-dtype": (lambda c: c["block_table"].long(), TypeError, "block_table must be int32"),
}


@pytest.mark.parametrize("name", list(PAGED_BAD))
def test_bad_block_table_is_rejected(name):
    make_table, error, message = PAGED_BAD[name]
    case = make_case(page_size=16, seqlens=(20, 40), seqlen_new=1)
    case["block_table"] = make_table(case)
    with pytest.raises(error, match=message):
        flash_attn_with_kvcache(**case)


def test_empty_pages_are_rejected():
    case = make_case(page_size=16, seqlens=(0, 0))
    case["k_cache"], case["v_cache"] = case["k_cache"][:, :0], case["v_cache"][:, :0]
    with pytest.raises(ValueError, match="page_block_size 0"):
        flash_attn_with_kvcache(**case)


def test_unused_block_table_slots_are_not_checked():
    # vLLM-style tables pad unused slots with any value; only slots below the length are read.
    case = make_case(page_size=16, seqlens=(3, 5), capacity=48)
    case["block_table"][:, 1:] = -1
    ref_out = kvcache_ref(**{**case, "block_table": case["block_table"].clamp_min(0)})[0]
    out = flash_attn_with_kvcache(**case)
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-3, atol=2e-3)


def test_cache_batch_idx_with_block_table_is_rejected():
    case = make_case(page_size=16)
    case["cache_batch_idx"] = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_batch_idx cannot be used with block_table"):
        flash_attn_with_kvcache(**case)


# ---- On the GPU: serving-sized shapes, bf16, the split path, CUDA graphs. ----

def gpu_case(batch, seqlen_q, seqlen_new, head_dim, dtype, page_size, max_len, rotary=True):
    torch.manual_seed(batch * 1000 + seqlen_q)
    lengths = torch.randint(0, max_len - seqlen_new, (batch,)).tolist()
    lengths[0] = max_len - seqlen_new  # one sequence fills its cache
    case = make_case(batch=batch, seqlen_q=seqlen_q, heads=32, kv_heads=8, head_dim=head_dim, capacity=max_len,
                     seqlens=lengths, seqlen_new=seqlen_new, dtype=dtype, page_size=page_size,
                     rotary_dim=head_dim if rotary else None)
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def gpu_oracle_check(case, **options):
    inputs = {**case, "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()}
    out, lse = flash_attn_with_kvcache(**inputs, **options, return_softmax_lse=True)
    cpu_case = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    ref_out, ref_lse, _, _ = kvcache_ref(**cpu_case, **oracle_kwargs(options))
    lowp = [kvcache_ref(**cpu_case, **oracle_kwargs(options), upcast=False, reorder_ops=r) for r in (False, True)]
    assert_tolerance_rule("out", out.cpu(), ref_out, [lo[0] for lo in lowp])
    assert_tolerance_rule("lse", lse.cpu(), ref_lse, [lo[1] for lo in lowp])
    check_cache(cpu_case, {k: v.cpu() for k, v in inputs.items() if k in ("k_cache", "v_cache")},
                lowp[0][2], lowp[0][3])
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("page_size", [None, 16, 64], ids=["contiguous", "page16", "page64"])
@pytest.mark.parametrize("num_splits", [0, 1, 5])
@pytest.mark.parametrize("shape", [(1, 1, 1, 128, 3000), (3, 4, 2, 64, 700), (2, 1, 1, 256, 1500)],
                         ids=["decode-b1-d128", "spec-b3-d64", "decode-b2-d256"])
def test_gpu_decode_matches_oracle(dtype, page_size, num_splits, shape):
    batch, seqlen_q, seqlen_new, head_dim, max_len = shape
    case = gpu_case(batch, seqlen_q, seqlen_new, head_dim, dtype, page_size, max_len)
    case["rotary_interleaved"] = page_size != 16
    gpu_oracle_check(case, causal=True, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(window_size=(256, 0)), dict(softcap=30.0, alibi_slopes=True), dict()],
                         ids=["window", "softcap-alibi", "non-causal"])
def test_gpu_decode_features(options):
    case = gpu_case(4, 2, 2, 128, torch.bfloat16, 64, 2000)
    if options.get("alibi_slopes"):
        options = {**options, "alibi_slopes": torch.rand(32, device="cuda") * 0.1}
    gpu_oracle_check(case, **options)


@pytest.mark.gpu
def test_gpu_decode_in_a_cuda_graph():
    """Captured once, replayed with new lengths written into cache_seqlens in place (the index
    checks are skipped while capturing); every replay equals an eager call."""
    case = gpu_case(2, 1, 1, 128, torch.bfloat16, 64, 1024, rotary=True)
    static = {**case, "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        flash_attn_with_kvcache(**static, causal=True)  # warm-up: compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = flash_attn_with_kvcache(**static, causal=True)
    for lengths in ([100, 7], [900, 1022]):
        static["cache_seqlens"].copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        eager_case = {**static, "k_cache": static["k_cache"].clone(), "v_cache": static["v_cache"].clone()}
        eager = flash_attn_with_kvcache(**eager_case, causal=True)
        assert torch.equal(graph_out, eager)


@pytest.mark.gpu
def test_gpu_index_values_are_checked():
    case = gpu_case(2, 1, 1, 64, torch.bfloat16, 16, 256)
    case["block_table"][1, 0] = 10_000
    with pytest.raises(ValueError, match="block_table must index"):
        flash_attn_with_kvcache(**case)
    case = gpu_case(2, 1, 1, 64, torch.bfloat16, None, 256)
    case["cache_seqlens"][0] = 256
    with pytest.raises(ValueError, match="cache holds 256 positions"):
        flash_attn_with_kvcache(**case)


@pytest.mark.gpu
def test_gpu_paged_varlen_prefill():
    torch.manual_seed(3)
    page_size, q_lens, k_lens = 64, [300, 1, 77], [1000, 1, 500]
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), 16, 128, dtype=torch.bfloat16)
    k_cache = torch.randn(60, page_size, 4, 128, dtype=torch.bfloat16)
    v_cache = torch.randn(60, page_size, 4, 128, dtype=torch.bfloat16)
    table = torch.randperm(60)[:48].reshape(3, 16).int()
    k = torch.cat([k_cache[table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(k_lens)])
    v = torch.cat([v_cache[table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(k_lens)])
    with torch.no_grad():
        out, lse, _ = flash_attn_varlen_func(q.cuda(), k_cache.cuda(), v_cache.cuda(), cu_q.cuda(), cu_k.cuda(),
                                             max(q_lens), max(k_lens), causal=True, return_attn_probs=True,
                                             block_table=table.cuda())
    ref_out, ref_lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True)
    lowp = [attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, upcast=False, reorder_ops=r) for r in (False, True)]
    assert_tolerance_rule("out", out.cpu(), ref_out, [lo[0] for lo in lowp])
    assert_tolerance_rule("lse", lse.cpu(), ref_lse, [lo[1] for lo in lowp])
