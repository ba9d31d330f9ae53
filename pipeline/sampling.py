"""One place that turns a sampler spec into what sampling needs: the denoiser ``model_fn`` and the per-step
correction, each loaded from the run's artifacts and checked against the request (D²-DPM §"Dual denoising";
PTQD §4; QNCD's runtime noise estimation; the seed's ``--correct_type`` names, spec d2dpm.md §3.7).

Artifacts (``pipeline.layout``): the quantized model (step 3, kind "quant"), and for a corrected sampler the fit
(step 5: ``gaussian_{tensor,channel}.pt`` kind "gaussian", or ``ptqd.pt`` kind "ptqd"). Every artifact is checked
against ``expect`` (model, ckpt, steps, eta, scale), the bits, the model's DDIM grid and, for the fits, the
fingerprint of the quantized model they were measured on. A missing or mismatched artifact is a one-line
``ArtifactMismatch`` naming the script to run; nothing falls back to another sampler.

To add a correction method: a ``StepCorrection`` in ``correction/`` and its entry in ``pipeline.corrections`` (name,
fit kind, factory, description); nothing here changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from correction.gaussian import GaussianFit
from correction.ptqd import PTQDFit
from correction.qncd import QNCDProbe
from correction.statistics import ConfigMismatch, CorrectionError
from ldm.fileio import file_fingerprint
from ldm.models.diffusion.ddim import ModelFn, StepCorrection
from pipeline.artifacts import ArtifactMismatch, load_artifact
from pipeline.corrections import FitKind, check_fit_settings, fit_kind
from pipeline.families import ModelFamily
from pipeline.layout import QuantTag, RunLayout
from pipeline.packed import EXPORT_SCRIPT, Execution, apply_execution, load_packed_model
from pipeline.quantize import QUANT_KIND, QUANT_SCRIPT, load_quant_model
from pipeline.sampler_spec import SamplerSpec
from pipeline.settings import SamplingSettings

STATS_SCRIPT = "quant_scripts/collect_timestep_aware_statistics.py"
FIT_SCRIPT = "quant_scripts/gaussian_modeling.py"
NOISE_STATS_KIND = "noise_stats"
GAUSSIAN_KIND = FitKind.GAUSSIAN.kind   # the built-in kinds' strings, for callers that name one
PTQD_KIND = FitKind.PTQD.kind

Fit = GaussianFit | PTQDFit   # the built-in fits; a registered kind may load another


# ---- corrections from a spec --------------------------------------------------------------------------------------

def make_correction(spec: SamplerSpec, fit: Fit | None, generator: torch.Generator | None) -> StepCorrection | None:
    """A fresh ``StepCorrection`` for ``spec`` (None for fp32 and none), built by the method's registry factory.
    S-D² and the QNCD probe draw their noise from ``generator``; the others ignore it. With a probe, the method is
    its base (the probe then estimates the bias left after the base's correction)."""
    if spec.needs_generator and generator is None:
        raise CorrectionError(f"{spec} draws its correction noise from a torch.Generator; pass one "
                              f"(e.g. torch.Generator().manual_seed(seed))")
    base = spec.method.build(fit, generator)
    return base if spec.probe is None else QNCDProbe(spec.probe, base=base, generator=generator)


# ---- the value object ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Variant:
    """What sampling with one sampler spec needs.

    ``model_fn`` (x, t, c) -> ε: the FP denoiser for fp32, the quantized UNet behind the family's conditioning
    routing otherwise. ``correction_for(generator)`` gives a fresh ``StepCorrection`` (None for fp32 and none).
    ``artifacts`` maps each artifact used to its path; ``quant_meta`` and ``quant_model`` are the quantized UNet's
    meta and QuantModel (None for fp32). Sample inside ``family.ema_scope(model)`` (the quantized UNet was copied
    from the EMA weights)."""

    spec: SamplerSpec
    model_fn: ModelFn
    fit: Fit | None = None
    quant_meta: dict | None = None
    quant_model: torch.nn.Module | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec)

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def quantized(self) -> bool:
        return self.quant_meta is not None

    def correction_for(self, generator: torch.Generator | None = None) -> StepCorrection | None:
        return make_correction(self.spec, self.fit, generator)

    def check_sampling(self, settings: SamplingSettings) -> None:
        """One-line ``ConfigMismatch`` when the sampler's settings differ from those the fit was made for."""
        if self.fit is not None:
            check_fit_settings(self.fit, steps=settings.steps, eta=settings.eta, scale=settings.scale,
                               what=f"the {self.name} statistics")

    def fingerprints(self) -> dict[str, str]:
        """{artifact: fingerprint} of what this variant loaded (for the metadata of what it produces)."""
        return {k: file_fingerprint(p) for k, p in self.artifacts.items()}


# ---- which artifacts, and are they there ---------------------------------------------------------------------------

def fit_path(spec: SamplerSpec, layout: RunLayout, tag: QuantTag) -> tuple[Path, str] | None:
    """(path, kind) of the fit ``spec`` reads, None when it reads none."""
    if spec.fit is None:
        return None
    return layout.fit(tag, spec.fit, spec.granularity), spec.fit.kind


def required_artifacts(spec: SamplerSpec, layout: RunLayout, tag: QuantTag, packed: bool = False
                       ) -> list[tuple[Path, str, str]]:
    """(path, kind, the script that makes it) of every artifact ``spec`` reads, in pipeline order (``packed``: the
    quantized UNet comes from a packed file the caller names, not from the run's quant artifact)."""
    out = []
    if spec.quantized and not packed:
        out.append((layout.quant(tag), QUANT_KIND, f"{QUANT_SCRIPT} {tag.flags}"))
    fit = fit_path(spec, layout, tag)
    if fit is not None:
        out.append((*fit, f"{FIT_SCRIPT} {tag.flags}"))
    return out


def check_present(specs: Iterable[SamplerSpec], layout: RunLayout, tag: QuantTag, packed: bool = False) -> None:
    """Stop with one line naming the first missing artifact and the script that makes it: cheap (no model is
    loaded), so a script calls it before it creates folders or loads anything."""
    for spec in specs:
        for path, kind, script in required_artifacts(spec, layout, tag, packed):
            if not path.is_file():
                what = f"{tag.title()} quantized model" if kind == QUANT_KIND else f"{kind} artifact"
                if kind != QUANT_KIND and not layout.noise_stats(tag).is_file():
                    script = f"{STATS_SCRIPT} {tag.flags}, then {script}"
                raise ArtifactMismatch(f"{what} not found: {path}{layout.elsewhere(path)}; run {script} with "
                                       f"these settings first")


def load_fit(path: Path, kind: str, want: dict, produced_by: str) -> Fit:
    """A fit artifact of a registered ``kind`` (``pipeline.corrections``), meta checked against ``want`` and the
    payload's sampling settings against the meta (a file edited by hand or written by other code is refused)."""
    loader = fit_kind(kind).load
    obj = load_artifact(path, kind, want, produced_by)
    try:
        fit = loader(obj["fit"])
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactMismatch(f"{path} holds no usable fit ({type(e).__name__}: {e}); rerun {produced_by}") from None
    try:
        check_fit_settings(fit, steps=want["steps"], eta=want["eta"], scale=want["scale"],
                           timesteps=want["timesteps"], what="the statistics of its fit")
    except ConfigMismatch as e:
        raise ArtifactMismatch(f"{path}: {e}; rerun {produced_by}") from None
    return fit


# ---- building -----------------------------------------------------------------------------------------------------

def ddim_timesteps(model, settings: SamplingSettings) -> list[int]:
    """The model's timestep grid under ``settings`` (ascending, repeats included), as every artifact's meta records
    it."""
    return settings.schedule(model).timesteps.tolist()


def settings_of(meta: dict) -> SamplingSettings:
    """The sampling settings an artifact's meta (or a request shaped like one) records."""
    return SamplingSettings(meta["steps"], meta["eta"], meta["scale"], meta.get("grid"), bool(meta.get("plms")))


EXPECT_KEYS = ("model", "ckpt", "steps", "eta", "scale")


def quant_expect(expect: dict[str, Any], tag: QuantTag) -> dict[str, Any]:
    """What a quantized model's meta (and that of everything measured on it) must say for this request: the run's
    model and sampler settings (``pipeline.cli.model_meta``) and the bits of ``tag``."""
    missing = [k for k in EXPECT_KEYS if k not in expect]
    if missing:
        raise ValueError(f"expect must name {', '.join(EXPECT_KEYS)} (pipeline.cli.model_meta); missing {missing}")
    return {**{k: expect[k] for k in EXPECT_KEYS}, "w_bits": tag.w_bits, "a_bits": tag.a_bits, "sm_abit": tag.sm_abit}


def build_variant(spec: SamplerSpec, family: ModelFamily, model, layout: RunLayout, tag: QuantTag,
                  expect: dict[str, Any], packed: Path | None = None,
                  execution: Execution = Execution.FAKE) -> Variant:
    """Load and check everything ``spec`` needs. ``model`` is the loaded FP model of ``family``; ``expect`` is
    ``pipeline.cli.model_meta`` (model, ckpt, steps, eta, scale) that every artifact must match, together with the
    bits of ``tag`` and the model's DDIM grid for these steps and η. ``packed``: the quantized UNet comes from this
    packed file (``pipeline.packed``) instead of the quant artifact and the checkpoint's UNet weights (``model``
    then loaded ``without_unet``). ``execution``: fake-quant or integer kernels."""
    check_present([spec], layout, tag, packed=packed is not None)
    if not spec.quantized:
        return Variant(spec, family.model_fn(model))
    qpath = layout.quant(tag) if packed is None else Path(packed)
    qwant = quant_expect(expect, tag)
    qscript = f"{QUANT_SCRIPT} {tag.flags}" if packed is None else f"{EXPORT_SCRIPT} {tag.flags}"
    with family.ema_scope(model):
        if packed is None:
            qm, qmeta = load_quant_model(family.unet(model), qpath, qwant, qscript, family=family)
        else:
            qm, qmeta = load_packed_model(family.unet(model), qpath, qwant, family=family)
    apply_execution(qm, execution)
    grid = ddim_timesteps(model, settings_of(expect))
    if "timesteps" in qmeta and list(qmeta["timesteps"]) != grid:
        raise ArtifactMismatch(f"{qpath} was calibrated on another DDIM grid than the model's {expect['steps']}-step "
                               f"one; rerun {qscript}")
    artifacts, fit = {"quant" if packed is None else "packed": qpath}, None
    found = fit_path(spec, layout, tag)
    if found is not None:
        fpath, kind = found
        # a packed file names the quant artifact it was packed from: the fits made on that model accept it
        fwant = spec.fit.meta({**qwant, "timesteps": grid,
                               "quant": file_fingerprint(qpath) if packed is None else qmeta["quant"]},
                              spec.granularity)
        try:
            fit = load_fit(fpath, kind, fwant, f"{FIT_SCRIPT} {tag.flags}")
        except ArtifactMismatch as e:
            if e.key == "quant":
                raise ArtifactMismatch(f"{fpath} was fitted on another {qpath.name} than the one there now; rerun "
                                       f"{STATS_SCRIPT} and {FIT_SCRIPT}") from None
            raise
        artifacts["fit"] = fpath
    return Variant(spec, family.unet_model_fn(model, qm), fit=fit, quant_meta=qmeta, quant_model=qm,
                   artifacts=artifacts)


__all__ = ["Variant", "make_correction", "build_variant", "check_present", "required_artifacts", "load_fit",
           "fit_path", "ddim_timesteps", "quant_expect", "NOISE_STATS_KIND", "GAUSSIAN_KIND", "PTQD_KIND",
           "STATS_SCRIPT", "FIT_SCRIPT"]
