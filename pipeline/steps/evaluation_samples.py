"""Step 7: class-balanced evaluation samples from any sampler spec, sharded and resumable (one process or torchrun
ranks give the same file), merged into samples.npz (``evaluation.generation`` holds the plan, shards and merge)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from evaluation.generation import (LABEL_RULE, DistContext, GenerationError, PeerFailed, Plan, assign, env_rank, init_distributed,
                                   merge_shards, pending_batches, prepare_dir, rank_device, shard_path, write_shard)
from ldm.precision import Precision
from ldm.util import UserFacingError
from pipeline.basics import ensure_writable_dir
from pipeline.generate import sample_batch
from pipeline.layout import FP32, QuantTag
from pipeline.packed import Execution
from pipeline.run import Run, SamplerChoice
from pipeline.sampling import build_variant
from pipeline.steps.sample_grid import in_precision


@dataclass(frozen=True)
class EvalSettings:
    """Step 7's own settings: ``n`` samples (sample i has class i mod C, or ``classes[i mod K]`` for a subset) in
    batches of ``batch_size`` with seeds from ``seed`` and the batch index; ``decode_batch_size`` for the first
    stage (None: the batch); ``dry_run``: the plan only."""

    n: int
    seed: int
    batch_size: int
    classes: tuple[int, ...] | None = None
    decode_batch_size: int | None = None
    dry_run: bool = False
    flag: str = "--n_samples"   # the flag that set n, for the messages (txt2img: --eval)

    def __post_init__(self):
        if self.seed < 0:
            raise UserFacingError(f"--seed must be >= 0, got {self.seed}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(dict.fromkeys(self.classes)))  # (order kept, no duplicates)


def plan_of(run: Run, ev: EvalSettings) -> Plan:
    """The plan, from the yaml alone (no model, nothing written); a class subset checked against the model."""
    n_model = run.family.num_classes(run.model.config_yaml)   # (a text model: its prompt count)
    if ev.classes is not None:
        if n_model is None:
            raise UserFacingError("--classes needs a class-conditional model; this one is unconditional")
        bad = [c for c in ev.classes if not 0 <= c < n_model]
        if bad:
            raise UserFacingError(f"--classes {bad} out of range for a model with {n_model} classes "
                                  f"(0..{n_model - 1})")
    try:
        return Plan(ev.n, ev.batch_size, ev.seed, n_model if ev.classes is None else len(ev.classes), ev.classes)
    except GenerationError as e:
        raise GenerationError(f"{ev.flag} {ev.n}: {e}") from None


def preflight(run: Run, ev: EvalSettings) -> None:
    """What a script that runs step 7 after other work checks first: the plan, the family and the checkpoint."""
    plan_of(run, ev)
    run.meta()


def generate(run: Run, ev: EvalSettings, sampler: SamplerChoice, tag: QuantTag) -> Path | None:
    """Make (or finish) the samples of ``sampler`` (``tag``: the quantized model's bits; ignored for FP32); returns
    the folder (None for a dry run)."""
    plan = plan_of(run, ev)
    expect = run.meta()
    layout = run.layout
    tag = tag if sampler.spec.quantized else FP32
    where = layout.eval_samples(tag, sampler.name, plan.n, plan.seed, ev.classes, sampler.suffix)
    if ev.dry_run:
        return dry_run(run, sampler, plan, where)
    sdir = ensure_writable_dir(where)
    device = rank_device(run.torch_device())
    family, model = run.load(device, without_unet=sampler.packed is not None)
    model_fn, correction_for, artifacts = family.model_fn(model), None, {}
    if sampler.spec.quantized:
        variant = build_variant(sampler.spec, family, model, layout, tag, expect, sampler.packed, sampler.execution)
        variant.check_sampling(run.sampling)
        model_fn, correction_for, artifacts = variant.model_fn, variant.correction_for, variant.fingerprints()
    settings = {**expect, "sampler": sampler.name, "bits": str(tag), "artifacts": artifacts,
                **({"execution": sampler.execution.value} if sampler.execution is not Execution.FAKE else {}),
                **({"precision": sampler.precision.value} if sampler.precision is not Precision.FP32 else {}),
                "n": plan.n, "seed": plan.seed, "batch_size": plan.batch_size, "classes": plan.num_classes,
                **({"class_ids": list(ev.classes)} if ev.classes else {}),
                "labels": LABEL_RULE, "device": device.type, "ema": bool(getattr(model, "use_ema", False)),
                **family.run_meta()}   # a text model: the prompt list its labels index
    ctx = init_distributed(device)
    try:
        make(ctx, run, ev, sampler, family, model, plan, sdir, settings, model_fn, correction_for)
    finally:
        ctx.close()
    return sdir


def dry_run(run: Run, sampler: SamplerChoice, plan: Plan, sdir: Path) -> None:
    """The plan alone: what would be made, where, and how much is already there; no model is loaded and nothing is
    written. Memory does not grow with N (the shard count is read from the folder, not from a list of batches)."""
    s = run.sampling
    done = sum(1 for _ in shard_path(sdir, 0).parent.glob("batch_*.npz")) if sdir.is_dir() else 0
    per_class = f", {plan.n // plan.num_classes:,} per class" if plan.num_classes else ", unconditional"
    print(f"[{run.preset}] dry run, {sampler.name}: {plan.n:,} samples{per_class}; {plan.num_batches:,} "
          f"batches of {plan.batch_size}, {done:,} shard(s) already in {sdir}; {s.steps} {s.loop} "
          f"steps, eta {s.eta:g}, scale {s.scale:g}, base seed {plan.seed}; nothing written (drop --dry_run to "
          f"make them)")


def make(ctx: DistContext, run: Run, ev: EvalSettings, sampler: SamplerChoice, family, model, plan: Plan,
         sdir: Path, settings: dict, model_fn, correction_for) -> None:
    def prepare() -> list[int]:
        prepare_dir(sdir, settings, force=run.force)
        return pending_batches(sdir, plan)

    s = run.sampling
    t0 = time.time()
    pending = ctx.on_main(prepare)
    mine = assign(pending, ctx.rank, ctx.world)
    out = sdir / "samples.npz"
    if ctx.main:
        what = f"{plan.n} samples" + (f", {plan.n // plan.num_classes} per class" if plan.num_classes else "")
        print(f"[{run.preset}] {sampler.name} ({settings['bits']}): {what}; {plan.num_batches} batches of "
              f"{plan.batch_size}, {len(pending)} to make on {ctx.world} process(es); {s.steps} "
              f"{s.loop} steps, eta {s.eta:g}, scale {s.scale:g}, seed {plan.seed}, on "
              f"{model.betas.device}{in_precision(sampler.precision)}")
    with family.ema_scope(model):
        for b in tqdm(mine, desc="batches (rank 0)" if ctx.active else "batches", disable=not ctx.main):
            batch = plan.batch(b)
            images = sample_batch(family, model, batch, s, model_fn=model_fn,
                                  correction_for=correction_for, decode_batch_size=ev.decode_batch_size,
                                  precision=sampler.precision)
            write_shard(shard_path(sdir, b), images, batch.labels, batch.indices)
    ctx.barrier()
    if not ctx.main:
        return
    if pending or not out.exists():
        merge_shards(sdir, plan, out)
        print(f"wrote {out} ({plan.n} images; {len(pending)} batches made in {time.time() - t0:.1f} s)")
    else:
        print(f"{out} is complete; nothing to do")


def torchrun_protocol(work: Callable[[], object]) -> None:
    """``work()`` under torchrun's error protocol: rank 0 reports, the other ranks exit quietly."""
    try:
        work()
    except PeerFailed:
        sys.exit(2)            # rank 0 printed the reason
    except UserFacingError:
        if env_rank() != 0:    # every rank checks the same inputs; rank 0 says it once
            sys.exit(2)
        raise
