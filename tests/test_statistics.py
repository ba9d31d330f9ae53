"""FID statistics: known answers on Gaussians with closed-form Fréchet distance."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.statistics import FIDStatistics


def test_frechet_distance_closed_form_for_commuting_covariances():
    # N(m1, diag(a)) vs N(m2, diag(b)): d = |m1 - m2|² + Σ (√a − √b)²
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    s1 = FIDStatistics(np.array([0.0, 1.0, 2.0], dtype=np.float32), np.diag(a))
    s2 = FIDStatistics(np.array([1.0, 1.0, 0.0], dtype=np.float32), np.diag(b))
    expected = 1 + 0 + 4 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert s1.frechet_distance(s2) == pytest.approx(expected, rel=1e-9)
    assert s1.frechet_distance(s1) == pytest.approx(0.0, abs=1e-9)


def test_statistics_recover_known_gaussian_parameters():
    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.6], [0.6, 1.0]])
    feats = rng.multivariate_normal([3.0, -1.0], cov, size=200_000).astype(np.float32)
    s = FIDStatistics.from_features(feats)
    assert s.mu.dtype == np.float32 and s.sigma.dtype == np.float64
    np.testing.assert_allclose(s.mu, [3.0, -1.0], atol=0.02)
    np.testing.assert_allclose(s.sigma, cov, atol=0.03)
    assert s.frechet_distance(FIDStatistics(np.array([3.0, -1.0]), cov)) < 1e-3


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="different dimension"):
        FIDStatistics(np.zeros(2), np.eye(2)).frechet_distance(FIDStatistics(np.zeros(3), np.eye(3)))
