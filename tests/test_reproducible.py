"""Same seed, same bytes: steps 1-5 and 7 run twice into two folders give sha256-identical artifacts (wall times live
beside them, in *.timing.json); a setting that changes an artifact is in its meta, so changing it redoes the step
instead of reusing a stale file; a write killed mid-checkpoint leaves nothing behind after the rerun."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

import tiny_models
from conftest import REPO, load_script

STEPS = 4
SCRIPTS = ("collect_imagenet_calibration_set", "quantize_weight", "quantize_weight_activation",
           "collect_timestep_aware_statistics", "gaussian_modeling", "generate_evaluation_samples_dist")


@pytest.fixture(scope="module")
def scripts():
    return {n: load_script(REPO / "quant_scripts" / f"{n}.py") for n in SCRIPTS}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    model = tiny_models.build(tiny_models.config(tiny_models.CLASS_COND))
    return tiny_models.write(tiny_models.config(tiny_models.CLASS_COND), model, tmp / "m")


def run_pipeline(scripts, model_files, out: Path, **extra: list[str]) -> list[str]:
    torch.set_num_threads(1)
    cfg, ckpt = model_files
    common = ["--config", str(cfg), "--ckpt", str(ckpt), "--steps", str(STEPS), "--outdir", str(out)]
    steps = [("collect_imagenet_calibration_set", ["--n", "24", "--n_holdout", "8",
                                                   "--calibration_trajectories_per_class", "2"]),
             ("quantize_weight", ["--weight_iters", "3"]),
             ("quantize_weight_activation", ["--act_iters", "2", "--act_init_samples", "8"]),
             ("collect_timestep_aware_statistics", ["--n", "6", "--batch_size", "3", "--no_progress"]),
             ("gaussian_modeling", []),
             ("generate_evaluation_samples_dist", ["--sampler", "dd2-channel", "--w_bits", "4", "--a_bits", "8",
                                                   "--n_samples", "8", "--batch_size", "4"])]
    for name, argv in steps:
        scripts[name].main(common + argv + extra.get(name, []))
    return common


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".timing.json")}


@pytest.fixture(scope="module")
def reference(scripts, model_files, tmp_path_factory):
    """One full run: (its folder, its common flags without --outdir, its digests)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    common = run_pipeline(scripts, model_files, out)
    return out, common[:-2], digests(out)


def copy_of(reference, tmp_path: Path) -> tuple[Path, list[str]]:
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    return out, reference[1] + ["--outdir", str(out)]


def test_same_seed_reruns_are_byte_identical(scripts, model_files, reference, tmp_path):
    run_pipeline(scripts, model_files, tmp_path / "b")
    a, b = reference[2], digests(tmp_path / "b")
    assert set(a) == set(b) and len(a) >= 12
    assert {k for k in a if a[k] != b[k]} == set()
    assert any(k.endswith("samples.npz") for k in a) and any(k.endswith("quant_w4a8.pt") for k in a)
    timings = sorted(p.name for p in (tmp_path / "b").rglob("*.timing.json"))
    assert timings == ["noise_stats.timing.json", "quant_w4.timing.json", "quant_w4a8.timing.json"]


def test_a_changed_setting_redoes_the_step(scripts, reference, tmp_path, capsys):
    _, common = copy_of(reference, tmp_path)
    capsys.readouterr()
    scripts["quantize_weight"].main(common + ["--weight_iters", "3", "--cache_dtype", "bfloat16"])
    assert "was made with other settings (cache_dtype differs); redoing it" in capsys.readouterr().out
    scripts["collect_imagenet_calibration_set"].main(
        common + ["--n", "24", "--n_holdout", "8", "--calibration_trajectories_per_class", "3"])
    assert "was made with other settings (trajectories_per_condition differs); redoing it" in capsys.readouterr().out
    scripts["quantize_weight"].main(common + ["--weight_iters", "3", "--cache_dtype", "bfloat16"])
    assert "was made with other settings (calibration differs); redoing it" in capsys.readouterr().out
    scripts["quantize_weight"].main(common + ["--weight_iters", "3", "--cache_dtype", "bfloat16"])
    assert "already holds this quantized model; skipping" in capsys.readouterr().out


def test_a_killed_checkpoint_write_leaves_nothing_after_the_rerun(scripts, reference, tmp_path):
    """A SIGKILL during torch.save of the progress checkpoint leaves its temporary file (the process cannot clean
    up): planted here as the 0-byte file a kill leaves. The rerun removes it and ends with the uninterrupted bytes."""
    out, common = copy_of(reference, tmp_path)
    w4 = next(out.rglob("quant_w4.pt"))
    w4.unlink()
    for name in ("quant_w4.partial.pt", "quant_w4.pt"):
        (w4.parent / f".{name}.tmp{os.getpid() + 1}").write_bytes(b"")
    scripts["quantize_weight"].main(common + ["--weight_iters", "3"])
    assert sorted(p.name for p in w4.parent.iterdir() if p.name.startswith(".")) == []
    key = str(w4.relative_to(out))
    assert digests(out)[key] == reference[2][key]


def test_a_truncated_progress_file_is_named_as_such(scripts, reference, tmp_path, capsys):
    out, common = copy_of(reference, tmp_path)
    w4 = next(out.rglob("quant_w4.pt"))
    partial = w4.with_name("quant_w4.partial.pt")
    partial.write_bytes(w4.read_bytes()[:1000])    # what a kill during the checkpoint's rename-less write leaves
    w4.unlink()
    capsys.readouterr()
    scripts["quantize_weight"].main(common + ["--weight_iters", "3"])
    said = capsys.readouterr().out
    assert f"ignoring {partial}: it cannot be read (an interrupted write?); starting over" in said
    assert "other settings" not in said and not partial.exists()
