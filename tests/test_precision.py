"""--precision fp32|tf32|bf16 (ldm.precision, issue 28 item 4): fp32 is the identity, bf16 on CPU gives samples
that differ from fp32 but stay close, non-fp32 runs are named in their file / folder and step 7's manifest, a resumed
step 7 never mixes precisions, tf32 off CUDA and bad names are one line with nothing written, and paired fidelity
accepts two sample sets that differ only in precision."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, error_line, load_script, run_main
from evaluation import fidelity as F
from evaluation import generation as G
from ldm.precision import Precision
from pipeline.layout import RunLayout

STEP0 = REPO / "quant_scripts" / "sample_fp32_imagenet.py"
STEP7 = REPO / "quant_scripts" / "generate_evaluation_samples_dist.py"
N, BATCH, STEPS, SEED = 8, 4, 4, 3


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def step0():
    return load_script(STEP0, "sample_fp32_imagenet_precision")


@pytest.fixture(scope="module")
def step7():
    return load_script(STEP7, "generate_evaluation_samples_precision")


def step7_flags(tiny, outdir, *extra):
    cfg, ckpt = tiny["cond"]
    return ["--config", cfg, "--ckpt", ckpt, "--n_samples", N, "--batch_size", BATCH, "--steps", STEPS,
            "--seed", SEED, "--device", "cpu", "--outdir", outdir, *extra]


def eval_dir(outdir, variant="") -> Path:
    return RunLayout(Path(outdir), "custom", STEPS, 0.0, 3.0).eval_samples("fp32", "fp32", N, SEED, None, variant)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    return float(F.psnr(a, b).mean())


# ---- the mode itself ----------------------------------------------------------------------------------------------

def test_parse_suffix_and_fp32_identity():
    assert Precision.parse("BF16") is Precision.BF16 and Precision.parse(" fp32 ") is Precision.FP32
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose one of fp32, tf32, bf16"):
        Precision.parse("fp16")
    assert [p.suffix for p in Precision] == ["", "-tf32", "-bf16"]

    def fn(x):
        return x * 3

    assert Precision.FP32.wrap(fn, "cpu") is fn     # no wrapper at all: fp32 runs are today's runs, byte for byte


def test_bf16_wraps_the_model_call_and_returns_float32():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def fn(z):
        out = conv(z)
        seen.append(out.dtype)
        return out

    got = Precision.BF16.wrap(fn, "cpu")(x)
    assert seen == [torch.bfloat16] and got.dtype == torch.float32   # bf16 inside, float32 for the DDIM update
    exact = conv(x)
    assert not torch.equal(got, exact) and torch.allclose(got, exact, atol=0.05, rtol=0.02)
    assert conv(x).dtype == torch.float32                              # the autocast ended with the call


def test_tf32_is_refused_off_cuda():
    from ldm.util import UserFacingError
    with pytest.raises(UserFacingError, match="--precision tf32 is a CUDA mode"):
        Precision.TF32.check_device("cpu")
    with pytest.raises(UserFacingError):
        with Precision.TF32.scope("cpu"):
            pass
    Precision.BF16.check_device("cpu")


# ---- step 0 -------------------------------------------------------------------------------------------------------

def test_step0_bf16_grid_is_named_and_close_to_fp32(step0, tiny_checkpoints, tmp_path, capsys):
    cfg, ckpt = tiny_checkpoints["cond"]
    common = ["--config", cfg, "--ckpt", ckpt, "--classes", 0, 1, 2, "--n_samples_per_class", 2, "--steps", STEPS,
              "--seed", SEED, "--device", "cpu", "--outdir", tmp_path]
    assert run_main(step0.main, common, capsys).returncode == 0
    explicit = [a if a != tmp_path else tmp_path / "explicit" for a in common] + ["--precision", "fp32"]
    assert run_main(step0.main, explicit, capsys).returncode == 0
    name = f"fp32_steps{STEPS}_eta0_scale3_seed{SEED}.png"
    assert (tmp_path / "explicit" / name).read_bytes() == (tmp_path / name).read_bytes()   # fp32 = no flag
    proc = run_main(step0.main, common + ["--precision", "bf16"], capsys)
    assert proc.returncode == 0, proc.stderr
    assert "on cpu in bf16" in proc.stdout
    fp = Image.open(tmp_path / f"fp32_steps{STEPS}_eta0_scale3_seed{SEED}.png")
    bf = Image.open(tmp_path / f"fp32-bf16_steps{STEPS}_eta0_scale3_seed{SEED}.png")
    assert "precision" not in fp.text and bf.text["precision"] == "bf16"
    a, b = np.asarray(fp)[None], np.asarray(bf)[None]
    assert not np.array_equal(a, b)          # bf16 really ran
    assert psnr_db(a, b) > 25                # ... and stayed close (same x_T and noise)


def test_step0_bad_precision_and_tf32_on_cpu_are_one_line(step0, tiny_checkpoints, tmp_path, capsys):
    cfg, ckpt = tiny_checkpoints["cond"]
    common = ["--config", cfg, "--ckpt", ckpt, "--steps", 2, "--device", "cpu", "--outdir", tmp_path / "o"]
    line = error_line(run_main(step0.main, common + ["--precision", "fp16"], capsys))
    assert "unknown precision 'fp16'" in line and "fp32, tf32, bf16" in line
    line = error_line(run_main(step0.main, common + ["--precision", "tf32"], capsys))
    assert "--precision tf32 is a CUDA mode" in line
    assert not (tmp_path / "o").exists()


# ---- step 7 and paired fidelity -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def step7_runs(step7, tiny_checkpoints, tmp_path_factory):
    """fp32 and bf16 evaluation samples of the same plan in one outdir."""
    from pipeline.cli import run_cli
    outdir = tmp_path_factory.mktemp("eval")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for extra in ([], ["--precision", "bf16"]):
            run_cli(lambda: step7.main([str(a) for a in step7_flags(tiny_checkpoints, outdir, *extra)]))
    finally:
        torch.set_num_threads(threads)
    return outdir


def test_step7_bf16_has_its_own_folder_and_manifest(step7_runs):
    fp_dir, bf_dir = eval_dir(step7_runs), eval_dir(step7_runs, "-bf16")
    assert fp_dir.name == f"samples_fp32_n{N}_seed{SEED}" and bf_dir.name == f"samples_fp32-bf16_n{N}_seed{SEED}"
    fp_m = json.loads((fp_dir / G.MANIFEST).read_text())
    bf_m = json.loads((bf_dir / G.MANIFEST).read_text())
    assert "precision" not in fp_m and bf_m["precision"] == "bf16"        # fp32 manifests are as before
    assert {k: v for k, v in bf_m.items() if k != "precision"} == fp_m
    with np.load(fp_dir / G.SAMPLES) as f, np.load(bf_dir / G.SAMPLES) as g:
        a, b = f["arr_0"], g["arr_0"]
        np.testing.assert_array_equal(f["arr_1"], g["arr_1"])
    assert not np.array_equal(a, b) and psnr_db(a, b) > 25


def test_step7_resume_never_mixes_precisions(step7, step7_runs, tiny_checkpoints, tmp_path, capsys):
    import shutil
    shutil.copytree(step7_runs, tmp_path, dirs_exist_ok=True)
    fp_bytes = (eval_dir(tmp_path) / G.SAMPLES).read_bytes()
    bf_dir = eval_dir(tmp_path, "-bf16")
    (bf_dir / G.SHARDS / "batch_000001.npz").unlink()
    # a bf16 manifest moved into the fp32 folder (a renamed folder) is refused, not resumed
    fp_manifest = eval_dir(tmp_path) / G.MANIFEST
    saved = fp_manifest.read_text()
    fp_manifest.write_text((bf_dir / G.MANIFEST).read_text())
    proc = run_main(step7.main, step7_flags(tiny_checkpoints, tmp_path), capsys)
    assert "holds samples made with" in error_line(proc) and "precision" in error_line(proc)
    fp_manifest.write_text(saved)
    # resuming bf16 remakes only its lost shard, in bf16: the file equals the uninterrupted one
    proc = run_main(step7.main, step7_flags(tiny_checkpoints, tmp_path, "--precision", "bf16"), capsys)
    assert proc.returncode == 0, proc.stderr
    assert "1 to make" in proc.stdout and "in bf16" in proc.stdout
    assert (bf_dir / G.SAMPLES).read_bytes() == (eval_dir(step7_runs, "-bf16") / G.SAMPLES).read_bytes()
    assert (eval_dir(tmp_path) / G.SAMPLES).read_bytes() == fp_bytes


def test_step7_tf32_on_cpu_and_integer_with_bf16_are_refused(step7, tiny_checkpoints, tmp_path, capsys):
    proc = run_main(step7.main, step7_flags(tiny_checkpoints, tmp_path, "--precision", "tf32"), capsys)
    assert "--precision tf32 is a CUDA mode" in error_line(proc)
    proc = run_main(step7.main, step7_flags(tiny_checkpoints, tmp_path, "--sampler", "none", "--execution",
                                            "integer", "--precision", "bf16"), capsys)
    assert "--execution integer" in error_line(proc)
    assert not any(tmp_path.iterdir())


def test_fidelity_pairs_sets_that_differ_only_in_precision(step7_runs, tmp_path):
    fp = F.open_batch(eval_dir(step7_runs) / G.SAMPLES, "FP")
    other, plan = F.open_paired(fp, eval_dir(step7_runs, "-bf16") / G.SAMPLES)
    assert plan is not None and "precision" not in plan and plan["n"] == N
    per = F.pixel_metrics(fp, other)
    assert per["psnr"].shape == (N,) and np.all(per["ssim"] > 0.5)
    # anything else differing is still a different plan
    moved = tmp_path / "bf"
    moved.mkdir()
    (moved / G.SAMPLES).write_bytes((eval_dir(step7_runs, "-bf16") / G.SAMPLES).read_bytes())
    manifest = json.loads((eval_dir(step7_runs, "-bf16") / G.MANIFEST).read_text())
    (moved / G.MANIFEST).write_text(json.dumps({**manifest, "steps": STEPS + 1}))
    with pytest.raises(F.FidelityError, match="different plans: steps="):
        F.open_paired(fp, moved / G.SAMPLES)


# ---- txt2img ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    import tiny_models
    return tiny_models.write_text_model(tmp_path_factory.mktemp("text"), ["a photo of a bag", "a red dress"])[:3]


def test_txt2img_precision_and_compvis_names(text_model, tmp_path, capsys):
    txt2img = load_script(REPO / "quant_scripts" / "txt2img.py", "txt2img_precision")
    cfg, ckpt, prompts = text_model
    common = ["--config", cfg, "--ckpt", ckpt, "--from_file", prompts, "--n_samples", 2, "--ddim_steps", 4,
              "--seed", 1, "--skip_grid", "-l", tmp_path / "runs"]
    images = {}
    for name in ("full", "autocast"):       # CompVis' names: full = fp32, autocast = bf16
        proc = run_main(txt2img.main, common + ["--precision", name, "--outdir", tmp_path / name], capsys)
        assert proc.returncode == 0, proc.stderr
        files = sorted((tmp_path / name / "samples").glob("*.png"))
        images[name] = np.stack([np.asarray(Image.open(f)) for f in files])
        assert Image.open(files[0]).text.get("precision") == (None if name == "full" else "bf16")
    assert not np.array_equal(images["full"], images["autocast"])
    assert psnr_db(images["full"], images["autocast"]) > 25
    # tf32 on CPU: one line before calibration (--ptq) writes anything
    proc = run_main(txt2img.main, common + ["--ptq", "--precision", "tf32", "--outdir", tmp_path / "t"], capsys)
    assert "--precision tf32 is a CUDA mode" in error_line(proc)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "t").exists()
