"""Step 4: timestep-aware statistics of the quantization noise, FP vs quantized ε on FP trajectories
(D²-DPM Algorithm 1 lines 1-8), resumable, with a float32 spill for the k·σ outlier filter."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from correction.statistics import CorrectionError, Moments, NoiseStatistics, SamplingConfig, collect_noise_statistics
from ldm.fileio import file_fingerprint
from ldm.util import UserFacingError
from pipeline.artifacts import is_current, load_progress, save_artifact
from pipeline.basics import check_at_least, ensure_writable_dir
from pipeline.layout import QuantTag, partial_path
from pipeline.run import Run
from pipeline.sampler_spec import Method, SamplerSpec
from pipeline.sampling import NOISE_STATS_KIND, build_variant, check_present, ddim_timesteps, quant_expect

PARTIAL_KIND = "noise_stats_partial"
SPILL_PATTERN = "t*.f32"
UNCORRECTED = SamplerSpec(Method.NONE)


@dataclass(frozen=True)
class StatisticsSettings:
    """Step 4's own settings: ``n`` FP trajectories (class-balanced in a seeded order), batches of ``batch_size``
    from ``seed``, the k·σ outlier filter ``outlier_k`` (0: none, no spill), a resume checkpoint every
    ``save_every`` batches, ``keep_spill`` to refit later with another k."""

    n: int
    batch_size: int
    seed: int = 0
    outlier_k: float = 4.0
    save_every: int = 4
    keep_spill: bool = False
    progress: bool = True

    def __post_init__(self):
        check_at_least("n", self.n)
        check_at_least("save_every", self.save_every)
        check_at_least("outlier_k", self.outlier_k, minimum=0)
        object.__setattr__(self, "outlier_k", float(self.outlier_k))


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
    obj = load_progress(partial, PARTIAL_KIND, meta, needs=("state",))
    if obj is not None:
        try:
            stats = NoiseStatistics.from_state_dict(obj["state"], spill if use_spill else None)
            print(f"resuming from {partial}: {int(stats.samples[0])} of {meta['n']} trajectories done")
            return stats
        except (CorrectionError, KeyError) as e:
            print(f"ignoring {partial} ({str(e)[:80]}...); starting over")
    partial.unlink(missing_ok=True)
    clear_spill(spill)
    return NoiseStatistics(sampling, spill if use_spill else None)


def trajectories(family, model, st: StatisticsSettings, scale: float) -> tuple[list | None, int | None, str]:
    """(conditions, unconditional count, description): class-balanced in a seeded order, or unconditional."""
    conditions = family.conditions(model, 1)
    if conditions is None:
        return None, st.n, f"{st.n} unconditional trajectories"
    labels = [conditions[i] for i in shuffled_balanced_labels(st.n, len(conditions), st.seed)]
    return labels, None, f"{st.n} class-balanced trajectories over {len(conditions)} classes, scale {scale}"


def run(run: Run, st: StatisticsSettings, tag: QuantTag) -> Path:
    """Collect (or resume, or reuse) the noise statistics of the quantized model ``tag``; returns their path."""
    settings = run.sampling
    base = run.meta()
    layout = run.layout
    out = layout.noise_stats(tag)
    check_present([UNCORRECTED], layout, tag)  # one line before any model is loaded
    meta = {**quant_expect(base, tag), "quant": file_fingerprint(layout.quant(tag)), "n": st.n,
            "seed": st.seed, "batch_size": st.batch_size, "outlier_k": st.outlier_k,
            **run.family.run_meta()}   # a text model: the prompts its trajectories follow
    if is_current(out, NOISE_STATS_KIND, meta, run.force, "these statistics"):
        return out
    ensure_writable_dir(out.parent)
    device = run.torch_device()
    family, model = run.load(device)
    variant = build_variant(UNCORRECTED, family, model, layout, tag, base)
    sampling = SamplingConfig.for_run(model, settings)
    meta["timesteps"] = ddim_timesteps(model, settings)   # the grid, repeats included
    partial, spill = partial_path(out), layout.noise_stats_spill(tag)
    if run.force:
        partial.unlink(missing_ok=True)
    stats = resume_or_start(partial, spill, meta, sampling)
    labels, n_uncond, what = trajectories(family, model, st, settings.scale)
    print(f"[{run.preset}] {tag.title()} vs FP on {what}; {settings.steps} {settings.loop} steps, eta "
          f"{settings.eta}, seed {st.seed}, batch {st.batch_size}, on {device}")
    seconds, done0 = collect(run, st, family, model, variant, stats, labels, n_uncond, partial, meta)
    write(run, st, out, meta, stats, seconds, done0, spill)
    return out


def collect(run: Run, st: StatisticsSettings, family, model, variant, stats, labels, n_uncond, partial: Path,
            meta: dict) -> tuple[float, int]:
    done0 = int(stats.samples[0])
    bar = tqdm(total=st.n, initial=done0, desc="trajectories", unit="traj", disable=not st.progress)
    since_save = 0

    def on_batch(s: NoiseStatistics, done: int) -> None:
        nonlocal since_save
        bar.update(done - bar.n)
        since_save += 1
        if since_save >= st.save_every or done == st.n:
            save_artifact(partial, PARTIAL_KIND, meta, {"state": s.state_dict(), "done": done})
            since_save = 0

    t0 = time.time()
    try:
        with family.ema_scope(model):
            scale = run.sampling.scale
            conditioner = None if labels is None else family.conditioner(model, family.guidance_scale(scale))
            collect_noise_statistics(model, variant.model_fn, stats, labels, n=n_uncond, batch_size=st.batch_size,
                                     seed=st.seed, fp_model_fn=family.model_fn(model), on_batch=on_batch,
                                     progress=False, conditioner=conditioner, settings=run.sampling)
    except CorrectionError as e:
        raise UserFacingError(f"{e} (or delete {partial} to start over)") from None
    finally:
        bar.close()
    return time.time() - t0, done0


def write(run: Run, st: StatisticsSettings, out: Path, meta: dict, stats: NoiseStatistics, seconds: float,
          done0: int, spill: Path) -> None:
    payload = {"state": stats.state_dict(), "filtered": None}
    if st.outlier_k > 0:
        payload["filtered"] = {"tensor": moments_dict(stats.filtered_moments(st.outlier_k, per_channel=False)),
                               "channel": moments_dict(stats.filtered_moments(st.outlier_k, per_channel=True))}
    # (timing None: resumed, the time covers part of the work)
    save_artifact(out, NOISE_STATS_KIND, meta, payload, timing={"seconds": seconds if done0 == 0 else None},
                  replaces=[partial_path(out)])
    if not st.keep_spill:
        clear_spill(spill)
    m = stats.moments().pooled()
    std_d = m.cov()[:, 0, 1, 1].sqrt()
    kept = "" if payload["filtered"] is None else (
        f"; the {st.outlier_k:g}σ filter keeps "
        f"{100 * payload['filtered']['tensor']['n'].sum().item() / m.n.sum().item():.3f} % of the elements")
    collected = st.n - done0
    steps = run.sampling.steps
    print(f"wrote {out}: {st.n} trajectories x {steps} steps; std Δ from {std_d.min():.4f} to "
          f"{std_d.max():.4f}{kept} ({seconds:.1f} s for {collected} trajectories, "
          f"{seconds / max(steps * collected, 1) * 1e3:.1f} ms per trajectory-step)")
