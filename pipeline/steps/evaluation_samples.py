"""Step 7: class-balanced evaluation samples from any sampler spec, sharded and resumable (one process or torchrun
ranks give the same file), merged into samples.npz (``evaluation.generation`` holds the plan, shards and merge)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from evaluation.generation import (LABEL_RULE, DistContext, PeerFailed, Plan, assign, env_rank, init_distributed,
                                   merge_shards, pending_batches, prepare_dir, rank_device, shard_path, write_shard)
from ldm.precision import Precision
from ldm.util import UserFacingError
from pipeline import cli
from pipeline.generate import sample_batch
from pipeline.layout import FP32
from pipeline.packed import Execution
from pipeline.sampling import build_variant
from pipeline.steps.sample_grid import in_precision


def check_args(args: argparse.Namespace) -> None:
    cli.check_sampling_args(args)
    cli.check_bits(args)
    if args.eval_samples is None:
        raise UserFacingError("the preset has no eval_samples; pass --n_samples")
    cli.check_positive(args, "eval_samples", "decode_batch_size", flag={"eval_samples": "n_samples"})
    if args.seed < 0:
        raise UserFacingError(f"--seed must be >= 0, got {args.seed}")
    cli.resolve_sampler(args)
    cli.check_execution_args(args)


def plan_of(args: argparse.Namespace) -> tuple[Plan, tuple[int, ...] | None]:
    """Every flag checked and the plan made, from the yaml alone (no model, nothing written)."""
    check_args(args)
    config, family = cli.model_family(args)
    classes = getattr(args, "eval_classes", None)
    if classes is not None:
        classes = tuple(dict.fromkeys(classes))  # (order kept, duplicates dropped)
        n_model = family.num_classes(config)
        if n_model is None:
            raise UserFacingError("--classes needs a class-conditional model; this one is unconditional")
        bad = [c for c in classes if not 0 <= c < n_model]
        if bad:
            raise UserFacingError(f"--classes {bad} out of range for a model with {n_model} classes "
                                  f"(0..{n_model - 1})")
    plan = Plan(args.eval_samples, args.batch_size, args.seed,
                family.num_classes(config) if classes is None else len(classes), classes)
    return plan, classes


def preflight(args: argparse.Namespace, preset: str) -> None:
    """What a script that runs step 7 after other work checks first: the preset, every flag, the plan and the
    checkpoint, silently (``--dry_run`` without its line)."""
    cli.apply_preset(args, preset)
    plan_of(args)
    cli.model_meta(args)


def generate(args: argparse.Namespace) -> None:
    plan, classes = plan_of(args)
    expect = cli.model_meta(args)
    layout = cli.layout(args)
    tag = cli.quant_tag(args) if args.spec.quantized else FP32
    if args.dry_run:
        return dry_run(args, plan, layout.eval_samples(tag, args.sampler, plan.n, plan.seed, classes,
                                                       args.variant_suffix))
    sdir = cli.ensure_writable_dir(layout.eval_samples(tag, args.sampler, plan.n, plan.seed, classes,
                                                       args.variant_suffix))
    device = rank_device(cli.pick_device(args.device))
    family, model = cli.load_model(args, device)
    model_fn, correction_for, artifacts = family.model_fn(model), None, {}
    if args.spec.quantized:
        variant = build_variant(args.spec, family, model, layout, tag, expect,
                                Path(args.packed) if args.packed else None, args.execution_mode)
        variant.check_sampling(args.settings)
        model_fn, correction_for, artifacts = variant.model_fn, variant.correction_for, variant.fingerprints()
    settings = {**expect, "sampler": args.sampler, "bits": str(tag), "artifacts": artifacts,
                **({"execution": args.execution} if args.execution_mode is not Execution.FAKE else {}),
                **({"precision": args.precision.value} if args.precision is not Precision.FP32 else {}), "n": plan.n,
                "seed": plan.seed, "batch_size": plan.batch_size, "classes": plan.num_classes,
                **({"class_ids": list(classes)} if classes else {}),
                "labels": LABEL_RULE, "device": device.type, "ema": bool(getattr(model, "use_ema", False)),
                **family.run_meta()}   # a text model: the prompt list its labels index
    ctx = init_distributed(device)
    try:
        run(ctx, args, family, model, plan, sdir, settings, model_fn, correction_for)
    finally:
        ctx.close()


def dry_run(args: argparse.Namespace, plan: Plan, sdir: Path) -> None:
    """The plan alone: what would be made, where, and how much is already there; no model is loaded and nothing is
    written. Memory does not grow with N (the shard count is read from the folder, not from a list of batches)."""
    done = sum(1 for _ in shard_path(sdir, 0).parent.glob("batch_*.npz")) if sdir.is_dir() else 0
    per_class = f", {plan.n // plan.num_classes:,} per class" if plan.num_classes else ", unconditional"
    print(f"[{args.preset_used}] dry run, {args.sampler}: {plan.n:,} samples{per_class}; {plan.num_batches:,} "
          f"batches of {plan.batch_size}, {done:,} shard(s) already in {sdir}; {args.steps} {args.settings.loop} "
          f"steps, eta {args.eta:g}, scale {args.scale:g}, base seed {plan.seed}; nothing written (drop --dry_run to "
          f"make them)")


def run(ctx: DistContext, args, family, model, plan: Plan, sdir: Path, settings: dict, model_fn,
        correction_for) -> None:
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
              f"{plan.batch_size}, {len(pending)} to make on {ctx.world} process(es); {args.steps} "
              f"{args.settings.loop} steps, eta {args.eta:g}, scale {args.scale:g}, seed {plan.seed}, on "
              f"{model.betas.device}{in_precision(args)}")
    with family.ema_scope(model):
        for b in tqdm(mine, desc="batches (rank 0)" if ctx.active else "batches", disable=not ctx.main):
            batch = plan.batch(b)
            images = sample_batch(family, model, batch, args.settings, model_fn=model_fn,
                                  correction_for=correction_for, decode_batch_size=args.decode_batch_size,
                                  precision=args.precision)
            write_shard(shard_path(sdir, b), images, batch.labels, batch.indices)
    ctx.barrier()
    if not ctx.main:
        return
    if pending or not out.exists():
        merge_shards(sdir, plan, out)
        print(f"wrote {out} ({plan.n} images; {len(pending)} batches made in {time.time() - t0:.1f} s)")
    else:
        print(f"{out} is complete; nothing to do")


def main(args: argparse.Namespace, preset: str) -> None:
    """The preset, then ``generate``, with the torchrun error protocol: rank 0 reports, the other ranks exit
    quietly."""
    try:
        cli.apply_preset(args, preset)
        generate(args)
    except PeerFailed:
        sys.exit(2)            # rank 0 printed the reason
    except UserFacingError:
        if env_rank() != 0:    # every rank checks the same inputs; rank 0 says it once
            sys.exit(2)
        raise
