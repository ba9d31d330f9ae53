"""Step 0 of the pipeline: FP32 sampling to a PNG grid, with classifier-free guidance for class-conditional LDMs.

    python quant_scripts/sample_fp32_imagenet.py                         # embedded Fashion model, all 10 classes
    python quant_scripts/sample_fp32_imagenet.py --preset cin256         # ImageNet LDM-4 at the paper's settings
    python quant_scripts/sample_fp32_imagenet.py --config C --ckpt K     # any CompVis LDM; unconditional ones
                                                                         # (LSUN) sample --n_samples, no guidance

The grid has one row per class. The same seed and flags give an identical PNG. Flags left unset take the
preset's values (configs/presets/<name>.yaml); the constants below are the script's own defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from evaluation.images import make_grid, save_png, to_uint8  # noqa: E402
from ldm.sample import decode_latents, null_class, sample_latents  # noqa: E402
from ldm.util import UserFacingError  # noqa: E402
from quant_scripts.common import (add_model_args, add_sampling_args, apply_preset, check_sampling_args,  # noqa
                                  ensure_writable_dir, load_ldm, pick_device, run_cli)

# ---- defaults (edit here or override with flags; model paths and sampling settings live in the preset) -------
PRESET = "fashion"
N_SAMPLES = 16                  # unconditional models only
SEED = 42
OUTDIR = "outputs/fp32_samples"
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, PRESET)
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids, one grid row each (default: the preset's; all classes of a custom model)")
    p.add_argument("--n_samples_per_class", type=int, default=None)
    p.add_argument("--n_samples", type=int, default=N_SAMPLES, help="number of samples for unconditional models")
    add_sampling_args(p)
    p.add_argument("--uncond_class", type=int, default=None,
                   help="unconditional label for guidance (default: the model's null class, 1000 for cin256-v2)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--no_ema", action="store_true", help="use the live weights of a model trained with EMA")
    p.add_argument("--outdir", default=OUTDIR)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("n_samples_per_class", "n_samples"):
        if getattr(args, name) < 1:
            raise UserFacingError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_sampling_args(args)


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_preset(args, PRESET)
    check_args(args)
    outdir = ensure_writable_dir(args.outdir)
    device = pick_device(args.device)
    _, model = load_ldm(args, device)
    if args.steps > model.num_timesteps:
        raise UserFacingError(f"--steps {args.steps} exceeds the model's {model.num_timesteps} timesteps")

    if model.is_conditional:
        n_classes = model.cond_stage_model.n_classes
        uc = null_class(model) if args.uncond_class is None else args.uncond_class
        if args.classes is None:  # a custom model: its first (up to) 10 real classes
            args.classes = list(range(min(n_classes - 1, 10)))
        bad = [c for c in args.classes + [uc] if not 0 <= c < n_classes]
        if bad:
            raise UserFacingError(f"class ids {bad} out of range for a model with {n_classes} classes "
                                  f"(0..{n_classes - 1}, null class {n_classes - 1})")
        labels = [c for c in args.classes for _ in range(args.n_samples_per_class)]
        nrow, n = args.n_samples_per_class, None
        what = f"classes {args.classes} x {args.n_samples_per_class}, scale {args.scale}, null class {uc}"
    else:
        labels, uc, nrow, n = None, None, min(args.n_samples, 8), args.n_samples
        what = f"{n} unconditional samples (no guidance)"
    print(f"[{args.preset_used}] sampling {what}; {args.steps} DDIM steps, eta {args.eta}, seed {args.seed}, "
          f"on {device}")

    generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.time()
    ema = model.ema_scope("sampling") if (model.use_ema and not args.no_ema) else contextlib.nullcontext()
    with ema:
        z = sample_latents(model, labels, n=n, steps=args.steps, eta=args.eta,
                           scale=args.scale if labels is not None else 1.0, uncond_label=uc,
                           batch_size=args.batch_size, generator=generator)
        images = decode_latents(model, z, batch_size=args.batch_size)
    grid = make_grid(to_uint8(images), nrow=nrow)
    name = f"fp32_steps{args.steps}_eta{args.eta:g}_scale{args.scale:g}_seed{args.seed}.png"
    path = save_png(grid, outdir / name, text={
        "config": str(args.config), "ckpt": str(args.ckpt), "steps": str(args.steps), "eta": f"{args.eta:g}",
        "scale": f"{args.scale:g}", "seed": str(args.seed), "preset": args.preset_used,
        "classes": " ".join(map(str, args.classes))
        if labels is not None else "unconditional"})
    print(f"wrote {path} ({len(images)} samples, {time.time() - t0:.1f} s)")


if __name__ == "__main__":
    run_cli(main)
