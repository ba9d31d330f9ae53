"""Step 3 of the pipeline: activation quantization (A8 or A6) on top of step 2's weights, step sizes learned LSQ-style.

    python quant_scripts/quantize_weight_activation.py                      # fashion preset, W4A8
    python quant_scripts/quantize_weight_activation.py --w_bits 8 --a_bits 8
    python quant_scripts/quantize_weight_activation.py --preset cin256      # the paper: 5k iterations, batch 16

Reads .../w{b}/quant_w{b}.pt (step 2) and calibration.pt (step 1); writes .../w{b}a{b}/quant_w{b}a{b}.pt, the
artifact every later step loads. Each layer's input is quantized with one per-tensor asymmetric range shared by all
timesteps and both guidance branches: initialised by the L2.4 clipping search over ACT_INIT_SAMPLES calibration
inputs (weights quantized), then the step sizes Δ_a are trained unit by unit (Adam 4e-4, cosine decay, L2.4 loss, FP
unit inputs, or with --act_inputs quantized the quantized prefix's). Resumable after every unit like step 2.
"""
from __future__ import annotations

import argparse


from pipeline import cli  # noqa: E402
from pipeline.cli import add_quant_args  # noqa: E402
from pipeline.steps import quantize_activations  # noqa: E402
from quant.api import QuantConfig  # noqa: E402

# ---- defaults (edit here or override with flags) ---------------------------------------------------------------
PRESET = "fashion"
W_BITS = 4
A_BITS = 8
SM_ABIT = None            # attention-matmul quantization (Q-Diffusion --sm_abit); None: off, as in D²-DPM
POLICY = QuantConfig.policy   # "d2dpm"
CHANNEL_WISE = False
ACT_ITERS = None          # step-size iterations per unit (None: the preset's; paper 5,000)
ACT_INIT_SAMPLES = None   # calibration inputs for the initial ranges (None: the preset's; paper 32)
RECON_BATCH_SIZE = quantize_activations.ActivationSettings.batch_size   # D²-DPM: 16
LR = quantize_activations.ActivationSettings.lr   # 4e-4
P_NORM = quantize_activations.ActivationSettings.p   # 2.4
ACT_INPUTS = "fp"         # each unit's inputs during step learning: "fp" (D²-DPM) or "quantized" (the quantized
                          # prefix, weights and activations on: Q-Diffusion / BRECQ's asymmetric reconstruction)
SEED = 0
RUNNING_STAT = None       # Q-Diffusion/QNCD --running_stat: None (off), "all" or "softmax" (--rs_sm_only)
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.script_parser(__doc__, PRESET)
    add_quant_args(p, W_BITS, POLICY, CHANNEL_WISE)
    p.add_argument("--a_bits", type=int, default=A_BITS, choices=cli.A_BITS, help="activation bits")
    p.add_argument("--sm_abit", type=int, default=SM_ABIT,
                   help="also quantize the attention matmuls: q, k, v at --a_bits and the softmax output at this many "
                        "bits (Q-Diffusion; 16 for SD). Default: attention matmuls stay FP (D²-DPM)")
    p.add_argument("--act_iters", type=int, default=ACT_ITERS,
                   help="step-size iterations per unit; 0 skips step learning (QNCD's released flow: initial "
                        "ranges, then --running_stat)")
    p.add_argument("--running_stat", action="store_const", const="all", default=RUNNING_STAT,
                   help="after step learning, EMA (momentum 0.95) activation ranges over the whole calibration set, "
                        "streamed through the quantized model in shuffled chunks of 64 (Q-Diffusion / QNCD)")
    p.add_argument("--rs_sm_only", dest="running_stat", action="store_const", const="softmax",
                   help="--running_stat for the attention-softmax quantizers only (needs --sm_abit)")
    p.add_argument("--rs_batch_size", type=int, default=quantize_activations.RS_BATCH,
                   help="batch of the --running_stat EMA pass (Q-Diffusion / QNCD LDM: 64; QNCD SD: 1)")
    p.add_argument("--act_init_samples", type=int, default=ACT_INIT_SAMPLES)
    p.add_argument("--recon_batch_size", type=int, default=RECON_BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--p", type=float, default=P_NORM, help="L_p exponent of the reconstruction loss")
    p.add_argument("--act_inputs", choices=("fp", "quantized"), default=ACT_INPUTS,
                   help="where each unit's inputs come from while its step sizes are learned: the FP model (D²-DPM) "
                        "or the quantized prefix, so a unit learns to undo the error before it (BRECQ, Q-Diffusion)")
    p.add_argument("--seed", type=int, default=SEED)
    return p.parse_args(argv)


def typed(args: argparse.Namespace) -> tuple:
    """The typed objects the flags describe (the preset applied first), every flag checked; nothing loaded."""
    cli.apply_preset(args, PRESET)
    run = cli.run_of(args)
    config = cli.quant_of(args, run)
    acts = quantize_activations.ActivationSettings(
        args.act_iters, args.act_init_samples, args.recon_batch_size, args.lr, args.p, args.seed, args.act_inputs,
        args.running_stat, args.rs_batch_size, cli.cache_of(args))
    return run, config, acts


def main(argv=None) -> None:
    quantize_activations.run(*typed(parse_args(argv)))


if __name__ == "__main__":
    cli.run_cli(main)
