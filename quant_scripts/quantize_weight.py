"""Step 2 of the pipeline: weight quantization by BRECQ block reconstruction with AdaRound (W4 or W8).

    python quant_scripts/quantize_weight.py                     # fashion preset, W4
    python quant_scripts/quantize_weight.py --w_bits 8
    python quant_scripts/quantize_weight.py --preset cin256     # the paper: 10k iterations per unit, batch 8

Reads outputs/<preset>/scale{s}_eta{η}_steps{S}/calibration.pt (step 1), writes .../w{b}/quant_w{b}.pt. A checkpoint
is written after every reconstruction unit (quant_w{b}.partial.pt): rerun the same command after an interruption and
it resumes at the next unit. The UNet ε SQNR on held-out calibration inputs is printed for round-to-nearest and for
AdaRound and stored in the artifact's meta.
"""
from __future__ import annotations

import argparse


from pipeline import cli  # noqa: E402
from pipeline.cli import add_quant_args  # noqa: E402
from pipeline.steps import quantize_weights  # noqa: E402
from quant.api import QuantConfig  # noqa: E402

# ---- defaults (edit here or override with flags) ---------------------------------------------------------------
PRESET = "fashion"
W_BITS = 4
POLICY = QuantConfig.policy      # "d2dpm": D²-DPM's layer policy; "all" quantizes every Conv/Linear (Q-Diffusion)
CHANNEL_WISE = False      # D²-DPM: per-tensor weight scales
WEIGHT_ITERS = None       # AdaRound iterations per unit (None: the preset's; paper 10,000)
RECON_BATCH_SIZE = quantize_weights.WeightSettings.batch_size    # D²-DPM: 8
ROUND_WEIGHT = quantize_weights.WeightSettings.round_weight     # λ of the rounding regulariser (0.01)
SEED = 0
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.script_parser(__doc__, PRESET)
    add_quant_args(p, W_BITS, POLICY, CHANNEL_WISE)
    p.add_argument("--weight_iters", type=int, default=WEIGHT_ITERS)
    p.add_argument("--recon_batch_size", type=int, default=RECON_BATCH_SIZE)
    p.add_argument("--round_weight", type=float, default=ROUND_WEIGHT)
    p.add_argument("--seed", type=int, default=SEED)
    return p.parse_args(argv)


def typed(args: argparse.Namespace) -> tuple:
    """The typed objects the flags describe (the preset applied first), every flag checked; nothing loaded."""
    cli.apply_preset(args, PRESET)
    run = cli.run_of(args)
    config = cli.quant_of(args, run)
    weights = quantize_weights.WeightSettings(args.weight_iters, args.recon_batch_size, args.round_weight, args.seed,
                                              cli.cache_of(args))
    return run, config, weights


def main(argv=None) -> None:
    quantize_weights.run(*typed(parse_args(argv)))


if __name__ == "__main__":
    cli.run_cli(main)
