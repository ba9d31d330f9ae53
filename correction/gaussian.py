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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
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


# ---------------------------------------------------------------------------------------------------------------------
# Plot (paper Fig. 2: the noise statistics against the timestep), drawn with Pillow (no matplotlib dependency)
# ---------------------------------------------------------------------------------------------------------------------

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (188, 189, 34)]
_PANELS = (("mean of Delta  (mu_D)", "mu_y"), ("std of Delta  (sigma_D)", "sigma_y"),
           ("corr(eps_hat, Delta)  (rho)", "rho"))
_PW, _PH, _ML, _MR, _MT, _MB = 380, 280, 62, 14, 28, 40  # panel size and margins, pixels


def _ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    """Round tick values (1, 2 or 5 × 10^k apart) inside [lo, hi], about n of them."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** np.floor(np.log10(raw))
    step = mag * min((m for m in (1, 2, 5, 10) if m * mag >= raw), default=10)
    return np.arange(np.ceil(lo / step), np.floor(hi / step) + 1) * step


def _draw_panel(draw, font, x0: int, title: str, series: list, key: str) -> None:
    left, top, right, bottom = x0 + _ML, _MT, x0 + _PW - _MR, _PH - _MB
    ys = np.concatenate([s[3][key] for s in series])
    xs = np.concatenate([s[2] for s in series])
    lo, hi = float(ys.min()), float(ys.max())
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.1, 1e-3)
    lo, hi = lo - pad, hi + pad
    xlo, xhi = float(xs.min()), float(xs.max())
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1

    def px(t, v):
        return (left + (t - xlo) / (xhi - xlo) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))

    draw.text((left, 6), title, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline="black")
    for v in _ticks(lo, hi):
        y = px(xlo, v)[1]
        draw.line((left - 4, y, left, y), fill="black")
        draw.line((left + 1, y, right - 1, y), fill=(232, 232, 232))
        draw.text((x0 + 6, y - 6), f"{v + 0.0:.3g}", fill="black", font=font)
    for t in _ticks(xlo, xhi):
        x = px(t, lo)[0]
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - 10, bottom + 6), f"{t:.0f}", fill="black", font=font)
    draw.text(((left + right) / 2 - 3, bottom + 22), "t", fill="black", font=font)
    if lo < 0 < hi:
        y = px(xlo, 0.0)[1]
        draw.line((left + 1, y, right - 1, y), fill=(150, 150, 150))
    for _, color, ts, vals in series:
        pts = [px(t, v) for t, v in zip(ts.tolist(), vals[key].tolist(), strict=True)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for x, y in pts:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)


def plot_fit(path: str | os.PathLike, fits: Sequence[GaussianFit], title: str | None = None) -> Path:
    """PNG of μ_Δ, σ_Δ and ρ against t (D²-DPM Fig. 2): one line for a tensor-wise fit (black), one per channel
    for a channel-wise fit. Pass both to compare them. Written atomically."""
    from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

    from ldm.fileio import write_atomic

    if not fits:
        raise ValueError("nothing to plot: pass at least one fit")
    series = []
    for fit in fits:
        ts = np.asarray(fit.timesteps, dtype=np.float64)
        tables = {k: getattr(fit, k).numpy() for _, k in _PANELS}
        if fit.granularity is Granularity.TENSOR:
            series.append(("tensor-wise", (0, 0, 0), ts, {k: v[:, 0] for k, v in tables.items()}))
        else:
            for c in range(fit.channels):
                series.append((f"channel {c}", _PALETTE[c % len(_PALETTE)], ts,
                               {k: v[:, c] for k, v in tables.items()}))
    legend_rows = -(-len(series) // 6)
    head = 22 if title else 0
    img = Image.new("RGB", (3 * _PW, head + _PH + 8 + 18 * legend_rows), "white")
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (3 * _PW, _PH), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (panel_title, key) in enumerate(_PANELS):
        _draw_panel(draw, font, k * _PW, panel_title, series, key)
    img.paste(canvas, (0, head))
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((_ML, 4), title, fill="black", font=font)
    for j, (label, color, _, _) in enumerate(series):
        x, y = _ML + (j % 6) * 180, head + _PH + 4 + 18 * (j // 6)
        draw.line((x, y + 6, x + 24, y + 6), fill=color, width=3)
        draw.text((x + 30, y), label, fill="black", font=font)
    info = PngImagePlugin.PngInfo()
    info.add_text("content", "D2-DPM noise statistics: mu_D, sigma_D, rho vs t")
    return write_atomic(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info))
