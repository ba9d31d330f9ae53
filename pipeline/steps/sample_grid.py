"""Steps 0 and 6: PNG grids, from the FP model (step 0) or from any sampler spec (step 6; ``--compare``: one row
per sampler, every row from the same x_T and sampler noise, so rows differ only by the model and the correction)."""
from __future__ import annotations

import argparse
from pathlib import Path
import contextlib
import time

import numpy as np
import torch

from evaluation.images import labelled_rows, make_grid, save_png, to_uint8
from ldm.precision import Precision
from pipeline import cli
from pipeline.generate import sample_images
from pipeline.sampler_spec import SamplerSpec
from pipeline.sampling import Variant, build_variant, check_present

CORRECTION_SEED_OFFSET = 1_000_003  # S-D² / probe noise generator: seed + offset, apart from the sampler's stream
COMPARE = ("fp32", "none", "ptqd", "dd2-channel")  # --compare rows; the last is replaced by a D² --sampler


def check_grid_args(args: argparse.Namespace) -> None:
    """The grid's flags, before any folder is made or model loaded."""
    cli.check_sampling_args(args)
    cli.check_positive(args, "n_samples_per_class", "n_samples")
    cli.check_precision_args(args)


def grid_conditions(family, model, args: argparse.Namespace, uncond=None) -> tuple[list | None, int, str]:
    """(conditions, grid row length, description): ``--classes`` x ``--n_samples_per_class`` for a conditional
    family (default: its first 10 classes), ``--n_samples`` unconditional samples otherwise."""
    every = family.conditions(model, 1)
    if every is None:
        return None, min(args.n_samples, 8), f"{args.n_samples} unconditional samples (no guidance)"
    if args.classes is None:
        args.classes = every[:10]
    family.check_conditions(model, args.classes, uncond)
    labels = [c for c in args.classes for _ in range(args.n_samples_per_class)]
    null = family.null_condition(model) if uncond is None else uncond
    null = "" if null is None else f", null class {null}"
    return labels, args.n_samples_per_class, f"classes {args.classes} x {args.n_samples_per_class}, scale " \
                                             f"{args.scale}{null}"


def fp32_grid(args: argparse.Namespace) -> None:
    """Step 0: a grid of FP samples (the model works before anything is quantized)."""
    check_grid_args(args)
    settings = args.settings
    outdir = cli.ensure_writable_dir(args.outdir)
    device = cli.pick_device(args.device)
    family, model = cli.load_model(args, device)
    labels, nrow, what = grid_conditions(family, model, args, args.uncond_class)
    print(f"[{args.preset_used}] sampling {what}; {args.steps} {args.settings.loop} steps, eta {args.eta}, seed "
          f"{args.seed}, on {device}{in_precision(args)}")
    t0 = time.time()
    with family.ema_scope(model) if not args.no_ema else contextlib.nullcontext():
        images = sample_images(family, model, labels, settings=settings, n=None if labels else args.n_samples,
                               batch_size=args.batch_size, uncond=args.uncond_class, precision=args.precision,
                               generator=torch.Generator(device=device).manual_seed(args.seed))
    name = f"fp32{args.precision.suffix}_steps{args.steps}_eta{args.eta:g}_scale{args.scale:g}_seed{args.seed}.png"
    path = save_png(make_grid(to_uint8(images), nrow=nrow), outdir / name, text={
        "config": str(args.config), "ckpt": str(args.ckpt), "steps": str(args.steps), "eta": f"{args.eta:g}",
        "scale": f"{args.scale:g}", "seed": str(args.seed), "preset": args.preset_used,
        "classes": " ".join(map(str, args.classes)) if labels is not None else "unconditional",
        **precision_text(args)})
    print(f"wrote {path} ({len(images)} samples, {time.time() - t0:.1f} s)")


def precision_text(args: argparse.Namespace) -> dict[str, str]:
    """The PNG text entry of a non-FP32 --precision (none for FP32: its grids stay byte-identical to earlier ones)."""
    return {} if args.precision is Precision.FP32 else {"precision": args.precision.value}


def in_precision(args: argparse.Namespace) -> str:
    """' in bf16' for the run's first line ('' for FP32)."""
    return "" if args.precision is Precision.FP32 else f" in {args.precision.value}"


def sample_variant(family, model, variant: Variant, labels, args: argparse.Namespace, device) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1]. x_T and the sampler noise come from a generator seeded with ``args.seed``
    (the same for every variant); the correction draws from its own generator."""
    variant.check_sampling(args.settings)
    corr_gen = torch.Generator(device=device).manual_seed(args.seed + CORRECTION_SEED_OFFSET)
    with family.ema_scope(model):
        return sample_images(family, model, labels, settings=args.settings,
                             n=None if labels is not None else args.n_samples, batch_size=args.batch_size,
                             generator=torch.Generator(device=device).manual_seed(args.seed),
                             model_fn=variant.model_fn, correction=variant.correction_for(corr_gen),
                             progress=not args.no_progress, precision=args.precision)


def compared_specs(args: argparse.Namespace) -> list[SamplerSpec]:
    if not args.compare:
        return [args.spec]
    names = list(COMPARE[:-1]) + [COMPARE[-1] if args.sampler in COMPARE[:-1] else args.sampler]
    return [SamplerSpec.parse(n) for n in names]


def compare_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Before the preset fills the flags: ``--compare`` shows one sample per class unless told otherwise."""
    if args.compare and args.n_samples_per_class is None:
        args.n_samples_per_class = 1
    return args


def quantized_grid(args: argparse.Namespace) -> None:
    """Step 6: one grid for ``--sampler``, or the ``--compare`` rows (call ``compare_defaults`` on the flags
    before the preset is applied)."""
    check_grid_args(args)
    cli.check_bits(args)
    cli.resolve_sampler(args)
    cli.check_execution_args(args)
    base = cli.model_meta(args)
    layout, tag = cli.layout(args), cli.quant_tag(args)
    specs = compared_specs(args)
    packed = Path(args.packed) if args.packed else None
    check_present(specs, layout, tag, packed=packed is not None)  # before any folder is made or model loaded
    device = cli.pick_device(args.device)
    family, model = cli.load_model(args, device)
    labels, nrow, what = grid_conditions(family, model, args)
    variants = [build_variant(s, family, model, layout, tag, base, packed, args.execution_mode)
                for s in specs]  # all checked before sampling
    outdir = cli.ensure_writable_dir(layout.grids(tag))
    names = [v.name for v in variants]
    print(f"[{args.preset_used}] {str(tag).upper()} {' | '.join(names)}: {what}; {args.steps} "
          f"{args.settings.loop} steps, eta {args.eta}, seed {args.seed}, on {device}{in_precision(args)}")
    t0 = time.time()
    rows = [to_uint8(sample_variant(family, model, v, labels, args, device)) for v in variants]
    suffix = f"{tag}{args.variant_suffix}_steps{args.steps}_eta{args.eta:g}_scale{args.scale:g}_seed{args.seed}.png"
    if args.compare:
        report_distances(variants, rows)
        grid = labelled_rows(make_grid(np.concatenate(rows), nrow=len(rows[0])), names, rows[0].shape[1])
        name = f"compare_{'_'.join(names)}_{suffix}"
    else:
        grid, name = make_grid(rows[0], nrow=nrow), f"{names[0]}_{suffix}"
    fingerprints = {f"{v.name}:{a}": f for v in variants for a, f in v.fingerprints().items()}
    path = save_png(grid, outdir / name, text={
        "config": str(args.config), "ckpt": base["ckpt"], "steps": str(args.steps), "eta": f"{args.eta:g}",
        "scale": f"{args.scale:g}", "seed": str(args.seed), "preset": args.preset_used, "bits": str(tag),
        "sampler": " | ".join(names), "execution": args.execution,
        "classes": " ".join(map(str, args.classes)) if labels is not None else "unconditional",
        "artifacts": " ".join(f"{k}={v}" for k, v in fingerprints.items()), **precision_text(args)})
    print(f"wrote {path} ({sum(len(r) for r in rows)} samples, {time.time() - t0:.1f} s)")


def report_distances(variants: list[Variant], rows: list[np.ndarray]) -> None:
    """RMS pixel distance of each row to the FP row (same x_T and noise; 0-255)."""
    names = [v.name for v in variants]
    if "fp32" in names:
        fp = rows[names.index("fp32")].astype(np.float64)
        print("RMS pixel distance to the FP32 row (same x_T and noise; 0-255): " + ", ".join(
            f"{v.name} {np.sqrt(((r.astype(np.float64) - fp) ** 2).mean()):.2f}"
            for v, r in zip(variants, rows, strict=True)))
