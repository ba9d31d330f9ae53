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


from pipeline import cli  # noqa: E402
from pipeline.steps import sample_grid  # noqa: E402

# ---- defaults (edit here or override with flags; model paths and sampling settings live in the preset) -------
PRESET = "fashion"
N_SAMPLES = 16                  # unconditional models only
SEED = 42
OUTDIR = "outputs/fp32_samples"
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.script_parser(__doc__, PRESET)
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids, one grid row each (default: the preset's; all classes of a custom model)")
    p.add_argument("--n_samples_per_class", type=int, default=None)
    p.add_argument("--n_samples", type=int, default=N_SAMPLES, help="number of samples for unconditional models")
    p.add_argument("--uncond_class", type=int, default=None,
                   help="unconditional label for guidance (default: the model's null class, 1000 for cin256-v2)")
    p.add_argument("--no_ema", action="store_true", help="use the live weights of a model trained with EMA")
    cli.add_precision_args(p)
    cli.add_output_args(p, OUTDIR, SEED, force=None)
    return p.parse_args(argv)


def typed(args: argparse.Namespace) -> tuple:
    """The typed objects the flags describe (the preset applied first), every flag checked; nothing loaded."""
    cli.apply_preset(args, PRESET)
    run = cli.run_of(args)
    return run, cli.grid_of(args), cli.check_precision_args(args)


def main(argv=None) -> None:
    sample_grid.fp32_grid(*typed(parse_args(argv)))


if __name__ == "__main__":
    cli.run_cli(main)
