"""Write a quantized model as a packed file: integer weight codes (4-bit two per byte, 8-bit one), Δ, z, the
activation ranges, the layers kept in FP32 and, for QNCD-smoothed models, the smoothing factors.

    python quant_scripts/export_packed.py                         # fashion, W4A8 (after steps 2-3)
    python quant_scripts/export_packed.py --w_bits 8 --a_bits 8
    python quant_scripts/export_packed.py --weights_only          # the weight-only model of step 2 (w4/quant_w4.pt)
    python quant_scripts/sample_quantized_ldm_imagenet.py --packed outputs/fashion/.../w4a8/packed_w4a8.pt \\
        --execution integer                                       # sample from the file alone, int8 kernels

Writes .../w{b}a{b}/packed_w{b}a{b}.pt (kind "packed"; its meta is the quant artifact's, plus that file's
fingerprint, so the D²/PTQD fits made on it accept the packed model, and the measured file sizes). ``--packed``
builds the UNet from the config and fills it from this file alone; the first stage and the conditioning encoder
still come from the checkpoint.
"""
from __future__ import annotations

import argparse


from pipeline import cli  # noqa: E402
from pipeline.steps import export_packed  # noqa: E402

# ---- defaults (edit here or override with flags) -----------------------------------------------------------------
PRESET = "fashion"
W_BITS = 4
A_BITS = 8
OUTDIR = "outputs"
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.script_parser(__doc__, PRESET)
    cli.add_bits_args(p, W_BITS, A_BITS)
    p.add_argument("--weights_only", action="store_true", help="pack step 2's weight-only model (w{b}/quant_w{b}.pt)")
    p.add_argument("--out", default=None, help="the packed file (default: .../w{b}a{b}/packed_w{b}a{b}.pt)")
    cli.add_output_args(p, OUTDIR, force="rewrite even if a current packed file exists")
    return p.parse_args(argv)


def typed(args: argparse.Namespace) -> tuple:
    """The typed objects the flags describe (the preset applied first), every flag checked; nothing loaded."""
    cli.apply_preset(args, PRESET)
    run = cli.run_of(args)
    return run, cli.tag_of(args, weights_only=args.weights_only), args.out


def main(argv=None) -> None:
    export_packed.run(*typed(parse_args(argv)))


if __name__ == "__main__":
    cli.run_cli(main)
