"""quant_scripts/sample_fp32_imagenet.py end to end: grids, determinism, and one-line errors on bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, error_line, load_script, run_main

SCRIPT = REPO / "quant_scripts" / "sample_fp32_imagenet.py"


def run(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300)


@pytest.fixture
def run_inproc(capsys):
    """The script's main() in this process (fast); same exit code and stderr as a subprocess."""
    module = load_script(SCRIPT, "sample_fp32_imagenet")
    return lambda *args: run_main(module.main, args, capsys)


def assert_one_line_error(proc, *fragments):
    line = error_line(proc)
    for f in fragments:
        assert f in line, line


@pytest.fixture(scope="module")
def tiny_files(tiny_checkpoints):
    return tiny_checkpoints


def test_fixture_model_grid_is_reproducible(small_dir, tmp_path):
    common = ["--config", small_dir / "config.yaml", "--ckpt", small_dir / "state_dict.pt", "--classes", 0, 3, 7,
              "--n_samples_per_class", 2, "--steps", 10, "--seed", 5, "--device", "cpu"]
    first, second = run(*common, "--outdir", tmp_path / "a"), run(*common, "--outdir", tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    name = "fp32_steps10_eta0_scale3_seed5.png"
    a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
    assert a == b
    img = np.asarray(Image.open(tmp_path / "a" / name))
    assert img.shape == (3 * 66 + 2, 2 * 66 + 2, 3)  # 3 class rows x 2 samples of 64 px, 2 px padding
    other = run(*common[:-4], "--seed", 6, "--device", "cpu", "--outdir", tmp_path / "c")
    assert other.returncode == 0
    assert (tmp_path / "c" / "fp32_steps10_eta0_scale3_seed6.png").read_bytes() != a


def test_unconditional_model_samples_without_guidance(tiny_files, tmp_path):
    cfg, ckpt = tiny_files["uncond"]
    proc = run("--config", cfg, "--ckpt", ckpt, "--n_samples", 3, "--steps", 5, "--eta", 1.0, "--outdir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 unconditional samples" in proc.stdout
    img = Image.open(tmp_path / "fp32_steps5_eta1_scale3_seed42.png")
    assert img.size == (3 * 34 + 2, 36) and img.text["classes"] == "unconditional"


def test_missing_checkpoint(tiny_files, tmp_path):
    cfg, _ = tiny_files["cond"]
    proc = run("--config", cfg, "--ckpt", tmp_path / "models/ldm/cin256-v2/model.ckpt", "--outdir", tmp_path / "o")
    assert_one_line_error(proc, "checkpoint not found", "ommer-lab.com")
    assert not list((tmp_path / "o").glob("*.png"))


def test_wrong_checkpoint_for_config(tiny_files, tmp_path, run_inproc):
    _, ckpt = tiny_files["cond"]
    cfg, _ = tiny_files["uncond"]
    proc = run_inproc("--config", cfg, "--ckpt", ckpt, "--outdir", tmp_path)
    assert_one_line_error(proc, "does not match config", "missing:", "unexpected:")
    assert not list(tmp_path.glob("*.png"))


def test_corrupt_checkpoint(tiny_files, tmp_path, run_inproc):
    cfg, ckpt = tiny_files["cond"]
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(Path(ckpt).read_bytes()[:1000])
    assert_one_line_error(run_inproc("--config", cfg, "--ckpt", bad, "--outdir", tmp_path), "corrupt or truncated")


def test_unknown_target(tiny_files, tmp_path, run_inproc):
    cfg, ckpt = tiny_files["cond"]
    c = OmegaConf.load(cfg)
    c.model.params.unet_config.target = "ldm.modules.diffusionmodules.openaimodel.UNetModelXL"
    OmegaConf.save(c, tmp_path / "typo.yaml")
    assert_one_line_error(run_inproc("--config", tmp_path / "typo.yaml", "--ckpt", ckpt, "--outdir", tmp_path),
                          "UNetModelXL")


def test_a_width_groupnorm_cannot_take_is_one_line(tiny_files, tmp_path, run_inproc):
    cfg, ckpt = tiny_files["cond"]
    c = OmegaConf.load(cfg)
    c.model.params.unet_config.params.model_channels = 33
    OmegaConf.save(c, tmp_path / "odd.yaml")
    assert_one_line_error(run_inproc("--config", tmp_path / "odd.yaml", "--ckpt", ckpt, "--outdir", tmp_path),
                          "does not fit the model code", "divisible by num_groups")


def test_unwritable_outdir(tiny_files, tmp_path, run_inproc):
    cfg, ckpt = tiny_files["cond"]
    (tmp_path / "a_file").write_text("x")
    assert_one_line_error(run_inproc("--config", cfg, "--ckpt", ckpt, "--outdir", tmp_path / "a_file" / "sub"),
                          "not writable")


def test_unsafe_checkpoint_needs_the_flag(tiny_files, tmp_path, run_inproc):
    import argparse
    cfg, ckpt = tiny_files["cond"]
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": sd, "hparams": argparse.Namespace(a=1)}, unsafe)
    args = ("--config", cfg, "--ckpt", unsafe, "--classes", 1, "--n_samples_per_class", 1, "--steps", 2,
            "--outdir", tmp_path)
    assert_one_line_error(run_inproc(*args), "--trust_checkpoint")
    assert run_inproc(*args, "--trust_checkpoint").returncode == 0


@pytest.mark.parametrize("args,fragment", [
    (("--classes", 9), "out of range"),
    (("--steps", 3), "--steps 3"),
    (("--steps", 0), "--steps must be >= 1"),
    (("--eta", -1), "--eta must be in [0, 1]"),
])
def test_bad_flags(tiny_files, tmp_path, args, fragment, run_inproc):
    cfg, ckpt = tiny_files["cond"]
    assert_one_line_error(run_inproc("--config", cfg, "--ckpt", ckpt, "--outdir", tmp_path, *args), fragment)


def test_no_arguments_means_the_embedded_default(tmp_path):
    """The fashion preset: all 10 classes from the committed model (kept short: 1 sample each, 5 steps)."""
    proc = run("--n_samples_per_class", 1, "--steps", 5, "--outdir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[fashion]" in proc.stdout and "null class 10" in proc.stdout
    img = Image.open(tmp_path / "fp32_steps5_eta0_scale3_seed42.png")
    assert img.size == (34 + 2, 10 * 34 + 2)
    assert img.text["preset"] == "fashion" and img.text["classes"] == "0 1 2 3 4 5 6 7 8 9"
