"""One place that turns a sampler name into what sampling needs: the denoiser ``model_fn`` and the per-step
correction, each loaded from the pipeline's artifacts and checked against the request (D²-DPM §"Dual denoising";
PTQD §4; the seed's ``--correct_type`` names, spec d2dpm.md §3.7).

    fp32          the full-precision LDM (``model.apply_model``)
    none          the quantized UNet, uncorrected
    ptqd          PTQD: correlated-noise, bias and variance-schedule correction (ptqd.pt)
    sd2-tensor    S-D², one Gaussian per timestep (gaussian_tensor.pt)
    dd2-tensor    D-D², one Gaussian per timestep (gaussian_tensor.pt)
    sd2-channel   S-D², one Gaussian per timestep and latent channel (gaussian_channel.pt)
    dd2-channel   D-D², one Gaussian per timestep and latent channel (gaussian_channel.pt; the seed's default)

Artifacts live in ``run_dir/w{b}a{b}/`` (``run_dir`` = outputs/<preset>/scale{s}_eta{η}_steps{S}):

    quant_w{b}a{b}.pt     step 3, kind "quant"
    noise_stats.pt        step 4, kind "noise_stats"   (quant_scripts/collect_timestep_aware_statistics.py)
    gaussian_tensor.pt    step 5, kind "gaussian"      (quant_scripts/gaussian_modeling.py)
    gaussian_channel.pt   step 5, kind "gaussian"
    ptqd.pt               step 5, kind "ptqd"

Every artifact is checked against ``expect`` (model, ckpt, steps, eta, scale), the bits, the model's DDIM grid and,
for the fits, the fingerprint of the quantized model they were measured on. A missing or mismatched artifact is a
one-line ``ArtifactMismatch`` naming the script to run; nothing falls back to another variant.

    qncd          QNCD's runtime noise estimation: a probe every R = 10 steps (no fit)
    qncd+<base>   the probe on top of a quantized base (qncd+dd2-channel, qncd+sd2-channel, qncd+ptqd, ...), as the
                  residual-bias estimator after the base's correction; qncd-r5+<base>, qncd-r5: R = 5
                  (``qncd_name(base, R)``: what ``--sample_reverse --reverse_interval R`` turns ``--sampler`` into)

To add a variant, add a ``VariantSpec`` to ``SPECS`` (its name then appears in ``VARIANTS``).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from correction.d2 import DeterministicD2, StochasticD2
from correction.gaussian import GaussianFit, Granularity
from correction.ptqd import PTQDCorrection, PTQDFit
from correction.qncd import DEFAULT_INTERVAL, QNCDProbe
from correction.statistics import CorrectionError
from ldm.models.diffusion.ddim import DDIMSchedule, ModelFn, StepCorrection
from quant.artifacts import ArtifactMismatch, file_fingerprint, load_artifact
from quant.pipeline import load_quant_model

NOISE_STATS_KIND = "noise_stats"
GAUSSIAN_KIND = "gaussian"
PTQD_KIND = "ptqd"
QUANT_SCRIPT = "quant_scripts/quantize_weight_activation.py"
STATS_SCRIPT = "quant_scripts/collect_timestep_aware_statistics.py"
FIT_SCRIPT = "quant_scripts/gaussian_modeling.py"
EXPECT_KEYS = ("model", "ckpt", "steps", "eta", "scale")


# ---- where the artifacts live -----------------------------------------------------------------------------------

def bits_tag(w_bits: int, a_bits: int) -> str:
    return f"w{w_bits}a{a_bits}"


def quant_path(run_dir: str | os.PathLike, w_bits: int, a_bits: int) -> Path:
    tag = bits_tag(w_bits, a_bits)
    return Path(run_dir) / tag / f"quant_{tag}.pt"


def noise_stats_path(run_dir: str | os.PathLike, w_bits: int, a_bits: int) -> Path:
    return Path(run_dir) / bits_tag(w_bits, a_bits) / "noise_stats.pt"


def noise_stats_spill_dir(run_dir: str | os.PathLike, w_bits: int, a_bits: int) -> Path:
    """Step 4's float32 spill of the (ε̂, ε_fp) values, for the outlier filter (removed after step 4 by default)."""
    return Path(run_dir) / bits_tag(w_bits, a_bits) / "noise_stats_spill"


def gaussian_path(run_dir: str | os.PathLike, w_bits: int, a_bits: int, granularity: Granularity | str) -> Path:
    return Path(run_dir) / bits_tag(w_bits, a_bits) / f"gaussian_{Granularity(granularity).value}.pt"


def ptqd_path(run_dir: str | os.PathLike, w_bits: int, a_bits: int) -> Path:
    return Path(run_dir) / bits_tag(w_bits, a_bits) / "ptqd.pt"


# ---- the registry -------------------------------------------------------------------------------------------------

Fit = GaussianFit | PTQDFit


@dataclass(frozen=True)
class VariantSpec:
    """How a sampler name is built: whether it runs the quantized UNet, which fit artifact it reads (``fit``:
    "tensor", "channel", "ptqd" or None) and how a fit becomes a ``StepCorrection`` (``make(fit, generator)``)."""

    description: str
    quantized: bool = True
    fit: str | None = None
    make: Callable[[Any, torch.Generator | None], StepCorrection] | None = None
    needs_generator: bool = False


def _sd2(fit: GaussianFit, generator: torch.Generator | None) -> StepCorrection:
    if generator is None:
        raise CorrectionError("S-D² draws its correction noise from a torch.Generator; pass one to correction_for "
                              "(e.g. torch.Generator().manual_seed(seed))")
    return StochasticD2(fit, generator)


SPECS: dict[str, VariantSpec] = {
    "fp32": VariantSpec("full-precision LDM", quantized=False),
    "none": VariantSpec("quantized, uncorrected"),
    "ptqd": VariantSpec("quantized + PTQD (CNC + BC + VSC)", fit="ptqd",
                        make=lambda fit, g: PTQDCorrection(fit)),
    "sd2-tensor": VariantSpec("quantized + S-D², tensor-wise", fit="tensor", make=_sd2, needs_generator=True),
    "dd2-tensor": VariantSpec("quantized + D-D², tensor-wise", fit="tensor",
                              make=lambda fit, g: DeterministicD2(fit)),
    "sd2-channel": VariantSpec("quantized + S-D², channel-wise", fit="channel", make=_sd2, needs_generator=True),
    "dd2-channel": VariantSpec("quantized + D-D², channel-wise", fit="channel",
                               make=lambda fit, g: DeterministicD2(fit)),
}


def _qncd(base: VariantSpec, interval: int) -> Callable[[Any, torch.Generator | None], StepCorrection]:
    """QNCD's runtime noise estimation (a probe every ``interval`` steps), alone or as the residual-bias estimator
    after a base correction (the base corrects ε̂ and the probe's prediction; the probe sees what is left)."""
    def make(fit, generator):
        if generator is None:
            raise CorrectionError("the QNCD probe draws its re-noising noise from a torch.Generator; pass one")
        inner = None if base.make is None else base.make(fit, generator)
        return QNCDProbe(interval, base=inner, generator=generator)
    return make


QNCD_NAME = re.compile(r"qncd(?:-r(?P<interval>[1-9]\d*))?(?:\+(?P<base>.+))?")


def qncd_name(base: str, interval: int = DEFAULT_INTERVAL) -> str:
    """The sampler name of ``base`` with QNCD's probe every ``interval`` steps (the scripts' ``--sample_reverse
    --reverse_interval R``): none -> qncd, dd2-channel -> qncd+dd2-channel, R = 5 -> qncd-r5+dd2-channel."""
    if base not in SPECS or not SPECS[base].quantized:
        raise CorrectionError(f"--sample_reverse adds QNCD's probe to a quantized sampler; '{base}' is not one "
                              f"(choose one of {', '.join(n for n, s in SPECS.items() if s.quantized)})")
    if interval < 1:
        raise CorrectionError(f"--reverse_interval must be ≥ 1, got {interval}")
    head = "qncd" if interval == DEFAULT_INTERVAL else f"qncd-r{interval}"
    return head if base == "none" else f"{head}+{base}"


def spec_for(name: str) -> VariantSpec:
    """The spec of a sampler name: one of ``SPECS``, or ``qncd[-rR][+base]`` (QNCD's probe on top of ``base``)."""
    if name in SPECS:
        return SPECS[name]
    m = QNCD_NAME.fullmatch(name)
    base = (m.group("base") or "none") if m else None
    if base is None or base not in SPECS or not SPECS[base].quantized or base == "none" and m.group("base"):
        raise CorrectionError(f"unknown sampler '{name}'; choose one of {', '.join(VARIANTS)}, or qncd[-rR]+<one of "
                              f"{', '.join(n for n, s in SPECS.items() if s.quantized and n != 'none')}>")
    interval = int(m.group("interval") or DEFAULT_INTERVAL)
    what = "QNCD runtime noise estimation" if base == "none" else f"{SPECS[base].description} + QNCD probe on the " \
                                                                    f"residual"
    return VariantSpec(f"{what} (R = {interval})", fit=SPECS[base].fit, make=_qncd(SPECS[base], interval),
                       needs_generator=True)


# the names listed by the scripts: every base, and QNCD's probe alone and on the channel-wise D² corrections (any
# qncd[-rR]+<base> is accepted too)
VARIANTS: tuple[str, ...] = (*SPECS, "qncd", "qncd+dd2-channel", "qncd+sd2-channel")


# ---- the value object -----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Variant:
    """What sampling with one named variant needs.

    ``model_fn`` (x, t, c) -> ε: ``model.apply_model`` for fp32, the quantized UNet behind the same conditioning
    routing otherwise. ``correction_for(generator)`` gives a fresh ``StepCorrection`` (None for fp32 and none);
    S-D² draws its noise from ``generator``, the others ignore it. ``artifacts`` maps each artifact used to its
    path; ``quant_meta`` and ``quant_model`` are the quantized UNet's meta and QuantModel (None for fp32).
    Sample an fp32 variant inside ``model.ema_scope()`` (the quantized UNet was copied from the EMA weights)."""

    name: str
    description: str
    model_fn: ModelFn
    fit: Fit | None = None
    quant_meta: dict | None = None
    quant_model: torch.nn.Module | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    _make: Callable[[Any, torch.Generator | None], StepCorrection] | None = None
    needs_generator: bool = False

    @property
    def quantized(self) -> bool:
        return self.quant_meta is not None

    def correction_for(self, generator: torch.Generator | None = None) -> StepCorrection | None:
        return None if self._make is None else self._make(self.fit, generator)

    def check_sampling(self, *, steps: int, eta: float, scale: float) -> None:
        """One-line ``ConfigMismatch`` when the sampler's settings differ from those the fit was made for."""
        if self.fit is not None:
            self.fit.sampling.check(steps=steps, eta=eta, scale=scale, what=f"the {self.name} statistics")

    def fingerprints(self) -> dict[str, str]:
        """{artifact: fingerprint} of what this variant loaded (for the metadata of what it produces)."""
        return {k: file_fingerprint(p) for k, p in self.artifacts.items()}


# ---- the quantized UNet as a model_fn ---------------------------------------------------------------------------

def unet_model_fn(model, unet: torch.nn.Module) -> ModelFn:
    """``unet`` (e.g. a QuantModel) behind ``LatentDiffusion.apply_model``'s conditioning routing: a non-dict
    ``cond`` goes to c_concat or c_crossattn by the model's ``conditioning_key``, then as ``DiffusionWrapper`` passes
    it (crossattn: context = cat(c_crossattn, 1); concat: cat([x] + c_concat, 1); hybrid: both; adm: y)."""
    key = model.model.conditioning_key

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if not isinstance(cond, dict):
            cond = {"c_concat" if key == "concat" else "c_crossattn": cond if isinstance(cond, list) else [cond]}
        if key is None:
            out = unet(x, t)
        elif key == "concat":
            out = unet(torch.cat([x] + cond["c_concat"], dim=1), t)
        elif key == "crossattn":
            out = unet(x, t, context=torch.cat(cond["c_crossattn"], 1))
        elif key == "hybrid":
            out = unet(torch.cat([x] + cond["c_concat"], dim=1), t, context=torch.cat(cond["c_crossattn"], 1))
        elif key == "adm":
            out = unet(x, t, y=cond["c_crossattn"][0])
        else:
            raise ValueError(f"unknown conditioning_key {key!r}")
        return out[0] if isinstance(out, tuple) else out

    return model_fn


# ---- building -----------------------------------------------------------------------------------------------------

def ddim_timesteps(model, steps: int, eta: float) -> list[int]:
    """The model's DDIM grid for ``steps`` steps (ascending), as every artifact's meta records it."""
    return DDIMSchedule.make(model.alphas_cumprod, steps, eta).timesteps.tolist()


def _check_expect(expect: dict) -> None:
    missing = [k for k in EXPECT_KEYS if k not in expect]
    if missing:
        raise ValueError(f"expect must name {', '.join(EXPECT_KEYS)} (quant_scripts.common.model_meta); "
                         f"missing {missing}")


def _elsewhere(path: Path, run_dir: Path) -> str:
    """' (it exists for steps=20, eta=0, scale=3: sample with --steps 20 --eta 0 --scale 3)' when the same file
    exists in another run directory of the preset (another sampler setting)."""
    rel = path.relative_to(run_dir)
    found = []
    for p in sorted(run_dir.parent.glob(f"*/{rel}")):
        m = re.fullmatch(r"scale(.+)_eta(.+)_steps(\d+)", p.relative_to(run_dir.parent).parts[0])
        if m and m.group(0) != run_dir.name:
            found.append(f"--steps {m.group(3)} --eta {m.group(2)} --scale {m.group(1)}")
    if not found:
        return ""
    return f" (it exists for other settings: sample with {' or '.join(found[:3])})"


def required_artifacts(name: str, run_dir: str | os.PathLike, w_bits: int,
                       a_bits: int) -> list[tuple[Path, str, str]]:
    """(path, kind, the script that makes it) of every artifact sampler ``name`` reads, in pipeline order."""
    spec, flags = spec_for(name), f"--w_bits {w_bits} --a_bits {a_bits}"
    out = []
    if spec.quantized:
        out.append((quant_path(run_dir, w_bits, a_bits), "quant", f"{QUANT_SCRIPT} {flags}"))
    if spec.fit == "ptqd":
        out.append((ptqd_path(run_dir, w_bits, a_bits), PTQD_KIND, f"{FIT_SCRIPT} {flags}"))
    elif spec.fit is not None:
        out.append((gaussian_path(run_dir, w_bits, a_bits, spec.fit), GAUSSIAN_KIND, f"{FIT_SCRIPT} {flags}"))
    return out


def check_present(names, run_dir: str | os.PathLike, w_bits: int, a_bits: int) -> None:
    """Stop with one line naming the first missing artifact and the script that makes it: cheap (no model is
    loaded), so a script can call it before it creates folders or loads anything."""
    run_dir = Path(run_dir)
    for name in names:
        for path, kind, script in required_artifacts(name, run_dir, w_bits, a_bits):
            if not path.is_file():
                what = f"W{w_bits}A{a_bits} quantized model" if kind == "quant" else f"{kind} artifact"
                if kind != "quant" and not noise_stats_path(run_dir, w_bits, a_bits).is_file():
                    script = f"{STATS_SCRIPT} --w_bits {w_bits} --a_bits {a_bits}, then {script}"
                raise ArtifactMismatch(f"{what} not found: {path}{_elsewhere(path, run_dir)}; run {script} with "
                                       f"these settings first")


def load_fit(path: Path, kind: str, want: dict, produced_by: str, run_dir: Path) -> tuple[Fit, dict]:
    """A Gaussian or PTQD fit artifact, meta checked against ``want`` and the payload's sampling settings against
    the meta (a file edited by hand or written by other code is refused)."""
    if not path.is_file():
        raise ArtifactMismatch(f"{kind} artifact not found: {path}{_elsewhere(path, run_dir)}; run {produced_by} "
                               f"with these settings first")
    obj = load_artifact(path, kind, want, produced_by)
    try:
        fit = GaussianFit.from_dict(obj["fit"]) if kind == GAUSSIAN_KIND else PTQDFit.from_dict(obj["fit"])
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactMismatch(f"{path} holds no usable fit ({type(e).__name__}: {e}); rerun {produced_by}") from None
    s = fit.sampling
    if list(s.timesteps) != want["timesteps"] or s.steps != want["steps"] or \
            not math.isclose(s.eta, want["eta"], abs_tol=1e-9) or not math.isclose(s.scale, want["scale"],
                                                                                  abs_tol=1e-9):
        raise ArtifactMismatch(f"{path}: its fit covers steps={s.steps}, eta={s.eta:g}, scale={s.scale:g}, but "
                               f"steps={want['steps']}, eta={want['eta']:g}, scale={want['scale']:g} is asked for; "
                               f"rerun {produced_by}")
    return fit, obj["meta"]


def build_variant(name: str, model, run_dir: str | os.PathLike, *, w_bits: int, a_bits: int,
                  expect: dict) -> Variant:
    """Load and check everything sampler ``name`` needs.

    ``model`` is the loaded FP LatentDiffusion; ``run_dir`` is outputs/<preset>/scale{s}_eta{η}_steps{S};
    ``expect`` is ``quant_scripts.common.model_meta(args)`` (model, ckpt, steps, eta, scale) that every artifact
    must match, together with ``w_bits``/``a_bits`` and the model's DDIM grid for these steps and η."""
    _check_expect(expect)
    run_dir = Path(run_dir)
    check_present([name], run_dir, w_bits, a_bits)
    spec = spec_for(name)
    if not spec.quantized:
        return Variant(name, spec.description, model.apply_model)

    qpath = quant_path(run_dir, w_bits, a_bits)
    qwant = {**{k: expect[k] for k in EXPECT_KEYS}, "w_bits": w_bits, "a_bits": a_bits}
    qscript = f"{QUANT_SCRIPT} --w_bits {w_bits} --a_bits {a_bits}"
    with model.ema_scope():
        qm, qmeta = load_quant_model(model.model.diffusion_model, qpath, qwant, qscript)
    grid = ddim_timesteps(model, expect["steps"], expect["eta"])
    if "timesteps" in qmeta and list(qmeta["timesteps"]) != grid:
        raise ArtifactMismatch(f"{qpath} was calibrated on another DDIM grid than the model's {expect['steps']}-step "
                               f"one; rerun {qscript}")
    artifacts = {"quant": qpath}
    fit = None
    if spec.fit is not None:
        fwant = {**qwant, "timesteps": grid, "quant": file_fingerprint(qpath)}
        fscript = f"{FIT_SCRIPT} --w_bits {w_bits} --a_bits {a_bits}"
        if spec.fit == "ptqd":
            fpath, kind = ptqd_path(run_dir, w_bits, a_bits), PTQD_KIND
        else:
            fpath, kind = gaussian_path(run_dir, w_bits, a_bits, spec.fit), GAUSSIAN_KIND
            fwant["granularity"] = spec.fit
        try:
            fit, _ = load_fit(fpath, kind, fwant, fscript, run_dir)
        except ArtifactMismatch as e:
            if "quant=" in str(e):
                raise ArtifactMismatch(f"{fpath} was fitted on another {qpath.name} than the one there now; rerun "
                                       f"{STATS_SCRIPT} and {FIT_SCRIPT}") from None
            raise
        artifacts["fit"] = fpath
    return Variant(name, spec.description, unet_model_fn(model, qm), fit=fit, quant_meta=qmeta, quant_model=qm,
                   artifacts=artifacts, _make=spec.make, needs_generator=spec.needs_generator)


__all__ = ["VARIANTS", "SPECS", "VariantSpec", "spec_for", "qncd_name", "Variant", "build_variant", "unet_model_fn", "ddim_timesteps",
           "load_fit", "required_artifacts", "check_present", "bits_tag", "quant_path", "noise_stats_path",
           "noise_stats_spill_dir", "gaussian_path", "ptqd_path", "NOISE_STATS_KIND", "GAUSSIAN_KIND", "PTQD_KIND",
           "STATS_SCRIPT", "FIT_SCRIPT", "QUANT_SCRIPT"]
