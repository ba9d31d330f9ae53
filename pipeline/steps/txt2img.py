"""txt2img (CompVis / QNCD ``scripts/txt2img.py``): images from a prompt or a prompt file, with the FP model or a
quantized one under any sampler spec (QNCD's probe included), written as CompVis does: one PNG per image in
``<image_dir>/samples/`` (numbered on from the files already there) and one grid per run,
``<image_dir>/grid-NNNN.png``; the quantized model and fits come from the run folder under ``args.outdir``.

Batches are ``--n_samples`` prompts (the same prompt repeated for ``--prompt``; consecutive lines for a prompt file),
``--n_iter`` passes over them; x_T and the sampler noise come from one generator seeded with ``--seed``, so a seed
fixes every image.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.images import make_grid, save_png_numbered, to_uint8
from ldm.util import UserFacingError
from pipeline.basics import check_at_least, ensure_writable_dir
from pipeline.generate import sample_images
from pipeline.layout import QuantTag
from pipeline.run import Run, SamplerChoice
from pipeline.sampling import build_variant, check_present
from pipeline.steps.sample_grid import CORRECTION_SEED_OFFSET, in_precision, precision_text


@dataclass(frozen=True)
class ImageSettings:
    """txt2img's own settings: PNGs into ``image_dir``/samples and a grid per run into ``image_dir``; batches of
    ``n_samples`` prompts (``single``: the one prompt repeated), ``n_iter`` passes, grid rows of ``n_rows`` (0: the
    batch); ``size`` (C, H, W, f; None where not given) checked against the model; seed for x_T and the noise."""

    image_dir: Path
    seed: int
    n_samples: int = 3
    n_iter: int = 1
    n_rows: int = 0
    single: bool = False
    size: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None)
    skip_grid: bool = False
    skip_save: bool = False
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "image_dir", Path(self.image_dir))
        check_at_least("n_samples", self.n_samples)
        check_at_least("n_iter", self.n_iter)
        check_at_least("n_rows", self.n_rows, minimum=0)   # (0: a row per batch)


def check_size(family, model, size: tuple) -> None:
    """--C/--H/--W/--f, when given, must describe the model's latent (it samples at its trained latent size)."""
    c, h, w = family.latent_shape(model)
    f = 2 ** (model.first_stage_model.encoder.num_resolutions - 1)
    asked = tuple(given or own for given, own in zip(size, (c, h * f, w * f, f), strict=True))
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


def run(run: Run, im: ImageSettings, sampler: SamplerChoice, tag: QuantTag) -> Path:
    """Sample the run's prompts with ``sampler`` (``tag``: the quantized model's bits); returns the image folder."""
    settings = run.sampling
    quantized = sampler.spec.quantized
    base = run.meta()
    layout = run.layout
    check_present([sampler.spec], layout, tag, packed=sampler.packed is not None)
    outdir = ensure_writable_dir(im.image_dir)
    device = run.torch_device()
    family, model = run.load(device, without_unet=sampler.packed is not None)
    check_size(family, model, im.size)
    variant = build_variant(sampler.spec, family, model, layout, tag, base, sampler.packed, sampler.execution)
    variant.check_sampling(settings)
    plan = batches(len(family.prompts), im.single, im.n_samples, im.n_iter)
    print(f"[{run.preset}] {variant.name} ({tag if quantized else 'FP32'}): {sum(map(len, plan))} images from "
          f"{len(family.prompts)} prompt(s), {settings.steps} {settings.loop} steps, eta {settings.eta:g}, scale "
          f"{settings.scale:g}, seed {im.seed}, on {device}{in_precision(sampler.precision)}")
    generator = torch.Generator(device=device).manual_seed(im.seed)
    corr_gen = torch.Generator(device=device).manual_seed(im.seed + CORRECTION_SEED_OFFSET)
    sample_dir = outdir / "samples"
    count = next_index(sample_dir, "*.png")
    text = {"config": run.model.config, "ckpt": base["ckpt"], "steps": str(settings.steps),
            "eta": f"{settings.eta:g}", "scale": f"{settings.scale:g}", "seed": str(im.seed), "sampler": variant.name,
            "loop": settings.loop, "bits": str(tag) if quantized else "fp32", "execution": sampler.execution.value,
            **precision_text(sampler.precision)}
    t0, images, n_done = time.time(), [], 0
    with family.ema_scope(model):
        for b, conditions in enumerate(plan):
            x = to_uint8(sample_images(family, model, conditions, settings=settings, batch_size=len(conditions),
                                       generator=generator, model_fn=variant.model_fn,
                                       correction=variant.correction_for(corr_gen), progress=im.progress,
                                       precision=sampler.precision))
            if not im.skip_save:
                for img, c in zip(x, conditions):
                    path = save_png_numbered(img, sample_dir, "{:05}.png".format, count,
                                             text={**text, "prompt": family.prompt(c)})
                    count = int(path.stem) + 1
            if not im.skip_grid:   # (5,000 captions at 512² would otherwise be held in memory for nothing)
                images.append(x)
            n_done += len(x)
            print(f"batch {b + 1}/{len(plan)} done ({time.time() - t0:.1f} s)")
    if not im.skip_grid:
        grid_path = save_png_numbered(
            make_grid(np.concatenate(images), nrow=im.n_rows or im.n_samples), outdir, "grid-{:04}.png".format,
            next_index(outdir, "grid-*.png"),
            text={**text, "prompts": " | ".join(dict.fromkeys(family.prompt(c) for b in plan for c in b))})
        print(f"wrote {grid_path}")
    print(f"your samples are ready in {outdir} ({n_done} images, {time.time() - t0:.1f} s)")
    return outdir
