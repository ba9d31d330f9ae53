"""Dual denoising (D²-DPM §"Dual denoising", Eqs. 11-18, Algorithm 1) as ``StepCorrection`` objects: callables
``(ε̂, σ_t, step, x_t) -> (ε', σ_t')`` that change only the inputs of the DDIM update (``ldm...ddim.ddim_step``).

With the conditional Gaussian Δ | ε̂ ~ N(μ_c, σ_c²) of ``correction.gaussian`` at the step's timestep t:

* S-D² (stochastic, "explicit"; Eqs. 11-14): subtract a draw of the noise, ε' = ε̂ − μ_c − σ_c z, z ~ N(0, I)
  from the generator given; the handed σ is returned unchanged (the sampler is unchanged).
* D-D² (deterministic, "implicit"; Eqs. 15-18, Algorithm 1 lines 15-16): subtract the conditional mean,
  ε' = ε̂ − μ_c, and absorb the residual variance σ_c² into the sampler's noise. ε' enters x_{t−1} with the total
  coefficient k_t = √(1 − ᾱ_prev − σ_t²) − √(ᾱ_prev (1 − ᾱ_t)/ᾱ_t), so its error adds k_t² σ_c² of variance; the
  noise the step injects is lowered to match: σ' = √max(σ² − k_t² σ_c², 0). At η = 0 (σ = 0) this is mean
  correction only.

k_t is taken at ``step.sigma``, the σ of the DDIM form of the step's mean (``step_eps_coefficient``), and the
shrinking applies to the σ the correction is handed, the std of the noise the step injects. Under DDIM/PLMS both are
σ_t(η). Under DiT's learned-variance DDPM step they differ (docs/DIT.md): ``step.sigma`` is the posterior std
√β̃_t (the mean is DDIM's at that σ), the handed σ is the learned per-element σ_θ; k_t then equals Ho et al.'s
ε weight −β'_t/(√α'_t √(1 − ᾱ_t)) and σ' = √max(σ_θ² − k_t² σ_c², 0) elementwise.

Tensor-wise fits give scalars per timestep; channel-wise fits give [1, C, 1, 1] tables, and D-D² then returns a
per-channel σ' (each channel shrunk by its own σ_c -- the original read channel 0's already-shrunk value for
every channel; [B, C, H, W] when the handed σ is per element). A timestep without statistics, or a sampler whose
steps/η differ from the fit's, is an error.
"""
from __future__ import annotations

import torch

from correction.gaussian import GaussianFit
from correction.statistics import CorrectionError
from ldm.models.diffusion.ddim import DDIMStep


def eps_coefficient(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """k_t, the total weight of ε in the DDIM update x_{t−1} = √ᾱ_prev x̂0(ε) + √(1 − ᾱ_prev − σ_t²) ε + σ_t z:
    k_t = √(1 − ᾱ_prev − σ_t²) − √(ᾱ_prev (1 − ᾱ_t)/ᾱ_t) (D²-DPM Algorithm 1 line 15; PTQD's c_t)."""
    return (1. - alpha_prev - sigma_t ** 2).sqrt() - (alpha_prev * (1. - alpha_t) / alpha_t).sqrt()


def step_eps_coefficient(step: DDIMStep, sigma: torch.Tensor) -> torch.Tensor:
    """k_t of ``step`` as a float64 scalar on σ's device: ``eps_coefficient`` at ᾱ_t, ᾱ_prev and ``step.sigma``, the
    σ of the DDIM form of the step's mean, not the handed σ (the injected noise's std, which under DiT's DDPM step is
    the learned σ_θ; docs/DIT.md). ``step.sigma`` is first rounded to σ's dtype, as the loops round it for their
    update, so under DDIM/PLMS k_t is the value at the σ the update uses."""
    s = torch.tensor(step.sigma, dtype=sigma.dtype, device=sigma.device).to(torch.float64)
    return eps_coefficient(torch.tensor(step.alpha, dtype=torch.float64, device=sigma.device),
                           torch.tensor(step.alpha_prev, dtype=torch.float64, device=sigma.device), s)


def absorb_variance(sigma_t: torch.Tensor, k_t: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """σ_t' = √(σ_t² − k_t² var), or 0 where that is negative (D²-DPM Algorithm 1 line 16; PTQD's VSC): an
    independent error of variance ``var`` in ε already brings k_t² var of the noise the step should inject."""
    return (sigma_t ** 2 - k_t ** 2 * var).clamp_min(0.).sqrt()


def conditional_mean(eps_hat: torch.Tensor, mu_x: torch.Tensor, mu_y: torch.Tensor,
                     slope: torch.Tensor) -> torch.Tensor:
    """μ_c = μ_Δ + ρ (σ_Δ/σ_ε̂)(ε̂ − μ_ε̂), D²-DPM Eq. (9); elementwise, parameters broadcast as [1, G, 1, 1]."""
    return mu_y + slope * (eps_hat - mu_x)


class GaussianCorrection:
    """Common part of S-D² and D-D²: looks up the fit's conditional Gaussian at ``step.t`` after checking the step
    against the fit's sampling settings. ``check_config(steps=, eta=, scale=)`` checks a sampler's settings up
    front (the guidance scale does not travel with a step)."""

    method = "D²"

    def __init__(self, fit: GaussianFit):
        if not isinstance(fit, GaussianFit):
            raise TypeError(f"expected a GaussianFit, got {type(fit).__name__} (GaussianFit.from_dict loads one)")
        self.fit = fit
        self.what = f"the {fit.granularity.value}-wise Gaussian fit"

    def check_config(self, *, steps: int, eta: float, scale: float) -> None:
        self.fit.sampling.check(steps=steps, eta=eta, scale=scale, what=self.what)

    def params(self, step: DDIMStep, eps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(μ_ε̂, μ_Δ, slope, σ_c) at step.t, each [1, G, 1, 1] in ε's dtype and device (G = 1 or C)."""
        self.fit.sampling.check_step(step, self.what)
        r = self.fit.row(step.t)
        g = self.fit.channels
        if g != 1 and g != eps.shape[1]:
            raise CorrectionError(f"{self.what} has {g} channels, the model's ε has {eps.shape[1]}; fit statistics "
                                  f"collected with this model")
        return tuple(v[r].view(1, g, 1, 1).to(eps) for v in
                     (self.fit.mu_x, self.fit.mu_y, self.fit.slope, self.fit.sigma_c))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fit.granularity.value}-wise, {len(self.fit.timesteps)} timesteps)"


class StochasticD2(GaussianCorrection):
    """S-D², Eqs. (11)-(14): ε' = ε̂ − μ_c(ε̂) − σ_c z, σ_t unchanged. z ~ N(0, I) comes from ``generator`` (drawn on
    the generator's device, then moved to ε's), so a seed fixes the correction."""

    method = "S-D²"

    def __init__(self, fit: GaussianFit, generator: torch.Generator):
        super().__init__(fit)
        if not isinstance(generator, torch.Generator):
            raise TypeError("S-D² needs a torch.Generator for its noise draws (e.g. torch.Generator().manual_seed(0))")
        self.generator = generator

    def __call__(self, eps: torch.Tensor, sigma: torch.Tensor, step: DDIMStep,
                 x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu_x, mu_y, slope, sigma_c = self.params(step, eps)
        z = torch.randn(eps.shape, generator=self.generator, device=self.generator.device,
                        dtype=torch.float32).to(eps)
        return eps - conditional_mean(eps, mu_x, mu_y, slope) - sigma_c * z, sigma


class DeterministicD2(GaussianCorrection):
    """D-D², Eqs. (15)-(18) and Algorithm 1: ε' = ε̂ − μ_c(ε̂), σ' = √max(σ² − k_t² σ_c², 0) for the handed σ with
    k_t from ``step.sigma`` (``step_eps_coefficient``). Channel-wise, σ' is [1, C, 1, 1] for a scalar σ (channel
    c shrunk by its own σ_c); tensor-wise it keeps σ's shape; a per-element σ (DiT's DDPM step) stays per element."""

    method = "D-D²"

    def __call__(self, eps: torch.Tensor, sigma: torch.Tensor, step: DDIMStep,
                 x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu_x, mu_y, slope, sigma_c = self.params(step, eps)
        k = step_eps_coefficient(step, sigma)
        sigma_new = absorb_variance(sigma.to(torch.float64), k, sigma_c.to(torch.float64) ** 2)
        if sigma_new.numel() == 1:
            sigma_new = sigma_new.reshape(sigma.shape)
        return eps - conditional_mean(eps, mu_x, mu_y, slope), sigma_new.to(sigma.dtype)
