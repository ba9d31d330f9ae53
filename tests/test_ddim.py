"""The DDIM schedule, the pure update and the sampling loop, on analytic inputs and tiny random models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from ldm.models.diffusion.ddim import DDIMSampler, DDIMSchedule, cfg_eps, ddim_step, sample_ddim
from ldm.modules.diffusionmodules.util import make_beta_schedule


@pytest.fixture(scope="module")
def alphas_cumprod():
    return torch.tensor(np.cumprod(1 - make_beta_schedule("linear", 1000, 0.0015, 0.0195)), dtype=torch.float32)


def test_uniform_timesteps_keep_compvis_offset(alphas_cumprod):
    s = DDIMSchedule.make(alphas_cumprod, 10, 0.0)
    assert s.timesteps.tolist() == list(range(1, 1000, 100))
    assert [st.t for st in s.steps()] == list(range(901, 0, -100))
    assert len(DDIMSchedule.make(alphas_cumprod, 7, 0.0)) == 8  # ceil(1000 / (1000 // 7))
    assert len(DDIMSchedule.make(alphas_cumprod, 20, 0.0)) == 20


@pytest.mark.parametrize("steps", [3, 1000])
def test_steps_that_overrun_T_are_refused(alphas_cumprod, steps):
    with pytest.raises(ValueError, match="beyond the last trained timestep"):
        DDIMSchedule.make(alphas_cumprod, steps, 0.0)


def test_schedule_pairs_come_from_the_tables(alphas_cumprod):
    s = DDIMSchedule.make(alphas_cumprod, 20, 1.0)
    steps = list(s.steps())
    ac = alphas_cumprod.double().numpy()
    for prev, nxt in zip(steps, steps[1:], strict=False):
        assert prev.alpha_prev == nxt.alpha  # ᾱ_prev of a step is ᾱ of the next visited timestep
    assert steps[-1].alpha_prev == ac[0]     # CompVis: ᾱ_0 = 1 − β_1, not 1
    assert all(st.alpha == ac[st.t] for st in steps)
    a, ap = s.alphas, s.alphas_prev
    np.testing.assert_allclose(s.sigmas, np.sqrt((1 - ap) / (1 - a) * (1 - a / ap)))
    assert not DDIMSchedule.make(alphas_cumprod, 20, 0.0).sigmas.any()


def test_ddim_step_is_exact_on_a_consistent_pair():
    """With ε the true noise of x_t = √ᾱ x0 + √(1−ᾱ) ε, the step returns x0 and the deterministic x_prev."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                  dtype=torch.float64)
    a_t, a_prev = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    x_prev, pred_x0 = ddim_step(x_t, eps, a_t, a_prev, torch.tensor(0., dtype=torch.float64), None)
    torch.testing.assert_close(pred_x0, x0)
    torch.testing.assert_close(x_prev, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps)
    # σ adds σ·z and takes σ² out of the direction term
    z = torch.randn_like(x0)
    sigma = torch.tensor(0.2, dtype=torch.float64)
    x_prev_s, _ = ddim_step(x_t, eps, a_t, a_prev, sigma, z)
    torch.testing.assert_close(x_prev_s, a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps + sigma * z)


def test_ddim_step_takes_a_per_channel_sigma():
    x, e = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a, ap = torch.tensor(0.5), torch.tensor(0.9)
    sig = torch.tensor([0.0, 0.1, 0.2]).view(1, 3, 1, 1)
    z = torch.randn_like(x)
    out, _ = ddim_step(x, e, a, ap, sig, z)
    for ch in range(3):
        ref, _ = ddim_step(x[:, ch], e[:, ch], a, ap, sig[0, ch, 0, 0], z[:, ch])
        torch.testing.assert_close(out[:, ch], ref)


def test_loop_reports_explicit_timesteps_and_correction_only_changes_inputs(alphas_cumprod):
    s = DDIMSchedule.make(alphas_cumprod, 10, 1.0)
    x_T = torch.randn(2, 3, 4, 4)
    noises = torch.randn(len(s), 2, 3, 4, 4)
    eps_fn = lambda x, t, step: 0.5 * x + t.view(-1, 1, 1, 1) * 1e-3  # noqa: E731
    seen = []
    plain = sample_ddim(eps_fn, x_T, s, noise_sampler=lambda st: noises[st.i], callback=lambda d: seen.append(d["t"]))
    assert seen == [st.t for st in s.steps()]

    # a correction that removes a bias and zeroes σ equals running the η = 0 schedule on the debiased ε
    def correction(eps, sigma, step, x):
        return eps - 0.1, torch.zeros_like(sigma)

    corrected = sample_ddim(eps_fn, x_T, s, noise_sampler=lambda st: noises[st.i], correction=correction)
    s0 = DDIMSchedule.make(alphas_cumprod, 10, 0.0)
    reference = sample_ddim(lambda x, t, st: eps_fn(x, t, st) - 0.1, x_T, s0, noise_sampler=lambda st: noises[st.i])
    torch.testing.assert_close(corrected, reference)
    assert not torch.allclose(plain, corrected)


def test_cfg_puts_the_unconditional_half_first():
    calls = []

    def model_fn(x, t, c):
        calls.append(c.clone())
        return c.view(-1, 1, 1, 1).expand_as(x).float()

    x, t = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    c, uc = torch.tensor([3.0, 5.0]), torch.tensor([1.0, 1.0])
    e = cfg_eps(model_fn, x, t, c, uc, 2.0)
    assert calls[0].tolist() == [1.0, 1.0, 3.0, 5.0]
    torch.testing.assert_close(e[:, 0, 0, 0], uc + 2.0 * (c - uc))
    calls.clear()
    cfg_eps(model_fn, x, t, c, uc, 1.0)
    assert calls[0].tolist() == [3.0, 5.0]  # scale 1: no unconditional pass


@pytest.fixture(scope="module")
def tiny_cond():
    return tiny_models.build(tiny_models.config(tiny_models.CLASS_COND))


def test_sampler_is_deterministic_under_a_generator(tiny_cond):
    m = tiny_cond
    c = m.get_learned_conditioning({"class_label": torch.tensor([0, 1])})
    uc = m.get_learned_conditioning({"class_label": torch.tensor([4, 4])})

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return DDIMSampler(m).sample(S=5, batch_size=2, shape=(3, 8, 8), conditioning=c, eta=1.0, verbose=False,
                                     unconditional_guidance_scale=3.0, unconditional_conditioning=uc,
                                     generator=g)[0]

    torch.manual_seed(0)
    a = run(7)
    torch.manual_seed(1)  # the global RNG must not matter
    assert torch.equal(a, run(7))
    assert not torch.equal(a, run(8))


def test_sampler_refuses_bad_arguments(tiny_cond):
    s = DDIMSampler(tiny_cond)
    c = tiny_cond.get_learned_conditioning({"class_label": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="batch size 2, but batch_size is 3"):
        s.sample(S=5, batch_size=3, shape=(3, 8, 8), conditioning=c, verbose=False)
    with pytest.raises(ValueError, match="quantize_x0"):
        s.sample(S=5, batch_size=2, shape=(3, 8, 8), conditioning=c, verbose=False, quantize_x0=True)
    with pytest.raises(TypeError, match="unsupported arguments"):
        s.sample(S=5, batch_size=2, shape=(3, 8, 8), conditioning=c, verbose=False, not_an_option=1)


def test_model_fn_replaces_the_denoiser(tiny_cond):
    """Any (x, t, cond) -> ε function can stand in for apply_model (how quantized UNets will be plugged in)."""
    seen = []

    def zero_eps(x, t, c):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    x_T = torch.randn(1, 3, 8, 8)
    out, _ = DDIMSampler(tiny_cond, model_fn=zero_eps).sample(S=5, batch_size=1, shape=(3, 8, 8), verbose=False,
                                                              conditioning=None, x_T=x_T)
    # ε ≡ 0: x̂0 = x_t/√ᾱ_t each step, so the chain scales x_T by √(ᾱ_0 / ᾱ_first)
    s = DDIMSchedule.make(tiny_cond.alphas_cumprod, 5, 0.0)
    first = next(s.steps())
    torch.testing.assert_close(out, x_T * float(np.sqrt(s.alphas_prev[0] / first.alpha)), rtol=1e-5, atol=1e-6)
    assert seen == [st.t for st in s.steps()]
