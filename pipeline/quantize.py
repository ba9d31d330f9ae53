"""The assembly side of pipeline steps 2-3 (and the loader every later step uses): quantized-model artifacts through
``quant.api.quantize`` (the one entry point), calibration-set loading with its checks, and resumable reconstruction.

Artifact ``quant`` (quant_w{b}.pt, quant_w{b}a{b}[sm{b}].pt):
    meta: model, ckpt (fingerprint), w_bits, a_bits (None for weights only), sm_abit, policy, channel_wise,
          split_shortcut, smoothing (None or the QNCD formula), steps, eta, scale, timesteps, calibration
          (fingerprint of calibration.pt), the phase settings and the SQNRs measured
    quant_state: QuantModel.quant_state_dict() (Δ, z, rounding mode, round-up masks; no FP weights)
    summaries: one loss summary per reconstructed unit
    smoothing: quant.smoothing.smoothing_state() when meta["smoothing"] is set
Partial checkpoint (<artifact>.partial.pt): the same meta and state (``save_quant_state`` writes both), plus
``next_unit``, the summaries so far and ``measured`` (the SQNRs taken before the reconstruction); a resumed step
builds its model from it as from any quant artifact (``RESUME_KEYS``).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ldm.fileio import atomic_path
from pipeline.artifacts import ArtifactMismatch, load_artifact, save_artifact
from pipeline.families.base import ModelFamily
from ldm.util import UserFacingError
from pipeline.basics import check_at_least, ensure_writable_dir
from pipeline.layout import partial_path
from quant.api import LayerFilter, QuantConfig, quantize, quantized_state
from quant.model import QuantModel
from quant.reconstruction import CacheSpec, CalibrationData, Phase, ReconConfig, reconstruct_

QUANT_KIND = "quant"
PARTIAL_KIND = "quant_partial"
CALIBRATION_KIND = "calibration"
CALIBRATION_SCRIPT = "quant_scripts/collect_imagenet_calibration_set.py"
WEIGHT_SCRIPT = "quant_scripts/quantize_weight.py"
QUANT_SCRIPT = "quant_scripts/quantize_weight_activation.py"
# what must agree between a quantized model and the request that loads it
CACHE_BATCH_SIZE = 128   # rows per forward pass when steps 2-3 fill their caches
MODEL_KEYS = ("model", "ckpt", "w_bits", "a_bits", "policy", "channel_wise", "sm_abit", "split_shortcut",
              "smoothing")


def quant_config(meta: dict[str, Any], family: ModelFamily) -> tuple[QuantConfig, LayerFilter]:
    """The ``QuantConfig`` a quant artifact's meta (or a request shaped like one) serializes, and its layer filter:
    ``family``'s policy of that name."""
    policies = family.quant_specials().policies
    if meta["policy"] not in policies:
        raise ArtifactMismatch(f"unknown layer policy {meta['policy']!r}; the {family.name} family knows "
                               f"{sorted(policies)}")
    return QuantConfig.from_meta(meta), policies[meta["policy"]]


@dataclass(frozen=True)
class CacheSettings:
    """Where reconstruction keeps each unit's inputs and outputs: in memory at ``dtype`` (float16 halves it) or in
    memmap files under ``directory``; the caches fill ``batch_size`` rows per forward pass; one FP pass fills the
    targets of every next unit whose caches fit ``fp_capture_mb`` (0: one pass a unit); a unit keeps its forward
    activations for the backward when they fit ``keep_activations_mb`` (0: it recomputes them wherever the model's
    blocks do). None changes a result."""

    dtype: str = "float32"
    batch_size: int = CACHE_BATCH_SIZE
    directory: str | None = None
    fp_capture_mb: float = ReconConfig.fp_capture_bytes / 2**20
    keep_activations_mb: float = ReconConfig.recompute_above / 2**20

    def __post_init__(self):
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise UserFacingError(f"--cache_dtype must be float32, float16 or bfloat16, got {self.dtype}")
        check_at_least("cache_batch_size", self.batch_size)
        check_at_least("fp_capture_mb", self.fp_capture_mb, minimum=0)
        check_at_least("keep_activations_mb", self.keep_activations_mb, minimum=0)

    @property
    def fp_capture_bytes(self) -> int:
        return int(self.fp_capture_mb * 2**20)

    @property
    def recompute_above(self) -> int:
        return int(self.keep_activations_mb * 2**20)

    def spec(self) -> CacheSpec:
        if self.directory is not None:
            ensure_writable_dir(self.directory, create=True, flag="--cache_dir")  # (the memmap caches need it)
        return CacheSpec(dtype=getattr(torch, self.dtype), directory=self.directory)

    def recon_fields(self) -> dict[str, Any]:
        """These settings as ``ReconConfig`` fields (steps 2 and 3 build their phase's config with them)."""
        return dict(cache=self.spec(), cache_batch_size=self.batch_size, fp_capture_bytes=self.fp_capture_bytes,
                    recompute_above=self.recompute_above)

    def meta(self, key: str) -> dict:
        """``{key: batch_size}`` when not the default (artifacts made before the option keep their keys)."""
        return {key: self.batch_size} if self.batch_size != CACHE_BATCH_SIZE else {}


def make_quant_model(unet: torch.nn.Module, meta: dict[str, Any], obj: dict | None = None,
                     path: str | os.PathLike | None = None, copy: bool = True, *,
                     family: ModelFamily) -> QuantModel:
    """A QuantModel of ``family``'s ``unet`` shaped as ``meta`` says (its specials: ``family.quant_specials()``);
    with ``obj`` (a loaded quant artifact, from ``path``) holding its
    quantized state (smoothing re-folded first, then Δ, z and rounding). ``meta`` may add to the artifact's (step 3
    restores step 2's weights into a model with activation quantizers). ``copy=False``: wrap ``unet`` itself
    (steps 2-3, which need no second FP UNet: 1.6 GB less for cin256-v2)."""
    cfg, filter_fn = quant_config(meta, family)
    state = None
    if obj is not None:
        state = {"quant_state": obj["quant_state"], "smoothing": obj["smoothing"] if meta.get("smoothing") else None}
    # step 3 with --sm_abit adds attention quantizers to step 2's weights-only state
    fresh_attention = obj is not None and cfg.sm_abit is not None and obj["meta"].get("a_bits") is None
    try:
        return quantize(unet, cfg, filter_fn, state, fresh_attention=fresh_attention, copy=copy,
                        specials=family.quant_specials())
    except (ValueError, KeyError) as e:
        raise ArtifactMismatch(f"{path or 'the quantized model'}: {e}") from None


def load_quant_model(unet: torch.nn.Module, path: str | os.PathLike, expect: dict[str, Any],
                     produced_by: str = QUANT_SCRIPT, *, family: ModelFamily) -> tuple[QuantModel, dict]:
    """Rebuild ``family``'s quantized UNet from its artifact, checked against ``expect`` (model, bits, sampler
    settings...), on ``unet``'s device. Quantization is switched on as the artifact was made (weights, and
    activations when it has a_bits)."""
    obj = load_artifact(path, QUANT_KIND, expect, produced_by)
    meta = obj["meta"]
    qm = make_quant_model(unet, meta, obj, path, family=family)
    qm.to(next(unet.parameters()).device)
    qm.set_quant_state(weight=True, act=meta.get("a_bits") is not None)
    return qm.eval(), meta


def adopt_quant_artifact(src: str | os.PathLike, dest: str | os.PathLike, expect: dict[str, Any],
                         bits: tuple[int, int | None], asked: str, flag: str = "--cali_ckpt") -> Path:
    """Use a quantized model made elsewhere (``flag`` names it) as the run's ``dest``: its bits must be ``bits``
    (else one line: "<flag> SRC is W8A8, but <asked>", ``asked`` naming the flags that asked for them), its meta
    must match ``expect`` (``pipeline.sampling.quant_expect``: the run's model, sampler settings and bits); only
    then is it copied in, atomically (nothing is copied when ``src`` is ``dest``). Returns ``dest``."""
    src, dest = Path(src), Path(dest)
    meta = load_artifact(src, QUANT_KIND, {}, QUANT_SCRIPT)["meta"]
    if (meta.get("w_bits"), meta.get("a_bits")) != tuple(bits):
        raise UserFacingError(f"{flag} {src} is W{meta.get('w_bits')}A{meta.get('a_bits')}, but {asked}")
    load_artifact(src, QUANT_KIND, expect, QUANT_SCRIPT)
    if dest.resolve() != src.resolve():
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        print(f"{flag}: using {src} as {dest}")
    return dest


def calibration_data(obj: dict, path: str | os.PathLike, timesteps: list[int],
                     device: torch.device) -> tuple[CalibrationData, CalibrationData | None]:
    """The calibration set (and its held-out part) of a calibration artifact a step read (``load_artifact(path,
    CALIBRATION_KIND, run.meta(), CALIBRATION_SCRIPT)``: same model and sampler settings; read before the model
    loads, so a missing set fails fast), checked to be recorded on the DDIM grid that sampling will use (a set
    from another grid calibrates the wrong timesteps)."""
    got = obj["meta"].get("timesteps")
    if got != list(timesteps):
        raise ArtifactMismatch(f"{path} was recorded on the DDIM grid {got[:3]}...{got[-1:]} ({len(got)} steps), but "
                               f"the model's {len(timesteps)}-step grid is {list(timesteps)[:3]}...; recollect it")
    data = CalibrationData(obj["x"], obj["t"], obj.get("c"), device)
    held = (CalibrationData(obj["holdout_x"], obj["holdout_t"], obj.get("holdout_c"), device)
            if obj.get("holdout_x") is not None and len(obj["holdout_x"]) else None)
    return data, held


# what a reconstruction's partial checkpoint holds: a step resumes from ``load_progress(partial_path(out),
# PARTIAL_KIND, meta, needs=RESUME_KEYS)`` and builds its model from it (``make_quant_model(..., obj=resume)``)
RESUME_KEYS = ("quant_state", "next_unit", "summaries", "measured")


def resumable_reconstruct(qm: QuantModel, data: CalibrationData, phase: Phase, cfg: ReconConfig,
                          out_path: str | os.PathLike, meta: dict[str, Any], resume: dict | None = None,
                          measured: dict[str, Any] | None = None, progress: bool = True,
                          timings: list | None = None) -> list[dict]:
    """``reconstruct_`` with a checkpoint after every unit in ``<out>.partial.pt`` (``save_quant_state``: the
    model's state, the next unit, the summaries so far and ``measured``, what the step measured before the
    reconstruction and records in the artifact). ``resume`` (see ``RESUME_KEYS``): ``qm`` was built from that
    checkpoint, and the reconstruction goes on at its next unit. The caller's final
    ``save_quant_state(..., replaces=[partial_path(out)])`` removes the checkpoint."""
    ckpt = partial_path(out_path)
    start, done = 0, []
    if resume is not None:
        # the keys interned as the fresh summaries' literals are: pickle then shares them alike, and a resumed
        # run's artifact is byte-identical to an uninterrupted one's
        start = int(resume["next_unit"])
        done = [{sys.intern(k): v for k, v in summary.items()} for summary in resume["summaries"]]
        print(f"resuming {phase.value} reconstruction at unit {start} from {ckpt}")

    def checkpoint(next_unit: int, summaries: list[dict]) -> None:
        save_quant_state(ckpt, PARTIAL_KIND, meta, qm,
                         {"next_unit": next_unit, "summaries": done + summaries, "measured": measured or {}})

    return done + reconstruct_(qm, data, phase, cfg, start_unit=start, checkpoint=checkpoint, progress=progress,
                               timings=timings)


def save_quant_state(path: str | os.PathLike, kind: str, meta: dict[str, Any], qm: QuantModel, extra: dict[str, Any],
                     smoothing: dict | None = None, **finish: Any) -> None:
    """The one writer of a quantized model's state (a quant artifact, or a reconstruction's partial checkpoint):
    ``quantized_state(qm)`` (its smoothing factors too when ``meta["smoothing"]`` is set) with ``extra`` beside
    it; ``smoothing``: the factors as the artifact they came from holds them, written as they are (step 3 keeps step
    2's: the same file bytes as ever); ``finish``: ``save_artifact``'s ``timing`` and ``replaces``."""
    state = quantized_state(qm, bool(meta.get("smoothing")) and smoothing is None)
    if smoothing is not None:
        state["smoothing"] = smoothing
    save_artifact(path, kind, meta, {"quant_state": state.pop("quant_state"), **extra, **state}, **finish)


class Stopwatch:
    """The total wall time of the calls made through ``wrap(fn)`` (steps 2-3 record where their time goes, for
    projections to full-size runs, in ``<artifact>.timing.json``)."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed
