"""The `flashtile` command and the tile-table dispatch (both run without a GPU)."""

import itertools

import pytest
import torch

import flashtile
from flashtile import cli, configs
from flashtile.configs import TileConfig, tile_config


def test_info_checks_the_current_path(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"flashtile {flashtile.__version__}" in out and "check     ok" in out


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

    from flashtile.ops import fwd

    def users_allocator(size, alignment, stream):
        raise AssertionError("not called here")

    token = _allocation._allocator.set(users_allocator)
    try:
        fwd._ensure_allocator()
        assert _allocation._allocator.get() is users_allocator
        triton.set_allocator(_allocation._NULL_ALLOCATOR)
        fwd._ensure_allocator()
        assert _allocation._allocator.get() is fwd._tma_allocator
    finally:
        _allocation._allocator.reset(token)


def test_tma_alignment_rule_checks_every_tensor():
    """A descriptor needs a 16-byte aligned base and 16-byte strides for K and V alike: a V that
    starts 2 bytes into its buffer rules TMA out even when K is fine."""
    from flashtile.ops import fwd

    buf = torch.zeros(1, 64, 2, 136, dtype=torch.bfloat16)
    k, v_shifted = buf[..., :128], buf[..., 1:129]  # same strides, v's base off by one element
    assert fwd.tma_aligned(k, k)
    assert not fwd.tma_aligned(k, v_shifted)
    assert not fwd.tma_aligned(torch.zeros(1, 64, 2, 132, dtype=torch.bfloat16)[..., :128])  # 264-byte head stride
