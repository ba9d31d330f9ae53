"""Step 6 of the pipeline: PNG grids from the quantized LDM, uncorrected or with a noise correction.

    python quant_scripts/sample_quantized_ldm_imagenet.py                          # fashion, W4A8, D-D² channel-wise
    python quant_scripts/sample_quantized_ldm_imagenet.py --sampler ptqd
    python quant_scripts/sample_quantized_ldm_imagenet.py --compare                # rows FP | none | PTQD | D²
    python quant_scripts/sample_quantized_ldm_imagenet.py --preset cin256          # the paper: 20 steps, η 0, scale 3

D²-DPM's sample_quantized_ldm_imagenet.py (spec d2dpm.md §3.6): the W{b}A{b} QuantModel of step 3 replaces the UNet
and the sampler named by SAMPLER / --sampler corrects its noise with the fits of step 5 (``correction.variants``:
fp32, none, ptqd, sd2-tensor, dd2-tensor, sd2-channel, dd2-channel). Class-conditional with classifier-free guidance
like sample_fp32_imagenet.py: one grid row per class. Every artifact is checked against the model and the
sampler settings (steps, η, scale, bits): a fit for 20 steps does not drive a 250-step chain.

--compare writes one grid with a row per sampler (FP | uncorrected | PTQD | D², one sample per class by default);
every row starts from the same x_T and draws the same DDIM noise, so the rows differ only by the model and the
correction (S-D²'s own draws come from a separate seeded generator). The same seed and flags give an identical
PNG. Grids go to .../w{b}a{b}/samples/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from correction.variants import VARIANTS, Variant, bits_tag, build_variant, check_present  # noqa: E402
from evaluation.images import make_grid, save_png, to_uint8  # noqa: E402
from ldm.sample import decode_latents, null_class, sample_latents  # noqa: E402
from ldm.util import UserFacingError  # noqa: E402
from quant_scripts.common import (add_model_args, add_probe_args, add_sampling_args, apply_preset,  # noqa: E402
                                  check_sampling_args, ensure_writable_dir, load_ldm, model_meta, pick_device,
                                  resolve_sampler, run_cli, run_dir)

# ---- defaults (edit here or override with flags; model paths and sampling settings live in the preset) -------
PRESET = "fashion"
W_BITS = 4
A_BITS = 8
SAMPLER = "dd2-channel"                           # the seed's default; any of correction.variants.VARIANTS
COMPARE = ("fp32", "none", "ptqd", "dd2-channel")  # --compare rows; the last is replaced by a D² --sampler
N_SAMPLES = 16                                    # unconditional models only
SEED = 42
OUTDIR = "outputs"
# -------------------------------------------------------------------------------------------------------------------

CORRECTION_SEED_OFFSET = 1_000_003  # S-D²'s noise generator: seed + offset, apart from the sampler's stream


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, PRESET)
    p.add_argument("--sampler", default=SAMPLER, help=f"correction: one of {', '.join(VARIANTS)} or "
                                                      f"qncd[-rR]+<base> (fp32: the FP model)")
    add_probe_args(p)
    p.add_argument("--compare", action="store_true",
                   help="one grid, a row per sampler: FP | uncorrected | PTQD | --sampler (D-D² channel if "
                        "--sampler is one of those)")
    p.add_argument("--w_bits", type=int, default=W_BITS, choices=(4, 8))
    p.add_argument("--a_bits", type=int, default=A_BITS, choices=(6, 8))
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids, one grid row each (default: the preset's; all classes of a custom model)")
    p.add_argument("--n_samples_per_class", type=int, default=None, help="default: the preset's (1 with --compare)")
    p.add_argument("--n_samples", type=int, default=N_SAMPLES, help="number of samples for unconditional models")
    add_sampling_args(p)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--outdir", default=OUTDIR, help="artifact root (outputs/<preset>/scale.._eta.._steps..)")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def resolve_labels(args: argparse.Namespace, model) -> tuple[list[int] | None, int | None, str]:
    """(labels, unconditional label, description); None labels for an unconditional model."""
    if not model.is_conditional:
        return None, None, f"{args.n_samples} unconditional samples (no guidance)"
    n_classes = model.cond_stage_model.n_classes
    uc = null_class(model)
    if args.classes is None:
        args.classes = list(range(min(n_classes - 1, 10)))
    bad = [c for c in args.classes if not 0 <= c < n_classes - 1]
    if bad:
        raise UserFacingError(f"class ids {bad} out of range for a model with {n_classes - 1} classes "
                              f"(0..{n_classes - 2}; {n_classes - 1} is the null class)")
    labels = [c for c in args.classes for _ in range(args.n_samples_per_class)]
    return labels, uc, f"classes {args.classes} x {args.n_samples_per_class}, scale {args.scale}, null class {uc}"


def sample_variant(model, variant: Variant, labels, uc, args, device) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1]. x_T and the DDIM noise come from a generator seeded with ``args.seed`` (the
    same for every variant); S-D² draws its correction noise from its own generator."""
    variant.check_sampling(steps=args.steps, eta=args.eta, scale=args.scale if labels is not None else 1.0)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    corr_gen = torch.Generator(device=device).manual_seed(args.seed + CORRECTION_SEED_OFFSET)
    with model.ema_scope():
        z = sample_latents(model, labels, n=None if labels is not None else args.n_samples, steps=args.steps,
                           eta=args.eta, scale=args.scale if labels is not None else 1.0, uncond_label=uc,
                           batch_size=args.batch_size, generator=generator, model_fn=variant.model_fn,
                           correction=variant.correction_for(corr_gen), progress=not args.no_progress)
        return decode_latents(model, z, batch_size=args.batch_size)


def labelled_rows(grid: np.ndarray, names: list[str], row_height: int, padding: int = 2) -> np.ndarray:
    """Prefix a grid with a white column naming each row."""
    from PIL import Image, ImageDraw, ImageFont
    width = 8 + 7 * max(len(n) for n in names)
    img = Image.new("RGB", (width + grid.shape[1], grid.shape[0]), "white")
    img.paste(Image.fromarray(grid), (width, 0))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    for r, name in enumerate(names):
        draw.text((4, padding + r * (row_height + padding) + row_height // 2 - 6), name, fill="black", font=font)
    return np.asarray(img)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compare and args.n_samples_per_class is None:
        args.n_samples_per_class = 1
    apply_preset(args, PRESET)
    for name in ("n_samples_per_class", "n_samples"):
        if getattr(args, name) < 1:
            raise UserFacingError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_sampling_args(args)
    resolve_sampler(args)
    base = model_meta(args)
    rdir = run_dir(args)
    tag = bits_tag(args.w_bits, args.a_bits)
    names = [args.sampler]
    if args.compare:
        names = list(COMPARE[:-1]) + [COMPARE[-1] if args.sampler in COMPARE[:-1] else args.sampler]
    check_present(names, rdir, args.w_bits, args.a_bits)  # before any folder is made or model loaded
    outdir = ensure_writable_dir(rdir / tag / "samples")
    device = pick_device(args.device)
    _, model = load_ldm(args, device)
    if args.steps > model.num_timesteps:
        raise UserFacingError(f"--steps {args.steps} exceeds the model's {model.num_timesteps} timesteps")
    # every artifact is loaded and checked before any sampling
    variants = [build_variant(n, model, rdir, w_bits=args.w_bits, a_bits=args.a_bits, expect=base) for n in names]
    labels, uc, what = resolve_labels(args, model)
    print(f"[{args.preset_used}] {tag.upper()} {' | '.join(names)}: {what}; {args.steps} DDIM steps, eta {args.eta}, "
          f"seed {args.seed}, on {device}")

    t0 = time.time()
    rows = [to_uint8(sample_variant(model, v, labels, uc, args, device)) for v in variants]
    if args.compare:
        if "fp32" in names:
            fp = rows[names.index("fp32")].astype(np.float64)
            print("RMS pixel distance to the FP32 row (same x_T and noise; 0-255): " + ", ".join(
                f"{v.name} {np.sqrt(((r.astype(np.float64) - fp) ** 2).mean()):.2f}"
                for v, r in zip(variants, rows, strict=True)))
        ncol = len(rows[0])
        grid = make_grid(np.concatenate(rows), nrow=ncol)
        grid = labelled_rows(grid, [f"{v.name}" for v in variants], rows[0].shape[1])
        name = f"compare_{'_'.join(names)}_{tag}_steps{args.steps}_eta{args.eta:g}_scale{args.scale:g}_" \
               f"seed{args.seed}.png"
    else:
        nrow = args.n_samples_per_class if labels is not None else min(args.n_samples, 8)
        grid = make_grid(rows[0], nrow=nrow)
        name = f"{names[0]}_{tag}_steps{args.steps}_eta{args.eta:g}_scale{args.scale:g}_seed{args.seed}.png"
    fingerprints = {k: v for var in variants for k, v in
                    ((f"{var.name}:{a}", f) for a, f in var.fingerprints().items())}
    path = save_png(grid, outdir / name, text={
        "config": str(args.config), "ckpt": base["ckpt"], "steps": str(args.steps), "eta": f"{args.eta:g}",
        "scale": f"{args.scale:g}", "seed": str(args.seed), "preset": args.preset_used, "bits": tag,
        "sampler": " | ".join(names), "classes": " ".join(map(str, args.classes)) if labels is not None
        else "unconditional", "artifacts": " ".join(f"{k}={v}" for k, v in fingerprints.items())})
    print(f"wrote {path} ({sum(len(r) for r in rows)} samples, {time.time() - t0:.1f} s)")


if __name__ == "__main__":
    run_cli(main)
