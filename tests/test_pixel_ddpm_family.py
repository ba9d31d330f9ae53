"""The pixel DDPM family (pipeline/families/pixel_ddpm.py) on the tiny model of ../shared/fixtures/ddim_cifar10: the
family's sampler reproduces the original's runs, repeated timesteps of the quad grid are handled by calibration and
statistics, the quantization side knows the ermongroup blocks, and QNCD's CIFAR-10 command runs end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, SHARED, require_shared
from ldm.models.diffusion.settings import SamplingSettings, sample
from correction.gaussian import Granularity, fit_gaussian
from correction.d2 import DeterministicD2
from correction.statistics import NoiseStatistics, SamplingConfig, collect_noise_statistics
from ldm.models.diffusion.ddim import DDIMSampler, model_schedule, sample_ddim
from ldm.models.diffusion.generalized import GeneralizedDDPM
from ldm.util import CheckpointError, load_config
from pipeline.families import family_for
from pipeline.families.pixel_ddpm import PIXEL_DDPM_SPECIALS
from quant.calibration import TimestepDistribution, collect_calibration_set
from quant.config import QuantConfig
from quant.model import QuantModel
from quant.policy import Precision
from quant.reconstruction import find_units
from quant.smoothing import apply_smoothing_, smoothing_factors

FIXTURE = SHARED / "fixtures" / "ddim_cifar10" / "small"
SAMPLE_RTOL = 1e-5


@pytest.fixture(scope="module")
def fx() -> Path:
    return require_shared(FIXTURE)


@pytest.fixture(scope="module")
def family_model(fx):
    config = load_config(fx / "config.yml")
    family = family_for(config)
    return family, family.load(config, fx / "model.pt", device=torch.device("cpu"))


@pytest.fixture(scope="module")
def io(fx):
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    return load(fx / "inputs.pt"), load(fx / "outputs.pt")


def test_the_yml_layout_selects_the_family():
    assert family_for(load_config(REPO / "configs" / "cifar10.yml")).name == "pixel-ddpm"
    assert family_for(load_config(REPO / "configs" / "fashion-ddim.yml")).name == "pixel-ddpm"


@pytest.mark.parametrize("grid", ["quad", "uniform"])
def test_the_familys_sampler_reproduces_the_original(family_model, io, grid):
    """The project's sampling (one SamplingSettings, its grid included) on the family's model = generalized_steps;
    the model's own default grid is left alone."""
    family, model = family_model
    inputs, outputs = io
    default = model.grid
    steps, key = (100, "sample.quad100.f32.x0") if grid == "quad" else (10, "sample.uniform.f32.x0")
    settings = SamplingSettings(steps, 0.0, 1.0, grid)
    x0 = sample(family.model_fn(model), inputs["x_T"], settings.schedule(model), settings)
    ref = outputs[key]
    assert (x0 - ref).abs().max() <= SAMPLE_RTOL * ref.abs().max()
    assert model.grid == default


def test_pipeline_sample_latents_samples_on_the_settings_grid(family_model, io):
    """Issue 30's bug: pipeline.generate.sample_latents took SamplingSettings(grid="quad") and sampled on whatever
    grid the model had (a fresh model: uniform; max |Δ| 144 against the quad reference). The grid is the settings'."""
    from pipeline.generate import sample_latents
    family, model = family_model
    inputs, outputs = io
    assert model.grid == "uniform"
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 32, 32, generator=gen)
    quad = SamplingSettings(100, 0.0, 1.0, "quad")
    got = sample_latents(family, model, None, settings=quad, n=2, batch_size=2, progress=False,
                         generator=torch.Generator().manual_seed(0))
    want = sample(family.model_fn(model), x_T, quad.schedule(model), quad)
    uniform = sample(family.model_fn(model), x_T, model_schedule(model, 100, 0.0), quad)
    assert torch.equal(got, want)
    assert (got - uniform).abs().max() > 1.0   # the two grids differ visibly: the old result is not this one


def test_the_corrected_grid_is_an_explicit_choice(family_model):
    family, model = family_model
    assert len(model_schedule(model, 100, 0.0, grid="quad")) == 100           # the original: repeats run
    s = SamplingSettings(100, 0.0, 1.0, "quad-corrected").schedule(model)
    assert len(set(s.timesteps.tolist())) == len(s) == 97          # rounded, de-duplicated


def test_calibration_and_statistics_with_repeated_timesteps(family_model):
    family, model = family_model
    quad = SamplingSettings(100, 0.0, 1.0, "quad")
    schedule = quad.schedule(model)
    counts = {t: schedule.timesteps.tolist().count(t) for t in set(schedule.timesteps.tolist())}
    n_traj = 2
    data = collect_calibration_set(model, None, n=100 * n_traj, settings=quad,
                                   distribution=TimestepDistribution.UNIFORM, seed=0, n_unconditional=n_traj,
                                   batch_size=2, progress=False, model_fn=family.model_fn(model))
    got = torch.bincount(data["t"], minlength=1000)
    assert all(got[t] == c * n_traj for t, c in counts.items())   # every visit of a repeated t recorded

    cfg = SamplingConfig.for_run(model, quad)
    assert cfg.length == 100 and len(cfg.timesteps) == 96
    assert SamplingConfig.from_dict(cfg.to_dict()) == cfg
    fp = family.model_fn(model)
    noisy = lambda x, t, c: fp(x, t, c) * 1.01 + 0.001  # noqa: E731  (a "quantized" model with a known bias)
    stats = collect_noise_statistics(model, noisy, NoiseStatistics(cfg), None, n=2, batch_size=2, progress=False,
                                     fp_model_fn=fp, settings=quad)
    assert stats.samples.tolist() == [2] * 96                         # a repeat counted once per trajectory
    fit = fit_gaussian(stats, Granularity.CHANNEL, outlier_k=None)
    corr = DeterministicD2(fit)
    x0 = sample_ddim(lambda x, t, step: noisy(x, t, None), torch.randn(1, 3, 32, 32, generator=torch.Generator()
                     .manual_seed(0)), schedule, correction=corr)   # check_step accepts the 100-step chain
    assert torch.isfinite(x0).all()


def test_quantization_knows_the_ermongroup_blocks(family_model):
    family, model = family_model
    unet, specials = family.unet(model), family.quant_specials()
    assert specials is PIXEL_DDPM_SPECIALS
    names = dict(unet.named_modules())
    policy = {n: specials.policy("d2dpm")(n, m) for n, m in names.items()}
    assert policy["conv_in"] is policy["conv_out"] is policy["temb.dense.0"] is Precision.EIGHT_BIT
    assert policy["down.0.downsample.conv"] is Precision.FP32
    assert policy["down.1.block.0.nin_shortcut"] is Precision.FP32
    assert policy["down.0.block.0.conv1"] is policy["mid.attn_1.q"] is Precision.TARGET
    qm = QuantModel(unet, QuantConfig(4, 8), specials=specials)
    units = [u.name for u in find_units(qm)]
    assert "mid.block_1" in units and "mid.attn_1" in units and "up.1.attn.0" in units
    # split: [h ; skip] halves of every decoder shortcut's input (fixture README: 128→64, 96→64, 96→32, 64→32)
    assert specials.shortcut_splits(unet) == {"up.1.block.0.nin_shortcut": 64, "up.1.block.1.nin_shortcut": 64,
                                     "up.0.block.0.nin_shortcut": 64, "up.0.block.1.nin_shortcut": 32}
    with pytest.raises(ValueError, match="no attention module its family can wrap"):
        QuantModel(unet, QuantConfig(4, 8, sm_abit=8), specials=specials)


def test_smoothing_of_resnet_blocks_is_exact(fx, family_model):
    family, _ = family_model
    config = load_config(fx / "config.yml")
    model = family.load(config, fx / "model.pt", device=torch.device("cpu"))
    unet = family.unet(model)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 700])
    before = unet(x, t)
    factors = smoothing_factors(unet, torch.arange(0, 1000, 50), specials=family.quant_specials())
    assert len(factors) == 8 and all(f.shape[0] == unet.get_submodule(n).conv2.in_channels
                                     for n, f in factors.items())
    apply_smoothing_(unet, factors, specials=family.quant_specials())
    assert torch.allclose(unet(x, t), before, atol=1e-4, rtol=1e-5)


def test_a_released_path_is_md5_checked(fx, tmp_path):
    config = load_config(fx / "config.yml")
    bad = tmp_path / "ema_diffusion_cifar10_model" / "model-790000.ckpt"
    bad.parent.mkdir()
    bad.write_bytes((fx / "model.pt").read_bytes())
    with pytest.raises(CheckpointError, match="MD5 .* corrupt or partial download"):
        family_for(config).load(config, bad, device=torch.device("cpu"))


def test_grid_flags_on_an_ldm_are_refused(small_dir):
    from ldm.util import UserFacingError
    config = load_config(small_dir / "config.yaml")
    with pytest.raises(UserFacingError, match="--skip_type quad: .* CompVis uniform grid only"):
        family_for(config).check_steps(config, 20, "quad")


def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_qncd_cifar_command_runs_end_to_end(fx, tmp_path):
    """QNCD's README command (100 quad steps, W8A8 qncd, probe every 4 steps), at tiny counts."""
    argv = ["quant_scripts/sample_diffusion_ddim.py", "--config", str(fx / "config.yml"), "--ckpt",
            str(fx / "model.pt"), "--timesteps", "100", "--eta", "0", "--skip_type", "quad", "--ptq", "--weight_bit",
            "8", "--quant_mode", "qncd", "-l", str(tmp_path), "--sample_reverse", "4", "--max_images", "4",
            "--batch_size", "4", "--cali_n", "32", "--cali_trajectories", "2", "--cali_iters", "2",
            "--cali_iters_a", "2"]
    r = run_script(*argv)
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "custom" / "scale1_eta0_steps100_quad"
    meta = torch.load(run / "w8a8" / "quant_w8a8.pt", weights_only=True)["meta"]
    assert meta["grid"] == "quad" and meta["smoothing"] == "code" and meta["running_stat"] == "all"
    assert len(meta["timesteps"]) == 100
    out = run / "w8a8" / "samples_qncd-r4_n4_seed1234" / "samples.npz"
    import numpy as np
    with np.load(out) as f:
        assert f["arr_0"].shape == (4, 32, 32, 3) and f["arr_0"].dtype == np.uint8


def test_bad_inputs_are_one_line(fx, tmp_path):
    # a checkpoint of another architecture: the first mismatched keys are named
    r = run_script("quant_scripts/sample_diffusion_ddim.py", "--config", "configs/cifar10.yml", "--ckpt",
                   str(fx / "model.pt"), "--timesteps", "10", "-l", str(tmp_path), "--max_images", "2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "missing" in r.stderr and "down.0.block.1" in r.stderr
    r = run_script("quant_scripts/sample_diffusion_ddim.py", "--timesteps", "10", "-l", str(tmp_path))
    assert r.returncode == 2 and "say which model" in r.stderr and r.stderr.count("\n") == 1
    # --use_pretrained with a corrupt file where the original keeps the download: the MD5 names it
    bad = tmp_path / "cache" / "diffusion_models_converted" / "ema_diffusion_cifar10_model" / "model-790000.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the checkpoint")
    r = subprocess.run([sys.executable, "quant_scripts/sample_diffusion_ddim.py", "--config", "configs/cifar10.yml",
                        "--use_pretrained", "-l", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 2 and "MD5" in r.stderr and "corrupt or partial" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_family_config_errors(tmp_path):
    from ldm.util import ConfigError
    cfg = OmegaConf.load(REPO / "configs" / "cifar10.yml")
    cfg.model.ch_mult = [1, 2, 2, 2, 2, 2, 2]   # 32 is not divisible by 2**6
    with pytest.raises(ConfigError, match="not divisible"):
        family_for(cfg, "bad.yml")
    assert isinstance(GeneralizedDDPM, type)


def test_a_probe_due_on_a_repeated_timestep_moves_to_the_next_real_step(family_model):
    """100 quad steps repeat t = 0 three times at i = 96-98; R = 10 puts a probe at i = 96, where re-noising from t
    to t adds no noise. It must move to i = 99 (t = 0 -> ᾱ = 1), not measure ε̂ − z on an un-noised x."""
    from correction.qncd import QNCDProbe
    family, model = family_model
    schedule = model_schedule(model, 100, 0.0, grid="quad")
    fp = family.model_fn(model)
    probe = QNCDProbe(interval=10)
    eps_fn = lambda x, t, step: fp(x, t, None) + 0.05  # noqa: E731  (a known bias of 0.05)
    sample_ddim(eps_fn, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), schedule,
                correction=probe)
    probed = [i for i, _, _ in probe.estimates]
    assert 96 not in probed and 99 in probed and probed[-2] == 86
    assert all(abs(float(mu) - 0.05) < 0.05 for _, _, mu in probe.estimates[-3:])


def test_reconstruction_leaves_an_eval_unet_in_eval_mode(fx):
    """A UNet with dropout (the CIFAR-10 and Fashion pixel DDPMs: 0.1) stays in eval mode through BRECQ: QuantModel
    takes the UNet's mode, so restoring "the model's mode" afterwards does not switch dropout on (it did: the
    post-reconstruction SQNR of a dropout model read ~18 dB for ~48 dB of nearest rounding)."""
    from quant.reconstruction import CalibrationData, Phase, ReconConfig, reconstruct_, sqnr_db
    cfg = OmegaConf.load(fx / "config.yml")
    cfg.model.dropout = 0.5
    from ldm.modules.diffusionmodules.ddim_unet import Model
    unet = Model(cfg)
    unet.load_state_dict(torch.load(fx / "model.pt", weights_only=True))
    unet.eval()
    qm = QuantModel(unet, QuantConfig(8, None), copy_model=False, specials=PIXEL_DDPM_SPECIALS)
    assert not qm.training
    g = torch.Generator().manual_seed(0)
    data = CalibrationData(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 1000, (8,), generator=g),
                           None, torch.device("cpu"))
    qm.init_weights_()
    reconstruct_(qm, data, Phase.WEIGHT, ReconConfig(iters=1, batch_size=4), progress=False)
    assert not any(m.training for m in qm.modules())
    assert sqnr_db(qm, data) > 30
