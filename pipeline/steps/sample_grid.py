"""Steps 0 and 6: PNG grids, from the FP model (step 0) or from any sampler spec (step 6; ``--compare``: one row
per sampler, every row from the same x_T and sampler noise, so rows differ only by the model and the correction)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from evaluation.images import labelled_rows, make_grid, save_png, to_uint8
from ldm.precision import Precision
from ldm.util import UserFacingError
from pipeline.basics import check_at_least, ensure_writable_dir
from pipeline.generate import sample_images
from pipeline.layout import QuantTag
from pipeline.run import Run, SamplerChoice
from pipeline.sampler_spec import SamplerSpec
from pipeline.sampling import Variant, build_variant, check_present

CORRECTION_SEED_OFFSET = 1_000_003  # S-D² / probe noise generator: seed + offset, apart from the sampler's stream
COMPARE = ("fp32", "none", "ptqd", "dd2-channel")  # --compare rows; the last is replaced by a D² --sampler


@dataclass(frozen=True)
class GridSettings:
    """A grid's own settings: ``classes`` x ``n_samples_per_class`` for a conditional family (None: its first 10
    classes), ``n_samples`` unconditional samples otherwise, guided against ``uncond`` (None: the family's null
    condition), in batches of ``batch_size``, from ``seed``; ``ema`` False samples the live weights (step 0)."""

    seed: int
    batch_size: int
    n_samples_per_class: int = 1
    n_samples: int = 16
    classes: tuple[int, ...] | None = None
    uncond: int | None = None
    ema: bool = True
    progress: bool = True

    def __post_init__(self):
        check_at_least("n_samples_per_class", self.n_samples_per_class)
        check_at_least("n_samples", self.n_samples)
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))


def grid_conditions(family, model, grid: GridSettings, scale: float, uncond=None
                    ) -> tuple[list | None, int, str, Sequence | None]:
    """(conditions, grid row length, description, classes): ``grid.classes`` x ``n_samples_per_class`` for a
    conditional family (default: its first 10 classes), ``n_samples`` unconditional samples otherwise."""
    every = family.conditions(model, 1)
    if every is None:
        return None, min(grid.n_samples, 8), f"{grid.n_samples} unconditional samples (no guidance)", None
    classes = every[:10] if grid.classes is None else list(grid.classes)
    try:
        family.check_conditions(model, classes, uncond)
    except UserFacingError as e:
        raise UserFacingError(f"--classes: {e}" if grid.classes is not None else str(e)) from None
    labels = [c for c in classes for _ in range(grid.n_samples_per_class)]
    null = family.null_condition(model) if uncond is None else uncond
    null = "" if null is None else f", null class {null}"
    return labels, grid.n_samples_per_class, f"classes {classes} x {grid.n_samples_per_class}, scale " \
                                             f"{scale}{null}", classes


def fp32_grid(run: Run, grid: GridSettings, precision: Precision = Precision.FP32) -> Path:
    """Step 0: a grid of FP samples (the model works before anything is quantized); returns the PNG's path."""
    settings = run.sampling
    outdir = ensure_writable_dir(run.outdir)
    device = run.torch_device()
    family, model = run.load(device)
    labels, nrow, what, classes = grid_conditions(family, model, grid, settings.scale, grid.uncond)
    print(f"[{run.preset}] sampling {what}; {settings.steps} {settings.loop} steps, eta {settings.eta}, seed "
          f"{grid.seed}, on {device}{in_precision(precision)}")
    t0 = time.time()
    with family.ema_scope(model) if grid.ema else contextlib.nullcontext():
        images = sample_images(family, model, labels, settings=settings, n=None if labels else grid.n_samples,
                               batch_size=grid.batch_size, uncond=grid.uncond, precision=precision,
                               generator=torch.Generator(device=device).manual_seed(grid.seed))
    name = (f"fp32{precision.suffix}_steps{settings.steps}_eta{settings.eta:g}_scale{settings.scale:g}_"
            f"seed{grid.seed}.png")
    path = save_png(make_grid(to_uint8(images), nrow=nrow), outdir / name, text={
        "config": run.model.config, "ckpt": run.model.ckpt, "steps": str(settings.steps),
        "eta": f"{settings.eta:g}", "scale": f"{settings.scale:g}", "seed": str(grid.seed), "preset": run.preset,
        "classes": " ".join(map(str, classes)) if labels is not None else "unconditional",
        **precision_text(precision)})
    print(f"wrote {path} ({len(images)} samples, {time.time() - t0:.1f} s)")
    return path


def precision_text(precision: Precision) -> dict[str, str]:
    """The PNG text entry of a non-FP32 --precision (none for FP32: its grids stay byte-identical to earlier ones)."""
    return {} if precision is Precision.FP32 else {"precision": precision.value}


def in_precision(precision: Precision) -> str:
    """' in bf16' for the run's first line ('' for FP32)."""
    return "" if precision is Precision.FP32 else f" in {precision.value}"


def sample_variant(run: Run, family, model, variant: Variant, labels, grid: GridSettings, precision: Precision,
                   device) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1]. x_T and the sampler noise come from a generator seeded with ``grid.seed``
    (the same for every variant); the correction draws from its own generator."""
    variant.check_sampling(run.sampling)
    corr_gen = torch.Generator(device=device).manual_seed(grid.seed + CORRECTION_SEED_OFFSET)
    with family.ema_scope(model):
        return sample_images(family, model, labels, settings=run.sampling,
                             n=None if labels is not None else grid.n_samples, batch_size=grid.batch_size,
                             generator=torch.Generator(device=device).manual_seed(grid.seed),
                             model_fn=variant.model_fn, correction=variant.correction_for(corr_gen),
                             progress=grid.progress, precision=precision)


def compared_specs(spec: SamplerSpec, compare: bool) -> list[SamplerSpec]:
    if not compare:
        return [spec]
    names = list(COMPARE[:-1]) + [COMPARE[-1] if str(spec) in COMPARE[:-1] else str(spec)]
    return [SamplerSpec.parse(n) for n in names]


def quantized_grid(run: Run, grid: GridSettings, sampler: SamplerChoice, tag: QuantTag, compare: bool = False
                   ) -> Path:
    """Step 6: one grid for ``sampler``, or (``compare``) one row per sampler: FP | uncorrected | PTQD | D²
    (--compare shows one sample per class unless told otherwise: the edge's default). Returns the PNG's path."""
    settings = run.sampling
    base = run.meta()
    layout = run.layout
    specs = compared_specs(sampler.spec, compare)
    check_present(specs, layout, tag, packed=sampler.packed is not None)  # before any folder is made or model loaded
    device = run.torch_device()
    family, model = run.load(device, without_unet=sampler.packed is not None)
    labels, nrow, what, classes = grid_conditions(family, model, grid, settings.scale)
    variants = [build_variant(s, family, model, layout, tag, base, sampler.packed, sampler.execution)
                for s in specs]  # all checked before sampling
    outdir = ensure_writable_dir(layout.grids(tag))
    names = [v.name for v in variants]
    print(f"[{run.preset}] {str(tag).upper()} {' | '.join(names)}: {what}; {settings.steps} "
          f"{settings.loop} steps, eta {settings.eta}, seed {grid.seed}, on {device}{in_precision(sampler.precision)}")
    t0 = time.time()
    rows = [to_uint8(sample_variant(run, family, model, v, labels, grid, sampler.precision, device))
            for v in variants]
    suffix = (f"{tag}{sampler.suffix}_steps{settings.steps}_eta{settings.eta:g}_scale{settings.scale:g}_"
              f"seed{grid.seed}.png")
    if compare:
        report_distances(variants, rows)
        image = labelled_rows(make_grid(np.concatenate(rows), nrow=len(rows[0])), names, rows[0].shape[1])
        name = f"compare_{'_'.join(names)}_{suffix}"
    else:
        image, name = make_grid(rows[0], nrow=nrow), f"{names[0]}_{suffix}"
    fingerprints = {f"{v.name}:{a}": f for v in variants for a, f in v.fingerprints().items()}
    path = save_png(image, outdir / name, text={
        "config": run.model.config, "ckpt": base["ckpt"], "steps": str(settings.steps),
        "eta": f"{settings.eta:g}", "scale": f"{settings.scale:g}", "seed": str(grid.seed), "preset": run.preset,
        "bits": str(tag), "sampler": " | ".join(names), "execution": sampler.execution.value,
        "classes": " ".join(map(str, classes)) if labels is not None else "unconditional",
        "artifacts": " ".join(f"{k}={v}" for k, v in fingerprints.items()), **precision_text(sampler.precision)})
    print(f"wrote {path} ({sum(len(r) for r in rows)} samples, {time.time() - t0:.1f} s)")
    return path


def report_distances(variants: list[Variant], rows: list[np.ndarray]) -> None:
    """RMS pixel distance of each row to the FP row (same x_T and noise; 0-255)."""
    names = [v.name for v in variants]
    if "fp32" in names:
        fp = rows[names.index("fp32")].astype(np.float64)
        print("RMS pixel distance to the FP32 row (same x_T and noise; 0-255): " + ", ".join(
            f"{v.name} {np.sqrt(((r.astype(np.float64) - fp) ** 2).mean()):.2f}"
            for v, r in zip(variants, rows, strict=True)))
