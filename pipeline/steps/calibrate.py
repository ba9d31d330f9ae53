"""Step 1: a calibration set of UNet inputs (x_t, t, c) along FP DDIM trajectories (``quant.calibration``)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.util import UserFacingError
from pipeline.artifacts import is_current, save_artifact
from pipeline.basics import ensure_writable_dir
from pipeline.quantize import CALIBRATION_KIND
from pipeline.run import Run
from pipeline.sampling import ddim_timesteps
from quant.calibration import TimestepDistribution, collect_calibration_set


@dataclass(frozen=True)
class CalibrationSettings:
    """Step 1's own settings: keep ``n`` inputs (+ ``n_holdout`` held out, never calibrated on: the SQNRs are
    measured there) spread over the grid by ``distribution`` (or over QNCD's ``cali_st`` strided steps), from
    ``trajectories_per_condition`` guided FP trajectories per condition (only ``classes``, when given), sampled in
    batches of ``batch_size`` from ``seed``."""

    n: int = 1024
    n_holdout: int = 128
    distribution: TimestepDistribution = TimestepDistribution.UNIFORM
    seed: int = 0
    trajectories_per_condition: int = 1
    batch_size: int = 250
    classes: tuple[int, ...] | None = None
    cali_st: int | None = None

    def __post_init__(self):
        if self.n < 1 or self.trajectories_per_condition < 1 or self.n_holdout < 0:
            raise UserFacingError("--n and --calibration_trajectories_per_class must be >= 1, --n_holdout >= 0")
        object.__setattr__(self, "distribution", TimestepDistribution(self.distribution))
        if self.classes is not None:   # (None = every class)
            object.__setattr__(self, "classes", tuple(sorted(set(self.classes))))


def run(run: Run, cal: CalibrationSettings) -> Path:
    """Record the calibration set of ``run`` (reused when current); returns its path."""
    settings = run.sampling
    if cal.cali_st is not None and not 1 <= cal.cali_st <= settings.steps:
        raise UserFacingError(f"--cali_st {cal.cali_st} must be between 1 and --steps {settings.steps}")
    meta = {**run.meta(), "distribution": cal.distribution.value, "n": cal.n, "n_holdout": cal.n_holdout,
            "seed": cal.seed, "trajectories_per_condition": cal.trajectories_per_condition,
            "batch_size": cal.batch_size, **run.family.run_meta()}  # a text model: its prompts
    meta["cali_st"] = cal.cali_st   # (a set recorded before the flag reads as None: it matches)
    # None = every class (a set recorded before this key existed reads as None too, and still matches)
    meta["classes"] = None if cal.classes is None else list(cal.classes)
    out = run.layout.calibration
    if is_current(out, CALIBRATION_KIND, meta, run.force, "this calibration set"):
        return out
    ensure_writable_dir(out.parent)
    device = run.torch_device()
    family, model = run.load(device)
    per = cal.trajectories_per_condition
    conditions = family.conditions(model, per)
    if cal.classes is not None:
        if conditions is None:
            raise UserFacingError("--calibration_classes needs a class-conditional model; this one is unconditional")
        try:
            family.check_conditions(model, meta["classes"])
        except UserFacingError as e:
            raise UserFacingError(f"--calibration_classes: {e}") from None
        conditions = [c for c in meta["classes"] for _ in range(per)]
    n_unconditional = None if conditions is not None else per
    what = family.describe(conditions, n_unconditional or 0, noun="trajectories")
    print(f"[{run.preset}] recording {what}, {settings.steps} {settings.loop} steps, eta {settings.eta}, scale "
          f"{settings.scale}; keeping {cal.n} inputs + {cal.n_holdout} held out ({cal.distribution.value}), seed "
          f"{cal.seed}, on {device}")
    t0 = time.time()
    scale = family.guidance_scale(settings.scale)
    with family.ema_scope(model):
        try:
            data = collect_calibration_set(
                model, conditions, n=cal.n, settings=settings.with_scale(scale), distribution=cal.distribution,
                seed=cal.seed, n_unconditional=n_unconditional, batch_size=cal.batch_size, n_holdout=cal.n_holdout,
                model_fn=family.model_fn(model),
                conditioner=family.conditioner(model, scale) if conditions is not None else None, cali_st=cal.cali_st)
        except ValueError as e:
            raise UserFacingError(f"{e}; raise --calibration_trajectories_per_class or lower --n") from None
    meta["timesteps"] = ddim_timesteps(model, settings)
    save_artifact(out, CALIBRATION_KIND, meta, data)
    counts = torch.bincount(data["t"]).nonzero().numel()
    print(f"wrote {out}: {len(data['t'])} inputs over {counts} timesteps ({time.time() - t0:.1f} s)")
    return out
