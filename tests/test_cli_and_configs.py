"""The `flashtile` command and the tile-table dispatch (both run without a GPU)."""

import contextlib
import itertools

import pytest
import torch

import flashtile
from flashtile import cli, configs
from flashtile.autograd import use_triton_on_cpu
from flashtile.configs import TileConfig, tile_config

H100_SHARED_BYTES = 232448  # the most shared memory one block may take on an H100 (227 KB, opted in)


def test_info_checks_the_current_path(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"flashtile {flashtile.__version__}" in out and "check     ok" in out


def test_info_names_the_hopper_paths(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "Gluon forward/backward" in cli._path_description(torch.device("cuda", 0))
    monkeypatch.setattr("triton.__version__", "3.7.0")
    assert "no Gluon kernels (they need triton 3.6)" in cli._path_description(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert cli._path_description(torch.device("cuda", 0)) == "Triton kernels, generic tile table (sm80)"


def test_demo_runs_and_reports_errors(capsys):
    assert cli.main(["demo", "--seqlens", "64,300"]) == 0
    out = capsys.readouterr().out
    assert "300" in out and "flashtile err" in out


def test_cpu_tensors_get_the_interpreter_tiles():
    assert tile_config(torch.device("cpu"), torch.float16, 64, "fwd", False) == configs.INTERPRETER


@pytest.mark.parametrize("mode, block_d, causal",
                         list(itertools.product(["fwd", "dkdv", "dq"], [16, 32, 64, 128, 256], [False, True])))
def test_hopper_has_a_measured_entry_for_every_kernel(monkeypatch, mode, block_d, causal):
    monkeypatch.setattr(configs, "_arch", lambda index: (9, 0))
    cfg = tile_config(torch.device("cuda", 0), torch.bfloat16, block_d, mode, causal)
    assert cfg is configs.SM90[(mode, block_d, causal)]


@pytest.mark.parametrize("block_d", [16, 32, 64, 128])
def test_varlen_takes_its_own_entry_where_one_exists(monkeypatch, block_d):
    monkeypatch.setattr(configs, "_arch", lambda index: (9, 0))
    cuda = torch.device("cuda", 0)
    varlen = tile_config(cuda, torch.bfloat16, block_d, "fwd", False, varlen=True)
    assert varlen is configs.SM90_VARLEN.get(("fwd", block_d, False), configs.SM90[("fwd", block_d, False)])
    assert (varlen != configs.SM90[("fwd", block_d, False)]) == (block_d <= 64)
    # the backward and causal forwards keep the dense entries
    assert tile_config(cuda, torch.bfloat16, block_d, "fwd", True, varlen=True) is configs.SM90[("fwd", block_d, True)]
    assert tile_config(cuda, torch.bfloat16, block_d, "dq", False, varlen=True) is configs.SM90[("dq", block_d, False)]


@pytest.mark.parametrize("block_d", [32, 64, 128])
@pytest.mark.parametrize("mode", ["fwd", "dkdv", "dq"])
def test_softcap_and_dropout_take_the_masked_tiles_at_small_head_dims(monkeypatch, mode, block_d):
    monkeypatch.setattr(configs, "_arch", lambda index: (9, 0))
    cuda = torch.device("cuda", 0)
    heavy = tile_config(cuda, torch.bfloat16, block_d, mode, False, heavy_scores=True)
    switched = block_d <= 64 and mode in ("fwd", "dkdv")
    assert heavy is configs.SM90[(mode, block_d, switched)]


@pytest.mark.parametrize("mode", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("block_d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_long_loops_take_the_long_table_where_it_has_an_entry(monkeypatch, mode, block_d, causal):
    monkeypatch.setattr(configs, "_arch", lambda index: (9, 0))
    cuda = torch.device("cuda", 0)
    key = (mode, block_d, causal)
    long = tile_config(cuda, torch.bfloat16, block_d, mode, causal, long_loop=True)
    assert long is configs.SM90_LONG.get(key, configs.SM90[key])
    assert tile_config(cuda, torch.bfloat16, block_d, mode, causal) is configs.SM90[key]
    assert not configs.SM90[key].tma  # short loops never build descriptors


def test_launchers_call_a_loop_long_from_tma_min_seqlen_streamed_rows(monkeypatch):
    """Forward and dQ stream keys, dK/dV streams queries: each asks for the long table from
    TMA_MIN_SEQLEN of its own rows on (lowered here so the interpreter's shapes reach it)."""
    from flashtile.ops import bwd, fwd

    monkeypatch.setattr(configs, "TMA_MIN_SEQLEN", 24)
    asked = []
    for module in (fwd, bwd):
        real = module.tile_config
        monkeypatch.setattr(module, "tile_config",
                            lambda *a, real=real, **kw: asked.append((a[3], kw["long_loop"])) or real(*a, **kw))
    cuda = torch.cuda.is_available()
    for seqlen_q, seqlen_k, expected in ((24, 23, {"fwd": False, "dkdv": True, "dq": False}),
                                         (23, 24, {"fwd": True, "dkdv": False, "dq": True})):
        q = torch.randn(1, seqlen_q, 2, 16, dtype=torch.float16, device="cuda" if cuda else "cpu", requires_grad=True)
        k, v = (torch.randn_like(q[:, :1].expand(1, seqlen_k, 2, 16)).requires_grad_() for _ in range(2))
        asked.clear()
        with contextlib.nullcontext() if cuda else use_triton_on_cpu():
            out = flashtile.flash_attn_func(q, k, v)
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert dict(asked) == expected


@pytest.mark.parametrize("launcher, loader, module", [("fwd", "_gluon_forward", "fwd_hopper"),
                                                     ("bwd", "_gluon_backward", "bwd_hopper")])
def test_launchers_work_without_gluon(monkeypatch, launcher, loader, module):
    """A triton without Gluon: the Hopper kernels' modules fail to import, the launchers find no
    Gluon path (and the tl kernels serve every call)."""
    import importlib
    import sys

    from flashtile import ops

    load = getattr(importlib.import_module(f"flashtile.ops.{launcher}"), loader)
    load.cache_clear()
    monkeypatch.setitem(sys.modules, f"flashtile.ops.{module}", None)  # importing it raises ImportError
    monkeypatch.delattr(ops, module, raising=False)  # (an earlier import left it on the package)
    try:
        assert load() is None
    finally:
        load.cache_clear()
    monkeypatch.undo()
    assert load() is not None  # triton 3.6, as pinned, has it
    load.cache_clear()
    monkeypatch.setattr("triton.__version__", "3.7.0")  # Gluon's API is not stable across releases
    try:
        assert load() is None
    finally:
        load.cache_clear()


def test_gluon_kernels_build_for_hopper_on_any_machine():
    """Every entry of configs.SM90_GLUON_FWD (and _SHORT) and SM90_GLUON_BWD compiles for sm90 on this (GPU-less)
    machine through bench/ptxas_report.py, and its SASS multiplies on Hopper's warpgroup MMA
    (HGMMA, none of the Ampere-style HMMA, never serialized by ptxas: ``serialized_wgmma``) with operands
    arriving by TMA (UTMALDG); the backward's dQ leaves by TMA reductions (UTMAREDG). Runs in a
    child process: the tests' Triton interpreter would turn the kernel into Python."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.join(root, "src")
    specs = [f"{kind},{'causal' if causal else 'full'},{d}"
             for kind, table in (("gluon", configs.SM90_GLUON_FWD), ("gluon_short", configs.SM90_GLUON_FWD_SHORT),
                                 ("gluon_bwd", configs.SM90_GLUON_BWD))
             for d, causal in sorted(table)]
    run = subprocess.run([sys.executable, os.path.join(root, "bench", "ptxas_report.py"), *specs],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == specs
    from flashtile.ops import fwd_hopper

    for line in lines:
        counts = {op: int(n) for op, n in re.findall(r"(HGMMA|HMMA|UTMALDG|UTMASTG|UTMAREDG) (\d+)", line)}
        assert counts["HGMMA"] > 0 and counts["HMMA"] == 0 and counts["UTMALDG"] > 0, line
        assert (counts["UTMAREDG"] > 0) == line.startswith("gluon_bwd"), line
        # within the shared memory one block may have on an H100 (227 KB), or the launch fails
        assert int(re.search(r"shared (\d+) B", line).group(1)) <= H100_SHARED_BYTES, line
        if line.startswith(("gluon,", "gluon_short,")):  # the forward's output by TMA stores where its entry says so
            kind, mask, head_dim = line.split(":")[0].split(",")
            key = (int(head_dim), mask == "causal")
            tile = configs.SM90_GLUON_FWD_SHORT[key].tile if kind == "gluon_short" else configs.SM90_GLUON_FWD[key]
            assert (counts["UTMASTG"] > 0) == fwd_hopper.o_by_tma(tile), line
        # ptxas did not make the asynchronous MMAs wait for one another for want of registers
        assert "SERIALIZED" not in line, line


def test_ptxas_report_names_every_wgmma_serialization():
    """Both reasons ptxas gives for serializing warpgroup MMAs (its own wording, from the logs of
    step 23's and step 24's variants) are reported, each once; other info lines are not."""
    serialized_wgmma = _bench_module("ptxas_report").serialized_wgmma
    log = (
        "ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due "
        "to insufficient register resources for the function '_hopper_fwd_kernel'\n"
        "ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due "
        "to non wgmma instructions reading accumulator registers of  a wgmma between start and end of the "
        "pipeline stage in the function '_hopper_fwd_kernel'\n"
        "ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due "
        "to insufficient register resources for the function '_other'\n"
        "ptxas info    : Used 168 registers, used 3 barriers\n"
    )
    assert serialized_wgmma(log) == ["C7512", "C7514"]
    assert serialized_wgmma("ptxas info    : Used 168 registers, 0 bytes spill stores\n") == []


def _bench_module(name):
    """A module of bench/ (which imports its siblings by plain name), imported with bench/ on the path."""
    import importlib
    import os
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bench)


def test_ab_backward_loads_variants_as_their_own_modules():
    """bench/ab_backward.py: ``NAME=PATH`` loads the file as a module of its own (its backward is
    not the current one), anything else is refused naming the spec; the masks' windows."""
    import os

    ab = _bench_module("ab_backward")
    from flashtile.ops import bwd_hopper

    name, backward = ab.load_variant(f"copy={bwd_hopper.__file__}")
    assert name == "copy" and backward is not bwd_hopper.hopper_bwd
    assert os.path.samefile(backward.__code__.co_filename, bwd_hopper.__file__)
    for bad in ("copy", "=x.py", "copy="):
        with pytest.raises(SystemExit, match="expected NAME=PATH"):
            ab.load_variant(bad)
    assert [ab.MASKS[m](4096) for m in ("full", "causal", "window")] == [(-1, -1), (-1, 0), (1023, 0)]


def test_ptxas_report_counts_spills_inside_loops_only():
    """bench/ptxas_report.loop_spills on an nvdisasm-style listing: the STL/LDL between a backward
    branch's target and the branch count, those before the loop or skipped by a forward branch do
    not."""
    loop_spills = _bench_module("ptxas_report").loop_spills
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
.L_x_0:
        /*0020*/                   LDL R3, [R1] ;
        /*0030*/                   STL.64 [R1+0x8], R4 ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
        /*0050*/              @!P1 BRA `(.L_x_1) ;
        /*0060*/                   LDL R5, [R1] ;
.L_x_1:
        /*0070*/                   EXIT ;
"""
    assert loop_spills(sass) == (1, 1)
    assert loop_spills(sass.replace("@P0 BRA `(.L_x_0)", "@P0 BRA `(.L_x_1)")) == (0, 0)  # no backward branch


def test_causal_gluon_grids_take_heads_in_groups_sized_to_l2():
    from flashtile.ops.hopper_order import L2_GROUP_BYTES, head_group

    assert head_group(False, 64, 1) == 1  # equal programs: plain head-major order
    assert head_group(True, 64, L2_GROUP_BYTES // 4) == 4
    assert head_group(True, 3, L2_GROUP_BYTES // 4) == 3  # no more than the heads there are
    assert head_group(True, 64, 4 * L2_GROUP_BYTES) == 1  # a head larger than the budget: alone
    assert head_group(True, 64, 0) == 64


def test_causal_gluon_grids_merge_their_last_two_groups_where_the_simulated_dispatch_says_so():
    from flashtile.ops import hopper_order
    from flashtile.ops.hopper_order import START_TILES, _simulated_finish, tail_group

    # The dispatch model: one SM runs everything; enough SMs finish with the longest program.
    assert _simulated_finish(3, 4, 2, 1, 1) == 3 * sum(4 - r + START_TILES for r in range(4))
    assert _simulated_finish(3, 4, 2, 1, 12) == 4 + START_TILES
    # 2 x 17 heads in groups of 4 at 4096 tokens (the backward: 32 key tiles per head) leaves a
    # last group of 2 heads whose programs start late (measured 6% slower, docs/performance.md
    # step 39): merged with the group before it. 4 x 16 heads fall well on 132 SMs: kept.
    assert tail_group(True, 34, 32, 4, 132) == 7
    assert tail_group(True, 64, 32, 4, 132) == 15
    assert tail_group(False, 34, 32, 1, 132) == 33  # equal programs: head-major
    assert tail_group(True, 3, 32, 4, 132) == 0  # one group
    assert tail_group(True, hopper_order.MAX_SIMULATED, 2, 4, 132) == hopper_order.MAX_SIMULATED // 4 - 1


def test_gluon_backward_splits_the_dq_buffer_only_for_long_sequences_that_keep_the_gpu_full():
    from flashtile.ops.bwd_hopper import head_chunks

    long = configs.GLUON_BWD_SPLIT_DQ_MIN_SEQLEN
    assert head_chunks(16, 128, 132, long) == [(0, 8), (8, 8)]  # B1 H16 at 16k keys: 128 programs per head
    assert head_chunks(16, 128, 132, long - 64) == [(0, 16)]  # shorter: one launch
    assert head_chunks(16, 16, 132, long) == [(0, 16)]  # 8 x 16 programs per half: under two per SM
    assert head_chunks(15, 1000, 132, long) == [(0, 15)]  # odd KV head count
    assert head_chunks(1, 1000, 132, long) == [(0, 1)]


def test_gluon_backward_casts_dq_in_the_kernel_only_where_measured_faster():
    """The head dims of CAST_DQ_HEAD_DIMS, unmasked or causal (a right bound alone that every row
    sees key 0 under), and only while every program's Q tiles fit the list of tiles it may convert."""
    from flashtile.ops.bwd_hopper import BLOCK_M, CAST_DQ_HEAD_DIMS, MAX_OWNED, cast_dq_in_kernel

    def rule(head_dim, mask, group_size=1, seqlen_q=2048, seqlen_k=2048):
        window = {"none": (-1, -1), "causal": (-1, 0), "right": (-1, 64), "left": (255, 0), "band": (255, 255)}
        return cast_dq_in_kernel(head_dim, *window[mask], group_size, seqlen_q, seqlen_k)

    for head_dim in (64, 128, 256):
        assert rule(head_dim, "none") == (head_dim in CAST_DQ_HEAD_DIMS["none"])
        assert rule(head_dim, "causal") == (head_dim in CAST_DQ_HEAD_DIMS["causal"])
        assert not rule(head_dim, "left") and not rule(head_dim, "band")  # a left bound
    causal_dim = CAST_DQ_HEAD_DIMS["causal"][0]
    assert rule(causal_dim, "causal", seqlen_q=1024) and rule(causal_dim, "right")
    assert not rule(causal_dim, "causal", seqlen_q=4096)  # Sq > Sk: the first rows see no key
    assert rule(causal_dim, "right", seqlen_q=2048 + 64) and not rule(causal_dim, "right", seqlen_q=2048 + 128)
    rows = MAX_OWNED.value * BLOCK_M
    assert rule(128, "none", 4, rows // 4, rows // 4) and not rule(128, "none", 4, rows // 4 + BLOCK_M, rows // 4)


def test_delta_kernel_refuses_a_counter_buffer_of_the_wrong_size():
    from flashtile.ops import bwd

    out = torch.zeros(1, 128, 2, 64)
    delta = torch.empty(1, 2, 128)
    with pytest.raises(ValueError, match="counts: expected one counter per 64 rows"):
        bwd.launch_delta(out, out, delta, counts=torch.zeros(3, dtype=torch.int32))


def test_gluon_tables_are_what_their_probes_measured():
    """SM90_GLUON_FWD / SM90_GLUON_BWD (and their window thresholds) hold the shortest
    length from which the committed probe results show the Gluon kernel at least as fast as the
    tl kernel at every longer length (bench/common.py's rule; the probes print these lines): no
    entry without its measurement."""
    import dataclasses
    import json
    import os

    common = _bench_module("common")
    gluon_table_rows, min_winning_seqlen, window_min_keys, short_tiles, schedule = (
        common.gluon_table_rows, common.min_winning_seqlen, common.window_min_keys, common.short_tiles,
        common.schedule)
    bench = os.path.dirname(common.__file__)
    assert min_winning_seqlen({512: 0.9, 1024: 1.1, 2048: 0.99, 4096: 1.2}) == 4096
    assert min_winning_seqlen({512: 1.0, 1024: 1.1}) == 512
    assert min_winning_seqlen({512: 1.2, 1024: 0.9}) is None
    assert common.short_tile_below([{512: 1.05, 1024: 1.02, 2048: 1.0}, {512: 1.04, 1024: 1.005}]) == 1024
    assert common.short_tile_below([{512: 1.05, 4096: 1.2}, {512: 1.02, 2048: 0.99}]) == 2048
    assert common.short_tile_below([{512: 1.05}, {512: 1.02}]) is None
    for table, name, min_of in ((configs.SM90_GLUON_FWD, "fwd", lambda tile: tile.min_seqlen_k),
                                (configs.SM90_GLUON_BWD, "bwd", lambda entry: entry)):
        with open(os.path.join(bench, "results", f"h100_gluon_{name}.json")) as f:
            lines = gluon_table_rows(json.load(f)["rows"])
        measured = {line.split(":")[0]: int(line.split(":")[1].split(",")[0]) for line in lines}
        expected = {str(key): min_of(entry) for key, entry in table.items()}
        assert {key: measured[key] for key in expected} == expected
    # The forward entries' softcap thresholds, from --tiles --softcap (each (mask, length)'s first
    # row is the table's tile, timed with the tl kernel).
    with open(os.path.join(bench, "results", "h100_gluon_fwd_tiles64_softcap.json")) as f:
        softcap_rows = json.load(f)["rows"]
    softcap_entries = {key: tile for key, tile in configs.SM90_GLUON_FWD.items() if tile.softcap_min_seqlen_k}
    assert softcap_entries
    for (head_dim, causal), tile in softcap_entries.items():
        firsts = {}
        for row in softcap_rows:
            if row["head_dim"] == head_dim and row["causal"] == causal and row["softcap"] > 0:
                firsts.setdefault(row["seqlen"], row)
        assert all(row["tile"]["consumers"] == tile.consumers and row["tile"]["queue"] == tile.queue
                   for row in firsts.values())
        ratios = {seqlen: row["tl_ms"] / row["ms"] for seqlen, row in firsts.items()}
        assert min_winning_seqlen(ratios) == tile.softcap_min_seqlen_k, (head_dim, causal, ratios)
    # The short tiles (SM90_GLUON_FWD_SHORT): what common.short_tiles chooses from the two --tiles
    # runs (the rule `gluon_fwd_probe.py --short-tiles` prints), bound, schedule and first length.
    runs = []
    for run in ("run1", "run2"):
        with open(os.path.join(bench, "results", f"h100_gluon_fwd_tiles_1221_{run}.json")) as f:
            runs.append(json.load(f)["rows"])
    chosen = {key: (below, candidate, start) for key, (below, candidate, start, _) in short_tiles(runs).items()}
    assert chosen == {key: (short.below, schedule(dataclasses.asdict(short.tile)), short.tile.min_seqlen_k)
                      for key, short in configs.SM90_GLUON_FWD_SHORT.items()}
    assert {short.tile.softcap_min_seqlen_k for short in configs.SM90_GLUON_FWD_SHORT.values()} == {None}
    # Softcap calls keep the entry's tile: the head-dim-64 short tile without its second Q buffer lost
    # to the tl kernel with softcap at every length below its bound (--tiles --softcap 30).
    with open(os.path.join(bench, "results", "h100_gluon_fwd_tiles64_short_softcap.json")) as f:
        capped = [row for row in json.load(f)["rows"] if (row["head_dim"], row["causal"]) == (64, False)
                  and row["seqlen"] < configs.SM90_GLUON_FWD_SHORT[(64, False)].below
                  and schedule(row["tile"]) == schedule(dict(block_n=128, k_slots=3, v_slots=3, pingpong=False,
                                                             consumers=2, o_tma=True))]
    assert len(capped) >= 2 and all(row["softcap"] > 0 and row["tl_ms"] < row["ms"] for row in capped)
    for name, table in (("fwd", configs.SM90_GLUON_FWD_WINDOW_MIN_KEYS),
                        ("bwd", configs.SM90_GLUON_BWD_WINDOW_MIN_KEYS)):
        with open(os.path.join(bench, "results", f"h100_gluon_{name}_windows.json")) as f:
            assert window_min_keys(json.load(f)["rows"]) == table


def test_sm_count_asks_torch_once_per_device(monkeypatch):
    """configs.sm_count, which the launchers call on every call: torch is asked once per device."""
    import types

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: asked.append(index) or types.SimpleNamespace(multi_processor_count=132 + index))
    configs._sm_count.cache_clear()
    try:
        assert configs.sm_count(torch.device("cuda", 0)) == 132 and configs.sm_count(torch.device("cuda", 1)) == 133
        assert configs.sm_count(torch.device("cuda", 0)) == 132
        assert asked == [0, 1]
    finally:
        configs._sm_count.cache_clear()


def test_gluon_forward_tile_by_key_length(monkeypatch):
    """configs.gluon_forward_tile: below an entry's SM90_GLUON_FWD_SHORT bound its short tile (at
    any shorter length: the eligibility rule checks the short tile's own minimum), from the bound
    on the entry's tile; softcap calls always the entry's; None without an entry."""
    tile_for = configs.gluon_forward_tile
    for key, short in configs.SM90_GLUON_FWD_SHORT.items():
        entry = configs.SM90_GLUON_FWD[key]
        assert short.tile.min_seqlen_k < short.below and short.tile != entry
        assert tile_for(*key, short.below - 1) is short.tile and tile_for(*key, short.tile.min_seqlen_k) is short.tile
        assert tile_for(*key, 64) is short.tile
        assert tile_for(*key, short.below) is entry and tile_for(*key, 16384) is entry
        assert tile_for(*key, short.tile.min_seqlen_k, True) is entry  # softcap
    # head dim 64 unmasked: two consumers below the entry's own length, where its three lose
    short_64 = configs.SM90_GLUON_FWD_SHORT[(64, False)]
    assert short_64.below == configs.SM90_GLUON_FWD[(64, False)].min_seqlen_k and short_64.tile.consumers == 2
    assert (256, True) not in configs.SM90_GLUON_FWD_SHORT
    causal_256 = configs.SM90_GLUON_FWD[(256, True)]
    assert tile_for(256, True, 64) is causal_256 and tile_for(256, True, 8192) is causal_256
    assert tile_for(96, False, 8192) is None
    monkeypatch.setattr(configs, "SM90_GLUON_FWD_SHORT", {})
    assert tile_for(64, False, 1024) is configs.SM90_GLUON_FWD[(64, False)]


def test_gluon_forward_program_count(monkeypatch):
    """The Gluon forward's grid ``(programs, queue)``: one program per SM when there are more work
    tiles than SMs, taking them from the queue under a causal or window mask where the table
    entry says ``queue``; one per work tile with few tiles, masked without ``queue``, or with
    configs.GLUON_FWD_PERSISTENT off."""
    from flashtile.ops import fwd_hopper

    monkeypatch.setattr(configs, "sm_count", lambda device: 132)
    count = fwd_hopper.program_count
    assert count(2048, False, False, "cuda") == (132, False)
    assert count(100, False, False, "cuda") == (100, False)
    assert count(2048, True, True, "cuda") == (132, True)
    assert count(100, True, True, "cuda") == (100, False)
    assert count(2048, True, False, "cuda") == (2048, False)
    monkeypatch.setattr(configs, "GLUON_FWD_PERSISTENT", False)
    assert count(2048, False, False, "cuda") == (2048, False)
    assert count(2048, True, True, "cuda") == (2048, False)
    # The masked entries that take the queue: head dims 128 (docs/performance.md, step 18) and 64
    # (step 23).
    assert sorted(d for (d, masked), tile in configs.SM90_GLUON_FWD.items() if masked and tile.queue) == [64, 128]


def test_gluon_applies_rule_by_rule(monkeypatch):
    """The conditions both Gluon launchers share (ops/common.gluon_applies), one rule at a time,
    on host stand-ins for CUDA tensors (the GPU dispatch tests run the launchers' full rules)."""
    from flashtile.features import Features
    from flashtile.ops.common import gluon_applies

    class Cuda:  # what the rule reads of a tensor
        def __init__(self, shape, dtype=torch.bfloat16, contiguous=True, ptr=0, is_cuda=True):
            self.shape, self.dtype, self.is_cuda, self._contiguous, self._ptr = shape, dtype, is_cuda, contiguous, ptr
            self.device = torch.device("cuda", 0)

        def is_contiguous(self):
            return self._contiguous

        def data_ptr(self):
            return self._ptr

    monkeypatch.setattr(configs, "_arch", lambda index: (9, 0))
    q, k = Cuda((2, 1024, 4, 128)), Cuda((2, 2048, 2, 128))
    plain, causal = Features(0.1), Features(0.1, window_right=0)
    assert gluon_applies(q, k, plain, None, q, k) and gluon_applies(q, k, causal, None, q, k)
    assert not gluon_applies(Cuda((2, 1024, 4, 128), is_cuda=False), k, plain, None, q, k)
    assert not gluon_applies(Cuda((2, 1024, 4, 128), dtype=torch.float32), k, plain, None, q, k)
    assert not gluon_applies(q, k, plain, (None, None, 1024, 2048), q, k)  # varlen
    assert not gluon_applies(Cuda((2, 0, 4, 128)), k, plain, None, k)  # no queries
    assert not gluon_applies(Cuda((0, 1024, 4, 128)), k, plain, None, k)  # no batch
    assert not gluon_applies(k, q, causal, None, q, k)  # causal with Sq > Sk
    assert gluon_applies(k, q, plain, None, q, k)
    for window in (Features(0.1, window_left=8), Features(0.1, window_right=8)):
        assert not gluon_applies(q, k, window, None, q, k)
        assert gluon_applies(q, k, window, None, q, k, any_window=True)  # the forward's windows
    assert gluon_applies(k, q, causal, None, q, k, any_window=True)
    for features in (Features(0.1, dropout_p=0.1), Features(0.1, alibi_slopes=torch.ones(4))):
        assert not gluon_applies(q, k, features, None, q, k)
        assert not gluon_applies(q, k, features, None, q, k, any_window=True)
    assert gluon_applies(q, k, Features(0.1, softcap=1.0), None, q, k)
    assert gluon_applies(q, k, Features(0.1, window_right=0, softcap=1.0), None, q, k)
    assert not gluon_applies(q, k, plain, None, q, Cuda((2, 2048, 2, 128), contiguous=False))
    assert not gluon_applies(q, k, plain, None, q, Cuda((2, 2048, 2, 128), ptr=8))  # TMA needs 16-byte alignment
    monkeypatch.setattr(configs, "_arch", lambda index: (8, 0))
    assert not gluon_applies(q, k, plain, None, q, k)


def test_gluon_mask_rule():
    """ops/common.mask_admitted, the mask rule both Gluon launchers apply after gluon_applies:
    plain and causal (Sk >= Sq) always; other windows, and causal with Sk < Sq, from a number of
    keys per row (an unbounded side counts seqlen_k); a head dim without a window entry never."""
    from flashtile.features import Features
    from flashtile.ops.common import mask_admitted

    causal = Features(0.1, window_right=0)
    assert mask_admitted(Features(0.1), 4096, 4096, None) and mask_admitted(causal, 4096, 4096, None)
    assert not mask_admitted(causal, 4096, 2048, None)  # Sq > Sk: a window rule
    assert mask_admitted(causal, 4096, 2048, 2048) and not mask_admitted(causal, 4096, 2048, 2049)
    assert mask_admitted(Features(0.1, window_left=511, window_right=0), 4096, 4096, 512)
    assert not mask_admitted(Features(0.1, window_left=510, window_right=0), 4096, 4096, 512)
    assert mask_admitted(Features(0.1, window_left=256, window_right=255), 4096, 4096, 512)
    assert mask_admitted(Features(0.1, window_left=0), 4096, 4096, 4096)  # right side unbounded: Sk keys
    assert not mask_admitted(Features(0.1, window_left=0, window_right=0), 4096, 4096, None)


def test_other_gpus_fall_back_to_the_generic_table(monkeypatch):
    monkeypatch.setattr(configs, "_arch", lambda index: (8, 0))
    assert tile_config(torch.device("cuda", 0), torch.float16, 128, "fwd", True) == configs.GENERIC["fwd"][128]
    assert tile_config(torch.device("cuda", 0), torch.float16, 32, "dq", False) == configs.GENERIC["dq"][64]


def test_fp32_uses_smaller_tiles_on_any_gpu(monkeypatch):
    monkeypatch.setattr(configs, "_arch", lambda index: (9, 0))
    small = tile_config(torch.device("cuda", 0), torch.float32, 64, "fwd", False)
    large = tile_config(torch.device("cuda", 0), torch.float32, 256, "dkdv", False)
    assert small == TileConfig(64, 32, 4, 2) and large.block_m * large.block_n < small.block_m * small.block_n


def test_tma_scratch_allocator_leaves_a_users_allocator_alone():
    """The forward's TMA path installs triton's scratch allocator only where none is set."""
    import triton
    from triton.runtime import _allocation

    from flashtile.ops import common

    def users_allocator(size, alignment, stream):
        raise AssertionError("not called here")

    token = _allocation._allocator.set(users_allocator)
    try:
        common.ensure_allocator()
        assert _allocation._allocator.get() is users_allocator
        triton.set_allocator(_allocation._NULL_ALLOCATOR)
        common.ensure_allocator()
        assert _allocation._allocator.get() is common._tma_allocator
    finally:
        _allocation._allocator.reset(token)


def test_tma_alignment_rule_checks_every_tensor():
    """A descriptor needs a 16-byte aligned base and 16-byte strides for K and V alike: a V that
    starts 2 bytes into its buffer rules TMA out even when K is fine. Strides count bytes, so
    float32 rows of 4 elements qualify where 16-bit ones need 8."""
    from flashtile.ops import common

    buf = torch.zeros(1, 64, 2, 136, dtype=torch.bfloat16)
    k, v_shifted = buf[..., :128], buf[..., 1:129]  # same strides, v's base off by one element
    assert common.tma_aligned(k, k)
    assert not common.tma_aligned(k, v_shifted)
    assert not common.tma_aligned(torch.zeros(1, 64, 2, 132, dtype=torch.bfloat16)[..., :128])  # 264-byte head stride
    assert common.tma_aligned(torch.zeros(3, 4, dtype=torch.float32))
    assert not common.tma_aligned(torch.zeros(3, 4, dtype=torch.bfloat16))


def test_gluon_fwd_probe_passes_its_options_on(monkeypatch, tmp_path):
    """bench/gluon_fwd_probe.py's --tiles / --coverage / --windows get --head-dims and --seqlens
    as parsed, and --softcap reaches the calls' Features (the probes themselves need the GPU)."""
    import sys

    probe = _bench_module("gluon_fwd_probe")
    monkeypatch.setattr(probe, "SOFTCAP", 0.0)
    calls = []
    for name in ("tiles", "coverage", "windows"):
        monkeypatch.setattr(probe, name,
                            lambda *a, name=name, **kw: calls.append((name, a, kw, probe.SOFTCAP)) or True)
    out = str(tmp_path / "r.json")
    for argv in (["--tiles", "--head-dims", "64,128", "--seqlens", "2048,8192", "--softcap", "30"],
                 ["--tiles"], ["--coverage", "--head-dims", "256"], ["--windows", "--head-dims", "64"]):
        monkeypatch.setattr(sys, "argv", ["gluon_fwd_probe.py", *argv, "--out", out])
        with pytest.raises(SystemExit) as stop:
            probe.main()
        assert stop.value.code == 0
    assert calls == [("tiles", (out, (2048, 8192), {64, 128}), {}, 30.0),
                     ("tiles", (out, (1024, 4096, 16384), None), {}, 0.0),
                     ("coverage", (out, {256}), {}, 0.0), ("windows", (out,), {"head_dims": {64}}, 0.0)]
    monkeypatch.setattr(probe, "SOFTCAP", 30.0)
    assert probe._features(torch.empty(1, 1, 1, 64), causal=True).softcap == 30.0


def test_gluon_forward_stores_by_tma_only_where_the_kernel_can():
    """``o_tma`` entries (the output staged in the work tile's last K slot, or in a buffer the
    consumers take in turns) need two consumers; every table entry that asks for it qualifies,
    head dim 256's 64-key tiles included."""
    import dataclasses

    from flashtile.ops import fwd_hopper

    asking = {key: tile for key, tile in configs.SM90_GLUON_FWD.items() if tile.o_tma}
    assert {(256, False), (256, True)} <= set(asking)
    assert all(fwd_hopper.o_by_tma(tile) for tile in asking.values())
    assert all(fwd_hopper.o_by_tma(short.tile) for short in configs.SM90_GLUON_FWD_SHORT.values() if short.tile.o_tma)
    tile = configs.SM90_GLUON_FWD[(128, False)]
    assert not fwd_hopper.o_by_tma(dataclasses.replace(tile, consumers=3, pingpong=False))
    assert fwd_hopper.o_by_tma(dataclasses.replace(tile, block_n=64))
    assert not fwd_hopper.o_by_tma(dataclasses.replace(tile, o_tma=False))
