"""A new model family plugs in by adding one module (tests/pixel_family.py: CompVis' pixel-space DDPM,
unconditional, registered from outside pipeline/families/) and runs steps 1-7 through the scripts' main(argv), with
no edit to quant/ or correction/; and --sm_abit models run through steps 3-7."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import tiny_models
from conftest import REPO, load_script
from pipeline.families import family_for, families
from pixel_family import PIXEL_DDPM, PixelDDPM, register, unregister

STEPS = 5
SCRIPTS = ("sample_fp32_imagenet", "collect_imagenet_calibration_set", "quantize_weight", "quantize_weight_activation",
           "collect_timestep_aware_statistics", "gaussian_modeling", "sample_quantized_ldm_imagenet",
           "generate_evaluation_samples_dist")


@pytest.fixture(scope="module")
def scripts():
    return {n: load_script(REPO / "quant_scripts" / f"{n}.py") for n in SCRIPTS}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pixel_family():
    family = register(PixelDDPM())
    yield family
    unregister(family)


def test_an_unknown_family_is_one_line(tmp_path):
    from ldm.util import ConfigError
    cfg = OmegaConf.create(PIXEL_DDPM)
    with pytest.raises(ConfigError, match="belongs to no known model family; known: .*compvis-class-ldm"):
        family_for(cfg, "config pixel.yaml")


def test_a_plugged_in_family_runs_steps_0_to_7(pixel_family, scripts, tmp_path, one_thread):
    cfg = OmegaConf.create(PIXEL_DDPM)
    assert family_for(cfg) is pixel_family and pixel_family in families()
    model = tiny_models.build(cfg)
    cfg_path, ckpt = tiny_models.write(cfg, model, tmp_path / "m", "pixel")
    out = tmp_path / "out"
    common = ["--config", str(cfg_path), "--ckpt", str(ckpt), "--steps", str(STEPS), "--outdir", str(out),
              "--device", "cpu"]
    run = out / "custom" / f"scale3_eta0_steps{STEPS}"
    scripts["sample_fp32_imagenet"].main(common[:6] + ["--outdir", str(tmp_path / "grids"), "--n_samples", "4"])
    assert len(list((tmp_path / "grids").glob("fp32_*.png"))) == 1
    scripts["collect_imagenet_calibration_set"].main(
        common + ["--n", "24", "--n_holdout", "8", "--calibration_trajectories_per_class", "8", "--batch_size", "8"])
    cal = torch.load(run / "calibration.pt", weights_only=True)
    assert cal["x"].shape == (24, 3, 8, 8) and "c" not in cal          # unconditional, pixel space, no guidance
    scripts["quantize_weight"].main(common + ["--weight_iters", "2"])
    scripts["quantize_weight_activation"].main(common + ["--act_iters", "2", "--act_init_samples", "8"])
    meta = torch.load(run / "w4a8" / "quant_w4a8.pt", weights_only=True)["meta"]
    assert meta["a_bits"] == 8 and np.isfinite(meta["sqnr_db"])
    scripts["collect_timestep_aware_statistics"].main(common + ["--n", "6", "--batch_size", "3", "--no_progress"])
    scripts["gaussian_modeling"].main(common)
    assert (run / "w4a8" / "gaussian_channel.pt").is_file() and (run / "w4a8" / "ptqd.pt").is_file()
    scripts["sample_quantized_ldm_imagenet"].main(common + ["--sampler", "dd2-channel", "--n_samples", "4",
                                                            "--no_progress"])
    assert len(list((run / "w4a8" / "samples").glob("dd2-channel_*.png"))) == 1
    for sampler in ("fp32", "qncd-r2+dd2-channel"):
        scripts["generate_evaluation_samples_dist"].main(common + ["--sampler", sampler, "--n_samples", "4",
                                                                   "--batch_size", "2"])
    fp = np.load(run / "fp32" / "samples_fp32_n4_seed0" / "samples.npz")
    q = np.load(run / "w4a8" / "samples_qncd-r2+dd2-channel_n4_seed0" / "samples.npz")
    assert fp["arr_0"].shape == q["arr_0"].shape == (4, 8, 8, 3) and "arr_1" not in fp
    assert not np.array_equal(fp["arr_0"], q["arr_0"])


def test_sm_abit_runs_through_steps_3_to_7(scripts, tmp_path, one_thread):
    """Step 3 with --sm_abit 8 writes w4a8sm8/; steps 4-7 find it with --sm_abit 8 (and only then)."""
    cfg = tiny_models.config(tiny_models.CLASS_COND)   # has a SpatialTransformer: attention to quantize
    cfg_path, ckpt = tiny_models.write(cfg, tiny_models.build(cfg), tmp_path / "m")
    out = tmp_path / "out"
    common = ["--config", str(cfg_path), "--ckpt", str(ckpt), "--steps", str(STEPS), "--outdir", str(out),
              "--device", "cpu"]
    run = out / "custom" / f"scale3_eta0_steps{STEPS}"
    sm = ["--sm_abit", "8"]
    scripts["collect_imagenet_calibration_set"].main(common + ["--n", "16", "--n_holdout", "8"])
    scripts["quantize_weight"].main(common + ["--weight_iters", "2"])
    scripts["quantize_weight_activation"].main(common + sm + ["--act_iters", "2", "--act_init_samples", "8"])
    tag = run / "w4a8sm8"
    q = torch.load(tag / "quant_w4a8sm8.pt", weights_only=True)
    assert q["meta"]["sm_abit"] == 8 and any("softmax" in k or "attn" in k for k in q["quant_state"])
    assert not (run / "w4a8").exists()
    scripts["collect_timestep_aware_statistics"].main(common + sm + ["--n", "4", "--batch_size", "2", "--no_progress"])
    scripts["gaussian_modeling"].main(common + sm)
    fit = torch.load(tag / "gaussian_channel.pt", weights_only=True)
    assert fit["meta"]["sm_abit"] == 8 and (tag / "noise_stats.png").is_file()
    scripts["sample_quantized_ldm_imagenet"].main(common + sm + ["--sampler", "dd2-channel", "--classes", "0", "1",
                                                                 "--n_samples_per_class", "1", "--no_progress"])
    assert len(list((tag / "samples").glob("dd2-channel_w4a8sm8_*.png"))) == 1
    scripts["generate_evaluation_samples_dist"].main(common + sm + ["--sampler", "dd2-channel", "--n_samples", "4",
                                                                    "--batch_size", "2"])
    s = np.load(tag / "samples_dd2-channel_n4_seed0" / "samples.npz")
    assert s["arr_0"].shape == (4, 32, 32, 3) and sorted(s["arr_1"].tolist()) == [0, 1, 2, 3]
    from ldm.util import UserFacingError
    with pytest.raises(UserFacingError, match="W4A8 quantized model not found"):   # without --sm_abit: not that one
        scripts["collect_timestep_aware_statistics"].main(common + ["--n", "4", "--batch_size", "2"])
