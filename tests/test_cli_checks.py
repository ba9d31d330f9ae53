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
    ("sample_fp32_imagenet", ["--eta", "-1"], "--eta must be in [0, 1]"),
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


def test_a_billion_sample_plan_is_checked_in_bounded_memory(tmp_path):
    """The plan alone (--dry_run) for 10⁹ samples: no label array, no list of batches, no model, nothing written."""
    import subprocess
    import sys
    # VmHWM, the peak of this process's own address space: ru_maxrss can carry a forking parent's peak over
    # (a pytest process grown large makes the child look large)
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "finally:\n    print('maxrss_kb', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", probe, str(REPO / "quant_scripts/generate_evaluation_samples_dist.py"),
                           "--n_samples", "1000000000", "--dry_run", "--outdir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1,000,000,000 samples, 100,000,000 per class; 4,000,000 batches of 250" in proc.stdout
    rss_kb = int(proc.stdout.split("maxrss_kb")[1])
    assert rss_kb < 1024 * 1024, f"{rss_kb / 1024:.0f} MB"
    assert not out.exists()


def test_plan_balance_is_checked_without_building_labels():
    from evaluation.generation import GenerationError, Plan
    plan = Plan(10 ** 15, 250, 0, 10)  # would be 8 PB of labels if they were built
    assert plan.num_batches == 4 * 10 ** 12 and list(plan.batch(plan.num_batches - 1).labels) == [
        i % 10 for i in range(10 ** 15 - 250, 10 ** 15)]
    with pytest.raises(GenerationError, match="cannot be split evenly over 10 classes"):
        Plan(10 ** 15 + 1, 250, 0, 10)


@pytest.mark.skipif((REPO / "models/ldm/cin256-v2/model.ckpt").exists(), reason="the cin256 checkpoint is here")
def test_missing_released_checkpoint_names_the_download_before_building_anything(capsys, tmp_path):
    line = one_line("collect_imagenet_calibration_set", ["--preset", "cin256", "--outdir", str(tmp_path / "o")],
                    capsys)
    assert line == ("error: checkpoint not found: models/ldm/cin256-v2/model.ckpt; download it with: mkdir -p "
                    "models/ldm/cin256-v2 && wget -O models/ldm/cin256-v2/model.ckpt "
                    "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt")
    assert not (tmp_path / "o").exists()


def test_too_many_calibration_inputs_stop_before_any_trajectory(capsys, tmp_path, monkeypatch):
    import quant.calibration

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled trajectories before checking the count")
    monkeypatch.setattr(quant.calibration, "sample_latents", no_sampling)
    line = one_line("collect_imagenet_calibration_set", ["--n", "100000", "--outdir", str(tmp_path / "o")], capsys)
    assert "100128 calibration samples asked for, but only 20 x 520 inputs are recorded" in line, line
    assert not (tmp_path / "o").exists()


def test_the_null_class_is_not_a_class_to_sample(capsys, tmp_path):
    """(Every script asks the model family, so the FP and the quantized grid agree on the valid range.)"""
    line = one_line("sample_fp32_imagenet", ["--classes", "3", "10", "--outdir", str(tmp_path / "o")], capsys)
    assert line == "error: --classes: class ids [10] out of range for a model with 10 classes (0..9; 10 is the null class)"


@pytest.mark.parametrize("script, argv", [
    ("sample_fp32_imagenet", ["--classes", "10"]),
    ("generate_evaluation_samples_dist", ["--sampler", "dd2-channel", "--w_bits", "3"]),
    ("quantize_weight", ["--w_bits", "3"]),
    ("quantize_weight_activation", ["--w_bits", "3", "--a_bits", "4"]),
    ("collect_timestep_aware_statistics", ["--w_bits", "3", "--a_bits", "4"]),
])
def test_a_run_that_fails_validation_leaves_no_folder(script, argv, capsys, tmp_path):
    line = one_line(script, argv + ["--outdir", str(tmp_path / "o")], capsys)
    assert line.startswith("error: ") and not (tmp_path / "o").exists(), line
