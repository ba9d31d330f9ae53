"""The seed's sampler names (D²-DPM README; ``ldm/models/diffusion/ddim.py`` of TaylorJocelyn/D2-DPM) as thin
constructors: each returns a ``DDIMSampler`` (CompVis ``sample(S, batch_size, shape, conditioning, ...)``
interface) with the matching correction.

    DDIMSampler_gaussian_quantCorrection_imagenet                      S-D², tensor-wise
    DDIMSampler_implicit_gaussian_quantCorrection_imagenet             D-D², tensor-wise
    DDIMSampler_channel_wise_explicit_gaussian_quantCorrection_imagenet  S-D², channel-wise
    DDIMSampler_channel_wise_implicit_gaussian_quantCorrection_imagenet  D-D², channel-wise
    DDIMSampler_quantCorrection_imagenet                               PTQD (missing from the seed at HEAD)

The originals took ``(model, num_bit, correct=False, schedule="linear")`` and loaded their statistics from paths
hard-coded for one setting. Here the fit is an argument (a ``GaussianFit``/``PTQDFit`` or its ``to_dict()``),
``correct`` defaults to True (``correct=False`` gives the uncorrected sampler, as before), ``num_bit`` and ``schedule``
are accepted for call compatibility and unused (the bits belong to the statistics, whose artifact metadata records
them; the schedule is the model's), and ``model_fn``
plugs in the quantized UNet. ``sample`` checks S, η and the guidance scale against the fit before sampling.

The corrections are built by ``build_sd2`` / ``build_dd2`` / ``build_ptqd``, ``(fit, generator) -> StepCorrection``:
the same construction ``pipeline.corrections`` registers as each method's factory, so the seed names are a view over
the sampler specs ``sd2-tensor``, ``dd2-tensor``, ``sd2-channel``, ``dd2-channel`` and ``ptqd``.
"""
from __future__ import annotations

import inspect

import torch

from correction.d2 import DeterministicD2, GaussianCorrection, StochasticD2
from correction.gaussian import GaussianFit, Granularity
from correction.ptqd import PTQDCorrection, PTQDFit
from correction.statistics import CorrectionError
from ldm.models.diffusion.ddim import DDIMSampler, ModelFn

_SAMPLE_SIGNATURE = inspect.signature(DDIMSampler.sample)


class CorrectedDDIMSampler(DDIMSampler):
    """A ``DDIMSampler`` whose ``sample`` first checks (S, η, scale) against the correction's fit: statistics
    collected for 20 steps cannot silently drive a 250-step chain. The scale checked is the one in effect: 1 when
    no unconditional conditioning is given."""

    def sample(self, *args, **kwargs):
        bound = _SAMPLE_SIGNATURE.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        scale = a["unconditional_guidance_scale"] if a["unconditional_conditioning"] is not None else 1.0
        self.correction.check_config(steps=a["S"], eta=a["eta"], scale=scale)
        return super().sample(*args, **kwargs)


def _gaussian_fit(fit, granularity: Granularity, name: str) -> GaussianFit:
    if isinstance(fit, dict):
        fit = GaussianFit.from_dict(fit)
    if not isinstance(fit, GaussianFit):
        raise TypeError(f"{name} needs a GaussianFit (or its to_dict()), got {type(fit).__name__}")
    if fit.granularity is not granularity:
        raise CorrectionError(f"{name} needs a {granularity.value}-wise Gaussian fit, got a "
                              f"{fit.granularity.value}-wise one; pass the gaussian_{granularity.value} artifact")
    return fit


# ---- the construction of each fitted correction: (fit, generator) -> StepCorrection ------------------------------

def build_sd2(fit: GaussianFit, generator: torch.Generator) -> StochasticD2:
    """S-D² (D²-DPM Eqs. 11-14): its noise draws come from ``generator``."""
    return StochasticD2(fit, generator)


def build_dd2(fit: GaussianFit, generator: torch.Generator | None = None) -> DeterministicD2:
    """D-D² (Eqs. 15-18, Algorithm 1): deterministic, ``generator`` unused."""
    return DeterministicD2(fit)


def build_ptqd(fit: PTQDFit, generator: torch.Generator | None = None,
               variance_calibration: bool = True) -> PTQDCorrection:
    """PTQD §4 (CNC + BC, + VSC unless ``variance_calibration`` is False): deterministic, ``generator`` unused."""
    return PTQDCorrection(fit, variance_calibration)


# ---- the seed's names -------------------------------------------------------------------------------------------

def _build(model, correction: GaussianCorrection | PTQDCorrection | None, schedule: str,
           model_fn: ModelFn | None) -> DDIMSampler:
    if correction is None:
        return DDIMSampler(model, schedule=schedule, model_fn=model_fn)
    return CorrectedDDIMSampler(model, schedule=schedule, model_fn=model_fn, correction=correction)


def _generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(seed)


def DDIMSampler_gaussian_quantCorrection_imagenet(model, fit, num_bit: int | None = None, correct: bool = True,
                                                  schedule: str = "linear", *, model_fn: ModelFn | None = None,
                                                  generator: torch.Generator | None = None,
                                                  seed: int = 0) -> DDIMSampler:
    """S-D² with a tensor-wise fit (D²-DPM Eqs. 11-14). Its noise draws come from ``generator`` (default: a CPU
    generator seeded with ``seed``)."""
    name = "DDIMSampler_gaussian_quantCorrection_imagenet"
    corr = None
    if correct:
        corr = build_sd2(_gaussian_fit(fit, Granularity.TENSOR, name), _generator(generator, seed))
    return _build(model, corr, schedule, model_fn)


def DDIMSampler_implicit_gaussian_quantCorrection_imagenet(model, fit, num_bit: int | None = None,
                                                           correct: bool = True, schedule: str = "linear", *,
                                                           model_fn: ModelFn | None = None) -> DDIMSampler:
    """D-D² with a tensor-wise fit (D²-DPM Eqs. 15-18, Algorithm 1)."""
    name = "DDIMSampler_implicit_gaussian_quantCorrection_imagenet"
    corr = build_dd2(_gaussian_fit(fit, Granularity.TENSOR, name)) if correct else None
    return _build(model, corr, schedule, model_fn)


def DDIMSampler_channel_wise_explicit_gaussian_quantCorrection_imagenet(
        model, fit, num_bit: int | None = None, correct: bool = True, schedule: str = "linear", *,
        model_fn: ModelFn | None = None, generator: torch.Generator | None = None, seed: int = 0) -> DDIMSampler:
    """S-D² with a channel-wise fit (one conditional Gaussian per latent channel)."""
    name = "DDIMSampler_channel_wise_explicit_gaussian_quantCorrection_imagenet"
    corr = None
    if correct:
        corr = build_sd2(_gaussian_fit(fit, Granularity.CHANNEL, name), _generator(generator, seed))
    return _build(model, corr, schedule, model_fn)


def DDIMSampler_channel_wise_implicit_gaussian_quantCorrection_imagenet(
        model, fit, num_bit: int | None = None, correct: bool = True, schedule: str = "linear", *,
        model_fn: ModelFn | None = None) -> DDIMSampler:
    """D-D² with a channel-wise fit: σ_t shrunk per channel by that channel's σ_c (the seed's default sampler)."""
    name = "DDIMSampler_channel_wise_implicit_gaussian_quantCorrection_imagenet"
    corr = build_dd2(_gaussian_fit(fit, Granularity.CHANNEL, name)) if correct else None
    return _build(model, corr, schedule, model_fn)


def DDIMSampler_quantCorrection_imagenet(model, fit, num_bit: int | None = None, correct: bool = True,
                                         schedule: str = "linear", *, model_fn: ModelFn | None = None,
                                         variance_calibration: bool = True) -> DDIMSampler:
    """PTQD (correlated-noise, bias and variance-schedule correction), the baseline of D²-DPM's tables."""
    if isinstance(fit, dict):
        fit = PTQDFit.from_dict(fit)
    corr = build_ptqd(fit, variance_calibration=variance_calibration) if correct else None
    return _build(model, corr, schedule, model_fn)


__all__ = ["CorrectedDDIMSampler", "build_sd2", "build_dd2", "build_ptqd",
           "DDIMSampler_gaussian_quantCorrection_imagenet",
           "DDIMSampler_implicit_gaussian_quantCorrection_imagenet",
           "DDIMSampler_channel_wise_explicit_gaussian_quantCorrection_imagenet",
           "DDIMSampler_channel_wise_implicit_gaussian_quantCorrection_imagenet",
           "DDIMSampler_quantCorrection_imagenet"]
