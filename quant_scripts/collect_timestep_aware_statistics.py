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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from correction.statistics import (CorrectionError, Moments, NoiseStatistics, SamplingConfig,  # noqa: E402
                                   collect_noise_statistics)
from correction.variants import (NOISE_STATS_KIND, build_variant, check_present, noise_stats_path,  # noqa: E402
                                 noise_stats_spill_dir, quant_path)
from ldm.util import UserFacingError  # noqa: E402
from quant.artifacts import ArtifactMismatch, file_fingerprint, load_artifact, save_artifact  # noqa: E402
from quant_scripts.common import (add_model_args, add_sampling_args, apply_preset, check_sampling_args,  # noqa
                                  ensure_writable_dir, load_ldm, model_meta, pick_device, run_cli, run_dir)

# ---- defaults (edit here or override with flags) ---------------------------------------------------------------
PRESET = "fashion"
W_BITS = 4
A_BITS = 8
N_SAMPLES = None        # trajectories (None: the preset's stats_samples; D²-DPM: 1024)
OUTLIER_K = 4.0         # the fit's |Δ − mean Δ| ≤ k·std Δ filter (D²-DPM: 4); 0 = no filter, no spill
SAVE_EVERY = 4          # batches between resume checkpoints
SEED = 0
OUTDIR = "outputs"
# -------------------------------------------------------------------------------------------------------------------

PARTIAL_KIND = "noise_stats_partial"
SPILL_PATTERN = "t*.f32"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, PRESET)
    add_sampling_args(p)
    p.add_argument("--w_bits", type=int, default=W_BITS, choices=(4, 8))
    p.add_argument("--a_bits", type=int, default=A_BITS, choices=(6, 8))
    p.add_argument("--n", dest="stats_samples", type=int, default=N_SAMPLES,
                   help="trajectories (default: the preset's stats_samples)")
    p.add_argument("--outlier_k", type=float, default=OUTLIER_K, help="k of the k·σ outlier filter; 0 = none")
    p.add_argument("--save_every", type=int, default=SAVE_EVERY, help="batches between resume checkpoints")
    p.add_argument("--keep_spill", action="store_true", help="keep the spilled values (refits with another k)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--outdir", default=OUTDIR)
    p.add_argument("--force", action="store_true", help="recollect even if matching statistics exist")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_sampling_args(args)
    if args.stats_samples is None:
        raise UserFacingError("no sample count: pass --n or add stats_samples to the preset")
    if args.stats_samples < 1 or args.save_every < 1 or args.outlier_k < 0:
        raise UserFacingError(f"--n and --save_every must be >= 1 and --outlier_k >= 0, got {args.stats_samples}, "
                              f"{args.save_every}, {args.outlier_k}")


def partial_of(out: Path) -> Path:
    return out.with_name("noise_stats.partial.pt")


def clear_spill(spill: Path) -> None:
    """Remove our spill files (t####.f32) and the folder if that leaves it empty; nothing else is touched."""
    if spill.is_dir():
        for f in spill.glob(SPILL_PATTERN):
            f.unlink()
        try:
            spill.rmdir()
        except OSError:
            pass


def balanced_labels(n: int, n_classes: int, seed: int) -> list[int]:
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


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_preset(args, PRESET)
    check_args(args)
    base = model_meta(args)
    rdir = run_dir(args)
    out = noise_stats_path(rdir, args.w_bits, args.a_bits)
    check_present(["none"], rdir, args.w_bits, args.a_bits)  # one line before any model is loaded
    ensure_writable_dir(out.parent)
    qpath = quant_path(rdir, args.w_bits, args.a_bits)
    meta = {**base, "w_bits": args.w_bits, "a_bits": args.a_bits, "quant": file_fingerprint(qpath),
            "n": args.stats_samples, "seed": args.seed, "batch_size": args.batch_size,
            "outlier_k": float(args.outlier_k)}
    if out.exists() and not args.force:
        try:
            load_artifact(out, NOISE_STATS_KIND, meta)
            print(f"{out} already holds these statistics; skipping (--force to redo)")
            return
        except ArtifactMismatch:
            print(f"{out} was made with other settings (or another quantized model); recollecting")

    device = pick_device(args.device)
    _, model = load_ldm(args, device)
    variant = build_variant("none", model, rdir, w_bits=args.w_bits, a_bits=args.a_bits, expect=base)
    sampling = SamplingConfig.make(model.alphas_cumprod, args.steps, args.eta, args.scale)
    meta["timesteps"] = list(sampling.timesteps)
    partial, spill = partial_of(out), noise_stats_spill_dir(rdir, args.w_bits, args.a_bits)
    if args.force:
        partial.unlink(missing_ok=True)
    stats = resume_or_start(partial, spill, meta, sampling)

    if model.is_conditional:
        k = model.cond_stage_model.n_classes - 1  # real classes; the last one is the null class
        labels, n_uncond = balanced_labels(args.stats_samples, k, args.seed), None
        what = f"{args.stats_samples} class-balanced trajectories over {k} classes, scale {args.scale}"
    else:
        labels, n_uncond = None, args.stats_samples
        what = f"{args.stats_samples} unconditional trajectories"
    print(f"[{args.preset_used}] W{args.w_bits}A{args.a_bits} vs FP on {what}; {args.steps} DDIM steps, eta "
          f"{args.eta}, seed {args.seed}, batch {args.batch_size}, on {device}")

    done0 = int(stats.samples[0])
    bar = tqdm(total=args.stats_samples, initial=done0, desc="trajectories", unit="traj",
               disable=args.no_progress)
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
        with model.ema_scope():
            collect_noise_statistics(model, variant.model_fn, stats, labels, n=n_uncond,
                                     batch_size=args.batch_size, seed=args.seed, fp_model_fn=model.apply_model,
                                     on_batch=on_batch, progress=False)
    except CorrectionError as e:
        raise UserFacingError(f"{e} (or delete {partial} to start over)") from None
    finally:
        bar.close()
    seconds = time.time() - t0

    payload = {"state": stats.state_dict(), "filtered": None}
    if args.outlier_k > 0:
        payload["filtered"] = {"tensor": moments_dict(stats.filtered_moments(args.outlier_k, per_channel=False)),
                               "channel": moments_dict(stats.filtered_moments(args.outlier_k, per_channel=True))}
    meta["seconds"] = seconds if done0 == 0 else None
    save_artifact(out, NOISE_STATS_KIND, meta, payload)
    partial.unlink(missing_ok=True)
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


if __name__ == "__main__":
    run_cli(main)
