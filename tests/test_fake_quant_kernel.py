"""benchmarks/fake_quant_kernel.py: every fake-quant kernel timed against a copy, codes compared with the passes'."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import fake_quant_kernel
        yield fake_quant_kernel
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_the_kernels_are_timed_against_a_copy_and_checked(bench, tmp_path, capsys, compiled_kernels):
    out = bench.main(["--batch", "2", "--repeats", "2", "--scale_down", "8", "--json", str(tmp_path / "k.json")])
    assert json.loads((tmp_path / "k.json").read_text()) == json.loads(json.dumps(out))
    assert out["compiled_error"] is None
    assert [r["shape"] for r in out["results"]] == [[2, 24, 8, 8], [2, 72, 2, 2], [2, 128, 48]]
    for r in out["results"]:
        assert set(r["median_s"]) == {"copy", "passes", "fused", "compiled", "auto"}
        assert all(t > 0 for t in r["median_s"].values()) and r["ratio_to_copy"]["copy"] == 1
        codes = r["codes_vs_passes"]
        assert codes["compiled"]["differ"] == 0 and codes["auto"]["differ"] == 0   # CPU: auto is the passes
        assert codes["fused"]["all_at_ties"]            # ×(1/Δ): at most a tie apart
    text = capsys.readouterr().out
    assert "compiled: 0 values on another grid point" in text and "goal <= 1.5x" in text


def test_codes_apart_finds_ties_only(bench):
    import torch
    scale = torch.tensor(0.5)
    x = torch.tensor([0.25, 1.0, 0.75])          # x/Δ = 0.5 (a tie), 2, 1.5 (a tie)
    want = torch.tensor([0.0, 1.0, 1.0])
    assert bench.codes_apart(x, torch.tensor([0.5, 1.0, 0.5]), want, scale) == {"differ": 2, "all_at_ties": True}
    assert bench.codes_apart(x, torch.tensor([0.0, 1.5, 1.0]), want, scale) == {"differ": 1, "all_at_ties": False}
