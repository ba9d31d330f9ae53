"""Feature statistics and the Fréchet distance (Heusel et al. 2017, FID), as the OpenAI evaluator computes them.

mu is the float32 mean of float32 features, sigma the float64 covariance with an N − 1 denominator (spec
evaluator.md §7): d = ‖mu1 − mu2‖² + tr(S1) + tr(S2) − 2 tr(sqrtm(S1 S2)), sample first, reference second.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg


@dataclass(frozen=True)
class FIDStatistics:
    mu: np.ndarray     # [D]
    sigma: np.ndarray  # [D, D]

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FIDStatistics":
        features = np.asarray(features)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
        return cls(np.mean(features, axis=0), np.cov(features, rowvar=False))

    def frechet_distance(self, other: "FIDStatistics", eps: float = 1e-6) -> float:
        mu1, mu2 = np.atleast_1d(self.mu), np.atleast_1d(other.mu)
        s1, s2 = np.atleast_2d(self.sigma), np.atleast_2d(other.sigma)
        if mu1.shape != mu2.shape or s1.shape != s2.shape:
            raise ValueError(f"statistics of different dimension: {mu1.shape} vs {mu2.shape}")
        diff = mu1 - mu2
        covmean = _sqrtm(s1.dot(s2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                          stacklevel=2)
            offset = np.eye(s1.shape[0]) * eps
            covmean = _sqrtm((s1 + offset).dot(s2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
            covmean = covmean.real
        return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # Quiet like the reference's sqrtm(..., disp=False): no LinAlgWarning for the singular products that N < D
    # features give (non-finite results are handled by the caller), and no deprecation notice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)
