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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from correction.gaussian import Granularity, gaussian_from_moments, plot_fit  # noqa: E402
from correction.ptqd import ptqd_from_moments  # noqa: E402
from correction.statistics import Moments, NoiseStatistics, SamplingConfig  # noqa: E402
from correction.variants import (GAUSSIAN_KIND, NOISE_STATS_KIND, PTQD_KIND, check_present,  # noqa: E402
                                 STATS_SCRIPT, gaussian_path, noise_stats_path, noise_stats_spill_dir,
                                 ptqd_path, quant_path)
from ldm.util import UserFacingError  # noqa: E402
from quant.artifacts import ArtifactMismatch, file_fingerprint, load_artifact, save_artifact  # noqa: E402
from quant_scripts.common import (add_model_args, add_sampling_args, apply_preset, check_sampling_args,  # noqa
                                  ensure_writable_dir, model_meta, run_cli, run_dir)

# ---- defaults (edit here or override with flags) ---------------------------------------------------------------
PRESET = "fashion"
W_BITS = 4
A_BITS = 8
OUTLIER_K = None        # None: the filter step 4 applied (D²-DPM: 4σ); another k needs step 4's --keep_spill
OUTDIR = "outputs"
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, PRESET)
    add_sampling_args(p)
    p.add_argument("--w_bits", type=int, default=W_BITS, choices=(4, 8))
    p.add_argument("--a_bits", type=int, default=A_BITS, choices=(6, 8))
    p.add_argument("--outlier_k", type=float, default=OUTLIER_K,
                   help="k of the k·σ filter (default: step 4's); 0 = fit without the filter")
    p.add_argument("--outdir", default=OUTDIR)
    p.add_argument("--force", action="store_true", help="refit even if matching fits exist")
    return p.parse_args(argv)


def filtered(obj: dict, stats: NoiseStatistics, k: float, spill: Path) -> tuple[dict, float | None]:
    """{"tensor": Moments, "channel": Moments} after the k·σ filter (tensor-wise and per-channel thresholds), and
    the k recorded (None: no filter)."""
    if k == 0:
        raw = stats.moments()
        return {"tensor": raw, "channel": raw}, None
    stored_k = obj["meta"].get("outlier_k") or 0.0
    if obj.get("filtered") is not None and abs(stored_k - k) < 1e-12:
        return {g: Moments(stats.timesteps, *(obj["filtered"][g][x] for x in ("n", "s1", "s2")))
                for g in ("tensor", "channel")}, k
    if spill.with_name("noise_stats.partial.pt").exists():  # the spill then holds another collection's rows
        raise UserFacingError(f"a statistics collection was interrupted in {spill.parent} and its spill is not that "
                              f"of noise_stats.pt; finish it ({STATS_SCRIPT}) before refitting with another k")
    if not spill.is_dir():
        raise UserFacingError(f"the statistics were filtered at {stored_k:g}σ, a {k:g}σ filter needs the spilled "
                              f"values; rerun {STATS_SCRIPT} with --outlier_k {k:g} (or --keep_spill), or drop "
                              f"--outlier_k")
    s = NoiseStatistics.from_state_dict(obj["state"], spill)
    return {"tensor": s.filtered_moments(k, per_channel=False), "channel": s.filtered_moments(k, per_channel=True)}, k


def print_table(tensor_fit, channel_fit, ptqd_fit) -> None:
    """One line per timestep (t descending, sampling order): the tensor-wise Gaussian, the channel spread of μ_Δ
    and σ_Δ, and PTQD's k_t and residual σ."""
    print(f"{'t':>5} {'mu_eps':>8} {'mu_D':>9} {'sigma_D':>8} {'rho':>7} {'sigma_c':>8} | "
          f"{'mu_D (ch min..max)':>19} {'sigma_D (ch)':>15} | {'ptqd k':>7} {'ptqd s':>7}")
    for r in reversed(range(len(tensor_fit.timesteps))):
        mu_c, sd_c = channel_fit.mu_y[r], channel_fit.sigma_y[r]
        print(f"{tensor_fit.timesteps[r]:>5} {tensor_fit.mu_x[r, 0]:>8.4f} {tensor_fit.mu_y[r, 0]:>9.5f} "
              f"{tensor_fit.sigma_y[r, 0]:>8.5f} {tensor_fit.rho[r, 0]:>7.4f} {tensor_fit.sigma_c[r, 0]:>8.5f} | "
              f"{mu_c.min():>9.5f}..{mu_c.max():<9.5f} {sd_c.min():>7.5f}..{sd_c.max():<7.5f} | "
              f"{ptqd_fit.slope[r]:>7.4f} {ptqd_fit.sigma[r]:>7.5f}")
    t = tensor_fit
    print(f"ranges over t: mu_D {t.mu_y.min():.5f}..{t.mu_y.max():.5f}, sigma_D {t.sigma_y.min():.5f}.."
          f"{t.sigma_y.max():.5f}, rho {t.rho.min():.4f}..{t.rho.max():.4f}; channel-wise rho "
          f"{channel_fit.rho.min():.4f}..{channel_fit.rho.max():.4f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_preset(args, PRESET)
    check_sampling_args(args)
    if args.outlier_k is not None and args.outlier_k < 0:
        raise UserFacingError(f"--outlier_k must be >= 0, got {args.outlier_k}")
    base = model_meta(args)
    rdir = run_dir(args)
    tag = f"--w_bits {args.w_bits} --a_bits {args.a_bits}"
    qpath, spath = quant_path(rdir, args.w_bits, args.a_bits), noise_stats_path(rdir, args.w_bits, args.a_bits)
    check_present(["none"], rdir, args.w_bits, args.a_bits)
    ensure_writable_dir(spath.parent)
    want = {**base, "w_bits": args.w_bits, "a_bits": args.a_bits}
    try:
        obj = load_artifact(spath, NOISE_STATS_KIND, {**want, "quant": file_fingerprint(qpath)},
                            f"{STATS_SCRIPT} {tag}")
    except ArtifactMismatch as e:
        if "quant=" in str(e):
            raise ArtifactMismatch(f"{spath} was collected with another {qpath.name} than the one there now; rerun "
                                   f"{STATS_SCRIPT} {tag}") from None
        raise
    smeta = obj["meta"]
    stats = NoiseStatistics.from_state_dict(obj["state"])
    sampling: SamplingConfig = stats.sampling
    if list(sampling.timesteps) != list(smeta["timesteps"]):
        raise ArtifactMismatch(f"{spath}: its statistics and its meta name different timesteps; rerun {STATS_SCRIPT}")
    k = (smeta.get("outlier_k") or 0.0) if args.outlier_k is None else args.outlier_k

    meta = {**want, "timesteps": list(sampling.timesteps), "quant": smeta["quant"],
            "noise_stats": file_fingerprint(spath), "n": smeta["n"], "outlier_k": k or None}
    paths = {"tensor": gaussian_path(rdir, args.w_bits, args.a_bits, Granularity.TENSOR),
             "channel": gaussian_path(rdir, args.w_bits, args.a_bits, Granularity.CHANNEL),
             "ptqd": ptqd_path(rdir, args.w_bits, args.a_bits)}
    png = spath.with_name("noise_stats.png")
    if not args.force and png.exists():
        try:
            for g in ("tensor", "channel"):
                load_artifact(paths[g], GAUSSIAN_KIND, {**meta, "granularity": g})
            load_artifact(paths["ptqd"], PTQD_KIND, {k_: v for k_, v in meta.items() if k_ != "outlier_k"})
            print(f"{spath.parent} already holds these fits; skipping (--force to redo)")
            return
        except ArtifactMismatch:
            pass

    t0 = time.time()
    moments, k_used = filtered(obj, stats, k, noise_stats_spill_dir(rdir, args.w_bits, args.a_bits))
    fits = {g: gaussian_from_moments(moments[g], Granularity(g), sampling, k_used) for g in ("tensor", "channel")}
    ptqd = ptqd_from_moments(stats.moments(), sampling)
    for g, fit in fits.items():
        save_artifact(paths[g], GAUSSIAN_KIND, {**meta, "granularity": g}, {"fit": fit.to_dict()})
    save_artifact(paths["ptqd"], PTQD_KIND, {k_: v for k_, v in meta.items() if k_ != "outlier_k"},
                  {"fit": ptqd.to_dict()})
    filt = "no filter" if k_used is None else f"{k_used:g} sigma filter"
    plot_fit(png, [fits["channel"], fits["tensor"]],
             title=f"{args.preset_used} W{args.w_bits}A{args.a_bits}: {smeta['n']} trajectories, {args.steps} steps, "
                   f"eta {args.eta:g}, scale {args.scale:g}, {filt}")
    print(f"[{args.preset_used}] W{args.w_bits}A{args.a_bits}, {smeta['n']} trajectories x {args.steps} steps, eta "
          f"{args.eta:g}, scale {args.scale:g}, {'no' if k_used is None else f'{k_used:g}σ'} outlier filter")
    print_table(fits["tensor"], fits["channel"], ptqd)
    print(f"wrote {', '.join(p.name for p in paths.values())} and {png.name} to {spath.parent} "
          f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    run_cli(main)
