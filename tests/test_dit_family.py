"""DiT as a pipeline model family (pipeline/families/dit.py, ldm/models/dit_diffusion.py): loading the fixture DiT
and its VAE, DiT's DDIM over the respaced grid against the original's recorded trajectories, guidance of all ε
channels against DiT's forward_with_cfg, the quantization specials, one-line refusals, and steps 1-7 of a tiny random
DiT through the typed steps."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import yaml

import tiny_models
from conftest import REPO, SHARED, require_shared
from ldm.models.diffusion.ddim import sample_ddim
from ldm.models.dit_diffusion import DiTDenoiser, dit_schedule
from ldm.modules.dit import DiT, DiTBlock
from ldm.util import CheckpointError, ConfigError, UserFacingError, load_config
from pipeline.families import family_for
from pipeline.families.dit import DIT_SPECIALS, DIT_TARGET, DiTFamily
from quant.api import QuantConfig, quantize
from quant.policy import Precision

DIT = SHARED / "fixtures" / "dit" / "small"
REL = 1e-4   # the sampling tests' tolerance: max |ours − ref| <= REL · max |ref| (float32 over 10 steps)


def dit_yaml(path, dit_params: dict, first_stage: dict, **extra) -> str:
    path.write_text(yaml.safe_dump({"model": {"target": DIT_TARGET, "params": {
        "dit_config": {"target": "ldm.modules.dit.DiT", "params": dit_params}, "first_stage": first_stage,
        **extra}}}))
    return str(path)


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory):
    """(family, model, config path, inputs, outputs) of the fixture DiT with the fixture VAE."""
    folder = require_shared(DIT)
    cfg = dit_yaml(tmp_path_factory.mktemp("dit") / "small.yaml", json.loads((folder / "config.json").read_text()),
                   {"vae": str(folder / "vae")})
    family = family_for(load_config(cfg))
    model = family.load(load_config(cfg), folder / "model.pt", device=torch.device("cpu"))
    load = lambda name: torch.load(folder / name, weights_only=True)  # noqa: E731
    return family, model, cfg, load("inputs.pt"), load("outputs.pt")


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, name: str, rel: float = REL) -> None:
    err = (ours.double() - ref.double()).abs().max().item()
    assert ours.shape == ref.shape and err <= rel * ref.abs().max().item(), f"{name}: max |ours - ref| = {err:.3e}"


# ---- the model and its loading --------------------------------------------------------------------------------------

def test_the_family_loads_the_fixture_dit_and_its_vae(fixture_model, tmp_path, one_thread):
    family, model, cfg, inputs, outputs = fixture_model
    assert isinstance(family, DiTFamily) and family.num_classes(load_config(cfg)) == 10
    sd = torch.load(DIT / "model.pt", weights_only=True)
    assert all(torch.equal(model.dit.state_dict()[k], v) for k, v in sd.items())
    assert (model.channels, model.image_size, model.num_timesteps) == (4, 8, 1000)
    assert family.latent_shape(model) == (4, 8, 8) and family.unet(model) is model.model
    with torch.no_grad():   # ε is the first half of the learned-sigma output, through every path the pipeline uses
        eps = family.model_fn(model)(inputs["x"], inputs["t"], inputs["y"])
        assert_rel(eps, outputs["fwd_out"][:, :4], "eps", rel=1e-5)
        assert torch.equal(family.unet_model_fn(model, family.unet(model))(inputs["x"], inputs["t"], inputs["y"]),
                           eps)
        images = family.decode(model, inputs["vae_latents"])
    assert_rel(images, outputs["vae_decode"].clamp(-1, 1), "decode", rel=1e-5)   # decoder(z / 0.18215)
    # a train.py checkpoint ({"model", "ema", "opt", "args"}): its EMA weights, the same model
    ckpt = tmp_path / "0000100.pt"
    torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {},
                "args": argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=10)}, ckpt)
    trained = family.load(load_config(cfg), ckpt, device=torch.device("cpu"))
    assert all(torch.equal(trained.dit.state_dict()[k], v) for k, v in sd.items())


def test_loading_refuses_what_does_not_fit_in_one_line(fixture_model, tmp_path):
    family, _, cfg, _, _ = fixture_model
    config = load_config(cfg)
    wide = tmp_path / "wide.pt"
    torch.save({k: torch.zeros(2, *v.shape[1:]) if k == "final_layer.linear.weight" else v
                for k, v in torch.load(DIT / "model.pt", weights_only=True).items()}, wide)
    with pytest.raises(CheckpointError, match="final_layer.linear.weight"):
        family.load(config, wide, device=torch.device("cpu"))
    params = json.loads((DIT / "config.json").read_text())
    three = load_config(dit_yaml(tmp_path / "three.yaml", {**params, "in_channels": 3}, {"vae": str(DIT / "vae")}))
    with pytest.raises(ConfigError, match="first stage's latents have 4 channels, the DiT takes 3"):
        family.load(three, None, device=torch.device("cpu"), without_unet=True)
    with pytest.raises(UserFacingError, match="drop --trust_checkpoint"):
        family.load(config, DIT / "model.pt", device=torch.device("cpu"), trust=True)


@pytest.mark.parametrize("first_stage, dit_params, message", [
    ({}, {}, "needs exactly one of vae / ldm"),
    ({"vae": "a", "ldm": "b"}, {}, "needs exactly one of vae / ldm"),
    ({"vea": "a"}, {}, "needs exactly one of vae / ldm"),
    ({"vae": "a"}, {"hidden": 8}, r"unknown DiT argument\(s\) \['hidden'\]"),
])
def test_a_bad_config_is_one_line_before_anything_is_built(tmp_path, first_stage, dit_params, message):
    with pytest.raises(ConfigError, match=message):
        family_for(load_config(dit_yaml(tmp_path / "c.yaml", dit_params, first_stage)), "config c.yaml")


def test_steps_and_grids_are_checked_from_the_yaml(tmp_path):
    config = load_config(dit_yaml(tmp_path / "c.yaml", {}, {"vae": "v"}))
    family = family_for(config)
    family.check_steps(config, 250, None)
    family.check_steps(config, 1000, None)
    family.check_steps(config, 50, "uniform")   # DiT's ddim50: range(0, 1000, 20)
    assert dit_schedule(50, 0.0, "uniform").timesteps.tolist() == list(range(0, 1000, 20))
    for steps, grid, message in ((1001, None, "--steps 1001: respacing '1001'"),
                                 (300, "uniform", "--steps 300: respacing 'ddim300': no integer stride"),
                                 (50, "quad", "--skip_type uniform")):
        with pytest.raises(UserFacingError, match=message):
            family.check_steps(config, steps, grid)


def test_the_shipped_configs_are_this_familys_and_describe_their_dits():
    from ldm.modules.dit import dit_config
    from pipeline.families.dit import dit_arguments
    for size in (256, 512):
        config = load_config(REPO / "configs" / "dit" / f"ptq-DiT-XL-2-{size}.yaml")
        assert isinstance(family_for(config), DiTFamily) and family_for(config).num_classes(config) == 1000
        assert dit_arguments(config.model.params.dit_config) == dit_config("DiT-XL/2", size)
        family_for(config).check_steps(config, 250, None)
    config = load_config(REPO / "configs" / "dit" / "ptq-fashion-dit.yaml")
    trained = load_config(REPO / "configs" / "dit" / "fashion-dit.yaml")   # what train_dit.py trains
    assert dit_arguments(config.model.params.dit_config) == dit_arguments(trained.model)
    assert family_for(config).num_classes(config) == 10


# ---- the schedule and guidance -------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_ddim_schedule_is_dits_ddim_sample_loop(fixture_model, eta, one_thread):
    """The recorded ddim_sample_loop runs of the original (respacing "10", forward_with_cfg at 1.5, the recorded
    noise replayed): the project's DDIM loop over ``sampling_schedule`` with the same ε lands on the same samples."""
    family, model, _, inputs, outputs = fixture_model
    run = f"ddim_eta{eta}"
    schedule = model.sampling_schedule(10, eta)
    assert schedule.timesteps.tolist() == sorted(outputs[f"{run}_model_t"].tolist())
    assert schedule.alphas_prev[0] == 1.0 and schedule.sigmas[0] == 0.0   # the last step goes to ᾱ = 1
    z, y = outputs["sample_z"], outputs["sample_y"]
    noise = outputs[f"{run}_noise"]

    def eps_fn(x, t, step):
        return model.dit.forward_with_cfg(x, t, y, 1.5)[:, :4]

    out = sample_ddim(eps_fn, torch.cat([z, z]), schedule, noise_sampler=lambda step: noise[step.i])
    assert_rel(out, outputs[f"{run}_final"], run)


def test_guidance_covers_every_eps_channel_where_dits_forward_with_cfg_guides_three(fixture_model, one_thread):
    family, model, _, inputs, _ = fixture_model
    x, t, labels = inputs["x"][:3], inputs["t"][:3], [3, 7, 0]
    y = torch.tensor(labels)
    null = torch.full_like(y, family.null_condition(model))
    model_fn = family.model_fn(model)
    from ldm.models.diffusion.ddim import cfg_eps
    with torch.no_grad():
        for scale in (1.0, 4.0):
            c, uc = family.conditioner(model, scale)(labels)
            assert torch.equal(c, y) and (uc is None) == (scale == 1.0)
            ours = cfg_eps(model_fn, x, t, c, uc, scale)
            theirs = model.dit.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]),
                                                scale)[:3, :4]
            e_c, e_u = model.dit(x, t, y)[:, :4], model.dit(x, t, null)[:, :4]   # independent of both paths
            assert_rel(ours, e_u + scale * (e_c - e_u), f"pipeline ε at {scale}", rel=1e-6)
            assert_rel(ours[:, :3], theirs[:, :3], f"channels 0-2 at {scale}", rel=1e-6)
            if scale == 1.0:
                assert_rel(ours, theirs, "scale 1", rel=1e-6)
            else:   # channel 3: guided here, conditional in DiT's forward_with_cfg
                assert_rel(theirs[:, 3], e_c[:, 3], "channel 3 conditional", rel=1e-6)
                assert (ours[:, 3] - theirs[:, 3]).abs().max() > 0.1 * e_c[:, 3].abs().max()
    with pytest.raises(UserFacingError, match=r"class ids \[10, 11\] out of range for a DiT with 10 classes"):
        family.check_conditions(model, [0, 10], uncond=11)
    family.check_conditions(model, [0, 9], uncond=10)   # the null class is a valid uncond
    assert family.conditions(model, 2)[:4] == [0, 0, 1, 1] and len(family.conditions(model, 2)) == 20


# ---- the quantization specials -------------------------------------------------------------------------------------

def tiny_dit(seed: int = 0, **overrides) -> DiT:
    """A tiny random DiT whose zero-initialised layers (adaLN-Zero, the final layer) are re-randomised."""
    torch.manual_seed(seed)
    dit = DiT(**{"input_size": 8, "patch_size": 2, "in_channels": 3, "hidden_size": 32, "depth": 2,
                 "num_heads": 2, "num_classes": 3, **overrides})
    for m in dit.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.detach().any():
            m.reset_parameters()
    return dit.eval()


def test_the_specials_units_and_policies():
    from quant.reconstruction import find_units
    from quant.smoothing import sites
    unet = DiTDenoiser(tiny_dit())
    qm = quantize(unet, QuantConfig(4, 8, policy="all"), "all", specials=DIT_SPECIALS)
    units = find_units(qm)
    assert [u.name for u in units if u.is_block] == ["dit.blocks.0", "dit.blocks.1"]
    assert all(isinstance(u.module, DiTBlock) for u in units if u.is_block)
    assert sorted(u.name for u in units if not u.is_block) == [
        "dit.final_layer.adaLN_modulation.1", "dit.final_layer.linear", "dit.t_embedder.mlp.0",
        "dit.t_embedder.mlp.2", "dit.x_embedder.proj"]
    assert sites(unet, DIT_SPECIALS) == [] and DIT_SPECIALS.shortcut_splits(unet) == {}
    precision = {name: {n: DIT_SPECIALS.policy(name)(n, m) for n, m in unet.named_modules()}
                 for name in ("d2dpm", "all", "qncd-sd")}
    eight = {n for n, p in precision["d2dpm"].items() if p is Precision.EIGHT_BIT}
    assert eight == {"dit.t_embedder.mlp.0", "dit.final_layer.linear"}
    assert precision["d2dpm"]["dit.blocks.0.adaLN_modulation.1"] is Precision.TARGET   # adaLN at the target bits
    assert precision["d2dpm"]["dit.final_layer.adaLN_modulation.1"] is Precision.TARGET
    fp32 = {n for n, p in precision["d2dpm"].items()
            if p is Precision.FP32 and isinstance(unet.get_submodule(n), (torch.nn.Linear, torch.nn.Conv2d))}
    assert fp32 == {"dit.x_embedder.proj"}   # the patch embedding: its input x_t stays exact
    assert precision["d2dpm"]["dit.y_embedder.embedding_table"] is Precision.FP32   # a lookup: never quantized
    assert precision["qncd-sd"]["dit.blocks.1.mlp.fc1"] is Precision.FP32
    assert precision["qncd-sd"]["dit.final_layer.linear"] is Precision.TARGET
    with pytest.raises(ValueError, match="no silent no-op|attention"):   # DiT's fused attention has no matmul hook
        quantize(unet, QuantConfig(4, 8, sm_abit=8, policy="all"), "all", specials=DIT_SPECIALS)


# ---- steps 1-7 through the typed steps -----------------------------------------------------------------------------

def write_tiny_dit(directory) -> tuple[str, str]:
    """A tiny random DiT (3×8×8 latents, 3 classes) as a released-format state_dict, with a tiny CompVis VQ-f4 first
    stage as an LDM export folder (config.yaml + model.ckpt: first_stage_model.* and scale_factor)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    vq = tiny_models.build(tiny_models.config(tiny_models.CLASS_COND)).first_stage_model
    ldm = directory / "ldm"
    ldm.mkdir()
    (ldm / "config.yaml").write_text(yaml.safe_dump({"model": {"params": {
        "first_stage_config": tiny_models.VQ_F4}}}))
    torch.save({"state_dict": {**{f"first_stage_model.{k}": v for k, v in vq.state_dict().items()},
                               "scale_factor": torch.tensor(0.8)}}, ldm / "model.ckpt")
    dit = tiny_dit()
    torch.save(dit.state_dict(), directory / "tiny-dit.pt")
    params = {k: getattr(dit, k) for k in ("input_size", "patch_size", "in_channels", "num_classes")}
    cfg = dit_yaml(directory / "tiny-dit.yaml", {**params, "hidden_size": 32, "depth": 2, "num_heads": 2},
                   {"ldm": str(ldm)})
    return cfg, str(directory / "tiny-dit.pt")


def test_steps_1_to_7_run_on_a_dit(tmp_path, one_thread):
    from ldm.models.diffusion.settings import SamplingSettings
    from pipeline.layout import QuantTag
    from pipeline.run import ModelSource, Run, SamplerChoice
    from pipeline.sampler_spec import SamplerSpec
    from pipeline.steps import (calibrate, evaluation_samples, fit_noise, noise_statistics, quantize_activations,
                                quantize_weights)
    cfg, ckpt = write_tiny_dit(tmp_path / "m")
    run = Run(ModelSource(cfg, ckpt), SamplingSettings(4, 0.0, 2.0), tmp_path / "out", "cpu").check()
    assert run.family.name == "dit"
    config, tag = QuantConfig(4, 8), QuantTag(4, 8)
    cal = torch.load(calibrate.run(run, calibrate.CalibrationSettings(
        n=16, n_holdout=8, trajectories_per_condition=2, batch_size=8)), weights_only=True)
    assert cal["x"].shape == (16, 3, 8, 8) and cal["c"].dtype == torch.long and set(cal["c"].tolist()) <= {0, 1, 2, 3}
    assert 3 in cal["c"].tolist() + cal["holdout_c"].tolist()   # the null class: the guided unconditional half
    assert cal["meta"]["timesteps"] == [0, 333, 666, 999]
    quantize_weights.run(run, config, quantize_weights.WeightSettings(iters=2))
    path = quantize_activations.run(run, config, quantize_activations.ActivationSettings(iters=2, init_samples=8))
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["policy"] == "d2dpm" and np.isfinite(meta["sqnr_db"]) and meta["sqnr_db"] > 10
    noise_statistics.run(run, noise_statistics.StatisticsSettings(n=6, batch_size=3, progress=False), tag)
    folder = fit_noise.run(run, tag)
    from correction.gaussian import GaussianFit
    fit = torch.load(folder / "gaussian_channel.pt", weights_only=True)
    assert fit["meta"]["timesteps"] == [0, 333, 666, 999] and GaussianFit.from_dict(fit["fit"]).channels == 3
    ev = evaluation_samples.EvalSettings(n=3, seed=0, batch_size=2)
    samples = {}
    for name in ("fp32", "dd2-channel"):
        out = evaluation_samples.generate(run, ev, SamplerChoice(SamplerSpec.parse(name)), tag)
        samples[name] = np.load(out / "samples.npz")
    assert samples["dd2-channel"]["arr_0"].shape == (3, 32, 32, 3) and samples["fp32"]["arr_1"].tolist() == [0, 1, 2]
    assert not np.array_equal(samples["fp32"]["arr_0"], samples["dd2-channel"]["arr_0"])


def test_options_that_do_nothing_on_a_dit_are_refused_in_one_line():
    """QNCD's smoothing and Q-Diffusion's shortcut split have no site in a DiT: step 2 refuses them up front (they
    used to reach the model and stop with a traceback, or do nothing)."""
    from pipeline.steps.quantize_weights import check_specials
    family = DiTFamily()
    check_specials(family, QuantConfig(4))
    with pytest.raises(UserFacingError, match="--scale_split_static .* the dit family has none"):
        check_specials(family, QuantConfig(4, smoothing="code"))
    with pytest.raises(UserFacingError, match="--split: .* the dit family has none"):
        check_specials(family, QuantConfig(4, split_shortcut=True))
