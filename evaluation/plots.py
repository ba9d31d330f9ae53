"""The report's figures, drawn with matplotlib: methods as points with intervals, fidelity against bit width, and the
per-timestep quantization-noise statistics (D²-DPM Fig. 2).

Each function takes plain numbers (no model or artifact types: the callers turn their records into them), writes one
PNG atomically and returns the data it drew, so report.json can hold exactly what the figure shows. Text is set in
DejaVu Sans, which matplotlib ships and which has every glyph the method names use ("²", "—", "η", "ε", "Δ").
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ldm.fileio import write_atomic

DPI = 130
# one colour per method, stable across figures (tab10 order)
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed, the same on a laptop and a headless GPU node
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    try:  # (every figure is made with layout="constrained": titles and labels never overlap)
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    finally:
        plt.close(fig)


def interval(mean: float, lo: float | None = None, hi: float | None = None) -> dict:
    """One plotted value: the point and its interval (lo = hi = mean when there is none)."""
    return {"mean": float(mean), "lo": float(mean if lo is None else lo), "hi": float(mean if hi is None else hi)}


def methods_figure(path: str | os.PathLike, settings: dict[str, list[dict]], title: str,
                   references: dict[str, dict] | None = None) -> dict:
    """The methods of each setting as points with their intervals: one row of panels per setting, one panel per
    metric, each axis zoomed to that setting's values (never forced to start at 0), so a difference of 0.02 is as
    visible as its interval allows and the settings do not squash one another.

    ``settings``: {setting: [{"metric": axis label, "better": "higher" | "lower", "points": {method: interval()}}]};
    ``references``: {metric label: {"label": "FP32", "value": x}} drawn as a dashed vertical line in that metric's
    panels. Returns {"title", "settings", "references"} as drawn."""
    plt = _pyplot()
    settings = {s: [p for p in panels if p["points"]] for s, panels in settings.items()}
    settings = {s: panels for s, panels in settings.items() if panels}
    if not settings:
        raise ValueError("nothing to plot: no points in any panel")
    references = references or {}
    metrics = list(dict.fromkeys(p["metric"] for panels in settings.values() for p in panels))
    heights = [len({label for p in panels for label in p["points"]}) for panels in settings.values()]
    fig, axes = plt.subplots(len(settings), len(metrics), squeeze=False, gridspec_kw={"height_ratios": heights},
                             layout="constrained",
                             figsize=(3.4 * len(metrics) + 2.0, 0.3 * sum(heights) + 1.0 * len(settings) + 0.6))
    for row, (setting, panels) in zip(axes, settings.items(), strict=True):
        by_metric = {p["metric"]: p for p in panels}
        labels = list(dict.fromkeys(label for p in panels for label in p["points"]))  # one y per method in a row
        y = np.arange(len(labels))[::-1]
        for ax, metric in zip(row, metrics, strict=True):
            panel = by_metric.get(metric)
            if panel is None:
                ax.set_axis_off()
                continue
            for yi, label in zip(y, labels, strict=True):
                v = panel["points"].get(label)
                if v is not None and math.isfinite(v["mean"]):
                    ax.errorbar(v["mean"], yi, xerr=[[v["mean"] - v["lo"]], [v["hi"] - v["mean"]]], fmt="o",
                                ms=4, color=_COLOURS[0], ecolor="black", elinewidth=1, capsize=3)
            ref = references.get(metric)
            if ref is not None:
                ax.axvline(ref["value"], color="grey", ls="--", lw=1, label=ref["label"])
                ax.legend(fontsize=7, loc="best")
            ax.set_yticks(y, labels if ax is row[0] else [""] * len(labels))
            ax.set_ylim(-0.6, len(labels) - 0.4)
            ax.set_xlabel(f"{metric} ({panel['better']} is better)", fontsize=8)
            ax.margins(x=0.15)
        row[0].set_ylabel(setting, fontsize=10, fontweight="bold")
    fig.suptitle(title)
    _save(fig, path)
    return {"title": title, "settings": settings, "references": references}


def bits_figure(path: str | os.PathLike, settings: Sequence[str], panels: Sequence[dict], title: str) -> dict:
    """Fidelity against bit width: x = the settings in order (W8A8 … W3A8), one line per method with intervals.

    ``panels``: [{"metric": label, "better": ..., "series": {method: [interval(...) or None per setting]}}]."""
    for panel in panels:
        for method, values in panel["series"].items():
            if len(values) != len(settings):
                raise ValueError(f"{method}: {len(values)} values for {len(settings)} settings")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False, layout="constrained")
    x = np.arange(len(settings))
    for ax, panel in zip(axes[0], panels, strict=True):
        for k, (method, values) in enumerate(panel["series"].items()):
            shift = (k - (len(panel["series"]) - 1) / 2) * 0.06  # side by side, so the intervals do not overlap
            pts = [(x[i] + shift, v) for i, v in enumerate(values) if v is not None and math.isfinite(v["mean"])]
            if not pts:
                continue
            xs, vs = zip(*pts)
            ax.errorbar(xs, [v["mean"] for v in vs], yerr=[[v["mean"] - v["lo"] for v in vs],
                                                           [v["hi"] - v["mean"] for v in vs]],
                        fmt="o-", ms=3.5, lw=1.2, capsize=2.5, color=_COLOURS[k % len(_COLOURS)], label=method)
        ax.set_xticks(x, settings)
        ax.set_xlabel("quantized setting")
        ax.set_ylabel(f"{panel['metric']} ({panel['better']} is closer)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    _save(fig, path)
    return {"title": title, "settings": list(settings), "panels": [dict(p) for p in panels]}


NOISE_PANELS = (("mu_y", "mean of Δ  (μ_Δ)"), ("sigma_y", "std of Δ  (σ_Δ)"), ("rho", "corr(ε̂, Δ)  (ρ)"))


def noise_statistics_figure(path: str | os.PathLike, timesteps: Sequence[int], series: dict[str, dict],
                            title: str) -> dict:
    """D²-DPM Fig. 2: the quantization noise Δ = ε̂_q − ε̂ per timestep. ``series`` maps a label ("tensor-wise",
    "channel 0", …) to {"mu_y", "sigma_y", "rho"}: one value per timestep each. Tensor-wise is drawn black and
    thick, the channels thin in colour."""
    t = [int(v) for v in timesteps]
    for name, tables in series.items():
        for key, _ in NOISE_PANELS:
            if np.shape(tables[key]) != (len(t),):
                raise ValueError(f"{name} {key}: {np.size(tables[key])} values for {len(t)} steps")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), squeeze=False, layout="constrained")
    for ax, (key, label) in zip(axes[0], NOISE_PANELS, strict=True):
        for k, (name, tables) in enumerate(series.items()):
            values = np.asarray(tables[key], dtype=np.float64)
            tensor = name.startswith("tensor")
            ax.plot(t, values, "-o", ms=2, lw=2.0 if tensor else 1.0, label=name,
                    color="black" if tensor else _COLOURS[k % len(_COLOURS)], zorder=3 if tensor else 2)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xlabel("timestep t")
        ax.set_ylabel(label)
        ax.invert_xaxis()  # sampling runs from t = T down to 0
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    _save(fig, path)
    return {"title": title, "timesteps": t,
            "series": {name: {k: [float(v) for v in tables[k]] for k, _ in NOISE_PANELS}
                       for name, tables in series.items()}}
