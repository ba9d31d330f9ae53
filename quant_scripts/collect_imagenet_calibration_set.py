"""Step 1 of the pipeline: record a calibration set of UNet inputs (x_t, t, c) along FP DDIM trajectories.

    python quant_scripts/collect_imagenet_calibration_set.py                    # fashion preset
    python quant_scripts/collect_imagenet_calibration_set.py --preset cin256    # the paper: 1000 classes x 1

Every real class gets the same number of guided trajectories; both guidance branches are recorded. N_CALIBRATION
(x_t, t, c) triples are kept, spread over the DDIM grid by TIMESTEP_DISTRIBUTION. Output:
outputs/<preset>/scale{s}_eta{η}_steps{S}/calibration.pt, whose metadata the next steps check.
"""
from __future__ import annotations

import argparse


from pipeline import cli  # noqa: E402
from pipeline.steps import calibrate  # noqa: E402
from quant.calibration import TimestepDistribution  # noqa: E402

# ---- defaults (edit here or override with flags) ---------------------------------------------------------------
PRESET = "fashion"
N_CALIBRATION = calibrate.CalibrationSettings.n            # D²-DPM: 1024
N_HOLDOUT = calibrate.CalibrationSettings.n_holdout        # 128 extra inputs, drawn the same way, kept out of calibration to measure SQNR
TIMESTEP_DISTRIBUTION = calibrate.CalibrationSettings.distribution.value   # "uniform" "uniform" (the DDIM grid evenly) or "normal" (PTQ4DM: N(0.4, 0.4) over the grid)
SEED = 0
OUTDIR = "outputs"
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.script_parser(__doc__, PRESET)
    p.add_argument("--n", type=int, default=N_CALIBRATION, help="calibration samples to keep")
    p.add_argument("--n_holdout", type=int, default=N_HOLDOUT,
                   help="held-out inputs for measuring the quantized UNet's error (not used to calibrate)")
    p.add_argument("--distribution", default=TIMESTEP_DISTRIBUTION, choices=[d.value for d in TimestepDistribution])
    p.add_argument("--cali_st", type=int, default=None,
                   help="QNCD / Q-Diffusion: keep inputs of only K steps, 0, S//K, 2S//K, ... (--n spread evenly "
                        "over them); default: every step, by --distribution")
    p.add_argument("--calibration_trajectories_per_class", type=int, default=None)
    p.add_argument("--calibration_classes", type=int, nargs="+", default=None,
                   help="record trajectories of these class ids only (default: every real class, as the paper); "
                        "a quick or rehearsal run on a full-size model")
    cli.add_output_args(p, OUTDIR, SEED, force="recollect even if a matching calibration set exists")
    return p.parse_args(argv)


def settings_of(args: argparse.Namespace) -> calibrate.CalibrationSettings:
    return calibrate.CalibrationSettings(
        n=args.n, n_holdout=args.n_holdout, distribution=TimestepDistribution(args.distribution), seed=args.seed,
        trajectories_per_condition=(1 if args.calibration_trajectories_per_class is None
                                    else args.calibration_trajectories_per_class), batch_size=args.batch_size,
        classes=args.calibration_classes, cali_st=args.cali_st)


def typed(args: argparse.Namespace) -> tuple:
    """The typed objects the flags describe (the preset applied first), every flag checked; nothing loaded."""
    cli.apply_preset(args, PRESET)
    cal = settings_of(args)
    return cli.run_of(args), cal


def main(argv=None) -> None:
    calibrate.run(*typed(parse_args(argv)))


if __name__ == "__main__":
    cli.run_cli(main)
