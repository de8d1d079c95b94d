"""The examples run: a tiny model generates tokens through flashtile's paged KV cache on the CPU
and, fed the same tokens, SDPA's model makes the same greedy choices with the same logits."""

import importlib.util
import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_generate_example_matches_sdpa(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("generate_example", EXAMPLES / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["generate.py", "--tiny", "--device", "cpu", "--batch", "2", "--prompt", "19",
                                      "--new-tokens", "6", "--page-size", "16"])
    report = module.main()
    assert report["agreement"] == 1.0
    assert report["max_logit_diff"] < 1e-4 * max(report["logit_scale"], 1.0)
    assert "tokens/s" in capsys.readouterr().out
