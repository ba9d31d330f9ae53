"""Step 4 of the pipeline: timestep-aware statistics of the quantization noise Δ = ε̂ − ε_fp along FP trajectories.

    python quant_scripts/collect_timestep_aware_statistics.py                  # fashion preset, W4A8
    python quant_scripts/collect_timestep_aware_statistics.py --preset cin256  # the paper: 1024 samples x 20 steps
    python quant_scripts/collect_timestep_aware_statistics.py --w_bits 8 --a_bits 8

D²-DPM Algorithm 1 lines 1-8 (the seed's DDIMSampler_collectQuantError, spec d2dpm.md §3.4): the FP model and the
quantized W{b}A{b} model (step 3's quant_w{b}a{b}.pt) see the same x_t at every DDIM step, both with classifier-free
guidance; x_t advances with the FP ε. Labels are class-balanced (every real class N/K times, in a seeded order);
each batch draws x_T and its noise from its own seed, so the result does not depend on interruptions.

The per-timestep, per-channel moments of (ε̂, Δ, ε_fp) stream into a NoiseStatistics accumulator; the values
themselves go to a float32 spill folder (w{b}a{b}/noise_stats_spill/) for the 4σ outlier filter, which is applied
once at the end. Every SAVE_EVERY batches the accumulator is saved atomically to noise_stats.partial.pt; a rerun
with the same settings resumes there. Output: .../w{b}a{b}/noise_stats.pt (kind "noise_stats": the raw moments and
the moments after the OUTLIER_K·σ filter, tensor- and channel-wise thresholds); the spill folder is then removed
unless --keep_spill (keep it to refit later with another --outlier_k).
"""
from __future__ import annotations

import argparse


from ldm.util import UserFacingError  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.cli import add_bits_args  # noqa: E402
from pipeline.steps import noise_statistics  # noqa: E402

# ---- defaults (edit here or override with flags) ---------------------------------------------------------------
PRESET = "fashion"
W_BITS = 4
A_BITS = 8
N_SAMPLES = None        # trajectories (None: the preset's stats_samples; D²-DPM: 1024)
OUTLIER_K = noise_statistics.StatisticsSettings.outlier_k   # 4.0: the fit's |Δ − mean Δ| ≤ k·std Δ filter (D²-DPM: 4); 0 = no filter, no spill
SAVE_EVERY = noise_statistics.StatisticsSettings.save_every   # batches between resume checkpoints (4)
SEED = 0
OUTDIR = "outputs"
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.script_parser(__doc__, PRESET)
    add_bits_args(p, W_BITS, A_BITS)
    p.add_argument("--n", dest="stats_samples", type=int, default=N_SAMPLES,
                   help="trajectories (default: the preset's stats_samples)")
    p.add_argument("--outlier_k", type=float, default=OUTLIER_K, help="k of the k·σ outlier filter; 0 = none")
    p.add_argument("--save_every", type=int, default=SAVE_EVERY, help="batches between resume checkpoints")
    p.add_argument("--keep_spill", action="store_true", help="keep the spilled values (refits with another k)")
    cli.add_output_args(p, OUTDIR, SEED, force="recollect even if matching statistics exist")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def typed(args: argparse.Namespace) -> tuple:
    """The typed objects the flags describe (the preset applied first), every flag checked; nothing loaded."""
    cli.apply_preset(args, PRESET)
    run = cli.run_of(args)
    tag = cli.tag_of(args)
    if args.stats_samples is None:
        raise UserFacingError("no sample count: pass --n or add stats_samples to the preset")
    st = noise_statistics.StatisticsSettings(args.stats_samples, args.batch_size, args.seed, args.outlier_k,
                                             args.save_every, args.keep_spill, progress=not args.no_progress)
    return run, st, tag


def main(argv=None) -> None:
    noise_statistics.run(*typed(parse_args(argv)))


if __name__ == "__main__":
    cli.run_cli(main)
