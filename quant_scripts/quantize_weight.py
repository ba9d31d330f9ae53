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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli  # noqa: E402
from pipeline.cli import add_quant_args  # noqa: E402
from pipeline.steps import quantize_weights  # noqa: E402

# ---- defaults (edit here or override with flags) ---------------------------------------------------------------
PRESET = "fashion"
W_BITS = 4
POLICY = "d2dpm"          # D²-DPM's layer policy; "all" quantizes every Conv/Linear (Q-Diffusion)
CHANNEL_WISE = False      # D²-DPM: per-tensor weight scales
WEIGHT_ITERS = None       # AdaRound iterations per unit (None: the preset's; paper 10,000)
RECON_BATCH_SIZE = 8      # D²-DPM: 8
ROUND_WEIGHT = 0.01       # λ of the rounding regulariser
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


def main(argv=None) -> None:
    cli.run_script(parse_args(argv), PRESET, quantize_weights.run)


if __name__ == "__main__":
    cli.run_cli(main)
