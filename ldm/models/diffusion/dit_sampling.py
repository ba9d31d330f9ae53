"""Sampling a learned-variance ε-model over a ``RespacedSchedule``: the DDPM posterior step with Improved DDPM's
interpolated variance (Nichol & Dhariwal 2021 Eq. 15) and DDIM (Song et al. 2021 Eq. 12) from the same model, as
DiT's ``p_sample_loop`` / ``ddim_sample_loop`` run them (``clip_denoised=False``, as DiT's scripts pass).

The model output is [B, 2C, H, W]: ε, then v ∈ ~[−1, 1]. Each step, in float32 with float32-cast coefficients:

* x̂0 = √(1/ᾱ)·x − √(1/ᾱ − 1)·ε
* DDPM: log σ² = f·log β' + (1 − f)·log β̃ with f = (v + 1)/2 **unclamped** (v outside [−1, 1] extrapolates);
  x_prev = β̃-posterior mean (coef1·x̂0 + coef2·x) + σ·z, σ = 0 at the last step.
* DDIM: ε' = (√(1/ᾱ)·x − x̂0)/√(1/ᾱ − 1) (re-derived from x̂0, as the original); σ = η√((1−ᾱ_prev)/(1−ᾱ))
  √(1 − ᾱ/ᾱ_prev); x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ²)·ε' + σ·z.

Noise z is passed in: the loops draw one N(0, I) of x's shape **every step**, the last included and at η = 0, so the
original's RNG stream (or its recorded draws) replays exactly. Quantization-noise corrections enter through the same
``StepCorrection`` hook as ``ddim.sample_ddim``: they change (ε, σ) before the update; ``σ`` handed to them is the
std of the noise the step injects (DDPM: the learned one, per element). The ``DDIMStep`` they receive carries the
respaced ᾱ, ᾱ_prev and, as ``sigma``, the σ of the DDIM form of this update's mean (docs/DIT.md).
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import DDIMStep, StepCorrection, begin_trajectory, randn_sampler
from ldm.models.diffusion.respace import RespacedSchedule, StepCoefficients

# (x [B, C, H, W], t [B] original timesteps, step or None) -> model output [B, 2C, H, W] (ε, v)
LearnedModelFn = Callable[[torch.Tensor, torch.Tensor, "DDIMStep | None"], torch.Tensor]


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    """x̂0 = √(1/ᾱ) x_t − √(1/ᾱ − 1) ε (Ho et al. 2020 Eq. 4 solved for x0)."""
    return c.sqrt_recip_alphas_cumprod * x_t - c.sqrt_recipm1_alphas_cumprod * eps


def learned_log_variance(v: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    """Improved DDPM Eq. 15: log Σ = f log β' + (1 − f) log β̃, f = (v + 1)/2, not clamped (as DiT)."""
    frac = (v + 1) / 2
    return frac * c.max_log + (1 - frac) * c.min_log


def ddpm_sigma(v: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    """The std of the noise the DDPM step injects: exp(½ log Σ), zeroed at the last step (per element)."""
    return c.nonzero * torch.exp(0.5 * learned_log_variance(v, c))


def ddim_sigma(c: StepCoefficients, eta: float) -> torch.Tensor:
    """σ(η) = η √((1 − ᾱ_prev)/(1 − ᾱ)) √(1 − ᾱ/ᾱ_prev) in float32, as the original computes it per step."""
    return c.nonzero * (eta * torch.sqrt((1 - c.alpha_bar_prev) / (1 - c.alpha_bar))
                        * torch.sqrt(1 - c.alpha_bar / c.alpha_bar_prev))


def ddpm_learned_step(x_t: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, c: StepCoefficients,
                      noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step: x_prev = coef1·x̂0 + coef2·x_t + σ z (Ho et al. 2020 Eq. 7 posterior mean; σ from
    ``ddpm_sigma`` or a correction). Returns (x_prev, x̂0)."""
    pred_x0 = predict_x0(x_t, eps, c)
    x_prev = c.posterior_mean_coef1 * pred_x0 + c.posterior_mean_coef2 * x_t
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def ddim_learned_step(x_t: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, c: StepCoefficients,
                      noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2021 Eq. 12) with ε re-derived from x̂0 as the original does. Returns
    (x_prev, x̂0)."""
    pred_x0 = predict_x0(x_t, eps, c)
    eps_x0 = (c.sqrt_recip_alphas_cumprod * x_t - pred_x0) / c.sqrt_recipm1_alphas_cumprod
    x_prev = pred_x0 * torch.sqrt(c.alpha_bar_prev) + torch.sqrt(1 - c.alpha_bar_prev - sigma ** 2) * eps_x0
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def ddpm_eps_coefficient(step: DDIMStep) -> float:
    """The total weight of ε in the DDPM step's x_prev (x_t and z fixed): −coef1·√(1/ᾱ − 1)
    = −β'/(√α' √(1 − ᾱ)) with α' = ᾱ/ᾱ_prev, float64. It equals the DDIM form's
    √(1 − ᾱ_prev − σ̃²) − √(ᾱ_prev(1 − ᾱ)/ᾱ) at σ̃ = ``step.sigma`` (the posterior std), and does **not** depend on
    the learned σ, which scales only the noise (docs/DIT.md, "D² on the learned-variance DDPM step")."""
    alpha_step = step.alpha / step.alpha_prev
    return -(1 - alpha_step) / (alpha_step ** 0.5 * (1 - step.alpha) ** 0.5)


_UPDATES = {"ddpm": ddpm_learned_step, "ddim": ddim_learned_step}


def learned_advance(schedule: RespacedSchedule, method: str) -> Callable[..., torch.Tensor]:
    """``advance(x_t, ε, step, σ, z) -> x_prev``: the loop's own update at ``step`` (for ``StepCorrection.begin``)."""
    update = _UPDATES[method]

    def advance(x_t: torch.Tensor, eps: torch.Tensor, step: DDIMStep, sigma: torch.Tensor,
                noise: torch.Tensor | None) -> torch.Tensor:
        return update(x_t, eps, sigma, schedule.coefficients(step.index, x_t.device), noise)[0]
    return advance


@torch.no_grad()
def sample_learned(model_fn: LearnedModelFn, x_T: torch.Tensor, schedule: RespacedSchedule, *,
                   method: str = "ddpm", eta: float = 0.0,
                   noise_sampler: Callable[[DDIMStep], torch.Tensor] | None = None,
                   correction: StepCorrection | None = None, callback: Callable[[dict], None] | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Run DiT's DDPM (``method="ddpm"``) or DDIM (``"ddim"``, with ``eta``) chain from x_T; returns the final x.

    ``model_fn(x, t, step)`` gets the original timesteps ``timestep_map[i]`` (e.g. ``model.forward_with_cfg`` with
    its labels and scale bound). ``noise_sampler(step)`` supplies the step's N(0, I) draw (default: a fresh
    ``torch.randn`` of x's shape each step, the original's ``randn_like`` stream). ``correction`` as in
    ``ddim.sample_ddim``; ``callback`` gets i, index, t, x, model_out, eps (after correction), sigma, pred_x0,
    noise, x_prev (and log_variance for DDPM)."""
    if method not in _UPDATES:
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
    update = _UPDATES[method]
    noise_sampler = noise_sampler or randn_sampler(x_T.shape, x_T.device)
    x, b, channels = x_T, x_T.shape[0], x_T.shape[1]
    begin_trajectory(correction, lambda x_, t_, s_: model_fn(x_, t_, s_)[:, :channels], b,
                     learned_advance(schedule, method))
    steps = schedule.ddpm_steps() if method == "ddpm" else schedule.ddim_steps(eta)
    for step in tqdm(steps, total=len(schedule), desc=method.upper(), disable=not progress, leave=False):
        c = schedule.coefficients(step.index, x.device)
        t = torch.full((b,), step.t, device=x.device, dtype=torch.long)
        out = model_fn(x, t, step)
        if out.shape[1] != 2 * channels:
            raise ValueError(f"a learned-variance model returns 2·{channels} channels (ε, v), got {out.shape[1]}")
        eps, v = out[:, :channels], out[:, channels:]
        extra = {}
        if method == "ddpm":
            extra["log_variance"] = learned_log_variance(v, c)
            sigma = c.nonzero * torch.exp(0.5 * extra["log_variance"])
        else:
            sigma = ddim_sigma(c, eta)
        if correction is not None:
            eps, sigma = correction(eps, sigma, step, x)
        noise = noise_sampler(step)
        x_prev, pred_x0 = update(x, eps, sigma, c, noise)
        if callback is not None:
            callback({"i": step.i, "index": step.index, "t": step.t, "x": x, "model_out": out, "eps": eps,
                      "sigma": sigma, "pred_x0": pred_x0, "noise": noise, "x_prev": x_prev, **extra})
        x = x_prev
    return x
