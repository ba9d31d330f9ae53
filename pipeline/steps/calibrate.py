"""Step 1: a calibration set of UNet inputs (x_t, t, c) along FP DDIM trajectories (``quant.calibration``)."""
from __future__ import annotations

import argparse
import time

import torch

from ldm.util import UserFacingError
from pipeline import cli
from pipeline.artifacts import is_current, save_artifact
from pipeline.quantize import CALIBRATION_KIND
from pipeline.sampling import ddim_timesteps
from quant.calibration import TimestepDistribution, collect_calibration_set


def run(args: argparse.Namespace) -> None:
    if args.calibration_trajectories_per_class is None:
        args.calibration_trajectories_per_class = 1
    if args.n < 1 or args.calibration_trajectories_per_class < 1 or args.n_holdout < 0:
        raise UserFacingError("--n and --calibration_trajectories_per_class must be >= 1, --n_holdout >= 0")
    settings = cli.check_sampling_args(args)
    if getattr(args, "cali_st", None) is not None and not 1 <= args.cali_st <= settings.steps:
        raise UserFacingError(f"--cali_st {args.cali_st} must be between 1 and --steps {settings.steps}")
    meta = {**cli.model_meta(args), "distribution": args.distribution, "n": args.n, "n_holdout": args.n_holdout,
            "seed": args.seed, "trajectories_per_condition": args.calibration_trajectories_per_class,
            "batch_size": args.batch_size, **cli.model_family(args)[1].run_meta()}  # a text model: its prompts
    meta["cali_st"] = getattr(args, "cali_st", None)   # (a set recorded before the flag reads as None: it matches)
    classes = getattr(args, "calibration_classes", None)
    # None = every class (a set recorded before this key existed reads as None too, and still matches)
    meta["classes"] = None if classes is None else sorted(set(classes))
    cli.model_family(args)  # a config of no known family stops here, before anything is written
    out = cli.layout(args).calibration
    if is_current(out, CALIBRATION_KIND, meta, args.force, "this calibration set"):
        return
    cli.ensure_writable_dir(out.parent)
    device = cli.pick_device(args.device)
    family, model = cli.load_model(args, device)
    conditions = family.conditions(model, args.calibration_trajectories_per_class)
    if classes is not None:
        if conditions is None:
            raise UserFacingError("--calibration_classes needs a class-conditional model; this one is unconditional")
        family.check_conditions(model, meta["classes"])
        conditions = [c for c in meta["classes"] for _ in range(args.calibration_trajectories_per_class)]
    n_unconditional = None if conditions is not None else args.calibration_trajectories_per_class
    what = family.describe(conditions, n_unconditional or 0, noun="trajectories")
    print(f"[{args.preset_used}] recording {what}, {settings.steps} {settings.loop} steps, eta {settings.eta}, scale "
          f"{settings.scale}; keeping {args.n} inputs + {args.n_holdout} held out ({args.distribution}), seed "
          f"{args.seed}, on {device}")
    t0 = time.time()
    scale = family.guidance_scale(settings.scale)
    with family.ema_scope(model):
        try:
            data = collect_calibration_set(
                model, conditions, n=args.n, steps=settings.steps, eta=settings.eta, scale=scale,
                distribution=TimestepDistribution(args.distribution), seed=args.seed, n_unconditional=n_unconditional,
                batch_size=args.batch_size, n_holdout=args.n_holdout, model_fn=family.model_fn(model),
                conditioner=family.conditioner(model, scale) if conditions is not None else None,
                sampler_cls=settings.sampler_cls(family.sampler_cls), cali_st=getattr(args, "cali_st", None))
        except ValueError as e:
            raise UserFacingError(f"{e}; raise --calibration_trajectories_per_class or lower --n") from None
    meta["timesteps"] = ddim_timesteps(model, settings.steps, settings.eta)
    save_artifact(out, CALIBRATION_KIND, meta, data)
    counts = torch.bincount(data["t"]).nonzero().numel()
    print(f"wrote {out}: {len(data['t'])} inputs over {counts} timesteps ({time.time() - t0:.1f} s)")
