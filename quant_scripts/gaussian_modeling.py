"""Step 5 of the pipeline: fit the joint Gaussian of (ε̂, Δ) per timestep, tensor-wise and channel-wise, and PTQD's
noise model, from step 4's noise_stats.pt.

    python quant_scripts/gaussian_modeling.py                      # fashion preset, W4A8
    python quant_scripts/gaussian_modeling.py --preset cin256      # the paper's model
    python quant_scripts/gaussian_modeling.py --outlier_k 3        # needs step 4 run with --keep_spill

D²-DPM §"Joint Gaussian modeling", Eqs. 7-10 (the seed's gaussian_modeling.py, spec d2dpm.md §3.5): per DDIM
timestep, drop the elements with |Δ − mean Δ| > 4·std Δ (thresholds over all elements tensor-wise, per channel
channel-wise), then the mean and sample covariance of (ε̂, Δ); ρ is clamped to ±0.9999. PTQD (§4; spec
qncd_ptqd.md B.2) regresses Δ on ε_fp over the unfiltered elements: k_t, per-channel bias, residual σ.

Writes .../w{b}a{b}/gaussian_tensor.pt, gaussian_channel.pt (kind "gaussian"), ptqd.pt (kind "ptqd"), each meta
carrying the model, sampler settings, DDIM timesteps, bits and the fingerprints of the quantized model and the
statistics, and noise_stats.png (μ_Δ, σ_Δ, ρ against t; tensor-wise in black, one line per channel: the paper's
Fig. 2). Prints a per-timestep table.
"""
from __future__ import annotations

import argparse


from pipeline import cli  # noqa: E402
from pipeline.basics import check_at_least  # noqa: E402
from pipeline.cli import add_bits_args  # noqa: E402
from pipeline.steps import fit_noise  # noqa: E402

# ---- defaults (edit here or override with flags) ---------------------------------------------------------------
PRESET = "fashion"
W_BITS = 4
A_BITS = 8
OUTLIER_K = None        # None: the filter step 4 applied (D²-DPM: 4σ); another k needs step 4's --keep_spill
OUTDIR = "outputs"
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.script_parser(__doc__, PRESET)
    add_bits_args(p, W_BITS, A_BITS)
    p.add_argument("--outlier_k", type=float, default=OUTLIER_K,
                   help="k of the k·σ filter (default: step 4's); 0 = fit without the filter")
    cli.add_output_args(p, OUTDIR, force="refit even if matching fits exist")
    return p.parse_args(argv)


def typed(args: argparse.Namespace) -> tuple:
    """The typed objects the flags describe (the preset applied first), every flag checked; nothing loaded."""
    cli.apply_preset(args, PRESET)
    run = cli.run_of(args)
    check_at_least("outlier_k", args.outlier_k, minimum=0)
    return run, cli.tag_of(args), args.outlier_k


def main(argv=None) -> None:
    fit_noise.run(*typed(parse_args(argv)))


if __name__ == "__main__":
    cli.run_cli(main)
