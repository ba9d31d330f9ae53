"""DiT's respaced learned-variance sampling (ldm.models.diffusion.respace, dit_sampling) against the original's
recorded runs (../shared/fixtures/dit/small: schedules, DDPM and DDIM trajectories with every noise draw), the
StepCorrection hook, and the D² quantities of the learned-variance DDPM step (docs/DIT.md) re-derived independently."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHARED, require_shared
from ldm.errors import UserFacingError
from ldm.models.diffusion.ddim import ddim_step
from ldm.models.diffusion.dit_sampling import (ddim_learned_step, ddpm_eps_coefficient, ddpm_learned_step,
                                               learned_advance, sample_learned)
from ldm.models.diffusion.respace import RespacedSchedule, linear_betas, space_timesteps
from ldm.modules.dit import DiT

DIT = SHARED / "fixtures" / "dit" / "small"
RUNS = {"ddpm": ("ddpm", 0.0), "ddim_eta0.0": ("ddim", 0.0), "ddim_eta1.0": ("ddim", 1.0)}


def assert_rel(ours, ref, name, rel=1e-4):
    """The issue's trajectory tolerance: max |ours − ref| <= rel · max |ref| (latents reach ~1e3 here)."""
    assert tuple(ours.shape) == tuple(ref.shape), name
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"{name}: max |ours - ref| = {err:.3e}"


@pytest.fixture(scope="module")
def fixture():
    folder = require_shared(DIT)
    load = lambda name: torch.load(folder / name, map_location="cpu", weights_only=True)  # noqa: E731
    model = DiT(**json.loads((folder / "config.json").read_text())).eval()
    model.load_state_dict(load("model.pt"), strict=True)
    return model, load("inputs.pt"), load("outputs.pt"), json.loads((folder / "index.json").read_text())


def test_space_timesteps_matches_the_original_maps(fixture):
    examples = fixture[3]["respacing_examples"]
    assert {"7", "13", "25", "ddim50", "10,5"} <= set(examples)
    for spacing, expected in examples.items():
        assert space_timesteps(1000, spacing) == expected, spacing
    # half-to-even: "7" keeps 166 and 832 where round-half-up would give 167 and 833
    assert 166 in space_timesteps(1000, "7") and 833 not in space_timesteps(1000, "7")
    assert space_timesteps(1000, "") == list(range(1000)) and space_timesteps(1000, 4) == [0, 333, 666, 999]
    for bad, message in (("ddim105", "no integer stride"), ("x", "expected N"), ("0", "cannot take 0"),
                         ("600,600", "cannot take 600")):
        with pytest.raises(UserFacingError, match=message):
            space_timesteps(1000, bad)


def test_respaced_tables_are_exact(fixture):
    _, _, outputs, index = fixture
    # the un-respaced chain ("" = all 1000 steps) also recomputes β from ᾱ, as the original's SpacedDiffusion
    full = RespacedSchedule.make("")
    assert np.array_equal(full.betas, outputs["base_betas"].numpy())
    assert np.array_equal(np.cumprod(1 - linear_betas(1000)), outputs["base_alphas_cumprod"].numpy())
    assert np.abs(full.betas - linear_betas(1000)).max() < 1e-15
    schedule = RespacedSchedule.make(index["sampling"]["timestep_respacing"])
    tables = schedule.tables()
    assert len(tables) == 14
    for name, table in tables.items():
        ref = outputs[f"sched_{name}"].numpy()
        assert table.dtype == ref.dtype and np.array_equal(table, ref), name   # bit for bit, float64
    assert schedule.timestep_map.tolist() == index["sampling"]["timestep_map"]
    c = schedule.coefficients(5)
    assert c.posterior_mean_coef1.dtype == torch.float32
    assert float(c.posterior_mean_coef1) == float(np.float32(schedule.posterior_mean_coef1[5]))


@pytest.mark.parametrize("run", list(RUNS))
def test_trajectories_replay_the_recorded_noise(fixture, run, one_thread):
    model, inputs, outputs, _ = fixture
    method, eta = RUNS[run]
    schedule = RespacedSchedule.make("10")
    y, scale = outputs["sample_y"], float(inputs["sample_cfg_scale"])
    noise = outputs[f"{run}_noise"]
    seen = []
    final = sample_learned(lambda x, t, step: model.forward_with_cfg(x, t, y, scale), outputs[f"{run}_x"][0],
                           schedule, method=method, eta=eta, noise_sampler=lambda step: noise[step.i],
                           callback=seen.append)
    assert [d["index"] for d in seen] == outputs[f"{run}_t_index"].tolist()
    assert [d["t"] for d in seen] == outputs[f"{run}_model_t"].tolist()
    for name, key in (("x", "x"), ("model_out", "model_out"), ("pred_x0", "pred_xstart")):
        assert_rel(torch.stack([d[name] for d in seen]), outputs[f"{run}_{key}"][:len(seen)], f"{run} {name}")
    assert_rel(final, outputs[f"{run}_final"], f"{run} final")
    assert_rel(final.chunk(2)[0], outputs[f"{run}_samples"], f"{run} samples")
    if method == "ddpm":
        assert_rel(torch.stack([d["log_variance"] for d in seen]), outputs["ddpm_log_variance"], "log variance")
        means = torch.stack([d["x_prev"] - d["sigma"] * d["noise"] for d in seen])
        assert_rel(means, outputs["ddpm_mean"], "ddpm mean")
        assert float(seen[-1]["sigma"].abs().max()) == 0.   # the last step adds no noise, yet draws it
    # the RNG stream as sample.py: seed, z, then one randn_like per step
    torch.manual_seed(int(inputs["sample_seed"]))
    z = torch.randn(outputs["sample_z"].shape)
    again = sample_learned(lambda x, t, step: model.forward_with_cfg(x, t, y, scale), torch.cat([z, z]), schedule,
                           method=method, eta=eta)
    assert_rel(again, outputs[f"{run}_final"], f"{run} rng replay")


def test_the_variance_is_not_clamped(fixture):
    _, _, outputs, _ = fixture
    v = outputs["ddpm_model_out"][:, :, 4:]
    assert float(v.max()) > 1 and float(v.min()) < -1   # the tiny model leaves [−1, 1]; the recorded log-variances
    log_var = outputs["ddpm_log_variance"]               # extrapolate beyond [log β̃, log β]
    assert float(log_var.min()) < float(np.log(RespacedSchedule.make("10").posterior_variance[1:]).min())


class Recorder:
    """A StepCorrection that shifts ε and scales σ, recording what the loop hands it."""

    def __init__(self):
        self.calls, self.began = [], None

    def begin(self, eps_fn, batch_size, advance):
        self.began = (eps_fn, batch_size, advance)

    def __call__(self, eps, sigma, step, x):
        self.calls.append((step, sigma.clone()))
        return eps + 0.01, sigma * 0.5


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_step_correction_hook(fixture, method, one_thread):
    model, inputs, outputs, _ = fixture
    schedule = RespacedSchedule.make("10")
    y = outputs["sample_y"]
    model_fn = lambda x, t, step: model.forward_with_cfg(x, t, y, 1.5)  # noqa: E731
    noise = outputs["ddpm_noise"]
    recorder, seen = Recorder(), []
    x_T = outputs["ddpm_x"][0]
    sample_learned(model_fn, x_T, schedule, method=method, eta=1.0, noise_sampler=lambda s: noise[s.i],
                   correction=recorder, callback=seen.append)
    eps_fn, batch, advance = recorder.began
    assert batch == 4 and len(recorder.calls) == 10
    step0 = recorder.calls[0][0]
    assert (step0.i, step0.index, step0.t) == (0, 9, 999)
    assert step0.alpha == schedule.alphas_cumprod[9] and step0.alpha_prev == schedule.alphas_cumprod_prev[9]
    t = torch.full((4,), 999)
    with torch.no_grad():
        assert torch.equal(eps_fn(x_T, t), model_fn(x_T, t, None)[:, :4])
        # the loop used the corrected inputs, and advance is the loop's own update
        d = seen[3]
        assert torch.equal(d["eps"], d["model_out"][:, :4] + 0.01)
        assert torch.equal(d["sigma"], recorder.calls[3][1] * 0.5)
        assert torch.equal(advance(d["x"], d["eps"], recorder.calls[3][0], d["sigma"], d["noise"]), d["x_prev"])
    if method == "ddpm":   # σ handed over: the learned std, per element
        assert recorder.calls[3][1].shape == (4, 4, 8, 8)


def test_ddpm_step_is_ddim_at_the_posterior_sigma_with_learned_noise():
    """docs/DIT.md: the learned-variance DDPM mean equals DDIM Eq. 12 at σ̃ = √β̃ (step.sigma), so ε's weight in
    x_prev is k_t = √(1 − ᾱ_prev − σ̃²) − √(ᾱ_prev(1 − ᾱ)/ᾱ) = −β'/(√α'√(1 − ᾱ)) whatever the learned σ."""
    from correction.d2 import eps_coefficient
    for spacing in ("10", "250", "ddim25"):
        schedule = RespacedSchedule.make(spacing)
        for step in schedule.ddpm_steps():
            i = step.index
            # Ho et al. 2020 Eq. 11 from the raw tables, independent of the step's fields
            ho = -schedule.betas[i] / np.sqrt(1 - schedule.betas[i]) / np.sqrt(1 - schedule.alphas_cumprod[i])
            assert ddpm_eps_coefficient(step) == pytest.approx(ho, rel=1e-9)
            d2 = eps_coefficient(*(torch.tensor(v, dtype=torch.float64) for v in
                                   (step.alpha, step.alpha_prev, step.sigma)))
            assert float(d2) == pytest.approx(ho, rel=1e-9)
            # measured on the float32 update itself: the ε weight does not move with the injected σ
            c = schedule.coefficients(i)
            x, z = torch.zeros(1), torch.ones(1)
            for sigma in (torch.tensor(0.), torch.tensor(0.7)):
                weight = ddpm_learned_step(x, torch.ones(1), sigma, c, z)[0] - ddpm_learned_step(
                    x, torch.zeros(1), sigma, c, z)[0]
                assert float(weight) == pytest.approx(ho, rel=2e-5, abs=1e-6)
    # the whole mean: DDPM posterior == DDIM Eq. 12 at σ̃ (float64 tables)
    schedule = RespacedSchedule.make("10")
    step = next(schedule.ddpm_steps())
    x, eps = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    i = step.index
    pred = np.sqrt(1 / schedule.alphas_cumprod[i]) * x - np.sqrt(1 / schedule.alphas_cumprod[i] - 1) * eps
    mean = schedule.posterior_mean_coef1[i] * pred + schedule.posterior_mean_coef2[i] * x
    as_ddim = ddim_step(x, eps, *(torch.tensor(v, dtype=torch.float64) for v in
                                  (step.alpha, step.alpha_prev, step.sigma)), None)[0]
    torch.testing.assert_close(as_ddim, mean, rtol=1e-10, atol=1e-10)


def test_dd2_absorption_on_the_ddpm_step_keeps_the_learned_variance():
    """Known answer: an ε error of std σ_c enters x_prev as k_t·σ_c; lowering the injected std to
    σ' = √(σ_θ² − k_t²σ_c²) (k_t from step.sigma, not from σ_θ) leaves Var(x_prev | x_t) = σ_θ², per element."""
    gen = torch.Generator().manual_seed(0)
    schedule = RespacedSchedule.make("10")
    step = list(schedule.ddpm_steps())[3]
    c = schedule.coefficients(step.index)
    k = ddpm_eps_coefficient(step)
    n = 200_000
    sigma_theta = torch.tensor([0.9, 1.3]).repeat(n // 2) * abs(k)   # two learned stds
    sigma_c = 0.5
    x_t = torch.full((n,), 0.3)
    eps_fp = torch.full((n,), 0.2)
    eps_q = eps_fp + sigma_c * torch.randn(n, generator=gen)
    sigma_new = (sigma_theta ** 2 - k ** 2 * sigma_c ** 2).sqrt()
    out = ddpm_learned_step(x_t, eps_q, sigma_new, c, torch.randn(n, generator=gen))[0]
    mean_fp = ddpm_learned_step(x_t, eps_fp, sigma_new, c, None)[0]
    for part in (slice(0, None, 2), slice(1, None, 2)):
        var = float((out[part] - mean_fp[part]).double().pow(2).mean())
        assert var == pytest.approx(float(sigma_theta[part][0]) ** 2, rel=0.02)
    # the same absorption computed with σ_θ in place of σ̃ (DDIM's formula fed the wrong σ) is not this k_t
    from correction.d2 import eps_coefficient
    wrong = eps_coefficient(*(torch.tensor(v, dtype=torch.float64) for v in (step.alpha, step.alpha_prev)),
                            torch.tensor(float(sigma_theta[0]), dtype=torch.float64))
    assert not float(wrong) == pytest.approx(k, rel=1e-3)


def test_learned_advance_matches_pure_steps():
    schedule = RespacedSchedule.make("25")
    step = list(schedule.ddim_steps(0.5))[4]
    x, eps, z = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    sigma = torch.tensor(step.sigma, dtype=torch.float32)
    c = schedule.coefficients(step.index)
    assert torch.equal(learned_advance(schedule, "ddim")(x, eps, step, sigma, z),
                       ddim_learned_step(x, eps, sigma, c, z)[0])
    assert torch.equal(learned_advance(schedule, "ddpm")(x, eps, step, sigma, None),
                       ddpm_learned_step(x, eps, sigma, c, None)[0])
    # DDIM from the learned model: ε re-derived from x̂0 equals ε up to float32 rounding, σ(η) as the η formula
    eps_x0 = (c.sqrt_recip_alphas_cumprod * x - ddim_learned_step(x, eps, sigma, c, z)[1]) / \
        c.sqrt_recipm1_alphas_cumprod
    torch.testing.assert_close(eps_x0, eps, rtol=1e-4, atol=1e-4)
    a, ap = step.alpha, step.alpha_prev
    assert step.sigma == pytest.approx(0.5 * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap), rel=1e-12)
    with pytest.raises(UserFacingError, match="eta must be >= 0"):
        next(schedule.ddim_steps(-1))
