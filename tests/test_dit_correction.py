"""D-D², S-D² and PTQD under DiT's learned-variance DDPM step (docs/DIT.md, "D² on the learned-variance DDPM step"):
k_t comes from ``step.sigma`` (the posterior std of the DDIM form of the mean), the handed σ (the learned per-element
σ_θ) is what gets shrunk. Known answers from an independent float64 re-derivation of the respaced tables from the raw
linear β; the ε weight k_t also measured from the float32 update itself. Under DDIM both corrections are unchanged
bit for bit (the old formula: k_t at the handed σ, which there equals float32(step.sigma))."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from correction.d2 import DeterministicD2, StochasticD2, absorb_variance, eps_coefficient
from correction.gaussian import GaussianFit, Granularity
from correction.ptqd import PTQDCorrection, PTQDFit
from correction.statistics import SamplingConfig
from ldm.models.diffusion.ddim import DDIMSchedule
from ldm.models.diffusion.dit_sampling import ddpm_learned_step, sample_learned
from ldm.models.diffusion.respace import RespacedSchedule

STEPS = 10
SIGMA_C = (0.02, 0.2, 1.5)       # per channel: shrink a little, shrink a lot, clip to 0 at most steps
MU_X, MU_Y, RHO = (0.1, -0.2, 0.0), (0.03, -0.05, 0.1), (0.5, 0.0, -0.3)


def rederived(timestep_map: np.ndarray) -> dict[str, np.ndarray]:
    """The respaced step tables from the raw linear β (1e-4 … 0.02, T = 1000), written out here independently:
    β'_i = 1 − ᾱ(t_i)/ᾱ(t_{i−1}), β̃_i = β'_i (1 − ᾱ_{i−1})/(1 − ᾱ_i), k_i = −β'_i/(√(1 − β'_i) √(1 − ᾱ_i))
    (Ho et al. 2020 Eqs. 7 and 11)."""
    abar_full = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    abar = abar_full[timestep_map]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta = 1.0 - abar / abar_prev
    post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
    log_min = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    k = -beta / (np.sqrt(1.0 - beta) * np.sqrt(1.0 - abar))
    return {"abar": abar, "abar_prev": abar_prev, "beta": beta, "post_var": post_var, "log_min": log_min, "k": k}


def learned_model(x: torch.Tensor, t: torch.Tensor, step) -> torch.Tensor:
    """A fixed (ε, v) function: v = 1.1 tanh(3x) reaches past ±1, where Eq. 15 extrapolates."""
    eps = 0.3 * x + 0.05 * t.view(-1, 1, 1, 1) / 1000
    return torch.cat([eps, 1.1 * torch.tanh(3 * x)], dim=1)


def ddpm_sampling(schedule: RespacedSchedule) -> SamplingConfig:
    """The fit's record of a DDPM chain: it reads as η = 1 (step.sigma is the posterior std, σ(η = 1))."""
    return SamplingConfig(STEPS, 1.0, 1.0, tuple(int(t) for t in schedule.timestep_map))


def gaussian_fit(sampling: SamplingConfig) -> GaussianFit:
    """Channel-wise fit with σ_Δ = σ_c/√(1 − ρ²) so that Eq. 10 gives SIGMA_C; σ_ε̂ = 1."""
    t, g = len(sampling.timesteps), 3
    rho, sc = torch.tensor(RHO, dtype=torch.float64), torch.tensor(SIGMA_C, dtype=torch.float64)
    sy = sc / (1 - rho ** 2).sqrt()
    mu = torch.stack([torch.tensor(MU_X, dtype=torch.float64), torch.tensor(MU_Y, dtype=torch.float64)], -1)
    c = rho * sy
    cov = torch.stack([torch.stack([torch.ones(g, dtype=torch.float64), c], -1), torch.stack([c, sy ** 2], -1)], -2)
    return GaussianFit(Granularity.CHANNEL, sampling, mu.expand(t, g, 2).clone(), cov.expand(t, g, 2, 2).clone(),
                       torch.full((t, g), 1000, dtype=torch.int64))


class Recorder:
    """Wraps a correction: records (step, ε̂, handed σ, x, ε', σ') of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, eps, sigma, step, x):
        out = self.inner(eps, sigma, step, x)
        self.calls.append((step, eps.clone(), sigma.clone(), x.clone(), *out))
        return out


@pytest.fixture(scope="module")
def chain():
    schedule = RespacedSchedule.make(str(STEPS))
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    return schedule, x_T, rederived(schedule.timestep_map)


def run_ddpm(chain, correction):
    schedule, x_T, _ = chain
    rec = Recorder(correction)
    g = torch.Generator().manual_seed(1)
    out = sample_learned(learned_model, x_T, schedule, method="ddpm", correction=rec,
                         noise_sampler=lambda step: torch.randn(x_T.shape, generator=g))
    assert torch.isfinite(out).all()
    assert [c[0].i for c in rec.calls] == list(range(STEPS))
    return rec.calls


def learned_sigma(v: torch.Tensor, tables: dict, index: int) -> torch.Tensor:
    """σ_θ = exp(½ (f log β' + (1 − f) log β̃)), f = (v + 1)/2, 0 at the last step (Improved DDPM Eq. 15)."""
    f = (v.double() + 1) / 2
    log_var = f * np.log(tables["beta"][index]) + (1 - f) * tables["log_min"][index]
    return torch.exp(0.5 * log_var) * float(index != 0)


def test_step_sigma_is_the_posterior_std_and_k_the_ddpm_eps_weight(chain):
    schedule, _, tables = chain
    for step in schedule.ddpm_steps():
        r = step.index
        assert step.sigma == pytest.approx(np.sqrt(tables["post_var"][r]), rel=1e-12, abs=1e-15)
        k = eps_coefficient(*(torch.tensor(v, dtype=torch.float64) for v in (step.alpha, step.alpha_prev,
                                                                              step.sigma)))
        assert float(k) == pytest.approx(tables["k"][r], rel=1e-9)
        # measured: the ε weight of the float32 update the loop runs (x_t and z fixed)
        c = schedule.coefficients(r)
        x = torch.full((1, 1, 1, 1), 0.7, dtype=torch.float64)
        one, zero = (ddpm_learned_step(x, torch.full_like(x, e), None, c, None)[0] for e in (1.0, 0.0))
        assert float(one - zero) == pytest.approx(tables["k"][r], rel=1e-6)


def test_dd2_under_the_ddpm_step_matches_the_rederivation(chain):
    _, _, tables = chain
    fit = gaussian_fit(ddpm_sampling(chain[0]))
    calls = run_ddpm(chain, DeterministicD2(fit))
    sc2 = torch.tensor(SIGMA_C, dtype=torch.float64).view(1, 3, 1, 1) ** 2
    clipped = shrunk = old_nan = 0
    for step, eps, sigma, x, eps_new, sigma_new in calls:
        r = step.index
        v = learned_model(x, torch.full((x.shape[0],), step.t), step)[:, 3:]
        theta = learned_sigma(v, tables, r)
        torch.testing.assert_close(sigma.double(), theta, rtol=2e-6, atol=1e-9)   # the hook hands σ_θ
        expected = (theta ** 2 - tables["k"][r] ** 2 * sc2).clamp_min(0).sqrt()
        assert sigma_new.shape == eps.shape   # per element: each element's own σ_θ shrunk
        torch.testing.assert_close(sigma_new.double(), expected, rtol=1e-5, atol=1e-8)
        # the conserved quantity: the k_t² σ_c² the corrected ε carries plus σ'² is σ_θ² (where σ_θ² allows it)
        total = tables["k"][r] ** 2 * sc2 + sigma_new.double() ** 2
        room = theta ** 2 >= tables["k"][r] ** 2 * sc2
        torch.testing.assert_close(total[room], (theta ** 2)[room], rtol=1e-5, atol=1e-12)
        mu_c = torch.tensor(MU_Y).view(1, 3, 1, 1) + fit.slope[0].float().view(1, 3, 1, 1) * (
            eps - torch.tensor(MU_X).view(1, 3, 1, 1))
        torch.testing.assert_close(eps_new, eps - mu_c)
        clipped += int((sigma_new == 0).logical_and(theta > 0).sum())
        shrunk += int((sigma_new > 0).logical_and(sigma_new < sigma).sum())
        # the old rule (k_t at the handed σ_θ) is undefined where σ_θ² > 1 − ᾱ_prev
        old_k = eps_coefficient(torch.tensor(step.alpha, dtype=torch.float64),
                                torch.tensor(step.alpha_prev, dtype=torch.float64), sigma.double())
        old_nan += int(torch.isnan(old_k).sum())
    assert clipped > 0 and shrunk > 0 and old_nan > 0


def test_ptqd_under_the_ddpm_step_matches_the_rederivation(chain):
    _, _, tables = chain
    sampling = ddpm_sampling(chain[0])
    k_fit, bias, res = 0.2, torch.tensor([[0.05, -0.1, 0.02]], dtype=torch.float64), 0.3
    fit = PTQDFit(sampling, torch.full((STEPS,), k_fit, dtype=torch.float64), bias.expand(STEPS, 3).clone(),
                  torch.full((STEPS,), res, dtype=torch.float64), torch.full((STEPS,), 100, dtype=torch.int64))
    for step, eps, sigma, x, eps_new, sigma_new in run_ddpm(chain, PTQDCorrection(fit)):
        r = step.index
        v = learned_model(x, torch.full((x.shape[0],), step.t), step)[:, 3:]
        theta = learned_sigma(v, tables, r)
        expected = (theta ** 2 - tables["k"][r] ** 2 * (res / (1 + k_fit)) ** 2).clamp_min(0).sqrt()
        torch.testing.assert_close(sigma_new.double(), expected, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(eps_new, (eps - bias.float().view(1, 3, 1, 1)) / (1 + k_fit))
        assert torch.isfinite(sigma_new).all()


def test_sd2_under_the_ddpm_step_keeps_the_learned_sigma(chain):
    fit = gaussian_fit(ddpm_sampling(chain[0]))
    calls = run_ddpm(chain, StochasticD2(fit, torch.Generator().manual_seed(3)))
    replay = torch.Generator().manual_seed(3)
    for step, eps, sigma, x, eps_new, sigma_new in calls:
        assert torch.equal(sigma_new, sigma)
        z = torch.randn(eps.shape, generator=replay)
        mu_c = torch.tensor(MU_Y).view(1, 3, 1, 1) + fit.slope[0].float().view(1, 3, 1, 1) * (
            eps - torch.tensor(MU_X).view(1, 3, 1, 1))
        torch.testing.assert_close(eps_new, eps - mu_c - fit.sigma_c[0].float().view(1, 3, 1, 1) * z)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_steps_are_unchanged_bit_for_bit(eta):
    """The DDIM loops hand σ = float32(step.sigma); the old rule took k_t at that σ."""
    ac = torch.from_numpy(np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)).float()
    sched = DDIMSchedule.make(ac, STEPS, eta)
    sampling = SamplingConfig.from_schedule(sched, STEPS, 3.0)
    fit = gaussian_fit(sampling)
    pfit = PTQDFit(sampling, torch.full((STEPS,), 0.2, dtype=torch.float64),
                   torch.zeros(STEPS, 3, dtype=torch.float64), torch.full((STEPS,), 0.3, dtype=torch.float64),
                   torch.full((STEPS,), 100, dtype=torch.int64))
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    for step in sched.steps():
        sigma = torch.tensor(step.sigma, dtype=torch.float32)
        s64 = sigma.double()
        k_old = eps_coefficient(torch.tensor(step.alpha, dtype=torch.float64),
                                torch.tensor(step.alpha_prev, dtype=torch.float64), s64)
        _, dd2 = DeterministicD2(fit)(eps, sigma, step, eps)
        old = absorb_variance(s64, k_old, fit.sigma_c[0].view(1, 3, 1, 1) ** 2).to(sigma.dtype)
        assert torch.equal(dd2, old)
        _, pt = PTQDCorrection(pfit)(eps, sigma, step, eps)
        old_pt = absorb_variance(s64, k_old, torch.tensor((0.3 / 1.2) ** 2, dtype=torch.float64)).to(sigma.dtype)
        assert torch.equal(pt, old_pt)
