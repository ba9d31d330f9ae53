"""Step 4: timestep-aware statistics of the quantization noise, FP vs quantized ε on FP trajectories
(D²-DPM Algorithm 1 lines 1-8), resumable, with a float32 spill for the k·σ outlier filter."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from correction.statistics import CorrectionError, Moments, NoiseStatistics, SamplingConfig, collect_noise_statistics
from ldm.fileio import file_fingerprint
from ldm.util import UserFacingError
from pipeline import cli
from pipeline.artifacts import ArtifactMismatch, is_current, load_artifact, save_artifact, save_timing
from pipeline.layout import partial_path
from pipeline.quantize import finish_partial
from pipeline.sampler_spec import Method, SamplerSpec
from pipeline.sampling import NOISE_STATS_KIND, build_variant, check_present, ddim_timesteps, quant_expect

PARTIAL_KIND = "noise_stats_partial"
SPILL_PATTERN = "t*.f32"
UNCORRECTED = SamplerSpec(Method.NONE)


def check_args(args: argparse.Namespace) -> None:
    cli.check_sampling_args(args)
    cli.check_bits(args)
    if args.stats_samples is None:
        raise UserFacingError("no sample count: pass --n or add stats_samples to the preset")
    cli.check_positive(args, "stats_samples", "save_every", flag={"stats_samples": "n"})
    cli.check_positive(args, "outlier_k", minimum=0)


def clear_spill(spill: Path) -> None:
    """Remove our spill files (t####.f32) and the folder if that leaves it empty; nothing else is touched."""
    if spill.is_dir():
        for f in spill.glob(SPILL_PATTERN):
            f.unlink()
        try:
            spill.rmdir()
        except OSError:
            pass


def shuffled_balanced_labels(n: int, n_classes: int, seed: int) -> list[int]:
    """n labels, every class n // K or n // K + 1 times, in a seeded random order."""
    labels = torch.arange(n) % n_classes
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))].tolist()


def moments_dict(m: Moments) -> dict:
    return {"n": m.n, "s1": m.s1, "s2": m.s2}


def resume_or_start(partial: Path, spill: Path, meta: dict, sampling: SamplingConfig) -> NoiseStatistics:
    """The accumulator saved by an interrupted run with the same meta, or a fresh one (stale spill removed)."""
    use_spill = meta["outlier_k"] > 0
    if partial.exists():
        try:
            obj = load_artifact(partial, PARTIAL_KIND, meta)
            stats = NoiseStatistics.from_state_dict(obj["state"], spill if use_spill else None)
            print(f"resuming from {partial}: {int(stats.samples[0])} of {meta['n']} trajectories done")
            return stats
        except (ArtifactMismatch, CorrectionError, KeyError) as e:
            print(f"ignoring {partial} ({str(e)[:80]}...); starting over")
        partial.unlink(missing_ok=True)
    clear_spill(spill)
    return NoiseStatistics(sampling, spill if use_spill else None)


def trajectories(family, model, args: argparse.Namespace) -> tuple[list | None, int | None, str]:
    """(conditions, unconditional count, description): class-balanced in a seeded order, or unconditional."""
    conditions = family.conditions(model, 1)
    if conditions is None:
        return None, args.stats_samples, f"{args.stats_samples} unconditional trajectories"
    labels = [conditions[i] for i in shuffled_balanced_labels(args.stats_samples, len(conditions), args.seed)]
    return labels, None, f"{args.stats_samples} class-balanced trajectories over {len(conditions)} classes, " \
                         f"scale {args.scale}"


def run(args: argparse.Namespace) -> None:
    check_args(args)
    base = cli.model_meta(args)
    cli.model_family(args)
    layout, tag = cli.layout(args), cli.quant_tag(args)
    out = layout.noise_stats(tag)
    check_present([UNCORRECTED], layout, tag)  # one line before any model is loaded
    meta = {**quant_expect(base, tag), "quant": file_fingerprint(layout.quant(tag)), "n": args.stats_samples,
            "seed": args.seed, "batch_size": args.batch_size, "outlier_k": float(args.outlier_k),
            **cli.model_family(args)[1].run_meta()}   # a text model: the prompts its trajectories follow
    if is_current(out, NOISE_STATS_KIND, meta, args.force, "these statistics"):
        return
    cli.ensure_writable_dir(out.parent)
    device = cli.pick_device(args.device)
    family, model = cli.load_model(args, device)
    variant = build_variant(UNCORRECTED, family, model, layout, tag, base)
    sampling = SamplingConfig.for_model(model, args.steps, args.eta, args.scale)
    meta["timesteps"] = ddim_timesteps(model, args.steps, args.eta)   # the grid, repeats included
    partial, spill = partial_path(out), layout.noise_stats_spill(tag)
    if args.force:
        partial.unlink(missing_ok=True)
    stats = resume_or_start(partial, spill, meta, sampling)
    labels, n_uncond, what = trajectories(family, model, args)
    print(f"[{args.preset_used}] {tag.title()} vs FP on {what}; {args.steps} {args.settings.loop} steps, eta "
          f"{args.eta}, seed {args.seed}, batch {args.batch_size}, on {device}")
    seconds, done0 = collect(args, family, model, variant, stats, labels, n_uncond, partial, meta)
    write(args, out, meta, stats, seconds, done0, spill)


def collect(args, family, model, variant, stats, labels, n_uncond, partial: Path, meta: dict) -> tuple[float, int]:
    done0 = int(stats.samples[0])
    bar = tqdm(total=args.stats_samples, initial=done0, desc="trajectories", unit="traj", disable=args.no_progress)
    since_save = 0

    def on_batch(s: NoiseStatistics, done: int) -> None:
        nonlocal since_save
        bar.update(done - bar.n)
        since_save += 1
        if since_save >= args.save_every or done == args.stats_samples:
            save_artifact(partial, PARTIAL_KIND, meta, {"state": s.state_dict(), "done": done})
            since_save = 0

    t0 = time.time()
    try:
        with family.ema_scope(model):
            conditioner = None if labels is None else family.conditioner(model, family.guidance_scale(args.scale))
            collect_noise_statistics(model, variant.model_fn, stats, labels, n=n_uncond, batch_size=args.batch_size,
                                     seed=args.seed, fp_model_fn=family.model_fn(model), on_batch=on_batch,
                                     progress=False, conditioner=conditioner,
                                     sampler_cls=args.settings.sampler_cls(family.sampler_cls))
    except CorrectionError as e:
        raise UserFacingError(f"{e} (or delete {partial} to start over)") from None
    finally:
        bar.close()
    return time.time() - t0, done0


def write(args, out: Path, meta: dict, stats: NoiseStatistics, seconds: float, done0: int, spill: Path) -> None:
    payload = {"state": stats.state_dict(), "filtered": None}
    if args.outlier_k > 0:
        payload["filtered"] = {"tensor": moments_dict(stats.filtered_moments(args.outlier_k, per_channel=False)),
                               "channel": moments_dict(stats.filtered_moments(args.outlier_k, per_channel=True))}
    save_artifact(out, NOISE_STATS_KIND, meta, payload)
    save_timing(out, seconds=seconds if done0 == 0 else None)  # (None: resumed, the time covers part of the work)
    finish_partial(out)
    if not args.keep_spill:
        clear_spill(spill)
    m = stats.moments().pooled()
    std_d = m.cov()[:, 0, 1, 1].sqrt()
    kept = "" if payload["filtered"] is None else (
        f"; the {args.outlier_k:g}σ filter keeps "
        f"{100 * payload['filtered']['tensor']['n'].sum().item() / m.n.sum().item():.3f} % of the elements")
    collected = args.stats_samples - done0
    print(f"wrote {out}: {args.stats_samples} trajectories x {args.steps} steps; std Δ from {std_d.min():.4f} to "
          f"{std_d.max():.4f}{kept} ({seconds:.1f} s for {collected} trajectories, "
          f"{seconds / max(args.steps * collected, 1) * 1e3:.1f} ms per trajectory-step)")
