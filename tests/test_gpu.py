"""Real-size checks on a CUDA GPU: the adversarial matrix at full lengths, bf16, and tensors
past 2**31 elements. Skipped without CUDA (CI is CPU-only; run these with `-m gpu`)."""

import pytest
import torch
from helpers import assert_tolerance_rule, case_id, check_against_oracle, make_qkv

import flashtile
from flashtile import configs
from flashtile.reference import attention_ref

pytestmark = pytest.mark.gpu


def attention(causal):
    def attn(q, k, v):
        out, lse, _ = flashtile.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
        return out, lse

    return attn


GPU_SHAPES = (
    [(1, s, s, 4, 2, 128) for s in (1, 17, 63, 65, 127, 129, 1000, 4097)]
    + [(2, 1000, 4097, 8, 1, 64), (2, 4097, 1000, 8, 8, 64), (3, 1, 1000, 3, 1, 128), (1, 777, 2048, 6, 2, 96)]
    + [(2, 1000, 1000, 6, 2, d) for d in (32, 40, 64, 80, 96, 128, 160, 192, 256)]
    + [(1, 513, 700, 4, 4, d) for d in (16, 32, 64, 128, 256)]  # group size 1 compiles differently
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[case_id(*s) for s in GPU_SHAPES])
def test_matches_oracle(shape, causal, dtype):
    q, k, v = make_qkv(*shape, dtype=dtype, device="cuda")
    check_against_oracle(attention(causal), q, k, v, causal=causal)


TMA_SHAPES = [(1, 17, 17, 4, 2, 128), (2, 1000, 4097, 8, 1, 64), (2, 4097, 1000, 8, 8, 64), (1, 777, 2048, 6, 2, 128),
              (1, 300, 333, 2, 1, 32), (2, 200, 190, 2, 2, 16), (1, 300, 333, 2, 1, 256)]


@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "tma"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", TMA_SHAPES, ids=[case_id(*s) for s in TMA_SHAPES])
def test_streamed_tiles_both_ways(shape, causal, tma, monkeypatch):
    """Both ways each kernel reads the tiles its loop streams (a TileConfig choice): pointer
    loads, and on Hopper TMA tensor descriptors, which zero-fill rows past the sequence end
    themselves. Forward and dQ stream K/V, dK/dV streams Q/dO."""
    import dataclasses

    from flashtile.ops import bwd, common, fwd

    if tma and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("TMA descriptors: Hopper only")
    for module in (fwd, bwd):  # every entry, short loops too: the tails matter here
        real = module.tile_config
        monkeypatch.setattr(module, "tile_config",
                            lambda *a, real=real, **kw: dataclasses.replace(real(*a, **kw), tma=tma))
    q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device="cuda")
    cfg = fwd.tile_config(q.device, q.dtype, shape[-1], "fwd", causal)
    assert common.stream_by_tma(cfg, k, v) == common.stream_by_tma(cfg, q, q) == tma
    check_against_oracle(attention(causal), q, k, v, causal=causal)


LONG_SHAPES = [(1, 2100, 2100, 2, 1, d) for d in (64, 128, 256)] + [(2, 2048, 2300, 4, 2, 128)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", LONG_SHAPES, ids=[case_id(*s) for s in LONG_SHAPES])
def test_long_loops_with_the_real_tables(shape, causal):
    """Loops of TMA_MIN_SEQLEN rows and more take configs.SM90_LONG (TMA entries on Hopper), as
    dispatched, with no patching: the tiles the benchmarks run at long lengths."""
    assert min(shape[1], shape[2]) >= configs.TMA_MIN_SEQLEN
    q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device="cuda")
    check_against_oracle(attention(causal), q, k, v, causal=causal)


GLUON_SHAPES = [(2, 2048, 2048, 4, 4, 128), (1, 2176, 4096, 8, 2, 128), (3, 256, 2048, 2, 1, 128),
                (2, 2048, 2048, 4, 2, 64), (1, 384, 2368, 4, 4, 256), (1, 2048, 2048, 2, 1, 256),
                # key lengths with a partial last tile
                (2, 256, 1000, 4, 2, 128), (2, 128, 130, 2, 1, 64), (1, 384, 2340, 4, 4, 256)]


def _count_launches(monkeypatch, module_name, launcher, table, every_length):
    """Counts the launches of a Gluon module's launcher, with its table's length thresholds
    replaced by ``every_length`` (the dispatch tests check the real thresholds)."""
    import importlib

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("Gluon kernels: Hopper only")
    module = importlib.import_module(f"flashtile.ops.{module_name}")
    monkeypatch.setattr(configs, table, every_length)
    calls = []
    real = getattr(module, launcher)
    monkeypatch.setattr(module, launcher, lambda *a: calls.append(1) or real(*a))
    return calls


def _count_gluon_calls(monkeypatch):
    """The Gluon forward's launches; the entries' tiles serve every key length."""
    import dataclasses

    every_length = {key: dataclasses.replace(tile, min_seqlen_k=1, softcap_min_seqlen_k=None)
                    for key, tile in configs.SM90_GLUON_FWD.items()}
    monkeypatch.setattr(configs, "SM90_GLUON_FWD_SHORT", {})  # the entries' own tiles (short ones: their test)
    monkeypatch.setattr(configs, "SM90_GLUON_FWD_WINDOW_MIN_KEYS", {d: 1 for d in (64, 128, 256)})
    return _count_launches(monkeypatch, "fwd_hopper", "hopper_fwd", "SM90_GLUON_FWD", every_length)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GLUON_SHAPES, ids=[case_id(*s) for s in GLUON_SHAPES])
def test_gluon_forward_matches_oracle(shape, causal, dtype, monkeypatch):
    """The Hopper Gluon forward (ops/fwd_hopper.py) on calls it covers: head dims 64/128/256,
    causal with Sq < Sk (at Sq = 384, Sk = 2368 the diagonal starts half-way through a 128-row
    Q tile's span of 64-key tiles), GQA, key lengths with a partial last tile; the backward then
    runs on its LSE."""
    calls = _count_gluon_calls(monkeypatch)
    q, k, v = make_qkv(*shape, dtype=dtype, device="cuda")
    check_against_oracle(attention(causal), q, k, v, causal=causal)
    assert calls, "the Gluon forward did not run"


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal, seqlen_k", [(False, 40), (False, 1000), (True, 1000)])
def test_gluon_forward_key_tail_reads_nothing_of_the_next_batch(causal, seqlen_k, head_dim, monkeypatch):
    """Key lengths that are not a multiple of the key tile (one partial tile; a partial last
    tile): the tile runs past the batch entry's last key. Those keys are masked and arrive as
    zeros (3-D TMA boxes, one entry each), so the next entry's keys and values -- NaN here --
    never reach this entry's output or LSE."""
    calls = _count_gluon_calls(monkeypatch)
    q, k, v = make_qkv(2, 128, seqlen_k, 2, 2, head_dim, dtype=torch.bfloat16, device="cuda", grad=False)
    k[1], v[1] = float("nan"), float("nan")
    out, lse = attention(causal)(q, k, v)
    assert calls, "the Gluon forward did not run"
    check_against_oracle(lambda *_: (out[:1], lse[:1]), q[:1], k[:1], v[:1], causal=causal, grads=False)


PERSISTENT_CASES = [
    # (shape, causal, window, softcap): causal Q tiles of every length in one program; GQA with a
    # partial last key tile; a window with Sq > Sk (rows that see no key) at head dim 64; head dim
    # 256 with softcap
    ((2, 1024, 1024, 4, 2, 128), True, (-1, -1), 0.0), ((1, 640, 1000, 4, 2, 128), False, (-1, -1), 0.0),
    ((2, 768, 512, 2, 1, 64), False, (100, 20), 0.0), ((1, 512, 768, 4, 4, 256), True, (-1, -1), 5.0),
]


@pytest.mark.parametrize("queue", [False, True], ids=["round-robin", "queue"])
@pytest.mark.parametrize("programs", [1, 3])
@pytest.mark.parametrize("shape, causal, window, softcap", PERSISTENT_CASES,
                         ids=[f"{case_id(*c[0])}-{'causal' if c[1] else 'w%d_%d' % c[2]}-cap{c[3]:g}"
                              for c in PERSISTENT_CASES])
def test_gluon_forward_persistent_programs(shape, causal, window, softcap, programs, queue, monkeypatch):
    """The persistent Gluon forward with fewer programs than work tiles (the launch gives one
    per SM, more than these shapes have tiles): each program runs many tiles of different key
    ranges in turn, carrying its K/V ring positions, the consumers' turn phases and the Q
    buffer's barriers from one tile to the next; every G-th tile (round-robin) or the next one
    from the work queue (the producer posting each tile's index to the consumers, then the
    stop). Forced to 1 and 3 programs; by the tolerance rule on out, lse (and dq, dk, dv
    through the backward on that LSE)."""
    from flashtile.ops import fwd_hopper

    calls = _count_gluon_calls(monkeypatch)
    counts = []
    monkeypatch.setattr(fwd_hopper, "program_count",
                        lambda n_work, *_: (counts.append(n_work) or programs, queue))
    _check_forward_and_lse(shape, causal, window, softcap)
    assert calls and min(counts) > 3 * programs, "each program should have run several work tiles"


def _check_forward_and_lse(shape, causal, window, softcap):
    """flash_attn_func's out and lse on bf16 inputs of ``shape`` by the tolerance rule, and dq,
    dk, dv through the backward on that LSE."""
    q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device="cuda")

    def attn(q, k, v):
        out, lse, _ = flashtile.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                                return_attn_probs=True)
        return out, lse

    check_against_oracle(attn, q, k, v, causal=causal, window_size=window, softcap=softcap)


THREE_CONSUMER_CASES = [
    # (shape, causal, window, softcap): 192-row work tiles over lengths that are not a multiple of
    # 192 (the last tile's third warpgroup past the end, or reading the next batch entry's rows);
    # causal with Sq < Sk; GQA with a partial key tile; a window with Sq > Sk (rows that see no
    # key); softcap; fewer query rows than one tile (two or one warpgroups wholly past the end)
    ((2, 1024, 1024, 4, 2, 64), False, (-1, -1), 0.0), ((2, 448, 704, 4, 4, 64), True, (-1, -1), 0.0),
    ((1, 640, 1000, 4, 2, 64), False, (-1, -1), 0.0), ((2, 768, 512, 2, 1, 64), False, (100, 20), 0.0),
    ((1, 576, 576, 2, 2, 64), True, (-1, -1), 5.0), ((2, 64, 640, 2, 2, 64), False, (-1, -1), 0.0),
    ((2, 128, 896, 2, 1, 64), True, (-1, -1), 0.0),
]


def _masked_case_ids(cases):
    return [f"{case_id(*c[0])}-{'causal' if c[1] else 'w%d_%d' % c[2]}-cap{c[3]:g}" for c in cases]


def _check_forced_tiles(monkeypatch, head_dims, changes, case, queue):
    """The Gluon forward with the entries of ``head_dims`` changed (``changes(tile)``: the fields to
    replace) at every length, on three programs in the given grid order, so that each runs several
    work tiles: ``_check_forward_and_lse`` on ``case`` = (shape, causal, window, softcap)."""
    import dataclasses

    from flashtile.ops import fwd_hopper

    calls = _count_gluon_calls(monkeypatch)
    for key, tile in list(configs.SM90_GLUON_FWD.items()):
        if key[0] in head_dims:
            monkeypatch.setitem(configs.SM90_GLUON_FWD, key, dataclasses.replace(tile, **changes(tile)))
    monkeypatch.setattr(fwd_hopper, "program_count", lambda n_work, *_: (3, queue))
    _check_forward_and_lse(*case)
    assert calls, "the Gluon forward did not run"


@pytest.mark.parametrize("queue", [False, True], ids=["round-robin", "queue"])
@pytest.mark.parametrize("case", THREE_CONSUMER_CASES, ids=_masked_case_ids(THREE_CONSUMER_CASES))
def test_gluon_forward_three_consumers(case, queue, monkeypatch):
    """Head-dim-64 tiles with three consumer warpgroups (192 query rows per work tile, the
    ``consumers`` field of configs.GluonForwardTile) on every mask, with the persistent grid's
    two orders (3 programs); out and lse by the tolerance rule, and dq, dk, dv through the
    backward on that LSE. Rows past the last query row are computed and never stored."""
    _check_forced_tiles(monkeypatch, (64,), lambda tile: dict(consumers=3, pingpong=False), case, queue)


TWO_Q_SLOT_CASES = [
    # (shape, causal, window, softcap): three programs each running several work tiles, so both Q
    # slots are filled and reused (and the queue's work index passes through both); causal with
    # Sq < Sk, a window with Sq > Sk (rows that see no key), GQA with a partial key tile, softcap
    ((2, 1024, 1024, 4, 2, 128), False, (-1, -1), 0.0), ((2, 512, 768, 4, 4, 128), True, (-1, -1), 0.0),
    ((1, 640, 1000, 4, 2, 64), False, (-1, -1), 0.0), ((2, 768, 512, 2, 1, 128), False, (100, 20), 0.0),
    ((1, 512, 512, 2, 2, 64), True, (-1, -1), 5.0),
]


@pytest.mark.parametrize("queue", [False, True], ids=["round-robin", "queue"])
@pytest.mark.parametrize("case", TWO_Q_SLOT_CASES, ids=_masked_case_ids(TWO_Q_SLOT_CASES))
def test_gluon_forward_two_q_slots(case, queue, monkeypatch):
    """Tiles with two Q buffers (``q_slots``: the producer loads the next work tile's Q while the
    consumers read this one's) at head dims 64 and 128, two consumers with TMA output stores, on
    every mask and both grid orders: out and lse by the tolerance rule, and the gradients through
    the backward on that LSE."""
    # two Q buffers next to rings of at most 3 + 2 slots fit head dim 128
    _check_forced_tiles(monkeypatch, (64, 128), lambda tile: dict(
        consumers=2, pingpong=tile.pingpong and tile.consumers == 2, o_tma=True, q_slots=2,
        k_slots=min(tile.k_slots, 3), v_slots=2), case, queue)


SHORT_TILE_CASES = [
    # (shape, causal, softcap): key lengths below the short tiles' bounds: GQA, a partial last key
    # tile, Sq < Sk and Sq > Sk (causal: rows that see no key), row counts that are not a multiple of
    # the head-dim-64 unmasked entry's 192 rows; with softcap the entry's tile runs instead
    ((2, 512, 512, 4, 2, 64), False, 0.0), ((1, 1024, 1000, 4, 4, 64), False, 0.0),
    ((2, 256, 1920, 2, 1, 64), False, 0.0), ((1, 1280, 640, 2, 2, 64), False, 0.0),
    ((2, 512, 1024, 4, 2, 64), True, 0.0), ((1, 2048, 2048, 2, 1, 64), True, 0.0),
    ((1, 1280, 1100, 2, 2, 64), True, 0.0), ((1, 1024, 3968, 2, 2, 64), True, 0.0),
    ((2, 512, 512, 4, 2, 128), False, 0.0), ((1, 640, 1000, 2, 1, 128), False, 0.0),
    ((1, 512, 768, 2, 2, 128), False, 5.0),
    ((2, 512, 512, 4, 2, 128), True, 0.0), ((1, 640, 1000, 2, 1, 128), True, 0.0),
    ((1, 768, 640, 2, 2, 128), True, 0.0), ((1, 512, 768, 2, 2, 128), True, 5.0),
]


@pytest.mark.parametrize("shape, causal, softcap", SHORT_TILE_CASES,
                         ids=[f"{case_id(*c[0])}-{'causal' if c[1] else 'full'}-cap{c[2]:g}" for c in SHORT_TILE_CASES])
def test_gluon_forward_short_tiles(shape, causal, softcap, monkeypatch):
    """configs.SM90_GLUON_FWD_SHORT as dispatched, with the real tables: calls whose key length
    lies below a short tile's bound run it (two Q buffers; at head dim 64 two consumers, not
    three), softcap calls the entry's tile; out, lse and gradients meet the tolerance rule."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("Gluon kernels: Hopper only")
    key, seqlen_k = (shape[-1], causal), shape[2]
    short = configs.SM90_GLUON_FWD_SHORT[key]
    assert short.tile.min_seqlen_k <= seqlen_k < short.below
    expected = configs.SM90_GLUON_FWD[key] if softcap else short.tile
    chosen, real = [], configs.gluon_forward_tile

    def spy(*args):
        chosen.append(real(*args))
        return chosen[-1]

    monkeypatch.setattr(configs, "gluon_forward_tile", spy)
    _check_forward_and_lse(shape, causal, (-1, -1), softcap)
    assert chosen and all(tile is expected for tile in chosen)


def test_gluon_forward_queue_counter_is_zero_for_every_launch(monkeypatch):
    """The work queue's counter is kept per stream and reset by each launch's last take: launches
    of different tile counts in turn on one stream, on a side stream, and replays of a CUDA graph
    (which zero-fills its own counter) all run every tile once. The forward is deterministic, so
    each result equals the first bitwise; the first is held to the oracle."""
    from flashtile.ops import fwd_hopper

    calls = _count_gluon_calls(monkeypatch)
    monkeypatch.setattr(fwd_hopper, "program_count", lambda n_work, *_: (3, True))
    big = make_qkv(2, 1024, 1024, 4, 2, 128, dtype=torch.bfloat16, device="cuda", grad=False)
    small = make_qkv(1, 256, 512, 2, 2, 128, dtype=torch.bfloat16, device="cuda", grad=False)
    run = attention(True)
    first = run(*big)
    check_against_oracle(lambda *_: first, *big, causal=True, grads=False)
    small_first = run(*small)
    for inputs, expected in ((big, first), (small, small_first), (big, first)):
        assert all(torch.equal(a, b) for a, b in zip(run(*inputs), expected))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = run(*big)
    torch.cuda.current_stream().wait_stream(side)
    assert all(torch.equal(a, b) for a, b in zip(on_side, first))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(*big)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(captured, first))
    torch.cuda.synchronize()
    assert len(fwd_hopper._work_counters) >= 2 and all(c.item() == 0 for c in fwd_hopper._work_counters.values())
    assert len(calls) >= 7


GLUON_WINDOW_CASES = [
    # (shape, window): left edges mid-tile, both bounds, one key, right bound only, left bound only,
    # key tails, Sq > Sk with causal (the first rows see no key: out 0, LSE +inf), GQA
    ((2, 1024, 1024, 4, 2, 128), (100, 0)), ((2, 1024, 1024, 4, 2, 128), (256, 64)),
    ((1, 512, 700, 2, 2, 128), (0, 0)), ((1, 512, 700, 2, 2, 128), (-1, 50)),
    ((1, 384, 2340, 4, 4, 256), (1000, -1)), ((2, 256, 1000, 2, 1, 64), (3, 3)),
    ((1, 512, 300, 2, 2, 128), (-1, 0)), ((1, 640, 200, 2, 1, 64), (40, 10)),
]


@pytest.mark.parametrize("shape, window", GLUON_WINDOW_CASES,
                         ids=[f"{case_id(*shape)}-w{left}_{right}" for shape, (left, right) in GLUON_WINDOW_CASES])
def test_gluon_forward_windows(shape, window, monkeypatch):
    """Sliding windows on the Gluon forward (every length and window forced onto it), by the
    tolerance rule on out and lse and, through the tl backward on its LSE, dq, dk, dv."""
    calls = _count_gluon_calls(monkeypatch)
    q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device="cuda")

    def attn(q, k, v):
        out, lse, _ = flashtile.flash_attn_func(q, k, v, window_size=window, return_attn_probs=True)
        return out, lse

    check_against_oracle(attn, q, k, v, window_size=window)
    assert calls, "the Gluon forward did not run"


HALF_DIAGONAL_CASES = [
    # (shape, causal, window, softcap): right bounds whose diagonal leaves consumer 0 (a work tile's
    # first 64 rows) the last key tile's first half (fwd_hopper._half_diagonal): square causal;
    # Sk - Sq = 64 (consumer 0 sees none of the last tile), 100 (part of its first half), 165 with
    # a partial last key tile; Sq > Sk (first rows see no key); a right-only window; softcap; GQA
    ((2, 1024, 1024, 4, 2, 128), True, (-1, -1), 0.0), ((1, 512, 576, 2, 1, 128), True, (-1, -1), 0.0),
    ((1, 512, 612, 2, 2, 64), True, (-1, -1), 0.0), ((1, 640, 805, 2, 1, 128), True, (-1, -1), 0.0),
    ((1, 768, 640, 2, 2, 64), True, (-1, -1), 0.0), ((1, 512, 512, 2, 1, 128), False, (-1, 32), 0.0),
    ((1, 512, 512, 2, 2, 64), True, (-1, -1), 5.0), ((1, 384, 384, 4, 1, 128), True, (-1, -1), 5.0),
]


@pytest.mark.parametrize("case", HALF_DIAGONAL_CASES, ids=_masked_case_ids(HALF_DIAGONAL_CASES))
def test_gluon_forward_half_diagonal(case, monkeypatch):
    """Consumer 0's half key tile on the diagonal (two consumers, 128-key tiles: head dims 64 and
    128 under a right bound), at every offset of the diagonal against the tiles: out, lse and,
    through the backward on that LSE, dq, dk, dv by the tolerance rule."""
    calls = _count_gluon_calls(monkeypatch)
    _check_forward_and_lse(*case)
    assert calls, "the Gluon forward did not run"


GLUON_BWD_WINDOW_CASES = [
    # lengths multiples of the backward's tiles: both bounds, one key, right bound only, left bound
    # only, Sq > Sk (the first rows see no key), GQA, head dims 64 / 128 / 256
    ((2, 1024, 1024, 4, 2, 128), (256, 64)), ((1, 512, 768, 2, 2, 128), (0, 0)),
    ((1, 512, 768, 2, 2, 128), (-1, 50)), ((1, 384, 2368, 4, 4, 256), (1000, -1)),
    ((2, 256, 1024, 2, 1, 64), (3, 3)), ((1, 512, 256, 2, 2, 128), (-1, 0)), ((2, 640, 256, 2, 1, 64), (40, 10)),
    ((1, 256, 512, 2, 1, 256), (100, 30)),
]


@pytest.mark.parametrize("shape, window", GLUON_BWD_WINDOW_CASES,
                         ids=[f"{case_id(*shape)}-w{left}_{right}" for shape, (left, right) in GLUON_BWD_WINDOW_CASES])
def test_gluon_backward_windows(shape, window, monkeypatch):
    """Sliding windows on the Gluon backward (and forward; every length and window forced onto
    them), by the tolerance rule on out, lse, dq, dk, dv."""
    fwd_calls, bwd_calls = _count_gluon_calls(monkeypatch), _count_gluon_bwd_calls(monkeypatch)
    q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device="cuda")

    def attn(q, k, v):
        out, lse, _ = flashtile.flash_attn_func(q, k, v, window_size=window, return_attn_probs=True)
        return out, lse

    check_against_oracle(attn, q, k, v, window_size=window)
    assert fwd_calls and bwd_calls, "the Gluon kernels did not run"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gluon_forward_zero_scale(causal, monkeypatch):
    """softmax_scale = 0: uniform attention over the visible keys; the causal mask is applied after
    scaling, so masked scores are -inf, not 0 * -inf = NaN."""
    calls = _count_gluon_calls(monkeypatch)
    q, k, v = make_qkv(1, 2048, 2048, 2, 2, 128, dtype=torch.bfloat16, device="cuda")
    check_against_oracle(attention_with_scale(causal, 0.0), q, k, v, causal=causal, softmax_scale=0.0)
    assert calls, "the Gluon forward did not run"


def attention_with_scale(causal, softmax_scale):
    def attn(q, k, v):
        out, lse, _ = flashtile.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                                return_attn_probs=True)
        return out, lse

    return attn


GLUON_BWD_SHAPES = [(2, 2048, 2048, 4, 4, 128), (1, 1024, 3072, 4, 2, 128), (2, 576, 1024, 4, 1, 128),
                    (1, 128, 128, 2, 2, 128), (2, 1024, 1024, 4, 2, 64), (1, 320, 1152, 6, 3, 64),
                    (2, 1024, 1024, 4, 2, 256), (1, 192, 704, 4, 1, 256), (1, 64, 64, 2, 2, 256)]


def _count_gluon_bwd_calls(monkeypatch):
    """The Gluon backward's launches, with its thresholds at 0."""
    monkeypatch.setattr(configs, "SM90_GLUON_BWD_WINDOW_MIN_KEYS", {d: 1 for d in (64, 128, 256)})
    return _count_launches(monkeypatch, "bwd_hopper", "hopper_bwd", "SM90_GLUON_BWD",
                           dict.fromkeys(configs.SM90_GLUON_BWD, 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GLUON_BWD_SHAPES, ids=[case_id(*s) for s in GLUON_BWD_SHAPES])
def test_gluon_backward_matches_oracle(shape, causal, dtype, monkeypatch):
    """The Hopper Gluon backward (ops/bwd_hopper.py): dQ by atomics across key tiles and (GQA)
    dK/dV summed over the group inside a program; causal with Sq < Sk (the diagonal cuts 64-row
    tiles at different offsets per 128-key tile)."""
    calls = _count_gluon_bwd_calls(monkeypatch)
    q, k, v = make_qkv(*shape, dtype=dtype, device="cuda")
    check_against_oracle(attention(causal), q, k, v, causal=causal)
    assert calls, "the Gluon backward did not run"


CAST_SHAPES = [(2, 1024, 1024, 4, 2, 128), (1, 320, 1152, 4, 4, 128), (1, 1024, 1024, 8, 2, 64)]
# (causal, window_size): the masks the kernel may convert dQ under (bwd_hopper.cast_dq_in_kernel)
CAST_MASKS = {"full": (False, (-1, -1)), "causal": (True, (-1, -1)), "right-window": (False, (-1, 96))}


@pytest.mark.parametrize("in_kernel", [True, False], ids=["cast-in-kernel", "cast-after"])
@pytest.mark.parametrize("mask", list(CAST_MASKS))
@pytest.mark.parametrize("shape", CAST_SHAPES, ids=[case_id(*s) for s in CAST_SHAPES])
def test_gluon_backward_casts_dq_either_way(shape, mask, in_kernel, monkeypatch):
    """dQ converted to the input dtype inside the kernel, by the program whose reductions complete
    each tile (bwd_hopper's CAST_DQ; under a right bound each tile counts only the key tiles its
    rows see, and with Sq < Sk the diagonal cuts tiles at other offsets), or by the cast after it;
    GQA, one launch and one launch per KV head (each with its own dQ buffer, the counters shared)."""
    from flashtile.ops import bwd_hopper

    calls = _count_gluon_bwd_calls(monkeypatch)
    monkeypatch.setattr(bwd_hopper, "cast_dq_in_kernel", lambda *args: in_kernel)
    causal, window = CAST_MASKS[mask]

    def attn(q, k, v):
        out, lse, _ = flashtile.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
        return out, lse

    q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device="cuda")
    check_against_oracle(attn, q, k, v, causal=causal, window_size=window)
    one_launch = len(calls)
    monkeypatch.setattr(bwd_hopper, "head_chunks", lambda n_kv_heads, *_: [(h, 1) for h in range(n_kv_heads)])
    check_against_oracle(attn, q, k, v, causal=causal, window_size=window)
    assert one_launch and len(calls) > one_launch, "the Gluon backward did not run"


def test_gluon_launches_reuse_encoded_descriptors(monkeypatch):
    """ops/launch.FastLaunch calls triton's C launcher itself and keeps each encoded TMA
    descriptor per address, shape and strides: repeated calls (whose tensors come back at the
    same addresses) and calls of other lengths on the same compiled kernels must still match the
    oracle, and the Gluon kernels must take that path on this triton."""
    from flashtile.ops import bwd_hopper, fwd_hopper

    fwd_calls, bwd_calls = _count_gluon_calls(monkeypatch), _count_gluon_bwd_calls(monkeypatch)
    for shape in [(2, 1024, 1024, 4, 2, 128)] * 3 + [(1, 512, 1536, 4, 2, 128), (2, 1024, 1024, 4, 2, 128)]:
        q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device="cuda")
        check_against_oracle(attention(True), q, k, v, causal=True)
    assert len(fwd_calls) >= 5 and len(bwd_calls) >= 5
    for launcher in (fwd_hopper._hopper_fwd_launch, bwd_hopper._HOPPER_BWD.launch):
        directs = [direct for _, direct in launcher.compiled.values()]  # this test's and any earlier ones'
        assert directs and None not in directs and any(direct.encoded for direct in directs)


@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gluon_backward_in_head_chunks(causal, head_dim, monkeypatch):
    """One launch per KV head (as head_chunks splits large calls in two): every launch's dQ buffer
    is indexed from its own first head."""
    from flashtile.ops import bwd_hopper

    calls = _count_gluon_bwd_calls(monkeypatch)
    monkeypatch.setattr(bwd_hopper, "head_chunks", lambda n_kv_heads, *_: [(h, 1) for h in range(n_kv_heads)])
    q, k, v = make_qkv(2, 512, 768, 6, 3, head_dim, dtype=torch.bfloat16, device="cuda")
    check_against_oracle(attention(causal), q, k, v, causal=causal)
    assert calls


GLUON_SOFTCAP_SHAPES = [(2, 1024, 1024, 4, 2, 64), (1, 256, 1152, 4, 4, 128), (1, 384, 768, 2, 1, 256)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GLUON_SOFTCAP_SHAPES, ids=[case_id(*s) for s in GLUON_SOFTCAP_SHAPES])
def test_gluon_softcap_matches_oracle(shape, causal, monkeypatch):
    """Softcap on the Gluon forward and backward (scores cap * tanh(S * scale / cap), dS times
    1 - tanh^2), by the tolerance rule on out, lse, dq, dk, dv; small scores' tanh is nearly
    linear, so the scale is raised until the cap bends most of them."""
    fwd_calls, bwd_calls = _count_gluon_calls(monkeypatch), _count_gluon_bwd_calls(monkeypatch)
    q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device="cuda")

    def attn(q, k, v):
        out, lse, _ = flashtile.flash_attn_func(q, k, v, softmax_scale=0.5, causal=causal, softcap=3.0,
                                                return_attn_probs=True)
        return out, lse

    check_against_oracle(attn, q, k, v, causal=causal, softmax_scale=0.5, softcap=3.0)
    assert fwd_calls, "the Gluon forward did not run"
    # Entries measured slower with softcap keep the tl backward (configs.SM90_GLUON_BWD_NO_SOFTCAP).
    assert bool(bwd_calls) == ((shape[-1], causal) not in configs.SM90_GLUON_BWD_NO_SOFTCAP)


@pytest.mark.parametrize("merge", [False, True], ids=["last-group-alone", "last-two-merged"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gluon_causal_grid_in_head_groups(head_dim, merge, monkeypatch):
    """Causal Gluon forward and backward with heads taken in groups (ops/hopper_order.py) that do
    not divide the 2 x 4 heads: the forward's groups of 3 (3, 3, 2) and the backward's of 6 (it
    streams Q/dO, half the forward's K/V bytes here), the last group alone or merged with the one
    before it (``tail_group``'s choice forced). Every (head, tile) program must still run exactly
    once, which the oracle comparison checks."""
    from flashtile.ops import hopper_order

    fwd_calls, bwd_calls = _count_gluon_calls(monkeypatch), _count_gluon_bwd_calls(monkeypatch)
    q, k, v = make_qkv(2, 256, 512, 4, 4, head_dim, dtype=torch.bfloat16, device="cuda")
    per_head = 2 * 512 * head_dim * 2  # the forward's K/V bytes per head
    monkeypatch.setattr(hopper_order, "L2_GROUP_BYTES", 3 * per_head)
    assert hopper_order.head_group(True, 8, per_head) == 3 and hopper_order.head_group(True, 8, per_head // 2) == 6
    # Any simulated gain (or none at all) decides; the choice is cached, so cleared before and after.
    monkeypatch.setattr(hopper_order, "MERGE_GAIN", -1.0 if merge else 1.0)
    hopper_order.tail_group.cache_clear()
    try:
        assert hopper_order.tail_group(True, 8, 2, 3, 132) == (1 if merge else 2)
        check_against_oracle(attention(True), q, k, v, causal=True)
    finally:
        hopper_order.tail_group.cache_clear()
    assert fwd_calls and bwd_calls


def test_gluon_backward_frees_each_dq_chunk_before_the_next(monkeypatch):
    """head_chunks splits the float32 dQ buffer to cap peak memory: each launch's buffer (and
    its TMA descriptor, which holds a reference to it) is gone before the next is allocated.
    Four one-head chunks; a leak would keep all four alive at the peak."""
    from flashtile.ops import bwd_hopper

    calls = _count_gluon_bwd_calls(monkeypatch)
    monkeypatch.setattr(bwd_hopper, "head_chunks", lambda n_kv_heads, *_: [(h, 1) for h in range(n_kv_heads)])
    batch, seqlen, heads, head_dim = 1, 2048, 4, 128
    q, k, v = make_qkv(batch, seqlen, seqlen, heads, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    out = flashtile.flash_attn_func(q, k, v)
    dout = torch.randn_like(out)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.grad(out, (q, k, v), dout)
    extra = torch.cuda.max_memory_allocated() - base
    grads = 3 * batch * seqlen * heads * head_dim * 2
    chunk = batch * seqlen * head_dim * 4  # one KV head's float32 dQ
    assert calls and extra < grads + 2 * chunk, (extra, grads, chunk)


def test_gluon_backward_dispatch_rules(monkeypatch):
    """One check per rule of hopper_bwd_eligible (the forward's, plus Sq % 64, Sk a multiple of
    the kernel's keys per program, the entry's key length, windows from their number of keys per
    row, and deterministic=False), and deterministic=True through the API."""
    from flashtile.features import Features
    from flashtile.ops import bwd_hopper

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("Gluon backward: Hopper only")
    plain, causal = Features(0.1), Features(0.1, window_right=0)

    def tensors(seqlen_q=2048, seqlen_k=16384, head_dim=128, dtype=torch.bfloat16):
        q = torch.randn(1, seqlen_q, 2, head_dim, device="cuda", dtype=dtype)
        k = torch.randn(1, seqlen_k, 2, head_dim, device="cuda", dtype=dtype)
        return q, k, k.clone(), q.clone()

    eligible = bwd_hopper.hopper_bwd_eligible
    for (head_dim, masked), min_seqlen_k in configs.SM90_GLUON_BWD.items():
        features = causal if masked else plain
        block_n = bwd_hopper._kernel_for(head_dim).block_n
        shortest = max(min_seqlen_k, 128)  # causal needs Sk >= Sq = 128
        assert eligible(*tensors(128, shortest, head_dim), features, None)
        if min_seqlen_k > 128:
            assert not eligible(*tensors(128, shortest - block_n, head_dim), features, None)
        assert not eligible(*tensors(128, shortest + block_n // 2, head_dim), features, None)  # Sk % block_n
        assert not eligible(*tensors(128 + 32, shortest, head_dim), features, None)  # Sq % 64
        assert not eligible(*tensors(128, shortest, head_dim), Features(0.1, window_right=0 if masked else -1,
                                                                         deterministic=True), None)
    assert not eligible(*tensors(head_dim=96), plain, None)
    assert not eligible(*tensors(dtype=torch.float32), plain, None)
    # Sliding windows, and causal with Sq > Sk, from configs.SM90_GLUON_BWD_WINDOW_MIN_KEYS keys per row
    assert eligible(*tensors(seqlen_q=16384 + 64), causal, None)
    for head_dim, min_keys in configs.SM90_GLUON_BWD_WINDOW_MIN_KEYS.items():
        window = tensors(head_dim=head_dim)
        assert eligible(*window, Features(0.1, window_left=min_keys - 1, window_right=0), None)
        assert not eligible(*window, Features(0.1, window_left=min_keys - 2, window_right=0), None)
        assert eligible(*window, Features(0.1, window_left=min_keys // 2, window_right=min_keys - min_keys // 2 - 1),
                        None)
    q, k, v, dout = tensors()
    assert not eligible(q, k, v, dout.transpose(1, 2).contiguous().transpose(1, 2), plain, None)
    assert not eligible(q, k, v, dout, plain, (None, None, 2048, 16384))  # varlen
    for features in (Features(0.1, dropout_p=0.1), Features(0.1, alibi_slopes=torch.ones(2, device="cuda"))):
        assert not eligible(q, k, v, dout, features, None)
    assert eligible(q, k, v, dout, Features(0.1, softcap=5.0), None)
    assert not eligible(q, k, v, dout, Features(0.1, window_right=0, softcap=5.0), None)  # SM90_GLUON_BWD_NO_SOFTCAP

    calls = _count_gluon_bwd_calls(monkeypatch)
    q, k, v = make_qkv(1, 1024, 1024, 2, 2, 128, dtype=torch.bfloat16, device="cuda")
    for deterministic, expected in ((True, 0), (False, 1)):
        calls.clear()
        out = flashtile.flash_attn_func(q, k, v, deterministic=deterministic)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert len(calls) == expected


def test_gluon_forward_dispatch_rules():
    """One check per rule of hopper_fwd_eligible: 16-bit, an entry of configs.SM90_GLUON_FWD for
    the head dim and mask, windows from a number of keys per row, no ALiBi/dropout (softcap is fine),
    dense, contiguous, query lengths multiples of 128 (64 for three-consumer tiles), at least the
    entry's min_seqlen_k keys (below it, its SM90_GLUON_FWD_SHORT tile's), Hopper."""
    from flashtile.features import Features
    from flashtile.ops.fwd_hopper import hopper_fwd_eligible

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("Gluon forward: Hopper only")
    plain, causal = Features(0.1), Features(0.1, window_right=0)

    def qkv(seqlen_q=2048, seqlen_k=16384, head_dim=128, dtype=torch.bfloat16):
        q = torch.randn(1, seqlen_q, 2, head_dim, device="cuda", dtype=dtype)
        k = torch.randn(1, seqlen_k, 2, head_dim, device="cuda", dtype=dtype)
        return q, k, k.clone()

    for (head_dim, masked), tile in configs.SM90_GLUON_FWD.items():
        features = causal if masked else plain
        short = configs.SM90_GLUON_FWD_SHORT.get((head_dim, masked))

        def eligible(seqlen_k, features=features, head_dim=head_dim):
            return hopper_fwd_eligible(*qkv(seqlen_k=seqlen_k, seqlen_q=128, head_dim=head_dim), features, None)

        # the entry's tile from its length (past its short tile's bound); below, the short tile's rule
        assert eligible(tile.min_seqlen_k if short is None else max(tile.min_seqlen_k, short.below))
        shortest = tile if short is None else short.tile
        assert eligible(shortest.min_seqlen_k) and not eligible(shortest.min_seqlen_k - shortest.block_n)
        if short is not None:
            assert eligible(short.below - 1)
            # softcap calls keep the entry's tile and its threshold
            capped = Features(0.1, window_right=0 if masked else -1, softcap=5.0)
            assert eligible(short.tile.min_seqlen_k, capped) == (
                short.tile.min_seqlen_k >= (tile.softcap_min_seqlen_k or tile.min_seqlen_k))
        # any key length from there: the last tile's keys past the end are masked
        assert hopper_fwd_eligible(*qkv(seqlen_k=tile.min_seqlen_k + tile.block_n // 2 + 1, seqlen_q=128,
                                        head_dim=head_dim), features, None)
        if tile.softcap_min_seqlen_k is not None:  # with softcap, its own threshold
            capped = Features(0.1, window_right=0 if masked else -1, softcap=5.0)
            assert hopper_fwd_eligible(*qkv(seqlen_k=tile.softcap_min_seqlen_k, seqlen_q=128, head_dim=head_dim),
                                       capped, None)
            assert not hopper_fwd_eligible(*qkv(seqlen_k=tile.softcap_min_seqlen_k - tile.block_n, seqlen_q=128,
                                                head_dim=head_dim), capped, None)
    assert hopper_fwd_eligible(*qkv(dtype=torch.float16), plain, None)
    assert not hopper_fwd_eligible(*qkv(dtype=torch.float32), plain, None)
    assert not hopper_fwd_eligible(*qkv(head_dim=96), plain, None)
    assert not hopper_fwd_eligible(*qkv(seqlen_q=2048 + 64), plain, None)  # two consumers: Sq % 128
    # three consumers (192-row work tiles, head dim 64 here): any Sq % 64 == 0, the last tile past the end
    three = [key for key, tile in configs.SM90_GLUON_FWD.items() if tile.consumers == 3]
    assert three, "no table entry takes three consumers"
    for head_dim, masked in three:
        features = causal if masked else plain
        assert hopper_fwd_eligible(*qkv(seqlen_q=2048 + 64, head_dim=head_dim), features, None)
        assert not hopper_fwd_eligible(*qkv(seqlen_q=2048 + 32, head_dim=head_dim), features, None)
    for (head_dim, masked), short in configs.SM90_GLUON_FWD_SHORT.items():  # its own consumers' row rule
        features = causal if masked else plain
        rows = 128 if short.tile.consumers == 2 else 64
        assert hopper_fwd_eligible(*qkv(seqlen_q=rows, seqlen_k=short.tile.min_seqlen_k, head_dim=head_dim),
                                   features, None)
        assert not hopper_fwd_eligible(*qkv(seqlen_q=rows * 3 // 2, seqlen_k=short.tile.min_seqlen_k,
                                            head_dim=head_dim), features, None)
    assert hopper_fwd_eligible(*qkv(seqlen_q=128), causal, None)  # Sq < Sk
    assert hopper_fwd_eligible(*qkv(seqlen_q=16384 + 128), plain, None)
    # Sliding windows, and causal with Sq > Sk (its first rows see no key), take the causal
    # entry when a row sees at least configs.SM90_GLUON_FWD_WINDOW_MIN_KEYS keys.
    assert hopper_fwd_eligible(*qkv(seqlen_q=16384 + 128), causal, None)
    for head_dim, min_keys in configs.SM90_GLUON_FWD_WINDOW_MIN_KEYS.items():
        tensors = qkv(head_dim=head_dim)
        assert hopper_fwd_eligible(*tensors, Features(0.1, window_left=min_keys - 1, window_right=0), None)
        assert not hopper_fwd_eligible(*tensors, Features(0.1, window_left=min_keys - 2, window_right=0), None)
        half = min_keys // 2
        assert hopper_fwd_eligible(*tensors, Features(0.1, window_left=half, window_right=min_keys - half - 1), None)
        assert hopper_fwd_eligible(*tensors, Features(0.1, window_left=min_keys - 2), None)  # no right bound
    q, k, v = qkv()
    assert not hopper_fwd_eligible(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, plain, None)
    assert not hopper_fwd_eligible(q, k, v, plain, (None, None, 2048, 16384))  # varlen
    for features in (Features(0.1, alibi_slopes=torch.ones(2, device="cuda")), Features(0.1, dropout_p=0.1)):
        assert not hopper_fwd_eligible(q, k, v, features, None)
    assert hopper_fwd_eligible(q, k, v, Features(0.1, softcap=5.0), None)
    try:
        configs.GLUON_FWD = False
        assert not hopper_fwd_eligible(q, k, v, plain, None)
    finally:
        configs.GLUON_FWD = True


def test_tma_needs_aligned_strides():
    """Streamed tiles go by TMA only where the entry asks, for aligned 16-bit tiles of an
    unpadded head dim: a K whose head stride is not a multiple of 16 bytes, fp32, or a head dim
    of 96 (padded to 128) fall back to pointer loads."""
    from flashtile.configs import TileConfig
    from flashtile.ops.common import stream_by_tma

    cfg = TileConfig(128, 128, 8, 3, tma=True)
    q = torch.randn(1, 64, 2, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 64, 2, 132, device="cuda", dtype=torch.bfloat16)[..., :128]  # head stride: 264 bytes
    assert stream_by_tma(cfg, q, q)
    assert not stream_by_tma(TileConfig(128, 128, 8, 3), q, q)
    assert not stream_by_tma(cfg, k, k)
    assert not stream_by_tma(cfg, q, k)
    assert not stream_by_tma(cfg, q.float(), q.float())
    assert not stream_by_tma(cfg, q[..., :96], q[..., :96])


@pytest.mark.parametrize("std", [1.0, 4.0])
def test_scaled_inputs_bf16(std):
    q, k, v = make_qkv(2, 2048, 2048, 8, 2, 128, dtype=torch.bfloat16, device="cuda", std=std)
    check_against_oracle(attention(True), q, k, v, causal=True)


@pytest.mark.parametrize("head_dim", [64, 256])
def test_fp32_inputs(head_dim):
    q, k, v = make_qkv(2, 1000, 1100, 4, 2, head_dim, dtype=torch.float32, device="cuda")
    check_against_oracle(attention(True), q, k, v, causal=True)


def _check_slice(out, lse, grads, q, k, v, dout, batch_slice, head_slice, causal):
    """The tolerance rule on one slice of a huge call (the oracle can't hold all of it)."""
    def cut(t):
        return t[batch_slice][:, :, head_slice]

    qs, ks, vs, dos = (cut(t).detach() for t in (q, k, v, dout))
    q64, k64, v64 = (t.double().requires_grad_() for t in (qs, ks, vs))
    ref_out, ref_lse = attention_ref(q64, k64, v64, causal=causal)
    qs, ks, vs = (t.clone().requires_grad_() for t in (qs, ks, vs))
    low_out, low_lse = attention_ref(qs, ks, vs, causal=causal, upcast=False)
    assert_tolerance_rule("out", cut(out), ref_out, low_out)
    assert_tolerance_rule("lse", lse[batch_slice][:, head_slice], ref_lse, low_lse)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dos.double())
    low_grads = torch.autograd.grad(low_out, (qs, ks, vs), dos)
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_tolerance_rule(name, cut(g), r, lo)


@pytest.mark.bigmem
def test_batch_times_heads_beyond_grid_limit_and_2pow31_elements():
    """B*H = 140000 > 65535 programs on one axis; q/k/v hold 2.3e9 elements each."""
    batch, seqlen, heads, head_dim = 140_000, 128, 1, 128
    assert batch * seqlen * heads * head_dim > 2**31
    q, k, v = make_qkv(batch, seqlen, seqlen, heads, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    out, lse, _ = flashtile.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for batch_slice in (slice(0, 2), slice(batch - 3, batch)):
        _check_slice(out, lse, grads, q, k, v, dout, batch_slice, slice(None), causal=True)


@pytest.mark.bigmem
def test_seqlen_k_beyond_2pow31_elements():
    """One K/V sequence of 1M tokens x 16 heads x 128 dims: offsets along seqlen need int64."""
    seqlen_k, heads, head_dim = 1_048_576 + 100, 16, 128
    assert seqlen_k * heads * head_dim > 2**31
    q, k, v = make_qkv(1, 64, seqlen_k, heads, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    out, lse, _ = flashtile.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _check_slice(out, lse, grads, q, k, v, dout, slice(None), slice(heads - 2, heads), causal=True)


def test_backward_bitwise_reproducible_at_scale():
    q, k, v = make_qkv(2, 4096, 4096, 16, 4, 128, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(2, 4096, 16, 128, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        out = flashtile.flash_attn_func(q, k, v, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_inputs_on_different_devices_rejected():
    q, k, v = make_qkv(1, 16, 16, 2, 2, 32, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="v is on cpu but q is on cuda"):
        flashtile.flash_attn_func(q, k, v.cpu())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_inputs_device():
    q, k, v = make_qkv(1, 256, 256, 2, 2, 64, dtype=torch.float16, device="cuda:1")
    with torch.cuda.device(0):
        check_against_oracle(attention(True), q, k, v, causal=True)
