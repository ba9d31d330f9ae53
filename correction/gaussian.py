"""The joint Gaussian of the quantized output ε̂ and the quantization noise Δ per timestep (D²-DPM §"Joint
Gaussian modeling", Eqs. 7-10), tensor-wise or channel-wise, fitted from ``NoiseStatistics``.

Under the paper's assumptions (elements independent of one another; element i of ε̂ correlated only with element i
of Δ; isotropic) a timestep is described by five scalars, Algorithm 1's μ_{T×2} and Σ_{T×4}:

    [ε̂; Δ] ~ N([μ_ε̂; μ_Δ], [[σ_ε̂², c], [c, σ_Δ²]]),   ρ = c / (σ_ε̂ σ_Δ) clamped to ±0.9999          (Eq. 7)

and the conditional distribution of the noise given the quantized output is

    Δ | ε̂ ~ N(μ_c, σ_c²),   μ_c = μ_Δ + ρ (σ_Δ/σ_ε̂)(ε̂ − μ_ε̂),   σ_c = σ_Δ √(1 − ρ²)              (Eqs. 8-10)

(Eq. 10 as printed carries an extra factor; this is the standard form the code uses). Channel-wise, the same five
scalars per latent channel, for any number of channels (the original hard-coded 3). The fit is preceded by the
original's 4σ outlier filter on Δ (``NoiseStatistics.filtered_moments``) and uses the sample covariance (n − 1).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from correction.statistics import (DELTA, EPS_HAT, CorrectionError, Moments, NoiseStatistics, SamplingConfig,
                                   _has_no)

RHO_MAX = 0.9999  # |ρ| clamp of the original fit (keeps σ_c > 0 and the slope finite)
FORMAT = "d2dpm-gaussian"


class Granularity(enum.Enum):
    TENSOR = "tensor"    # one Gaussian per timestep over all elements
    CHANNEL = "channel"  # one per timestep and latent channel


def conditional_params(mu: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slope, σ_c, ρ) of Δ | ε̂ from μ [..., 2] = (μ_ε̂, μ_Δ) and Σ [..., 2, 2], Eqs. (8)-(10):
    μ_c = μ_Δ + slope·(ε̂ − μ_ε̂) with slope = ρ σ_Δ/σ_ε̂, and σ_c = σ_Δ √(1 − ρ²); ρ is clamped to ±0.9999.
    A timestep without noise (σ_Δ = 0) gets ρ = 0: μ_c = μ_Δ and σ_c = 0."""
    sx, sy = cov[..., 0, 0].clamp_min(0).sqrt(), cov[..., 1, 1].clamp_min(0).sqrt()
    denom = sx * sy
    rho = torch.where(denom > 0, cov[..., 0, 1] / denom.clamp_min(torch.finfo(cov.dtype).tiny), 0.)
    rho = rho.clamp(-RHO_MAX, RHO_MAX)
    slope = torch.where(sx > 0, rho * sy / sx.clamp_min(torch.finfo(cov.dtype).tiny), 0.)
    return slope, sy * (1 - rho ** 2).sqrt(), rho


@dataclass(frozen=True, eq=False)
class GaussianFit:
    """Per-timestep (row r ↔ ``sampling.timesteps[r]``) Gaussian of (ε̂, Δ); G = 1 tensor-wise, G = C channel-wise.

        mu     [T, G, 2]     float64  (μ_ε̂, μ_Δ)
        cov    [T, G, 2, 2]  float64  [[σ_ε̂², c], [c, σ_Δ²]]  (sample covariance, n − 1)
        count  [T, G]        int64    elements the fit used (after the outlier filter)

    ``outlier_k`` is the filter's k (None: fitted without it). Derived tables [T, G]: ``mu_x`` (μ_ε̂), ``mu_y``
    (μ_Δ), ``sigma_x``, ``sigma_y``, ``rho`` (clamped), ``slope`` and ``sigma_c`` (Eqs. 9-10)."""

    granularity: Granularity
    sampling: SamplingConfig
    mu: torch.Tensor
    cov: torch.Tensor
    count: torch.Tensor
    outlier_k: float | None = 4.0

    def __post_init__(self):
        t, g = len(self.sampling.timesteps), self.mu.shape[1]
        if tuple(self.mu.shape) != (t, g, 2) or tuple(self.cov.shape) != (t, g, 2, 2) or \
                tuple(self.count.shape) != (t, g):
            raise ValueError(f"fit tables do not match {t} timesteps: mu {tuple(self.mu.shape)}, "
                             f"cov {tuple(self.cov.shape)}, count {tuple(self.count.shape)}")
        if self.granularity is Granularity.TENSOR and g != 1:
            raise ValueError(f"a tensor-wise fit has one group per timestep, got {g}")
        slope, sigma_c, rho = conditional_params(self.mu, self.cov)
        object.__setattr__(self, "_derived", {"slope": slope, "sigma_c": sigma_c, "rho": rho})

    @property
    def timesteps(self) -> tuple[int, ...]:
        return self.sampling.timesteps

    @property
    def channels(self) -> int:
        """Groups per timestep: 1 tensor-wise, C channel-wise."""
        return self.mu.shape[1]

    mu_x = property(lambda self: self.mu[..., EPS_HAT])
    mu_y = property(lambda self: self.mu[..., DELTA])
    sigma_x = property(lambda self: self.cov[..., 0, 0].clamp_min(0).sqrt())
    sigma_y = property(lambda self: self.cov[..., 1, 1].clamp_min(0).sqrt())
    rho = property(lambda self: self._derived["rho"])
    slope = property(lambda self: self._derived["slope"])
    sigma_c = property(lambda self: self._derived["sigma_c"])

    def row(self, t: int) -> int:
        """Row of timestep t; a timestep without statistics is an error (never an identity fallback)."""
        r = self.sampling.row(t, what=f"the {self.granularity.value}-wise Gaussian fit")
        if int(self.count[r].min()) < 2:
            raise CorrectionError(f"the {self.granularity.value}-wise Gaussian fit {_has_no(t)}; refit from complete "
                                  f"statistics")
        return r

    def to_dict(self) -> dict:
        """Plain tensors and numbers (torch.save / torch.load(weights_only=True))."""
        return {"format": FORMAT, "granularity": self.granularity.value, "sampling": self.sampling.to_dict(),
                "mu": self.mu.clone(), "cov": self.cov.clone(), "count": self.count.clone(),
                "outlier_k": self.outlier_k}

    @classmethod
    def from_dict(cls, d: dict) -> "GaussianFit":
        if d.get("format") != FORMAT:
            raise CorrectionError(f"not a D²-DPM Gaussian fit (format {d.get('format')!r}); pass the output of the "
                                  f"Gaussian modeling step")
        k = d.get("outlier_k")
        return cls(Granularity(d["granularity"]), SamplingConfig.from_dict(d["sampling"]),
                   d["mu"].to(torch.float64), d["cov"].to(torch.float64), d["count"].to(torch.int64),
                   None if k is None else float(k))


def gaussian_from_moments(moments: Moments, granularity: Granularity, sampling: SamplingConfig,
                          outlier_k: float | None) -> GaussianFit:
    """Eq. (7) from sufficient statistics: pool the channels for the tensor-wise fit; sample mean and covariance
    (n − 1) of (ε̂, Δ). ``outlier_k`` only records which filter ``moments`` went through."""
    if moments.timesteps != sampling.timesteps:
        raise CorrectionError("moments and sampling config cover different timesteps")
    m = moments.pooled() if granularity is Granularity.TENSOR else moments
    m.require_complete()
    mu = m.mean()[..., :2].contiguous()
    cov = m.cov(ddof=1)[..., :2, :2].contiguous()
    cov = (cov + cov.transpose(-1, -2)) / 2  # exactly symmetric
    return GaussianFit(granularity, sampling, mu, cov, m.n.clone(), outlier_k)


def fit_gaussian(stats: NoiseStatistics, granularity: Granularity, outlier_k: float | None = 4.0) -> GaussianFit:
    """The D²-DPM fit (the original's ``gaussian_modeling.py``): drop |Δ − mean Δ| > k·std Δ per timestep (per
    channel for the channel-wise fit), then mean and covariance of (ε̂, Δ). ``outlier_k`` None skips the filter
    (needs no spill)."""
    if outlier_k is None:
        moments = stats.moments()
    else:
        moments = stats.filtered_moments(outlier_k, per_channel=granularity is Granularity.CHANNEL)
    return gaussian_from_moments(moments, granularity, stats.sampling, outlier_k)
