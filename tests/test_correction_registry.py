"""The correction registry (pipeline.corrections): each method is one entry, and a method registered at test time
(its math defined here, as correction/ would hold it) is parsed, printed, listed, built, fitted, written, found,
loaded and sampled with by the unchanged pipeline: the ``register`` call is the only change it needs."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from correction.gaussian import Granularity
from correction.qncd import QNCDProbe
from correction.samplers import build_dd2, build_ptqd, build_sd2
from correction.statistics import ConfigMismatch, Moments, SamplingConfig
from ldm.models.diffusion.ddim import DDIMSchedule, sample_ddim
from pipeline import corrections
from pipeline.artifacts import ArtifactMismatch, save_artifact
from pipeline.corrections import FIT_KINDS, METHODS, FitKind, Method, check_fit_settings, register
from pipeline.layout import QuantTag, RunLayout
from pipeline.sampler_spec import BASES, LISTED, SamplerSpec, UnknownSampler
from pipeline.sampling import fit_path, load_fit, make_correction, required_artifacts
from pipeline.steps.fit_noise import fit_paths, write_fits

ALPHAS = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
TAG = QuantTag(4, 8)


# ---- the throwaway methods' math (what correction/ would hold) -----------------------------------------------------

class ScaledEps:
    """ε' = c·ε, σ_t unchanged: a correction without a fit."""

    def __init__(self, c: float):
        self.c = c

    def __call__(self, eps, sigma, step, x):
        return self.c * eps, sigma


@dataclass
class MeanShiftFit:
    """μ_Δ per timestep, tensor-wise: a fit of a kind the pipeline does not know."""

    sampling: SamplingConfig
    mu: torch.Tensor   # [T] float64

    def to_dict(self) -> dict:
        return {"sampling": self.sampling.to_dict(), "mu": self.mu.clone()}

    @classmethod
    def from_dict(cls, d: dict) -> "MeanShiftFit":
        return cls(SamplingConfig.from_dict(d["sampling"]), d["mu"].to(torch.float64))


def mean_shift_fitter(moments: Moments, granularity, sampling: SamplingConfig, k) -> MeanShiftFit:
    pooled = moments.pooled()
    return MeanShiftFit(sampling, pooled.s1[:, 0, 1] / pooled.n[:, 0])   # Σ Δ / n per timestep


class MeanShift:
    """ε' = ε̂ − μ_Δ(t)."""

    def __init__(self, fit: MeanShiftFit):
        self.fit = fit

    def __call__(self, eps, sigma, step, x):
        return eps - self.fit.mu[self.fit.sampling.row(step.t)].to(eps), sigma


# ---- registering them: the one change ------------------------------------------------------------------------------

MEAN_SHIFT = FitKind("meanshift", mean_shift_fitter, MeanShiftFit.from_dict)


@pytest.fixture
def scaled():
    method = register(Method("scaled-eps", "quantized + ε scaled by 0.9", lambda fit, g: ScaledEps(0.9)))
    yield method
    del METHODS[method.name]


@pytest.fixture
def shifted():
    method = register(Method("meanshift", "quantized + mean shift", lambda fit, g: MeanShift(fit), MEAN_SHIFT))
    yield method
    del METHODS[method.name], FIT_KINDS[MEAN_SHIFT.kind]


def test_a_registered_method_is_parsed_printed_and_listed(scaled):
    spec = SamplerSpec.parse("scaled-eps")
    assert spec == SamplerSpec(scaled) and str(spec) == "scaled-eps" and spec.quantized and spec.fit is None
    assert spec.description == "quantized + ε scaled by 0.9" and not spec.needs_generator
    assert "scaled-eps" in BASES and "scaled-eps" in LISTED
    probed = SamplerSpec.parse("qncd-r5+scaled-eps")
    assert str(probed) == "qncd-r5+scaled-eps" and probed.method is scaled and probed.needs_generator
    with pytest.raises(UnknownSampler) as e:
        SamplerSpec.parse("scaled")
    assert "scaled-eps" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError):
        SamplerSpec(scaled, Granularity.TENSOR)   # a method without a per-granularity fit takes none


def test_unregistered_it_is_unknown_again(scaled):
    del METHODS[scaled.name]
    try:
        with pytest.raises(UnknownSampler):
            SamplerSpec.parse("scaled-eps")
        assert "scaled-eps" not in LISTED
    finally:
        register(scaled)


def test_a_registered_method_samples_through_make_correction(scaled, tmp_path):
    """The tiny known answer: the correction ε' = 0.9 ε equals a model whose ε is 0.9 times as large (η = 0)."""
    spec = SamplerSpec.parse("scaled-eps")
    layout = RunLayout(tmp_path, "custom", 5, 0.0, 1.0)
    assert fit_path(spec, layout, TAG) is None
    assert [kind for _, kind, _ in required_artifacts(spec, layout, TAG)] == ["quant"]
    correction = make_correction(spec, None, None)
    assert isinstance(correction, ScaledEps)
    schedule = DDIMSchedule.make(ALPHAS, 5, 0.0)
    x_T = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0))

    def eps_fn(x, t, step):
        return 0.3 * x + 0.1

    corrected = sample_ddim(eps_fn, x_T, schedule, correction=correction)
    reference = sample_ddim(lambda x, t, step: 0.9 * eps_fn(x, t, step), x_T, schedule)
    plain = sample_ddim(eps_fn, x_T, schedule)
    torch.testing.assert_close(corrected, reference, rtol=0, atol=1e-6)
    assert (corrected - plain).abs().max() > 1e-3
    wrapped = make_correction(SamplerSpec.parse("qncd+scaled-eps"), None, torch.Generator().manual_seed(0))
    assert isinstance(wrapped, QNCDProbe) and isinstance(wrapped.base, ScaledEps)


def moments(sampling: SamplingConfig, mu: torch.Tensor) -> Moments:
    """Moments with a known mean Δ per timestep (ε̂, ε_fp means 0; 10 elements per channel, 2 channels)."""
    t, n = len(sampling.timesteps), torch.full((len(sampling.timesteps), 2), 10, dtype=torch.int64)
    s1 = torch.zeros(t, 2, 3, dtype=torch.float64)
    s1[:, :, 1] = 10 * mu[:, None]
    return Moments(sampling.timesteps, n, s1, torch.eye(3, dtype=torch.float64).expand(t, 2, 3, 3) * 10)


def test_a_registered_fit_kind_is_named_written_loaded_and_checked(shifted, tmp_path):
    """Its file name (RunLayout asks the entry), step 5's writer, the loader and the one settings check."""
    layout = RunLayout(tmp_path, "custom", 5, 0.0, 1.0)
    spec = SamplerSpec.parse("meanshift")
    path = layout.model_dir(TAG) / "meanshift.pt"
    assert layout.fit(TAG, MEAN_SHIFT) == path and fit_path(spec, layout, TAG) == (path, "meanshift")
    paths = fit_paths(layout, TAG)
    assert list(paths)[-1] == (MEAN_SHIFT, None) and paths[MEAN_SHIFT, None] == path   # written after the built-ins

    sampling = SamplingConfig.make(ALPHAS, 5, 0.0, 1.0)
    mu = torch.tensor([0.1, -0.2, 0.3, 0.05, 0.0], dtype=torch.float64)
    m = moments(sampling, mu)
    meta = {"steps": 5, "eta": 0.0, "scale": 1.0, "timesteps": list(sampling.timesteps), "outlier_k": None}
    written = write_fits({(MEAN_SHIFT, None): path}, meta, {"tensor": m, "channel": m}, m, sampling, None)
    torch.testing.assert_close(written[MEAN_SHIFT, None].mu, mu)
    fit = load_fit(path, "meanshift", meta, "the test")
    torch.testing.assert_close(fit.mu, mu)
    assert isinstance(make_correction(spec, fit, None), MeanShift)

    # the payload's settings against its meta: the one check, as an artifact error
    save_artifact(path, "meanshift", {**meta, "steps": 7}, {"fit": fit.to_dict()})
    with pytest.raises(ArtifactMismatch, match=r"meanshift.pt: .*steps=5.*steps=7.*rerun the test"):
        load_fit(path, "meanshift", {**meta, "steps": 7}, "the test")


def test_the_builtin_entries_keep_their_names_files_and_meta(tmp_path):
    """Every artifact name, kind string and meta key as before the registry (reruns are byte-identical)."""
    layout = RunLayout(tmp_path, "custom", 20, 0.0, 3.0)
    d = layout.model_dir(TAG)
    assert [layout.gaussian(TAG, "tensor"), layout.gaussian(TAG, Granularity.CHANNEL), layout.ptqd(TAG)] == \
        [d / "gaussian_tensor.pt", d / "gaussian_channel.pt", d / "ptqd.pt"]
    assert [(k.kind, g) for k, g in corrections.fit_artifacts()] == \
        [("gaussian", Granularity.TENSOR), ("gaussian", Granularity.CHANNEL), ("ptqd", None)]
    base = {"steps": 20, "quant": "abc", "outlier_k": 4.0}
    assert list(FitKind.GAUSSIAN.meta(base, "tensor").items()) == [*base.items(), ("granularity", "tensor")]
    assert FitKind.PTQD.meta(base) == {"steps": 20, "quant": "abc"}
    assert [n for n in BASES] == ["fp32", "none", "ptqd", "sd2-tensor", "dd2-tensor", "cprobe-tensor", "sd2-channel",
                                  "dd2-channel", "cprobe-channel"]   # (issue 34's centered probe: one entry)
    # the seed names (correction.samplers) build with the same construction the registry holds
    assert (Method.SD2.factory, Method.DD2.factory, Method.PTQD.factory) == (build_sd2, build_dd2, build_ptqd)
    assert Method.FP32.factory is None and Method.NONE.factory is None and not Method.FP32.quantized


def test_register_refuses_clashes():
    for name in ("dd2", "qncd-x", "Scaled", "a+b", ""):
        with pytest.raises(ValueError):
            register(Method(name, "x"))
    with pytest.raises(ValueError, match="another fit kind"):
        register(Method("other-gauss", "x", fit=FitKind("gaussian", mean_shift_fitter, MeanShiftFit.from_dict)))
    assert "other-gauss" not in METHODS and FIT_KINDS["gaussian"] is FitKind.GAUSSIAN


def test_check_fit_settings_is_the_one_check():
    sampling = SamplingConfig.make(ALPHAS, 5, 0.0, 1.0)
    fit = MeanShiftFit(sampling, torch.zeros(5, dtype=torch.float64))
    check_fit_settings(fit, steps=5, eta=0.0, scale=1.0, what="it", timesteps=list(sampling.timesteps))
    with pytest.raises(ConfigMismatch, match="scale=1.*scale=3"):
        check_fit_settings(fit, steps=5, eta=0.0, scale=3.0, what="it")
    with pytest.raises(ConfigMismatch, match="another DDIM grid"):
        check_fit_settings(fit, steps=5, eta=0.0, scale=1.0, what="it", timesteps=[1, 2, 3, 4, 5])
