"""PTQD (He et al., NeurIPS 2023, arXiv 2305.10657, §4 "Quantization noise correction"), the baseline D²-DPM
improves on, fitted from the same ``NoiseStatistics`` and applied as a ``StepCorrection`` over the same DDIM update.

PTQD splits the noise into a part correlated with the FP output and a Gaussian residual:

    Δ = k_t ε + Δ',   k_t = least-squares slope of Δ on ε_fp over all elements at t (with intercept), clamped ≥ 0
    ε̂ = (1 + k_t) ε + Δ',   Δ' ~ N(μ_t, σ_t²),   μ_t per latent channel

* CNC + BC (correlated-noise and bias correction): ε̃ = (ε̂ − μ_t)/(1 + k_t), leaving an error of std
  σ_q = σ_t/(1 + k_t) in ε̃.
* VSC (variance schedule calibration): that error enters x_{t−1} with the coefficient k'_t of ε in the DDIM update
  (``d2.step_eps_coefficient``: at ``step.sigma``), so the noise the step injects is lowered to
  σ' = √max(σ² − k'_t² σ_q², 0). Inert at η = 0, where σ = 0. Under DiT's learned-variance DDPM step k'_t is taken
  at the posterior std ``step.sigma`` and the handed per-element σ_θ is lowered (docs/DIT.md; as ``d2``).

Definitions of the residual statistics (the released code's differ slightly; both agree when E[ε_fp] ≈ 0 and the
per-sample spread is uniform): μ_t,c = mean over channel c of Δ − k_t ε_fp (the original: of raw Δ), and σ_t the
pooled within-channel std of Δ − k_t ε_fp − μ_t,c, i.e. of exactly what remains after BC (the original: the mean
over samples of each sample's std). No outlier filter, as in PTQD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from correction.d2 import absorb_variance, step_eps_coefficient
from correction.statistics import (DELTA, EPS_FP, CorrectionError, Moments, NoiseStatistics, SamplingConfig,
                                   _has_no)
from ldm.models.diffusion.ddim import DDIMStep

FORMAT = "ptqd-noise-model"


@dataclass(frozen=True, eq=False)
class PTQDFit:
    """Per timestep (row r ↔ ``sampling.timesteps[r]``):

        slope  [T]     float64  least-squares slope of Δ on ε_fp (unclamped; ``k`` is it clamped at 0)
        bias   [T, C]  float64  μ_t per channel, mean of Δ − k_t ε_fp
        sigma  [T]     float64  σ_t, std of the residual Δ − k_t ε_fp − μ_t
        count  [T]     int64    elements used
    """

    sampling: SamplingConfig
    slope: torch.Tensor
    bias: torch.Tensor
    sigma: torch.Tensor
    count: torch.Tensor

    def __post_init__(self):
        t = len(self.sampling.timesteps)
        if self.slope.shape != (t,) or self.sigma.shape != (t,) or self.count.shape != (t,) or \
                self.bias.ndim != 2 or self.bias.shape[0] != t:
            raise ValueError(f"PTQD tables do not match {t} timesteps: slope {tuple(self.slope.shape)}, "
                             f"bias {tuple(self.bias.shape)}, sigma {tuple(self.sigma.shape)}")

    @property
    def k(self) -> torch.Tensor:
        """k_t = max(slope, 0): PTQD corrects only a positive correlation."""
        return self.slope.clamp_min(0.)

    @property
    def timesteps(self) -> tuple[int, ...]:
        return self.sampling.timesteps

    def row(self, t: int) -> int:
        r = self.sampling.row(t, what="the PTQD fit")
        if int(self.count[r]) < 2:
            raise CorrectionError(f"the PTQD fit {_has_no(t)}; refit from complete statistics")
        return r

    def to_dict(self) -> dict:
        return {"format": FORMAT, "sampling": self.sampling.to_dict(), "slope": self.slope.clone(),
                "bias": self.bias.clone(), "sigma": self.sigma.clone(), "count": self.count.clone()}

    @classmethod
    def from_dict(cls, d: dict) -> "PTQDFit":
        if d.get("format") != FORMAT:
            raise CorrectionError(f"not a PTQD fit (format {d.get('format')!r}); pass the output of the PTQD fit")
        return cls(SamplingConfig.from_dict(d["sampling"]), *(d[k].to(torch.float64) for k in ("slope", "bias",
                   "sigma")), d["count"].to(torch.int64))


def ptqd_from_moments(moments: Moments, sampling: SamplingConfig) -> PTQDFit:
    """k_t, μ_t, σ_t from per-channel moments of (ε̂, Δ, ε_fp) (see the module docstring for the definitions)."""
    if moments.timesteps != sampling.timesteps:
        raise CorrectionError("moments and sampling config cover different timesteps")
    moments.require_complete("the PTQD statistics")
    pooled = moments.pooled()
    c_all = pooled.cov(ddof=0)[:, 0]                                         # [T, 3, 3] over all elements
    var_f, cov_fy = c_all[:, EPS_FP, EPS_FP], c_all[:, EPS_FP, DELTA]
    if bool((var_f <= 0).any()):
        raise CorrectionError("ε_fp is constant at some timestep; the regression of Δ on ε_fp is undefined")
    slope = cov_fy / var_f                                                   # regression with one intercept
    k = slope.clamp_min(0.)[:, None]                                         # [T, 1]
    mean, cov = moments.mean(), moments.cov(ddof=0)                          # [T, C, 3], [T, C, 3, 3]
    bias = mean[..., DELTA] - k * mean[..., EPS_FP]                          # [T, C]
    # within-channel variance of r = Δ − k ε_fp, pooled over channels
    var_r = cov[..., DELTA, DELTA] - 2 * k * cov[..., EPS_FP, DELTA] + k ** 2 * cov[..., EPS_FP, EPS_FP]
    n = moments.n.to(torch.float64)
    sigma = ((var_r * n).sum(1) / n.sum(1)).clamp_min(0.).sqrt()
    return PTQDFit(sampling, slope, bias, sigma, moments.n.sum(1))


def fit_ptqd(stats: NoiseStatistics) -> PTQDFit:
    """PTQD's noise model from collected statistics (the original's ``analyze_error.py``)."""
    return ptqd_from_moments(stats.moments(), stats.sampling)


class PTQDCorrection:
    """PTQD as a ``StepCorrection``: ε̃ = (ε̂ − μ_t)/(1 + k_t) and σ' = √max(σ² − k'_t² (σ_t,res/(1 + k_t))², 0),
    σ the handed (injected) std, k'_t at ``step.sigma``."""

    method = "PTQD"

    def __init__(self, fit: PTQDFit, variance_calibration: bool = True):
        if not isinstance(fit, PTQDFit):
            raise TypeError(f"expected a PTQDFit, got {type(fit).__name__} (PTQDFit.from_dict loads one)")
        self.fit = fit
        self.variance_calibration = variance_calibration  # False: CNC + BC only (the paper's ablation)

    def check_config(self, *, steps: int, eta: float, scale: float) -> None:
        self.fit.sampling.check(steps=steps, eta=eta, scale=scale, what="the PTQD fit")

    def __call__(self, eps: torch.Tensor, sigma: torch.Tensor, step: DDIMStep,
                 x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.fit.sampling.check_step(step, "the PTQD fit")
        r = self.fit.row(step.t)
        c = self.fit.bias.shape[1]
        if c != eps.shape[1]:
            raise CorrectionError(f"the PTQD fit has {c} channels, the model's ε has {eps.shape[1]}; fit statistics "
                                  f"collected with this model")
        k = float(self.fit.k[r])
        eps_tilde = (eps - self.fit.bias[r].view(1, c, 1, 1).to(eps)) / (1. + k)
        if not self.variance_calibration:
            return eps_tilde, sigma
        sigma_q = float(self.fit.sigma[r]) / (1. + k)
        s64 = sigma.to(torch.float64)
        coef = step_eps_coefficient(step, sigma)   # k'_t at step.sigma; the handed σ is what gets lowered
        return eps_tilde, absorb_variance(s64, coef, torch.tensor(sigma_q ** 2, dtype=torch.float64,
                                                                  device=s64.device)).to(sigma.dtype)

    def __repr__(self) -> str:
        return f"PTQDCorrection({len(self.fit.timesteps)} timesteps, variance_calibration={self.variance_calibration})"
