"""Noise statistics, Gaussian / PTQD fits and the D²-DPM / PTQD step corrections: planted parameters, exact
second-pass filtering, persistence, the corrections' formulas, and corrected sampling on a tiny random model."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import tiny_models
from ldm.models.diffusion.settings import SamplingSettings
from correction.d2 import DeterministicD2, StochasticD2, absorb_variance, eps_coefficient
from correction.gaussian import GaussianFit, Granularity, fit_gaussian
from correction.ptqd import PTQDCorrection, PTQDFit, fit_ptqd
from correction.samplers import DDIMSampler_channel_wise_implicit_gaussian_quantCorrection_imagenet
from correction.statistics import (ConfigMismatch, CorrectionError, MissingTimestep, NoiseStatistics,
                                   SamplingConfig, collect_noise_statistics)
from ldm.models.diffusion.ddim import DDIMSchedule
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.sample import sample_latents
from ldm.util import UserFacingError


@pytest.fixture(scope="module")
def alphas_cumprod():
    return torch.tensor(np.cumprod(1 - make_beta_schedule("linear", 1000, 0.0015, 0.0195)), dtype=torch.float32)


SMALL = SamplingConfig(steps=3, eta=0.0, scale=3.0, timesteps=(1, 334, 667))

# planted joint Gaussian of (ε̂, Δ) per timestep row and channel (4 channels: nothing may assume 3)
MU_X = np.array([[0.1, -0.2, 0.0, 0.3], [0.0, 0.1, -0.1, 0.2], [-0.3, 0.0, 0.2, 0.1]])
SIG_X = np.array([[1.0, 0.8, 1.2, 0.9], [1.1, 1.0, 0.7, 1.3], [0.9, 1.2, 1.0, 0.8]])
MU_Y = np.array([[0.02, -0.05, 0.04, 0.0], [0.05, 0.0, -0.03, 0.01], [-0.02, 0.03, 0.0, 0.06]])
SIG_Y = np.array([[0.10, 0.20, 0.15, 0.05], [0.12, 0.08, 0.30, 0.10], [0.20, 0.10, 0.05, 0.25]])
RHO = np.array([[0.5, -0.3, 0.0, 0.8], [0.2, 0.6, -0.7, 0.1], [-0.4, 0.3, 0.9, 0.0]])


def planted_batch(row: int, b: int, g: torch.Generator, hw: int = 16):
    """(ε̂, ε_fp) [b, 4, hw, hw] float32 with (ε̂, Δ) jointly Gaussian with the planted parameters of ``row``."""
    z1 = torch.randn(b, 4, hw, hw, generator=g, dtype=torch.float64)
    z2 = torch.randn(b, 4, hw, hw, generator=g, dtype=torch.float64)
    p = {k: torch.tensor(v[row]).view(1, 4, 1, 1) for k, v in
         dict(mx=MU_X, sx=SIG_X, my=MU_Y, sy=SIG_Y, r=RHO).items()}
    x = p["mx"] + p["sx"] * z1
    y = p["my"] + p["sy"] * (p["r"] * z1 + (1 - p["r"] ** 2).sqrt() * z2)
    return x.float(), (x - y).float()


def fill(stats: NoiseStatistics, batches=4, b=6, seed=0, hw=16):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        for row, t in enumerate(stats.timesteps):
            q, f = planted_batch(row, b, g, hw)
            stats.update(t, q, f)
            data.append((t, q, f))
    return data


def test_channel_wise_fit_recovers_planted_parameters(tmp_path):
    stats = NoiseStatistics(SMALL, spill_dir=tmp_path / "spill")
    fill(stats, batches=5, b=8, hw=32)  # 40960 elements per timestep and channel
    fit = fit_gaussian(stats, Granularity.CHANNEL)
    assert fit.channels == 4 and fit.timesteps == SMALL.timesteps
    np.testing.assert_allclose(fit.mu_x.numpy(), MU_X, atol=0.03)
    np.testing.assert_allclose(fit.sigma_x.numpy(), SIG_X, rtol=0.03)
    np.testing.assert_allclose(fit.mu_y.numpy(), MU_Y, atol=0.005)
    np.testing.assert_allclose(fit.sigma_y.numpy(), SIG_Y, rtol=0.03)
    np.testing.assert_allclose(fit.rho.numpy(), RHO, atol=0.03)
    np.testing.assert_allclose(fit.sigma_c.numpy(), SIG_Y * np.sqrt(1 - RHO ** 2), rtol=0.05, atol=2e-3)
    np.testing.assert_allclose(fit.slope.numpy(), RHO * SIG_Y / SIG_X, atol=0.01)


def test_tensor_wise_fit_is_the_pooled_gaussian(tmp_path):
    stats = NoiseStatistics(SMALL)
    fill(stats, batches=5, b=8, hw=32)
    fit = fit_gaussian(stats, Granularity.TENSOR, outlier_k=None)
    assert fit.channels == 1
    # moments of the equal-weight mixture over channels
    ex, ey = MU_X.mean(1), MU_Y.mean(1)
    vx = (SIG_X ** 2 + MU_X ** 2).mean(1) - ex ** 2
    vy = (SIG_Y ** 2 + MU_Y ** 2).mean(1) - ey ** 2
    cxy = (RHO * SIG_X * SIG_Y + MU_X * MU_Y).mean(1) - ex * ey
    np.testing.assert_allclose(fit.mu_x[:, 0].numpy(), ex, atol=0.02)
    np.testing.assert_allclose(fit.mu_y[:, 0].numpy(), ey, atol=0.003)
    np.testing.assert_allclose(fit.sigma_x[:, 0].numpy(), np.sqrt(vx), rtol=0.02)
    np.testing.assert_allclose(fit.sigma_y[:, 0].numpy(), np.sqrt(vy), rtol=0.02)
    np.testing.assert_allclose(fit.rho[:, 0].numpy(), cxy / np.sqrt(vx * vy), atol=0.02)


def brute_force_fit(data, timesteps, per_channel: bool, k: float = 4.0):
    """The original fit on all values in memory: drop |Δ − mean| > k·std (population), then mean and np.cov."""
    mus, covs = [], []
    for t in timesteps:
        q = np.concatenate([d[1].double().numpy() for d in data if d[0] == t])
        f = np.concatenate([d[2].double().numpy() for d in data if d[0] == t])
        y = q - f
        groups = range(q.shape[1]) if per_channel else [slice(None)]
        mu_t, cov_t = [], []
        for c in groups:
            xc, yc = q[:, c].ravel(), y[:, c].ravel()
            keep = np.abs(yc - yc.mean()) <= k * yc.std()
            mu_t.append([xc[keep].mean(), yc[keep].mean()])
            cov_t.append(np.cov(np.stack([xc[keep], yc[keep]])))
        mus.append(mu_t)
        covs.append(cov_t)
    return np.array(mus), np.array(covs)


@pytest.mark.parametrize("granularity", [Granularity.TENSOR, Granularity.CHANNEL])
def test_outlier_filter_removes_planted_outliers_exactly(tmp_path, granularity):
    stats = NoiseStatistics(SMALL, spill_dir=tmp_path / "spill")
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(3):
        for row, t in enumerate(SMALL.timesteps):
            q, f = planted_batch(row, 4, g)
            f.view(-1)[torch.randperm(f.numel(), generator=g)[:20]] -= 40.0   # Δ = +40: far outside 4σ
            stats.update(t, q, f)
            data.append((t, q, f))
    raw = fit_gaussian(stats, granularity, outlier_k=None)
    fit = fit_gaussian(stats, granularity, outlier_k=4.0)
    mu, cov = brute_force_fit(data, SMALL.timesteps, per_channel=granularity is Granularity.CHANNEL)
    np.testing.assert_allclose(fit.mu.numpy(), mu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fit.cov.numpy(), cov, rtol=1e-9, atol=1e-12)
    assert int(fit.count.sum()) <= int(raw.count.sum()) - 60 * 3
    assert (raw.sigma_y > 3 * fit.sigma_y).all()   # the outliers dominate the unfiltered σ_Δ
    if granularity is Granularity.CHANNEL:
        np.testing.assert_allclose(fit.sigma_y.numpy(), SIG_Y, rtol=0.1)


def test_filter_needs_a_spill_and_complete_statistics(tmp_path):
    stats = NoiseStatistics(SMALL)
    fill(stats, batches=1, b=2)
    with pytest.raises(CorrectionError, match="spill"):
        fit_gaussian(stats, Granularity.TENSOR)
    partial = NoiseStatistics(SMALL)
    q, f = planted_batch(0, 2, torch.Generator().manual_seed(0))
    partial.update(1, q, f)
    with pytest.raises(MissingTimestep, match="t=334"):
        fit_gaussian(partial, Granularity.CHANNEL, outlier_k=None)
    with pytest.raises(ConfigMismatch, match="t=2 is not one of the 3"):
        partial.update(2, q, f)
    with pytest.raises(ValueError, match="earlier updates"):
        partial.update(334, q[:, :3], f[:, :3])


def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(3)
    qs, fs = zip(*(planted_batch(1, 3, g) for _ in range(5)), strict=True)
    streamed, once = NoiseStatistics(SMALL), NoiseStatistics(SMALL)
    for q, f in zip(qs, fs, strict=True):
        streamed.update(334, q, f)
    once.update(334, torch.cat(qs), torch.cat(fs))
    a, b = streamed.moments(), once.moments()
    assert torch.equal(a.n, b.n)
    torch.testing.assert_close(a.s1, b.s1, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(a.s2, b.s2, rtol=1e-12, atol=1e-9)
    # and both equal the float64 moments of the values
    v = torch.cat(qs).double(), torch.cat(qs).double() - torch.cat(fs).double()
    mean = b.mean()[1]
    torch.testing.assert_close(mean[:, 0], v[0].mean((0, 2, 3)))
    centred = [u - u.mean((0, 2, 3), keepdim=True) for u in v]
    torch.testing.assert_close(b.cov(ddof=0)[1, :, 0, 1], (centred[0] * centred[1]).mean((0, 2, 3)))


def test_state_dict_round_trip_merge_and_resume(tmp_path):
    whole = NoiseStatistics(SMALL, spill_dir=tmp_path / "whole")
    part_a = NoiseStatistics(SMALL, spill_dir=tmp_path / "a")
    part_b = NoiseStatistics(SMALL, spill_dir=tmp_path / "b")
    g = torch.Generator().manual_seed(5)
    for k in range(4):
        for row, t in enumerate(SMALL.timesteps):
            q, f = planted_batch(row, 3, g)
            whole.update(t, q, f)
            (part_a if k < 2 else part_b).update(t, q, f)
    # weights-only round trip of part a, then merge part b into it
    torch.save(part_a.state_dict(), tmp_path / "a.pt")
    restored = NoiseStatistics.from_state_dict(torch.load(tmp_path / "a.pt", weights_only=True), tmp_path / "a")
    restored.merge_(part_b)
    for per_channel in (False, True):
        m1, m2 = whole.filtered_moments(per_channel=per_channel), restored.filtered_moments(per_channel=per_channel)
        assert torch.equal(m1.n, m2.n)
        torch.testing.assert_close(m1.s2, m2.s2, rtol=1e-12, atol=1e-9)
    assert torch.equal(whole.samples, restored.samples)

    # resume: rows spilled after the saved state are cut off again
    state = whole.state_dict()
    q, f = planted_batch(0, 3, g)
    whole.update(1, q, f)
    again = NoiseStatistics.from_state_dict(state, tmp_path / "whole")
    assert (tmp_path / "whole" / "t0001.f32").stat().st_size == int(state["samples"][0]) * 2 * 4 * 16 * 16 * 4
    torch.testing.assert_close(again.filtered_moments().s1, restored.filtered_moments().s1, rtol=1e-12, atol=1e-9)

    with pytest.raises(CorrectionError, match="already holds"):
        NoiseStatistics(SMALL, spill_dir=tmp_path / "a")
    with pytest.raises(CorrectionError, match="without"):
        restored.merge_(NoiseStatistics(SMALL))
    other = NoiseStatistics(SamplingConfig(3, 1.0, 3.0, SMALL.timesteps))
    with pytest.raises(ConfigMismatch, match="eta=1"):
        NoiseStatistics(SMALL).merge_(other)


def make_fit(sampling: SamplingConfig, granularity: Granularity, mu_x, sigma_x, mu_y, sigma_y, rho) -> GaussianFit:
    """A fit with the same per-group parameters at every timestep."""
    p = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64).reshape(-1)
                                  for v in (mu_x, sigma_x, mu_y, sigma_y, rho)))
    g, t = p[0].numel(), len(sampling.timesteps)
    mu = torch.stack([p[0], p[2]], -1).expand(t, g, 2).clone()
    c = p[4] * p[1] * p[3]
    cov = torch.stack([torch.stack([p[1] ** 2, c], -1), torch.stack([c, p[3] ** 2], -1)], -2).expand(t, g, 2, 2)
    return GaussianFit(granularity, sampling, mu, cov.clone(), torch.full((t, g), 1000, dtype=torch.int64))


def test_fit_round_trips_through_a_weights_only_file_and_plots(tmp_path):
    from pipeline.steps.fit_noise import plot_noise
    fit = make_fit(SMALL, Granularity.CHANNEL, [0.1, 0.2, 0.3, 0.4], [1.] * 4, [0.01] * 4, [0.1] * 4, [0.5] * 4)
    torch.save(fit.to_dict(), tmp_path / "fit.pt")
    back = GaussianFit.from_dict(torch.load(tmp_path / "fit.pt", weights_only=True))
    assert back.granularity is Granularity.CHANNEL and back.sampling == SMALL and back.outlier_k == 4.0
    torch.testing.assert_close(back.cov, fit.cov)
    tensor_fit = make_fit(SMALL, Granularity.TENSOR, 0., 1., 0.02, 0.1, 0.3)
    data = plot_noise(tmp_path / "fig2.png", [tensor_fit, fit], title="synthetic")
    # the figure's data is the fits' tables: one series per channel and the tensor-wise one
    assert list(data["series"]) == ["tensor-wise", "channel 0", "channel 1", "channel 2", "channel 3"]
    assert data["timesteps"] == list(SMALL.timesteps)
    np.testing.assert_allclose(data["series"]["channel 2"]["rho"], fit.rho[:, 2].numpy())
    np.testing.assert_allclose(data["series"]["tensor-wise"]["sigma_y"], tensor_fit.sigma_y[:, 0].numpy())
    from PIL import Image
    with Image.open(tmp_path / "fig2.png") as im:
        assert im.format == "PNG" and im.width > 1000


def test_rho_is_clamped():
    fit = make_fit(SMALL, Granularity.TENSOR, 0., 1., 0., 0.1, 1.0)   # perfectly correlated
    assert float(fit.rho.max()) == pytest.approx(0.9999)
    assert float(fit.sigma_c.min()) > 0


@pytest.fixture(scope="module")
def eta1_steps(alphas_cumprod):
    sched = DDIMSchedule.make(alphas_cumprod, 10, 1.0)
    return SamplingConfig.from_schedule(sched, 10, 3.0), list(sched.steps())


def test_dd2_shrinks_sigma_per_channel_with_its_own_sigma_c(eta1_steps):
    sampling, steps = eta1_steps
    step = steps[5]
    sigma = torch.tensor(step.sigma, dtype=torch.float32)
    k = eps_coefficient(torch.tensor(step.alpha, dtype=torch.float64), torch.tensor(step.alpha_prev,
                        dtype=torch.float64), sigma.double())
    # σ_c per channel: small (shrink), just too large (clip), moderate (shrink); ρ = 0 so σ_c = σ_Δ
    limit = float(sigma) / abs(float(k))
    sig_c = torch.tensor([0.3 * limit, 1.05 * limit, 0.8 * limit], dtype=torch.float64)
    fit = make_fit(sampling, Granularity.CHANNEL, 0., 1., [0.05, -0.05, 0.1], sig_c, 0.)
    corr = DeterministicD2(fit)
    for b in (1, 2, 5):   # the original raised IndexError for batch sizes below 3
        eps = torch.randn(b, 3, 4, 4)
        eps2, sig2 = corr(eps, sigma, step, torch.zeros_like(eps))
        assert sig2.shape == (1, 3, 1, 1)
        expected = (float(sigma) ** 2 - float(k) ** 2 * sig_c ** 2).clamp_min(0).sqrt()
        torch.testing.assert_close(sig2.view(3).double(), expected, rtol=1e-5, atol=1e-7)
        assert float(sig2[0, 1]) == 0.0 and float(sig2[0, 0]) > float(sig2[0, 2]) > 0
        # the original's bug: channel 2 shrunk from channel 0's already-shrunk value
        buggy = (expected[0] ** 2 - float(k) ** 2 * sig_c[2] ** 2).clamp_min(0).sqrt()
        assert abs(float(sig2[0, 2]) - float(buggy)) > 1e-3
        torch.testing.assert_close(eps2, eps - torch.tensor([0.05, -0.05, 0.1]).view(1, 3, 1, 1))
    # tensor-wise: σ_t keeps its shape
    tfit = make_fit(sampling, Granularity.TENSOR, 0., 1., 0., 0.3 * limit, 0.)
    _, sig_t = DeterministicD2(tfit)(torch.randn(2, 3, 4, 4), sigma, step, None)
    assert sig_t.shape == sigma.shape and 0 < float(sig_t) < float(sigma)


def test_dd2_at_eta_0_is_conditional_mean_only(alphas_cumprod):
    sched = DDIMSchedule.make(alphas_cumprod, 10, 0.0)
    sampling = SamplingConfig.from_schedule(sched, 10, 3.0)
    step = next(sched.steps())
    fit = make_fit(sampling, Granularity.TENSOR, 0.5, 1.0, 0.1, 0.2, 0.5)
    eps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    eps2, sig2 = DeterministicD2(fit)(eps, torch.tensor(0., dtype=torch.float64), step, eps)
    torch.testing.assert_close(eps2, eps - (0.1 + 0.5 * 0.2 / 1.0 * (eps - 0.5)))
    assert float(sig2) == 0.0


def test_sd2_is_deterministic_for_a_seed_and_draws_the_conditional_noise(eta1_steps):
    sampling, steps = eta1_steps
    fit = make_fit(sampling, Granularity.CHANNEL, [0.5, 0., -0.5], 1.0, [0.1, 0.0, -0.1], [0.2, 0.1, 0.3],
                   [0.5, 0.0, -0.5])
    eps = torch.randn(64, 3, 16, 16)
    sigma = torch.tensor(steps[3].sigma)

    def run(seed):
        return StochasticD2(fit, torch.Generator().manual_seed(seed))(eps, sigma, steps[3], eps)

    (a, sa), (b, _), (c, _) = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c) and sa is sigma
    drawn = eps - a   # = μ_c(ε̂) + σ_c z
    mu_c = fit.mu_y[0].view(1, 3, 1, 1) + fit.slope[0].view(1, 3, 1, 1) * (eps - fit.mu_x[0].view(1, 3, 1, 1))
    resid = (drawn - mu_c.float()).transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(resid.std(1).numpy(), fit.sigma_c[0].numpy(), rtol=0.03)
    np.testing.assert_allclose(resid.mean(1).numpy(), 0, atol=0.01)


def test_ptqd_recovers_slope_bias_and_residual_and_clamps_k(eta1_steps):
    sampling, steps = eta1_steps
    g = torch.Generator().manual_seed(11)
    bias_c = torch.tensor([0.05, -0.1, 0.2, 0.0]).view(1, 4, 1, 1)
    for k_true, expect_k in ((0.15, 0.15), (-0.2, 0.0)):
        stats = NoiseStatistics(sampling)
        for t in sampling.timesteps:
            for _ in range(2):
                f = torch.randn(8, 4, 16, 16, generator=g)
                delta = k_true * f + bias_c + 0.05 * torch.randn(f.shape, generator=g)
                stats.update(t, f + delta, f)
        fit = fit_ptqd(stats)
        np.testing.assert_allclose(fit.slope.numpy(), k_true, atol=0.01)
        np.testing.assert_allclose(fit.k.numpy(), expect_k, atol=0.01)
        assert float(fit.k.min()) >= 0
        np.testing.assert_allclose(fit.bias.numpy(), bias_c.view(1, 4).expand(10, 4).numpy(), atol=0.01)
        resid = 0.05 if expect_k else float(np.sqrt(0.2 ** 2 + 0.05 ** 2))
        np.testing.assert_allclose(fit.sigma.numpy(), resid, rtol=0.05)

    # the correction on a hand-made fit (k = 0.25): ε̃ = (ε̂ − μ)/(1 + k), σ_t reduced by the residual σ/(1 + k)
    fit = PTQDFit(sampling, torch.full((10,), 0.25, dtype=torch.float64), torch.zeros(10, 4, dtype=torch.float64)
                  + bias_c.view(1, 4).double(), torch.full((10,), 0.1, dtype=torch.float64),
                  torch.full((10,), 100, dtype=torch.int64))
    f = torch.randn(2, 4, 8, 8, generator=g)
    step = steps[4]
    sigma = torch.tensor(step.sigma, dtype=torch.float32)
    eps_t, sig = PTQDCorrection(fit)(1.25 * f + bias_c, sigma, step, f)
    torch.testing.assert_close(eps_t, f)
    c = eps_coefficient(torch.tensor(step.alpha, dtype=torch.float64), torch.tensor(step.alpha_prev,
                        dtype=torch.float64), sigma.double())
    assert float(sig) == pytest.approx(float(absorb_variance(sigma.double(), c, torch.tensor((0.1 / 1.25) ** 2))),
                                       rel=1e-6)
    assert float(sig) < float(sigma)
    assert PTQDFit.from_dict(fit.to_dict()).k.tolist() == fit.k.tolist()


def test_missing_timestep_is_an_error_not_an_identity_fallback(alphas_cumprod):
    uniform = DDIMSchedule.make(alphas_cumprod, 10, 0.0)
    quad = DDIMSchedule.make(alphas_cumprod, 10, 0.0, discretize="quad")
    sampling = SamplingConfig.from_schedule(uniform, 10, 3.0)
    fit = make_fit(sampling, Granularity.TENSOR, 0., 1., 0., 0.1, 0.)
    eps = torch.randn(1, 3, 4, 4)
    step = next(st for st in quad.steps() if st.t not in sampling.timesteps)
    for corr in (DeterministicD2(fit), StochasticD2(fit, torch.Generator())):
        with pytest.raises(MissingTimestep, match=f"no statistics for t={step.t}"):
            corr(eps, torch.tensor(0.), step, eps)
    # a fit whose table has an empty row (e.g. edited or from incomplete statistics)
    d = fit.to_dict()
    d["count"][3] = 0
    hole = GaussianFit.from_dict(d)
    step = next(st for st in uniform.steps() if st.t == sampling.timesteps[3])
    with pytest.raises(CorrectionError, match=f"no statistics for t={step.t}"):
        DeterministicD2(hole)(eps, torch.tensor(0.), step, eps)


def test_config_mismatch_names_both_values(alphas_cumprod):
    sampling = SamplingConfig.make(alphas_cumprod, 20, 0.0, 3.0)
    corr = DeterministicD2(make_fit(sampling, Granularity.TENSOR, 0., 1., 0., 0.1, 0.))
    eps = torch.randn(1, 3, 4, 4)
    step250 = next(DDIMSchedule.make(alphas_cumprod, 250, 0.0).steps())
    with pytest.raises(ConfigMismatch) as e:
        corr(eps, torch.tensor(0.), step250, eps)
    msg = str(e.value)
    assert "20" in msg and "250" in msg and "\n" not in msg and isinstance(e.value, UserFacingError)
    step_eta1 = next(DDIMSchedule.make(alphas_cumprod, 20, 1.0).steps())
    with pytest.raises(ConfigMismatch, match=r"eta=0.*eta=1"):
        corr(eps, torch.tensor(step_eta1.sigma), step_eta1, eps)
    with pytest.raises(ConfigMismatch, match=r"scale=3.*scale=1.5"):
        corr.check_config(steps=20, eta=0.0, scale=1.5)
    corr.check_config(steps=20, eta=0.0, scale=3.0)


def test_seed_names_live_in_correction_samplers_and_ldm_does_not_know_them():
    """The seed's sampler names import from correction.samplers; ldm/ neither imports nor re-exports them."""
    from correction import samplers
    from ldm.models.diffusion import ddim
    for name in samplers.__all__:
        assert callable(getattr(samplers, name)) and not hasattr(ddim, name)
    code = "import sys, ldm.models.diffusion.ddim, ldm.models.diffusion.plms; assert 'correction' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------------------
# End to end on a tiny random model: a fake "quantized" model = FP + planted correlated bias + noise
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    # tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine they cost 100x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_models.build(tiny_models.config(tiny_models.CLASS_COND))
    torch.set_num_threads(threads)


PLANTED_BIAS = torch.tensor([0.25, -0.15, 0.1]).view(1, 3, 1, 1)


def fake_quantized(model, seed: int = 0):
    """ε̂ = 1.1 ε + b_c + 0.02 z: correlated with ε, biased per channel, a little noise (seeded)."""
    g = torch.Generator().manual_seed(seed)

    def q_fn(x, t, c):
        e = model.apply_model(x, t, c)
        return 1.1 * e + PLANTED_BIAS + 0.02 * torch.randn(e.shape, generator=g)
    return q_fn


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_corrected_sampling_moves_the_fake_quantized_model_back_to_fp(tiny, tmp_path, eta):
    steps, scale, labels = 10, 3.0, [0, 1, 2, 3, 0, 1]
    sampling = SamplingConfig.make(tiny.alphas_cumprod, steps, eta, scale)
    stats = collect_noise_statistics(tiny, fake_quantized(tiny), NoiseStatistics(sampling, tmp_path / "spill"),
                                     labels * 2, batch_size=6, progress=False)
    fits = {g: fit_gaussian(stats, g) for g in Granularity}
    ptqd = fit_ptqd(stats)
    assert float(fits[Granularity.CHANNEL].mu_y.mean()) == pytest.approx(float(PLANTED_BIAS.mean()), abs=0.05)

    def run(correction=None, q=True):
        g = torch.Generator().manual_seed(123)
        return sample_latents(tiny, labels, settings=SamplingSettings(steps, eta, scale), batch_size=6, generator=g,
                              model_fn=fake_quantized(tiny, 1) if q else None, correction=correction,
                              progress=False)

    fp, plain = run(q=False), run()
    err = lambda x: float((x - fp).pow(2).mean().sqrt())  # noqa: E731
    base = err(plain)
    results = {
        "D-D² tensor": err(run(DeterministicD2(fits[Granularity.TENSOR]))),
        "D-D² channel": err(run(DeterministicD2(fits[Granularity.CHANNEL]))),
        "S-D² channel": err(run(StochasticD2(fits[Granularity.CHANNEL], torch.Generator().manual_seed(0)))),
        "PTQD": err(run(PTQDCorrection(ptqd))),
    }
    assert all(v < base for v in results.values()), (base, results)
    assert results["D-D² channel"] < 0.5 * base, (base, results)

    # the seed constructor, with its configuration check before sampling
    c = tiny.get_learned_conditioning({"class_label": torch.tensor(labels)})
    uc = tiny.get_learned_conditioning({"class_label": torch.full((6,), 4)})
    sampler = DDIMSampler_channel_wise_implicit_gaussian_quantCorrection_imagenet(
        tiny, fits[Granularity.CHANNEL].to_dict(), num_bit=4, model_fn=fake_quantized(tiny, 1))
    g = torch.Generator().manual_seed(123)
    x_T = torch.randn((6, 3, 8, 8), generator=g)
    out, _ = sampler.sample(steps, 6, (3, 8, 8), c, eta=eta, x_T=x_T, unconditional_guidance_scale=scale,
                            unconditional_conditioning=uc, generator=g, verbose=False)
    assert err(out) == pytest.approx(results["D-D² channel"], rel=1e-5)
    with pytest.raises(ConfigMismatch, match="steps=10.*steps=20"):
        sampler.sample(20, 6, (3, 8, 8), c, eta=eta, unconditional_guidance_scale=scale,
                       unconditional_conditioning=uc, verbose=False)
    with pytest.raises(CorrectionError, match="channel-wise"):
        DDIMSampler_channel_wise_implicit_gaussian_quantCorrection_imagenet(tiny, fits[Granularity.TENSOR])


def test_collection_resumes_exactly(tiny, tmp_path):
    sampling = SamplingConfig.make(tiny.alphas_cumprod, 5, 1.0, 3.0)
    labels = [0, 1, 2, 3]
    whole = collect_noise_statistics(tiny, fake_quantized(tiny), NoiseStatistics(sampling), labels, batch_size=2,
                                     progress=False)
    saved = {}
    collect_noise_statistics(tiny, fake_quantized(tiny), NoiseStatistics(sampling), labels[:2], batch_size=2,
                             on_batch=lambda s, done: saved.update(state=s.state_dict(), done=done), progress=False)
    assert saved["done"] == 2
    resumed = NoiseStatistics.from_state_dict(saved["state"])
    # the fake model's noise stream differs after a restart; its FP part (and so x_T, the trajectory) does not
    collect_noise_statistics(tiny, fake_quantized(tiny), resumed, labels, batch_size=2, progress=False)
    assert torch.equal(resumed.samples, whole.samples)
    torch.testing.assert_close(resumed.moments().mean()[..., 2], whole.moments().mean()[..., 2])
    with pytest.raises(CorrectionError, match="batches of 3"):
        collect_noise_statistics(tiny, fake_quantized(tiny), resumed, labels * 2, batch_size=3, progress=False)


def test_channel_wise_equals_tensor_wise_when_channels_share_a_distribution():
    """Every channel drawn from one joint Gaussian: the per-channel fit and the pooled fit agree (each channel's
    parameters equal the tensor-wise ones within sampling error)."""
    stats = NoiseStatistics(SMALL)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        for t in stats.timesteps:
            z1, z2 = torch.randn(2, 8, 4, 16, 16, generator=g, dtype=torch.float64)
            x = 0.2 + 1.1 * z1
            y = 0.05 + 0.15 * (0.4 * z1 + (1 - 0.4 ** 2) ** 0.5 * z2)
            stats.update(t, x.float(), (x - y).float())
    ch = fit_gaussian(stats, Granularity.CHANNEL, outlier_k=None)
    te = fit_gaussian(stats, Granularity.TENSOR, outlier_k=None)
    for key in ("mu_x", "mu_y", "sigma_x", "sigma_y", "rho", "slope", "sigma_c"):
        a, b = getattr(ch, key), getattr(te, key)
        assert float((a - b).abs().max()) < 0.03, (key, a, b)


def test_zero_statistics_give_plain_ddim_bit_for_bit(tiny_model_eta):
    """A fit with μ_Δ = 0, σ_Δ = 0 (no noise): D-D² and S-D² leave ε and σ_t exactly as plain DDIM has them."""
    model, eta = tiny_model_eta
    sched = DDIMSchedule.make(model.alphas_cumprod, 6, eta)
    sampling = SamplingConfig.from_schedule(sched, 6, 3.0)
    zero = make_fit(sampling, Granularity.CHANNEL, [0.] * 3, [1.] * 3, [0.] * 3, [0.] * 3, [0.] * 3)

    def run(correction):
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return sample_latents(model, [0, 1], settings=SamplingSettings(6, eta, 3.0),
                                  generator=g, correction=correction,
                                  progress=False)
    plain = run(None)
    assert torch.equal(run(DeterministicD2(zero)), plain)
    assert torch.equal(run(StochasticD2(zero, torch.Generator().manual_seed(1))), plain)


@pytest.fixture(params=[0.0, 1.0])
def tiny_model_eta(request):
    import tiny_models
    torch.set_num_threads(1)
    return tiny_models.build(tiny_models.config(tiny_models.CLASS_COND)), request.param


def test_sd2_draws_fresh_noise_every_step(eta1_steps):
    """Two steps (and two calls at one step) get different z: the generator advances, nothing is reused."""
    sampling, steps = eta1_steps
    fit = make_fit(sampling, Granularity.TENSOR, 0., 1., 0., 0.2, 0.)  # ρ = 0: ε' = ε̂ − μ_Δ − σ_c z
    corr = StochasticD2(fit, torch.Generator().manual_seed(0))
    eps = torch.zeros(2, 3, 8, 8)
    z = [eps - corr(eps, torch.tensor(s.sigma), s, eps)[0] for s in (steps[2], steps[3], steps[3])]
    assert not torch.equal(z[0], z[1]) and not torch.equal(z[1], z[2])
    again = StochasticD2(fit, torch.Generator().manual_seed(0))
    assert torch.equal(eps - again(eps, torch.tensor(steps[2].sigma), steps[2], eps)[0], z[0])
