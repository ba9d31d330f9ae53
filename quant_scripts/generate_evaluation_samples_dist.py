"""Step 7 of the pipeline: class-balanced evaluation samples from any sampler, sharded and resumable, into samples.npz.

    python quant_scripts/generate_evaluation_samples_dist.py                          # fashion, FP32, 1,000 samples
    torchrun --nproc_per_node 2 quant_scripts/generate_evaluation_samples_dist.py     # the same file, 2 processes
    torchrun --nproc_per_node 8 quant_scripts/generate_evaluation_samples_dist.py --preset cin256 \\
        --sampler dd2-channel --w_bits 4 --a_bits 8                                    # the paper: 50,000 samples

Sample i has class i mod C (N/C per class). Batch b (samples [b·B, (b+1)·B)) has its own seeds, derived from
--seed and b, so one process and any number of torchrun ranks (gloo on CPU, NCCL with one GPU per rank) give the
same images. Each batch becomes one shard; a rerun makes only the missing ones. Rank 0 then merges them into
outputs/<preset>/scale{s}_eta{η}_steps{S}/<w{b}a{b}|fp32>/samples_<sampler>_n{N}_seed{S}/samples.npz (arr_0 uint8
[N, H, W, 3], arr_1 int64 labels), the input of evaluator.py. Flags left unset take the preset's values.
"""
from __future__ import annotations

import argparse


from ldm.util import UserFacingError  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.steps import evaluation_samples  # noqa: E402

# ---- defaults (edit here or override with flags; N and the batch size come from the preset) --------------------
PRESET = "fashion"
SAMPLER = "fp32"         # fp32, none, ptqd, sd2-/dd2-tensor|channel, qncd[-rR][+base] (pipeline.sampler_spec)
W_BITS = 4
A_BITS = 8
SEED = 0
OUTDIR = "outputs"
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.script_parser(__doc__, PRESET)
    cli.add_sampler_args(p, SAMPLER, W_BITS, A_BITS)
    cli.add_execution_args(p)
    cli.add_precision_args(p)
    p.add_argument("--n_samples", dest="eval_samples", type=int, default=None,
                   help="number of samples N, a multiple of the class count (default: the preset's eval_samples)")
    p.add_argument("--seed", type=int, default=SEED, help="base seed; batch b's seeds derive from it and b")
    # (its own dest: a preset's `classes` are the grid's classes, not an evaluation subset)
    p.add_argument("--classes", dest="eval_classes", type=int, nargs="+", default=None,
                   help="sample only these class ids (sample i gets the (i mod K)-th; N a multiple of K): a quick "
                        "run of a many-class model, named in the folder; its FID is not the paper's protocol")
    p.add_argument("--dry_run", action="store_true",
                   help="check the arguments and print the plan (samples, batches, folder, shards already made); "
                        "load no model, write nothing")
    p.add_argument("--decode_batch_size", type=int, default=None, help="first-stage decode batch (default: "
                                                                       "the whole batch)")
    cli.add_output_args(p, OUTDIR, force="discard shards made with other settings")
    return p.parse_args(argv)


def typed(args: argparse.Namespace, preset: str = PRESET) -> tuple:
    """(Run, EvalSettings, SamplerChoice, QuantTag) from the flags, the preset applied first; every flag checked."""
    cli.apply_preset(args, preset)
    run = cli.run_of(args)
    cli.check_bits(args)
    if args.eval_samples is None:
        raise UserFacingError("the preset has no eval_samples; pass --n_samples")
    cli.check_positive(args, "eval_samples", "decode_batch_size", flag={"eval_samples": "n_samples"})
    ev = evaluation_samples.EvalSettings(args.eval_samples, args.seed, args.batch_size, args.eval_classes,
                                         args.decode_batch_size, args.dry_run)
    sampler = cli.sampler_of(args, run.sampling.steps)
    return run, ev, sampler, cli.quant_tag(args)


def preflight(args: argparse.Namespace, preset: str = PRESET) -> None:
    """What a script that runs step 7 after other work checks first: the preset, every flag, the plan and the
    checkpoint, silently."""
    run, ev, _, _ = typed(args, preset)
    evaluation_samples.preflight(run, ev)


def main(argv=None) -> None:
    args = parse_args(argv)
    # the preset and the checks inside the torchrun error protocol (rank 0 says it once)
    evaluation_samples.torchrun_protocol(lambda: evaluation_samples.generate(*typed(args)))


if __name__ == "__main__":
    cli.run_cli(main)
