"""Step 6 of the pipeline: PNG grids from the quantized LDM, uncorrected or with a noise correction.

    python quant_scripts/sample_quantized_ldm_imagenet.py                          # fashion, W4A8, D-D² channel-wise
    python quant_scripts/sample_quantized_ldm_imagenet.py --sampler ptqd
    python quant_scripts/sample_quantized_ldm_imagenet.py --compare                # rows FP | none | PTQD | D²
    python quant_scripts/sample_quantized_ldm_imagenet.py --preset cin256          # the paper: 20 steps, η 0, scale 3

D²-DPM's sample_quantized_ldm_imagenet.py (spec d2dpm.md §3.6): the W{b}A{b} QuantModel of step 3 replaces the UNet
and the sampler named by SAMPLER / --sampler corrects its noise with the fits of step 5 (``pipeline.sampler_spec``:
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


from pipeline import cli  # noqa: E402
from pipeline.steps import sample_grid  # noqa: E402

# ---- defaults (edit here or override with flags; model paths and sampling settings live in the preset) -------
PRESET = "fashion"
W_BITS = 4
A_BITS = 8
SAMPLER = "dd2-channel"                           # the seed's default; any name of pipeline.sampler_spec
N_SAMPLES = 16                                    # unconditional models only
SEED = 42
OUTDIR = "outputs"
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.script_parser(__doc__, PRESET)
    cli.add_sampler_args(p, SAMPLER, W_BITS, A_BITS)
    cli.add_execution_args(p)
    cli.add_precision_args(p)
    p.add_argument("--compare", action="store_true",
                   help="one grid, a row per sampler: FP | uncorrected | PTQD | --sampler (D-D² channel if "
                        "--sampler is one of those)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids, one grid row each (default: the preset's; all classes of a custom model)")
    p.add_argument("--n_samples_per_class", type=int, default=None, help="default: the preset's (1 with --compare)")
    p.add_argument("--n_samples", type=int, default=N_SAMPLES, help="number of samples for unconditional models")
    cli.add_output_args(p, OUTDIR, SEED, force=None)
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def typed(args: argparse.Namespace) -> tuple:
    """The typed objects the flags describe (the preset applied first), every flag checked; nothing loaded."""
    if args.compare and args.n_samples_per_class is None:   # --compare: one sample per class unless told otherwise
        args.n_samples_per_class = 1
    cli.apply_preset(args, PRESET)
    run = cli.run_of(args)
    grid = cli.grid_of(args)
    tag = cli.tag_of(args)
    return run, grid, cli.sampler_of(args, run.sampling.steps, compare=args.compare), tag, args.compare


def main(argv=None) -> None:
    sample_grid.quantized_grid(*typed(parse_args(argv)))


if __name__ == "__main__":
    cli.run_cli(main)
