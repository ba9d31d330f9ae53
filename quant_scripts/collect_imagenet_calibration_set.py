"""Step 1 of the pipeline: record a calibration set of UNet inputs (x_t, t, c) along FP DDIM trajectories.

    python quant_scripts/collect_imagenet_calibration_set.py                    # fashion preset
    python quant_scripts/collect_imagenet_calibration_set.py --preset cin256    # the paper: 1000 classes x 1

Every real class gets the same number of guided trajectories; both guidance branches are recorded. N_CALIBRATION
(x_t, t, c) triples are kept, spread over the DDIM grid by TIMESTEP_DISTRIBUTION. Output:
outputs/<preset>/scale{s}_eta{η}_steps{S}/calibration.pt, whose metadata the next steps check.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.models.diffusion.ddim import DDIMSchedule  # noqa: E402
from ldm.util import UserFacingError  # noqa: E402
from quant.artifacts import ArtifactMismatch, file_fingerprint, load_artifact, save_artifact  # noqa: E402
from quant.calibration import TimestepDistribution, collect_calibration_set  # noqa: E402
from quant_scripts.common import (add_model_args, add_sampling_args, apply_preset, check_sampling_args,  # noqa
                                  ensure_writable_dir, load_ldm, pick_device, resolve, run_cli)

# ---- defaults (edit here or override with flags) ---------------------------------------------------------------
PRESET = "fashion"
N_CALIBRATION = 1024                 # D²-DPM: 1024
N_HOLDOUT = 128                      # extra inputs, drawn the same way, kept out of calibration to measure SQNR
TIMESTEP_DISTRIBUTION = "uniform"    # "uniform" (the DDIM grid evenly) or "normal" (PTQ4DM: N(0.4, 0.4) over the grid)
SEED = 0
OUTDIR = "outputs"
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, PRESET)
    p.add_argument("--n", type=int, default=N_CALIBRATION, help="calibration samples to keep")
    p.add_argument("--n_holdout", type=int, default=N_HOLDOUT,
                   help="held-out inputs for measuring the quantized UNet's error (not used to calibrate)")
    p.add_argument("--distribution", default=TIMESTEP_DISTRIBUTION, choices=[d.value for d in TimestepDistribution])
    p.add_argument("--calibration_trajectories_per_class", type=int, default=None)
    add_sampling_args(p)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--outdir", default=OUTDIR)
    p.add_argument("--force", action="store_true", help="recollect even if a matching calibration set exists")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_preset(args, PRESET)
    if args.calibration_trajectories_per_class is None:
        args.calibration_trajectories_per_class = 1
    if args.n < 1 or args.calibration_trajectories_per_class < 1 or args.n_holdout < 0:
        raise UserFacingError("--n and --calibration_trajectories_per_class must be >= 1, --n_holdout >= 0")
    check_sampling_args(args)
    run_dir = ensure_writable_dir(Path(args.outdir) / args.preset_used /
                                  f"scale{args.scale:g}_eta{args.eta:g}_steps{args.steps}")
    out = run_dir / "calibration.pt"
    meta = {"model": str(args.config), "ckpt": file_fingerprint(resolve(args.ckpt)), "steps": args.steps,
            "eta": float(args.eta), "scale": float(args.scale), "distribution": args.distribution, "n": args.n,
            "n_holdout": args.n_holdout, "seed": args.seed}
    if out.exists() and not args.force:
        try:
            load_artifact(out, "calibration", meta)
            print(f"{out} already holds this calibration set; skipping (--force to redo)")
            return
        except ArtifactMismatch:
            print(f"{out} was made with other settings; recollecting")
    device = pick_device(args.device)
    _, model = load_ldm(args, device)
    if model.is_conditional:
        n_classes = model.cond_stage_model.n_classes - 1  # all real classes; the last one is the null class
        labels = [c for c in range(n_classes) for _ in range(args.calibration_trajectories_per_class)]
        n_unconditional, what = None, f"{n_classes} classes x {args.calibration_trajectories_per_class}"
    else:
        labels, n_unconditional = None, args.calibration_trajectories_per_class
        what = f"{n_unconditional} unconditional trajectories"
    print(f"[{args.preset_used}] recording {what}, {args.steps} DDIM steps, eta {args.eta}, scale {args.scale}; "
          f"keeping {args.n} inputs + {args.n_holdout} held out ({args.distribution}), seed {args.seed}, on {device}")
    t0 = time.time()
    dist = TimestepDistribution(args.distribution)
    with model.ema_scope():
        try:
            data = collect_calibration_set(model, labels, n=args.n, steps=args.steps, eta=args.eta, scale=args.scale,
                                           distribution=dist, seed=args.seed, n_unconditional=n_unconditional,
                                           batch_size=args.batch_size, n_holdout=args.n_holdout)
        except ValueError as e:
            raise UserFacingError(f"{e}; raise --calibration_trajectories_per_class or lower --n") from None
    meta["timesteps"] = DDIMSchedule.make(model.alphas_cumprod, args.steps, args.eta).timesteps.tolist()
    save_artifact(out, "calibration", meta, data)
    counts = torch.bincount(data["t"]).nonzero().numel()
    print(f"wrote {out}: {len(data['t'])} inputs over {counts} timesteps ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    run_cli(main)
