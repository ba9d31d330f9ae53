"""txt2img (CompVis / QNCD ``scripts/txt2img.py``): images from a prompt or a prompt file, with the FP model or a
quantized one under any sampler spec (QNCD's probe included), written as CompVis does: one PNG per image in
``<image_dir>/samples/`` (numbered on from the files already there) and one grid per run,
``<image_dir>/grid-NNNN.png``; the quantized model and fits come from the run folder under ``args.outdir``.

Batches are ``--n_samples`` prompts (the same prompt repeated for ``--prompt``; consecutive lines for a prompt file),
``--n_iter`` passes over them; x_T and the sampler noise come from one generator seeded with ``--seed``, so a seed
fixes every image.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.images import make_grid, save_png_numbered, to_uint8
from ldm.util import UserFacingError
from pipeline import cli
from pipeline.generate import sample_images
from pipeline.sampling import build_variant, check_present
from pipeline.steps.sample_grid import CORRECTION_SEED_OFFSET, in_precision, precision_text


def check_size(family, model, args: argparse.Namespace) -> None:
    """--H/--W/--C/--f, when given, must describe the model's latent (it samples at its trained latent size)."""
    c, h, w = family.latent_shape(model)
    f = 2 ** (model.first_stage_model.encoder.num_resolutions - 1)
    asked = (args.C or c, args.H or h * f, args.W or w * f, args.f or f)
    if asked != (c, h * f, w * f, f):
        raise UserFacingError(f"--C {asked[0]} --H {asked[1]} --W {asked[2]} --f {asked[3]}: this model samples "
                              f"{c}x{h}x{w} latents, i.e. {h * f}x{w * f} images at f = {f}; drop the size flags")


def batches(n_prompts: int, single: bool, n_samples: int, n_iter: int) -> list[list[int]]:
    """Condition indices per batch: ``--prompt`` fills each batch with prompt 0; a file is cut into consecutive
    chunks of ``n_samples`` lines (the last may be shorter); ``n_iter`` passes."""
    if single:
        one = [[0] * n_samples]
    else:
        one = [list(range(i, min(i + n_samples, n_prompts))) for i in range(0, n_prompts, n_samples)]
    return [b for _ in range(n_iter) for b in one]


def next_index(folder: Path, pattern: str) -> int:
    """Where CompVis' numbering starts (the count of files there); ``save_png_numbered`` then takes the first free
    number from it, so two runs writing to one folder at once never overwrite each other's images."""
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def run(args: argparse.Namespace) -> None:
    settings = cli.check_sampling_args(args)
    cli.check_positive(args, "n_samples", "n_iter")
    cli.check_positive(args, "n_rows", minimum=0)   # (0: --n_samples per row)
    quantized = args.sampler != "fp32"
    if quantized:
        cli.check_bits(args)
    spec = cli.resolve_sampler(args)
    cli.check_execution_args(args)
    base = cli.model_meta(args)
    layout, tag = cli.layout(args), cli.quant_tag(args, weights_only=args.a_bits is None)
    packed = Path(args.packed) if args.packed else None
    check_present([spec], layout, tag, packed=packed is not None)
    outdir = cli.ensure_writable_dir(args.image_dir)
    device = cli.pick_device(args.device)
    family, model = cli.load_model(args, device)
    check_size(family, model, args)
    variant = build_variant(spec, family, model, layout, tag, base, packed, args.execution_mode)
    variant.check_sampling(settings)
    plan = batches(len(family.prompts), args.prompt is not None, args.n_samples, args.n_iter)
    loop = "PLMS" if settings.plms else "DDIM"
    print(f"[{args.preset_used}] {variant.name} ({tag if quantized else 'FP32'}): {sum(map(len, plan))} images from "
          f"{len(family.prompts)} prompt(s), {settings.steps} {loop} steps, eta {settings.eta:g}, scale "
          f"{settings.scale:g}, seed {args.seed}, on {device}{in_precision(args)}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    corr_gen = torch.Generator(device=device).manual_seed(args.seed + CORRECTION_SEED_OFFSET)
    sample_dir = outdir / "samples"
    count = next_index(sample_dir, "*.png")
    text = {"config": str(args.config), "ckpt": base["ckpt"], "steps": str(settings.steps), "eta": f"{settings.eta:g}",
            "scale": f"{settings.scale:g}", "seed": str(args.seed), "sampler": variant.name, "loop": settings.loop,
            "bits": str(tag) if quantized else "fp32", "execution": args.execution, **precision_text(args)}
    t0, images, n_done = time.time(), [], 0
    with family.ema_scope(model):
        for b, conditions in enumerate(plan):
            x = to_uint8(sample_images(family, model, conditions, settings=settings, batch_size=len(conditions),
                                       generator=generator, model_fn=variant.model_fn,
                                       correction=variant.correction_for(corr_gen), progress=not args.no_progress,
                                       precision=args.precision))
            if not args.skip_save:
                for img, c in zip(x, conditions):
                    path = save_png_numbered(img, sample_dir, "{:05}.png".format, count,
                                             text={**text, "prompt": family.prompt(c)})
                    count = int(path.stem) + 1
            if not args.skip_grid:   # (5,000 captions at 512² would otherwise be held in memory for nothing)
                images.append(x)
            n_done += len(x)
            print(f"batch {b + 1}/{len(plan)} done ({time.time() - t0:.1f} s)")
    if not args.skip_grid:
        grid_path = save_png_numbered(
            make_grid(np.concatenate(images), nrow=args.n_rows or args.n_samples), outdir, "grid-{:04}.png".format,
            next_index(outdir, "grid-*.png"),
            text={**text, "prompts": " | ".join(dict.fromkeys(family.prompt(c) for b in plan for c in b))})
        print(f"wrote {grid_path}")
    print(f"your samples are ready in {outdir} ({n_done} images, {time.time() - t0:.1f} s)")
