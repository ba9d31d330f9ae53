"""Step 5: the Gaussian fits of the quantization noise (tensor- and channel-wise, D²-DPM Eqs. 7-10), PTQD's fit,
the per-timestep plot (the paper's Fig. 2) and a table."""
from __future__ import annotations

import time
from pathlib import Path

from correction.gaussian import GaussianFit, Granularity
from correction.statistics import Moments, NoiseStatistics, SamplingConfig
from evaluation.plots import noise_statistics_figure
from ldm.fileio import file_fingerprint
from ldm.util import UserFacingError
from pipeline.artifacts import ArtifactMismatch, is_current, load_artifact, save_artifact
from pipeline.basics import check_at_least, ensure_writable_dir
from pipeline.corrections import FitKind, fit_artifacts
from pipeline.layout import QuantTag, partial_path
from pipeline.run import Run
from pipeline.sampling import NOISE_STATS_KIND, STATS_SCRIPT, check_present, quant_expect
from pipeline.steps.noise_statistics import UNCORRECTED


def plot_noise(path: Path, fits: list[GaussianFit], title: str) -> dict:
    """The paper's Fig. 2 of these fits (μ_Δ, σ_Δ, ρ against t; a channel-wise fit as one line per channel), as
    evaluation.plots draws it; returns the data drawn."""
    series = {}
    for fit in fits:
        tables = {k: getattr(fit, k).numpy() for k in ("mu_y", "sigma_y", "rho")}
        if fit.granularity is Granularity.TENSOR:
            series["tensor-wise"] = {k: v[:, 0] for k, v in tables.items()}
        else:
            series.update({f"channel {c}": {k: v[:, c] for k, v in tables.items()} for c in range(fit.channels)})
    return noise_statistics_figure(path, fits[0].timesteps, series, title)


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
    if partial_path(spill.with_name("noise_stats.pt")).exists():  # the spill then holds another collection's rows
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


def load_statistics(layout, tag, want: dict) -> dict:
    """Step 4's artifact, made on the quantized model that is there now."""
    qpath, spath = layout.quant(tag), layout.noise_stats(tag)
    try:
        return load_artifact(spath, NOISE_STATS_KIND, {**want, "quant": file_fingerprint(qpath)},
                             f"{STATS_SCRIPT} {tag.flags}")
    except ArtifactMismatch as e:
        if e.key == "quant":
            raise ArtifactMismatch(f"{spath} was collected with another {qpath.name} than the one there now; rerun "
                                   f"{STATS_SCRIPT} {tag.flags}") from None
        raise


FitPaths = dict[tuple[FitKind, Granularity | None], Path]


def fit_paths(layout, tag) -> FitPaths:
    """Where each fit of every registered kind (per granularity) goes, in the order step 5 writes them:
    gaussian_tensor.pt, gaussian_channel.pt, ptqd.pt."""
    return {(kind, g): layout.fit(tag, kind, g) for kind, g in fit_artifacts()}


def fits_current(paths: FitPaths, meta: dict, force: bool) -> bool:
    """Whether every fit holds these settings (the one reuse check, per artifact)."""
    if all(is_current(p, kind.kind, kind.meta(meta, g), force, None) for (kind, g), p in paths.items()):
        print(f"{next(iter(paths.values())).parent} already holds these fits; skipping (--force to redo)")
        return True
    return False


def write_fits(paths: FitPaths, meta: dict, moments: dict, raw: Moments, sampling: SamplingConfig,
               k: float | None) -> dict:
    """Fit and save each artifact of ``paths`` with its kind's fitter and meta: a filtered kind from the k·σ-filtered
    ``moments`` of its granularity (tensor-wise thresholds for a kind without one), the others (PTQD) from the
    ``raw`` moments. Returns {(kind, granularity): fit}."""
    fits = {}
    for (kind, g), path in paths.items():
        m = moments[(g or Granularity.TENSOR).value] if kind.filtered else raw
        fits[kind, g] = fit = kind.fitter(m, g, sampling, k if kind.filtered else None)
        save_artifact(path, kind.kind, kind.meta(meta, g), {"fit": fit.to_dict()})
    return fits


def run(run: Run, tag: QuantTag, outlier_k: float | None = None) -> Path:
    """Fit (or reuse) every registered fit of the quantized model ``tag`` from its step-4 statistics, with the
    k·σ filter ``outlier_k`` (None: step 4's; 0: none), and draw Fig. 2; returns the folder."""
    check_at_least("outlier_k", outlier_k, minimum=0)
    base = run.meta()
    layout = run.layout
    spath = layout.noise_stats(tag)
    check_present([UNCORRECTED], layout, tag)
    ensure_writable_dir(spath.parent)
    want = quant_expect(base, tag)
    obj = load_statistics(layout, tag, want)
    smeta = obj["meta"]
    stats = NoiseStatistics.from_state_dict(obj["state"])
    sampling: SamplingConfig = stats.sampling
    if list(sampling.timesteps) != sorted(set(smeta["timesteps"])) or sampling.length != len(smeta["timesteps"]):
        raise ArtifactMismatch(f"{spath}: its statistics and its meta name different timesteps; rerun {STATS_SCRIPT}")
    k = (smeta.get("outlier_k") or 0.0) if outlier_k is None else outlier_k
    meta = {**want, "timesteps": list(smeta["timesteps"]), "quant": smeta["quant"],
            "noise_stats": file_fingerprint(spath), "n": smeta["n"], "outlier_k": k or None}
    paths = fit_paths(layout, tag)
    png = layout.noise_plot(tag)
    if png.exists() and fits_current(paths, meta, run.force):
        return spath.parent

    s = run.sampling
    t0 = time.time()
    moments, k_used = filtered(obj, stats, k, layout.noise_stats_spill(tag))
    written = write_fits(paths, meta, moments, stats.moments(), sampling, k_used)
    fits = {g.value: written[FitKind.GAUSSIAN, g] for g in Granularity}
    ptqd = written[FitKind.PTQD, None]
    filt = "no filter" if k_used is None else f"{k_used:g}σ filter"
    plot_noise(png, [fits["channel"], fits["tensor"]],
               title=f"{run.preset} {tag.title()}: {smeta['n']} trajectories, {s.steps} steps, "
                     f"η {s.eta:g}, scale {s.scale:g}, {filt}")
    print(f"[{run.preset}] {tag.title()}, {smeta['n']} trajectories x {s.steps} steps, eta "
          f"{s.eta:g}, scale {s.scale:g}, {'no' if k_used is None else f'{k_used:g}σ'} outlier filter")
    print_table(fits["tensor"], fits["channel"], ptqd)
    print(f"wrote {', '.join(p.name for p in paths.values())} and {png.name} to {spath.parent} "
          f"({time.time() - t0:.1f} s)")
    return spath.parent
