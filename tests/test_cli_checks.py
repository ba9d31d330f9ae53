"""Flags are checked once, in pipeline.cli / pipeline.settings, before any model is built or folder made: NaN and
infinite values included (a NaN passes `eta < 0`), and argparse's own errors are one line too."""
from __future__ import annotations

import pytest

from conftest import REPO, error_line, load_script, run_main


def one_line(name: str, argv: list[str], capsys) -> str:
    return error_line(run_main(load_script(REPO / "quant_scripts" / f"{name}.py").main, argv, capsys))


@pytest.mark.parametrize("script, argv, fragment", [
    ("generate_evaluation_samples_dist", ["--eta", "nan"], "--eta must be a finite number"),
    ("generate_evaluation_samples_dist", ["--scale", "nan"], "--scale must be a finite number"),
    ("generate_evaluation_samples_dist", ["--scale", "inf"], "--scale must be a finite number"),
    ("sample_quantized_ldm_imagenet", ["--eta", "inf"], "--eta must be a finite number"),
    ("sample_fp32_imagenet", ["--eta", "-1"], "--eta must be >= 0"),
    ("quantize_weight", ["--round_weight", "nan"], "--round_weight must be a finite number"),
    ("quantize_weight_activation", ["--lr", "inf"], "--lr must be a finite number"),
    ("collect_timestep_aware_statistics", ["--outlier_k", "nan"], "--outlier_k must be a finite number"),
    ("gaussian_modeling", ["--outlier_k", "-1"], "--outlier_k must be >= 0"),
    ("collect_timestep_aware_statistics", ["--sm_abit", "1"], "--sm_abit must be in 2..16"),
    ("quantize_weight", ["--w_bits", "5"], "argument --w_bits: invalid choice"),
    ("collect_imagenet_calibration_set", ["--steps"], "expected one argument"),
])
def test_bad_flags_stop_with_one_line_and_write_nothing(script, argv, fragment, capsys, tmp_path):
    line = one_line(script, argv + ["--outdir", str(tmp_path / "out")], capsys)
    assert fragment in line, line
    assert not (tmp_path / "out").exists()
