"""Numerical parity with the original CompVis code on the small cin256-v2-structured fixture
(../shared/fixtures/ldm_reference/small, see its README for every call reproduced here)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_close_ref
from ldm.models.diffusion.ddim import DDIMSampler, ddim_step
from ldm.modules.diffusionmodules.util import timestep_embedding

SCHEDULE = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
            "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]
KEY = "class_label"


def test_fixture_loads_strictly(small_dir, small_model):
    sd = torch.load(small_dir / "state_dict.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(sd) == set(small_model.state_dict())
    assert list(sd) == list(small_model.state_dict()), "state_dict key order differs from CompVis"


@pytest.mark.parametrize("name", SCHEDULE)
def test_schedule_buffers(small_model, small_io, name):
    assert_close_ref(getattr(small_model, name), small_io[1][f"schedule.{name}"], name)


def test_lvlb_weights_nonpersistent(small_model, small_io):
    assert_close_ref(small_model.lvlb_weights, small_io[1]["schedule.lvlb_weights_nonpersistent"])
    assert "lvlb_weights" not in small_model.state_dict()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_tables(small_model, small_io, eta):
    out = small_io[1]
    s = DDIMSampler(small_model)
    s.make_schedule(ddim_num_steps=10, ddim_discretize="uniform", ddim_eta=eta, verbose=False)
    assert_close_ref(torch.as_tensor(s.ddim_timesteps), out["ddim_tables.ddim_timesteps"], "timesteps")
    assert_close_ref(s.ddim_alphas, out["ddim_tables.ddim_alphas"], "alphas")
    assert_close_ref(torch.as_tensor(s.ddim_alphas_prev), out["ddim_tables.ddim_alphas_prev"], "alphas_prev")
    assert_close_ref(s.ddim_sqrt_one_minus_alphas, out["ddim_tables.ddim_sqrt_one_minus_alphas"], "sqrt_1m")
    assert_close_ref(torch.as_tensor(s.ddim_sigmas), out[f"ddim_tables.ddim_sigmas_eta{int(eta)}"], "sigmas")
    if eta == 1.0:
        assert_close_ref(s.ddim_sigmas_for_original_num_steps,
                         out["ddim_tables.ddim_sigmas_for_original_num_steps_eta1"], "sigmas_original")


@torch.no_grad()
def test_learned_conditioning(small_model, small_io):
    inp, out = small_io
    assert_close_ref(small_model.get_learned_conditioning({KEY: inp["class_labels"]}), out["cond.c"], "c")
    assert_close_ref(small_model.get_learned_conditioning({KEY: inp["uncond_labels"]}), out["cond.uc"], "uc")


@torch.no_grad()
def test_unet_eps_and_guidance(small_model, small_io):
    inp, out = small_io
    c = small_model.get_learned_conditioning({KEY: inp["class_labels"]})
    uc = small_model.get_learned_conditioning({KEY: inp["uncond_labels"]})
    x, t = inp["x_t"], inp["timesteps"]
    e_c = small_model.apply_model(x, t, c)
    e_u = small_model.apply_model(x, t, uc)
    assert_close_ref(e_c, out["eps.cond"], "eps.cond")
    assert_close_ref(e_u, out["eps.uncond"], "eps.uncond")
    assert_close_ref(e_u + 3.0 * (e_c - e_u), out["eps.cfg3_from_separate_calls"], "cfg separate")
    from ldm.models.diffusion.ddim import cfg_eps
    assert_close_ref(cfg_eps(small_model.apply_model, x, t, c, uc, 3.0), out["eps.cfg3_batched"], "cfg batched")
    assert_close_ref(small_model.predict_start_from_noise(x, t=t, noise=e_c), out["eps.pred_x0_from_cond"], "x0")


@torch.no_grad()
def test_unet_per_block_activations(small_model, small_io):
    inp, out = small_io
    unet = small_model.model.diffusion_model
    c = small_model.get_learned_conditioning({KEY: inp["class_labels"]})
    got = {}
    names = [f"input_blocks.{i}" for i in range(12)] + ["middle_block"] + \
            [f"output_blocks.{i}" for i in range(12)] + ["time_embed", "out"]
    hooks = [unet.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: got.__setitem__(n, o[0:1].clone())) for n in names]
    try:
        unet(inp["x_t"], inp["timesteps"], context=c)
    finally:
        for h in hooks:
            h.remove()
    assert_close_ref(timestep_embedding(inp["timesteps"], unet.model_channels)[0:1],
                     out["unet_debug.timestep_embedding"], "timestep_embedding")
    for n in names:
        assert_close_ref(got[n], out[f"unet_debug.{n}"], n)


@torch.no_grad()
def test_first_stage(small_model, small_io):
    inp, out = small_io
    h = small_model.encode_first_stage(inp["images"])
    assert_close_ref(h, out["first_stage.encode_prequant"], "encode")
    z = small_model.get_first_stage_encoding(h)
    assert_close_ref(z, out["first_stage.z_scaled"], "z_scaled")
    zq, loss, (_, _, idx) = small_model.first_stage_model.quantize(h)
    assert_close_ref(zq, out["first_stage.quantized"], "quantized")
    assert_close_ref(idx, out["first_stage.quant_indices"], "indices")
    assert_close_ref(loss, out["first_stage.quant_emb_loss"], "emb loss")
    assert_close_ref(small_model.decode_first_stage(z), out["first_stage.decode"], "decode")
    assert_close_ref(small_model.decode_first_stage(z, force_not_quantize=True),
                     out["first_stage.decode_force_not_quantize"], "decode_fnq")


@torch.no_grad()
def test_training_quantities(small_model, small_io):
    inp, out = small_io
    z = out["first_stage.z_scaled"]
    assert_close_ref(small_model.q_sample(x_start=z, t=inp["loss_timesteps"], noise=inp["loss_noise"]),
                     out["train.q_sample"], "q_sample")
    c = small_model.get_learned_conditioning({KEY: inp["loss_class_labels"]})
    assert not small_model.training
    _, d = small_model.p_losses(z, c, inp["loss_timesteps"], noise=inp["loss_noise"])
    for k in ("loss_simple", "loss_vlb", "loss"):
        assert_close_ref(d[f"val/{k}"], out[f"train.{k}"], k)


def _run_ddim(model, inp, eta, noise_sampler=None):
    c = model.get_learned_conditioning({KEY: inp["ddim_class_labels"]})
    uc = model.get_learned_conditioning({KEY: inp["ddim_uncond_labels"]})
    record = {"t": [], "model_out": [], "noise": []}

    def model_fn(x, t, cond):
        e = model.apply_model(x, t, cond)
        record["model_out"].append(e)
        return e

    if noise_sampler is None:
        def noise_sampler(step):
            n = torch.randn(inp["ddim_x_T"].shape)
            record["noise"].append(n)
            return n

    sampler = DDIMSampler(model, model_fn=model_fn)
    torch.manual_seed(99)
    samples, inter = sampler.sample(S=10, batch_size=3, shape=[3, 16, 16], conditioning=c, verbose=False,
                                    x_T=inp["ddim_x_T"], eta=eta, log_every_t=1, unconditional_guidance_scale=3.0,
                                    unconditional_conditioning=uc, noise_sampler=noise_sampler,
                                    callback=lambda d: record["t"].append(d["t"]))
    return samples, inter, record


@pytest.mark.parametrize("eta", [0.0, 1.0])
@torch.no_grad()
def test_guided_ddim_trajectory(small_model, small_io, eta):
    inp, out = small_io
    pre = f"ddim_eta{int(eta)}_cfg3"
    samples, inter, rec = _run_ddim(small_model, inp, eta)
    assert rec["t"] == out[f"{pre}.step_timesteps"].tolist()
    assert_close_ref(torch.stack(rec["model_out"]), out[f"{pre}.model_out_per_step"], "model_out")
    if eta == 1.0:  # same global RNG stream as CompVis: one randn per step after manual_seed(99)
        assert_close_ref(torch.stack(rec["noise"]), out[f"{pre}.noise_per_step"], "noise")
    assert_close_ref(samples, out[f"{pre}.samples"], "samples")
    assert_close_ref(torch.stack(inter["x_inter"]), out[f"{pre}.x_inter"], "x_inter")
    assert_close_ref(torch.stack(inter["pred_x0"]), out[f"{pre}.pred_x0"], "pred_x0")
    assert_close_ref(small_model.decode_first_stage(samples), out[f"{pre}.decoded"], "decoded")
    if eta == 0.0:
        assert_close_ref(small_model.decode_first_stage(samples, force_not_quantize=True),
                         out[f"{pre}.decoded_force_not_quantize"], "decoded_fnq")


@torch.no_grad()
def test_stochastic_ddim_with_injected_noise(small_model, small_io):
    """The η = 1 run reproduced from the recorded noise, independent of the global RNG."""
    inp, out = small_io
    noise = out["ddim_eta1_cfg3.noise_per_step"]
    torch.manual_seed(12345)  # a different RNG state must not matter
    samples, _, _ = _run_ddim(small_model, inp, 1.0, noise_sampler=lambda step: noise[step.i])
    assert_close_ref(samples, out["ddim_eta1_cfg3.samples"], "samples")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_pure_ddim_step_replays_reference(small_model, small_io, eta):
    """ddim_step alone, fed the reference model outputs and noise, reproduces the reference trajectory."""
    _, out = small_io
    pre = f"ddim_eta{int(eta)}_cfg3"
    s = DDIMSampler(small_model)
    sched = s.make_schedule(10, ddim_eta=eta, verbose=False)
    x = out[f"{pre}.x_T"]
    for step in sched.steps():
        e_u, e_c = out[f"{pre}.model_out_per_step"][step.i].chunk(2)
        e = e_u + 3.0 * (e_c - e_u)
        noise = out[f"{pre}.noise_per_step"][step.i] if eta else torch.zeros_like(x)
        f32 = lambda v: torch.tensor(np.float32(v))  # noqa: E731
        x, x0 = ddim_step(x, e, f32(step.alpha), f32(step.alpha_prev), f32(step.sigma), noise)
        assert_close_ref(x, out[f"{pre}.x_inter"][step.i + 1], f"x step {step.i}")
        assert_close_ref(x0, out[f"{pre}.pred_x0"][step.i + 1], f"x0 step {step.i}")
