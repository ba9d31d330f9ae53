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
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tqdm.auto import tqdm  # noqa: E402

from evaluation.generation import (LABEL_RULE, DistContext, PeerFailed, Plan, assign, env_rank,  # noqa: E402
                                   init_distributed, merge_shards, pending_batches, prepare_dir, rank_device,
                                   sample_batch, sample_dir, shard_path, write_shard)
from ldm.util import UserFacingError, load_config  # noqa: E402
from quant_scripts.common import (add_model_args, add_probe_args, add_sampling_args, apply_preset,  # noqa: E402
                                  check_sampling_args, ensure_writable_dir, load_ldm, model_meta, pick_device,
                                  resolve, resolve_sampler, run_cli, run_dir)

# ---- defaults (edit here or override with flags; N and the batch size come from the preset) --------------------
PRESET = "fashion"
SAMPLER = "fp32"         # fp32, none, ptqd, sd2-/dd2-tensor|channel, qncd[-rR][+base] (correction.variants)
W_BITS = 4
A_BITS = 8
SEED = 0
OUTDIR = "outputs"
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, PRESET)
    add_sampling_args(p)
    p.add_argument("--sampler", default=SAMPLER, help="fp32 or a quantized variant: none, ptqd, sd2-tensor, "
                                                      "dd2-tensor, sd2-channel, dd2-channel, qncd, qncd[-rR]+<base>")
    add_probe_args(p)
    p.add_argument("--w_bits", type=int, default=W_BITS, choices=(4, 8), help="weight bits (quantized samplers)")
    p.add_argument("--a_bits", type=int, default=A_BITS, choices=(6, 8), help="activation bits (quantized samplers)")
    p.add_argument("--n_samples", dest="eval_samples", type=int, default=None,
                   help="number of samples N, a multiple of the class count (default: the preset's eval_samples)")
    p.add_argument("--seed", type=int, default=SEED, help="base seed; batch b's seeds derive from it and b")
    p.add_argument("--decode_batch_size", type=int, default=None, help="first-stage decode batch (default: "
                                                                       "the whole batch)")
    p.add_argument("--outdir", default=OUTDIR)
    p.add_argument("--force", action="store_true", help="discard shards made with other settings")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_sampling_args(args)
    if args.eval_samples is None:
        raise UserFacingError("the preset has no eval_samples; pass --n_samples")
    for name, flag in (("eval_samples", "n_samples"), ("decode_batch_size", "decode_batch_size")):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserFacingError(f"--{flag} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        raise UserFacingError(f"--seed must be >= 0, got {args.seed}")
    resolve_sampler(args)


def config_classes(args: argparse.Namespace) -> int | None:
    """Real classes of a class-conditional config (the ClassEmbedder's, minus the null class), None when
    unconditional: read from the yaml, so a bad N fails before the checkpoint is loaded."""
    params = load_config(resolve(args.config)).model.get("params", {})
    cond = params.get("cond_stage_config")
    if cond is None or cond == "__is_unconditional__":
        return None
    target = cond.get("target") if hasattr(cond, "get") else cond
    n_classes = cond.get("params", {}).get("n_classes") if hasattr(cond, "get") else None
    if not str(target).endswith("ClassEmbedder") or n_classes is None:
        raise UserFacingError(f"config {args.config}: evaluation samples need a class-conditional (ClassEmbedder) "
                              f"or unconditional model, not {target}")
    return n_classes - 1


def generate(argv=None) -> None:
    args = parse_args(argv)
    apply_preset(args, PRESET)
    check_args(args)
    plan = Plan(args.eval_samples, args.batch_size, args.seed, config_classes(args))
    expect = model_meta(args)
    rdir = run_dir(args)
    tag = "fp32" if args.sampler == "fp32" else f"w{args.w_bits}a{args.a_bits}"
    sdir = ensure_writable_dir(sample_dir(rdir, tag, args.sampler, plan.n, plan.seed))
    device = rank_device(pick_device(args.device))
    _, model = load_ldm(args, device)
    if args.steps > model.num_timesteps:
        raise UserFacingError(f"--steps {args.steps} exceeds the model's {model.num_timesteps} timesteps")
    model_fn = correction_for = None
    artifacts = {}
    if args.sampler != "fp32":
        from correction.variants import build_variant
        variant = build_variant(args.sampler, model, rdir, w_bits=args.w_bits, a_bits=args.a_bits, expect=expect)
        variant.check_sampling(steps=args.steps, eta=args.eta, scale=args.scale)
        model_fn, correction_for, artifacts = variant.model_fn, variant.correction_for, variant.fingerprints()
    settings = {**expect, "sampler": args.sampler, "bits": tag, "artifacts": artifacts, "n": plan.n,
                "seed": plan.seed, "batch_size": plan.batch_size, "classes": plan.num_classes,
                "labels": LABEL_RULE, "device": device.type, "ema": bool(model.use_ema)}

    ctx = init_distributed(device)
    try:
        run(ctx, args, model, plan, sdir, settings, model_fn, correction_for)
    finally:
        ctx.close()


def run(ctx: DistContext, args, model, plan: Plan, sdir: Path, settings: dict, model_fn, correction_for) -> None:
    def prepare() -> list[int]:
        prepare_dir(sdir, settings, force=args.force)
        return pending_batches(sdir, plan)

    t0 = time.time()
    pending = ctx.on_main(prepare)
    mine = assign(pending, ctx.rank, ctx.world)
    out = sdir / "samples.npz"
    if ctx.main:
        what = f"{plan.n} samples" + (f", {plan.n // plan.num_classes} per class" if plan.num_classes else "")
        print(f"[{args.preset_used}] {args.sampler} ({settings['bits']}): {what}; {plan.num_batches} batches of "
              f"{plan.batch_size}, {len(pending)} to make on {ctx.world} process(es); {args.steps} DDIM steps, "
              f"eta {args.eta:g}, scale {args.scale:g}, seed {plan.seed}, on {model.betas.device}")
    ema = model.ema_scope() if model.use_ema else contextlib.nullcontext()
    with ema:
        for b in tqdm(mine, desc="batches (rank 0)" if ctx.active else "batches", disable=not ctx.main):
            batch = plan.batch(b)
            images = sample_batch(model, batch, steps=args.steps, eta=args.eta, scale=args.scale,
                                  model_fn=model_fn, correction_for=correction_for,
                                  decode_batch_size=args.decode_batch_size)
            write_shard(shard_path(sdir, b), images, batch.labels, batch.indices)
    ctx.barrier()
    if not ctx.main:
        return
    if pending or not out.exists():
        merge_shards(sdir, plan, out)
        print(f"wrote {out} ({plan.n} images; {len(pending)} batches made in {time.time() - t0:.1f} s)")
    else:
        print(f"{out} is complete; nothing to do")


def main(argv=None) -> None:
    try:
        generate(argv)
    except PeerFailed:
        sys.exit(2)            # rank 0 printed the reason
    except UserFacingError:
        if env_rank() != 0:    # every rank checks the same inputs; rank 0 says it once
            sys.exit(2)
        raise


if __name__ == "__main__":
    run_cli(main)
