"""The correction methods, one registry entry each: the ``--sampler`` name, the step-5 fit it reads (its artifact
kind, file name, fitter and loader), the construction of its per-step correction from (fit, generator), and the
description the reports print. Everything else asks here: ``pipeline.sampler_spec`` parses and prints the names,
``pipeline.sampling`` builds and loads, ``pipeline.layout`` names the fit files, ``pipeline.steps.fit_noise`` writes
every registered fit.

    fp32   the full-precision model (nothing quantized, nothing corrected)
    none   the quantized model, uncorrected
    ptqd   PTQD (arXiv 2305.10657 §4): correlated-noise, bias and variance-schedule correction; fit ptqd.pt
    sd2    S-D² (D²-DPM, arXiv 2501.08180, Eqs. 11-14), per granularity: sd2-tensor, sd2-channel; fits
           gaussian_{tensor,channel}.pt (Eqs. 7-10)
    dd2    D-D² (Eqs. 15-18, Algorithm 1), the same fits
    cprobe QNCD's probe centered (issue 34): μ = mean of an antithetic pair of probe predictions minus the FP
           model's mean ε at t from the same fits (cprobe-tensor, cprobe-channel)

Adding a method: its math in ``correction/`` and one ``register(Method(...))`` call; a method with a new fit names a
new ``FitKind`` in its entry. The QNCD probe is not a method but a modifier of any quantized one
(``SamplerSpec.probe``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from correction.gaussian import GaussianFit, Granularity, gaussian_from_moments
from correction.ptqd import PTQDFit, ptqd_from_moments
from correction.qncd import CenteredProbe
from correction.samplers import build_dd2, build_ptqd, build_sd2
from correction.statistics import ConfigMismatch, Moments, SamplingConfig
from ldm.models.diffusion.ddim import StepCorrection

# (moments, granularity or None, sampling, outlier k or None) -> fit: step 5's fit of one artifact
Fitter = Callable[[Moments, "Granularity | None", SamplingConfig, "float | None"], Any]
# (fit or None, generator or None) -> the per-step correction (None: the model's ε is used as it is)
Factory = Callable[[Any, "torch.Generator | None"], "StepCorrection | None"]


@dataclass(frozen=True)
class FitKind:
    """One kind of step-5 fit: ``kind`` is its artifact kind (``pipeline.artifacts``) and its file's stem; a kind
    fitted per granularity writes one file each (gaussian_tensor.pt, gaussian_channel.pt) and records the
    granularity in the meta. ``filtered``: fitted from the k·σ-filtered moments, so the meta records ``outlier_k``
    (PTQD fits the raw moments, as the original's analyze_error.py, and records none). ``load`` turns the payload's
    ``fit`` dict back into the fit; the fit has ``sampling`` (a ``SamplingConfig``) and ``to_dict()``."""

    GAUSSIAN: ClassVar[FitKind]
    PTQD: ClassVar[FitKind]

    kind: str
    fitter: Fitter = field(repr=False)
    load: Callable[[dict], Any] = field(repr=False)
    granularities: tuple[Granularity, ...] = ()
    filtered: bool = True

    def file_name(self, granularity: Granularity | str | None = None) -> str:
        if not self.granularities:
            if granularity is not None:
                raise ValueError(f"the {self.kind} fit has no granularity, got {granularity!r}")
            return f"{self.kind}.pt"
        return f"{self.kind}_{self._granularity(granularity).value}.pt"

    def meta(self, base: dict, granularity: Granularity | str | None = None) -> dict:
        """The meta of one artifact of this kind from the step's common ``base`` (what the writer records and the
        loader expects)."""
        meta = base if self.filtered else {k: v for k, v in base.items() if k != "outlier_k"}
        return meta if not self.granularities else {**meta, "granularity": self._granularity(granularity).value}

    def artifacts(self) -> tuple[Granularity | None, ...]:
        """The granularity of each file of this kind (None: the one file of a kind without granularities)."""
        return self.granularities or (None,)

    def _granularity(self, granularity: Granularity | str | None) -> Granularity:
        g = Granularity(granularity) if granularity is not None else None
        if g not in self.granularities:
            raise ValueError(f"the {self.kind} fit is made per {', '.join(x.value for x in self.granularities)}, "
                             f"got {granularity!r}")
        return g


def _gaussian_fitter(moments: Moments, granularity: Granularity, sampling: SamplingConfig, k: float | None):
    return gaussian_from_moments(moments, granularity, sampling, k)


def _ptqd_fitter(moments: Moments, granularity: None, sampling: SamplingConfig, k: None):
    return ptqd_from_moments(moments, sampling)


FitKind.GAUSSIAN = FitKind("gaussian", _gaussian_fitter, GaussianFit.from_dict,
                           (Granularity.TENSOR, Granularity.CHANNEL))
FitKind.PTQD = FitKind("ptqd", _ptqd_fitter, PTQDFit.from_dict, filtered=False)


@dataclass(frozen=True)
class Method:
    """One correction method. ``name`` is its ``--sampler`` name (with ``-<granularity>`` appended for each of its
    fit's granularities); ``factory(fit, generator)`` builds a fresh ``StepCorrection`` (None: no factory, the model's
    ε as it is); ``draws_noise``: its correction draws from a generator of its own (S-D²); ``quantized``: False only
    for the full-precision model."""

    FP32: ClassVar[Method]
    NONE: ClassVar[Method]
    PTQD: ClassVar[Method]
    SD2: ClassVar[Method]
    DD2: ClassVar[Method]
    CPROBE: ClassVar[Method]

    name: str
    description: str
    factory: Factory | None = field(default=None, repr=False)
    fit: FitKind | None = None
    draws_noise: bool = False
    quantized: bool = True

    @property
    def granularities(self) -> tuple[Granularity, ...]:
        return () if self.fit is None else self.fit.granularities

    def build(self, fit: Any, generator: torch.Generator | None) -> StepCorrection | None:
        return None if self.factory is None else self.factory(fit, generator)


METHODS: dict[str, Method] = {}
"""Every method by name, in registration order (the order the scripts list them)."""
FIT_KINDS: dict[str, FitKind] = {k.kind: k for k in (FitKind.GAUSSIAN, FitKind.PTQD)}
"""Every fit kind by its artifact kind, in the order step 5 writes and prints them."""


def register(method: Method) -> Method:
    """Add ``method`` (and its fit kind, if new) to the registry; a taken name or another kind under a taken
    kind string is refused."""
    if method.name in METHODS or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", method.name) or \
            method.name.startswith("qncd"):
        raise ValueError(f"correction method name {method.name!r}: taken, or not a lower-case --sampler name "
                         f"apart from the QNCD ones")
    if method.fit is not None and FIT_KINDS.setdefault(method.fit.kind, method.fit) is not method.fit:
        raise ValueError(f"another fit kind is registered as {method.fit.kind!r}")
    METHODS[method.name] = method
    return method


def fit_kind(kind: str) -> FitKind:
    """The registered fit kind of an artifact kind string."""
    try:
        return FIT_KINDS[kind]
    except KeyError:
        raise ValueError(f"no fit kind {kind!r} is registered (known: {', '.join(FIT_KINDS)})") from None


def fit_artifacts() -> list[tuple[FitKind, Granularity | None]]:
    """(kind, granularity) of every fit file step 5 writes, in its order."""
    return [(k, g) for k in FIT_KINDS.values() for g in k.artifacts()]


def check_fit_settings(fit: Any, *, steps: int, eta: float, scale: float, what: str,
                       timesteps: list[int] | None = None) -> None:
    """The one check of a fit against a run's sampling settings: S, η and the guidance scale through the fit's
    ``SamplingConfig.check`` (the check the correction objects make too), and, where the run's DDIM grid is known,
    its timesteps. ``ConfigMismatch`` (one line naming both values) otherwise."""
    s: SamplingConfig = fit.sampling
    s.check(steps=steps, eta=eta, scale=scale, what=what)
    if timesteps is not None and list(s.timesteps) != sorted(set(timesteps)):
        raise ConfigMismatch(f"{what} were collected on another DDIM grid ({len(s.timesteps)} timesteps from "
                             f"t={s.timesteps[0]}) than the run's ({len(set(timesteps))} from t={min(timesteps)}); "
                             f"collect statistics (and refit) for this grid")


Method.FP32 = register(Method("fp32", "full-precision model", quantized=False))
Method.NONE = register(Method("none", "quantized, uncorrected"))
Method.PTQD = register(Method("ptqd", "quantized + PTQD (CNC + BC + VSC)", build_ptqd, FitKind.PTQD))
Method.SD2 = register(Method("sd2", "quantized + S-D²", build_sd2, FitKind.GAUSSIAN, draws_noise=True))
Method.DD2 = register(Method("dd2", "quantized + D-D²", build_dd2, FitKind.GAUSSIAN))
Method.CPROBE = register(Method("cprobe", "quantized + centered probe (QNCD's μ less the FP mean ε, antithetic)",
                                lambda fit, generator: CenteredProbe(fit, generator=generator), FitKind.GAUSSIAN,
                                draws_noise=True))

__all__ = ["FitKind", "Method", "METHODS", "FIT_KINDS", "register", "fit_kind", "fit_artifacts",
           "check_fit_settings"]
