"""The demo report: per-setting metric tables (mean ± spread over seeds), paired fidelity to FP, model sizes, stage
times, figures and pictures.

Inputs are the evaluator's and evaluation.fidelity's JSON records (one per setting, method and seed) and measured
numbers; nothing here computes a metric. ``write_report`` writes report.md and report.json; ``report_figures``
draws the figures with evaluation.plots (matplotlib) and returns the data behind each, which report.json keeps.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evaluation.fidelity import HIGHER_IS_CLOSER, PER_SAMPLE, Bootstrap
from evaluation.plots import bits_figure, interval, methods_figure
from ldm.fileio import write_json_atomic, write_text_atomic

METRICS = (("inception_score", "IS", "{:.2f}"), ("fid", "FID", "{:.2f}"), ("sfid", "sFID", "{:.2f}"),
           ("precision", "Prec.", "{:.3f}"), ("recall", "Rec.", "{:.3f}"),
           ("classifier_accuracy", "Acc.", "{:.3f}"))


@dataclass
class Row:
    """One (setting, method) with its per-seed evaluator records."""

    setting: str       # e.g. "FP32", "W8A8", "W4A8"
    method: str        # e.g. "—", "uncorrected", "PTQD", "D-D² (channel)"
    sampler: str       # the pipeline's sampler name
    records: dict[int, dict] = field(default_factory=dict)  # seed -> evaluator record

    def values(self, key: str) -> list[float]:
        return [r["metrics"][key] for _, r in sorted(self.records.items()) if key in r["metrics"]]

    def summary(self, key: str) -> tuple[float, float] | None:
        """(mean, half the range) over seeds: with two seeds the spread is |a − b|/2, a plain, honest bound."""
        v = self.values(key)
        if not v:
            return None
        return statistics.fmean(v), (max(v) - min(v)) / 2


def fmt(summary: tuple[float, float] | None, pattern: str) -> str:
    if summary is None:
        return "—"
    mean, spread = summary
    return f"{pattern.format(mean)} ± {pattern.format(spread)}"


def metrics_table(rows: Sequence[Row]) -> list[str]:
    head = "| setting | method | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for r in rows:
        cells = [fmt(r.summary(key), pattern) for key, _, pattern in METRICS]
        lines.append(f"| {r.setting} | {r.method.replace('|', '/')} | " + " | ".join(cells) + " |")
    return lines


FIDELITY_AXES = (("psnr", "PSNR to FP (dB)", "higher"), ("ssim", "SSIM to FP", "higher"),
                 ("feature_distance", "feature distance to FP", "lower"))
FID_AXIS = "FID to the reference"
PAIRED_AXIS = "Δ PSNR vs uncorrected, paired (dB)"


def row_label(setting: str, method: str) -> str:
    return setting if method in ("—", "") else f"{setting} {method}"


def report_figures(outdir: str | os.PathLike, rows: Sequence[Row], fidelity: dict[str, dict] | None,
                   settings: Sequence[str] | None = None) -> dict[str, dict]:
    """methods.png (every row as a point with its interval: FID against the reference, then the paired metrics)
    and, where the fidelity records span two or more of ``settings`` (in that order), fidelity_vs_bits.png.
    Returns {name: {"file", "caption", "data"}}: the data is exactly what was drawn."""
    outdir = Path(outdir)
    fidelity = fidelity or {}
    per_setting: dict[str, list[dict]] = {}
    references = {}
    for r in rows:
        s = r.summary("fid")
        if s is None:
            continue
        if r.sampler == "fp32":
            references[FID_AXIS] = {"label": row_label(r.setting, r.method), "value": s[0]}
            continue
        if not per_setting.get(r.setting):
            per_setting[r.setting] = [{"metric": FID_AXIS, "better": "lower", "points": {}}]
        per_setting[r.setting][0]["points"][r.method] = interval(s[0], s[0] - s[1], s[0] + s[1])
    for setting, methods in fidelity.items():
        panels = per_setting.setdefault(setting, [])
        for key, label, better in FIDELITY_AXES:
            panels.append({"metric": label, "better": better,
                           "points": {m: interval(d[key]["mean"], *d[key]["ci"]) for m, d in methods.items()}})
        paired = {m: interval(d["vs_uncorrected"]["psnr"]["mean"], *d["vs_uncorrected"]["psnr"]["ci"])
                  for m, d in methods.items() if "vs_uncorrected" in d}
        if paired:  # the question the marginal intervals cannot answer: closer than the uncorrected model?
            panels.append({"metric": PAIRED_AXIS, "better": "higher", "points": paired})
            references[PAIRED_AXIS] = {"label": "uncorrected", "value": 0.0}
    out = {"methods": {"file": "methods.png", "caption": "Every method of each setting with its interval (paired "
                       "metrics: 95 % bootstrap over samples; FID: half-range over seeds)",
                       "data": methods_figure(outdir / "methods.png", per_setting,
                                              "Quality and fidelity to FP by setting", references)}}
    swept = [st for st in (settings or ()) if st in fidelity]
    if len(swept) >= 2:
        methods = list(dict.fromkeys(m for st in swept for m in fidelity[st]))
        bit_panels = [{"metric": label, "better": better,
                       "series": {m: [interval(fidelity[st][m][key]["mean"], *fidelity[st][m][key]["ci"])
                                      if m in fidelity[st] else None for st in swept] for m in methods}}
                      for key, label, better in FIDELITY_AXES]
        out["bits"] = {"file": "fidelity_vs_bits.png", "caption": "Fidelity to FP against bit width (95 % paired "
                       "bootstrap intervals)", "data": bits_figure(outdir / "fidelity_vs_bits.png", swept, bit_panels,
                                                                    "Fidelity to FP across bit widths")}
    return out


def write_report(outdir: str | os.PathLike, rows: Sequence[Row], context: dict[str, Any],
                 sizes: dict[str, int], timings: dict[str, float], sqnr: dict[str, dict],
                 images: dict[str, str], sections: dict[str, list[str]] | None = None,
                 extra: dict[str, Any] | None = None, figures: dict[str, dict] | None = None) -> Path:
    """report.md + report.json in ``outdir``. ``context`` states the conditions (N, seeds, steps, η, scale,
    machine); ``images`` maps a caption to a PNG path relative to ``outdir``; ``sections`` (title -> markdown lines)
    follow the SQNR table, and ``extra`` (their numbers) goes into report.json; ``figures`` ({name: {"file",
    "caption", "data"}}, as report_figures returns) are shown and their data kept in report.json."""
    outdir = Path(outdir)
    figures = figures or {}
    c = context
    unconditional = c.get("unconditional", False)
    kind = "unconditional" if unconditional else "class-balanced"
    grid = f" on the {c['grid']} grid" if c.get("grid") else ""
    acc = ("" if unconditional else "; Acc. is the fraction of samples the classifier assigns to the class they were "
                                    "drawn for")
    md = [f"# {c['title']}", "",
          f"Conditions: {c['n']} samples per variant and seed ({kind}), seeds {c['seeds']}, DDIM "
          f"{c['steps']} steps{grid}, η {c['eta']}, guidance scale {c['scale']}; reference: {c['reference']}; "
          f"feature network: {c['features']}; machine: {c['machine']}. Values are mean ± half the range over the "
          f"seeds. IS on {c['n']} samples is one split (not comparable with 50k-sample numbers){acc}.", "",
          "## Sample quality", ""]
    md += metrics_table(rows)
    md += ["", "## Quantized UNet: ε SQNR on held-out calibration inputs", "",
           "| model | SQNR (dB) | notes |", "|---|---|---|"]
    for name, d in sqnr.items():
        md.append(f"| {name} | {d['sqnr']:.2f} | {d.get('note', '')} |")
    for title, lines in (sections or {}).items():
        md += ["", f"## {title}", "", *lines]
    md += ["", "## Model size (UNet, as stored)", "",
           "Files written by quant.export (integer weight codes packed: 4-bit two per byte, 8-bit one per byte; "
           "layers kept in FP32, biases and norms as float32) next to the FP32 UNet state dict.", "",
           "| file | bytes | MiB | ratio to FP32 |", "|---|---|---|---|"]
    fp = sizes.get("FP32")
    for name, b in sizes.items():
        md.append(f"| {name} | {b:,} | {b / 2 ** 20:.2f} | {fp / b:.2f}× |" if fp else f"| {name} | {b:,} | | |")
    md += ["", "## Wall time of each pipeline stage", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k.replace('|', '/')} | {v:.1f} |" for k, v in timings.items()]
    md += [f"| **total** | {sum(timings.values()):.1f} |", "", "## Figures and pictures", ""]
    md += [f"**{f['caption']}**\n\n![{f['caption']}]({f['file']})\n" for f in figures.values()]
    md += [f"**{caption}**\n\n![{caption}]({p})\n" for caption, p in images.items()]
    outdir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(outdir / "report.md", "\n".join(md) + "\n")
    record = {"context": context, "sizes": sizes, "timings": timings, "sqnr": sqnr, "images": images,
              "figures": figures,
              **({"extra": extra} if extra else {}),
              "rows": [{"setting": r.setting, "method": r.method, "sampler": r.sampler,
                        "per_seed": {str(s): rec["metrics"] for s, rec in sorted(r.records.items())},
                        "summary": {key: r.summary(key) for key, _, _ in METRICS}} for r in rows]}
    write_json_atomic(outdir / "report.json", record)
    return outdir / "report.md"


# ---- QNCD smoothing sections (numbers measured by the caller) --------------------------------------------------

def smoothing_effect_lines(effect: dict[str, dict], factors: dict, formula: str, n_held: int,
                           a_bits: Sequence[int]) -> list[str]:
    """The per-ResBlock table of ``quant.smoothing.smoothing_effect``: S range, second-conv input range before →
    after a ↦ a/S, and the conv-output SQNR with only the input (A) or only the weights (W4) quantized; a mean row."""
    acts = " | ".join(f"A{b} SQNR before → after" for b in a_bits)
    lines = [f"S from the {formula} formula over the calibration timesteps; measured on the {n_held} held-out "
             f"calibration inputs with the FP UNet. Range: max − min of the input of each ResBlock's second conv, "
             f"before and after a ↦ a/S. SQNR (dB) of that conv's output with only its input (A) or only its "
             f"weights (W4, W·S after) quantized, per-tensor, MSE-searched ranges.", "",
             f"| ResBlock | S min…max | range before → after | ratio | {acts} | W4 SQNR before → after |",
             "|---|---|---|---|" + "---|" * len(a_bits) + "---|"]
    for name, e in effect.items():
        s, (r0, r1) = factors[name], e["range"]
        cells = " | ".join(f"{e['act_sqnr_db'][b][0]:.1f} → {e['act_sqnr_db'][b][1]:.1f}" for b in a_bits)
        lines.append(f"| {name} | {s.min():.2f}…{s.max():.2f} | {r0:.2f} → {r1:.2f} | {r1 / r0:.2f} | {cells} | "
                     f"{e['weight_sqnr_db'][0]:.1f} → {e['weight_sqnr_db'][1]:.1f} |")
    n = len(effect)
    mean = {b: [sum(e["act_sqnr_db"][b][i] for e in effect.values()) / n for i in (0, 1)] for b in a_bits}
    w_mean = [sum(e["weight_sqnr_db"][i] for e in effect.values()) / n for i in (0, 1)]
    ratio = sum(e["range"][1] / e["range"][0] for e in effect.values()) / n
    lines.append(f"| **mean of {n}** | | | {ratio:.2f} | "
                 + " | ".join(f"{mean[b][0]:.1f} → {mean[b][1]:.1f}" for b in a_bits)
                 + f" | {w_mean[0]:.1f} → {w_mean[1]:.1f} |")
    return lines


def sqnr_without_with_lines(plain: str, both: Sequence[tuple[str, float, float]]) -> list[str]:
    """ε SQNR of each model without and with smoothing: (name, without, with) in dB."""
    return [f"Held-out inputs as above; without = the same mode's unsmoothed run ({plain}).", "",
            "| model | without (dB) | with (dB) | Δ (dB) |", "|---|---|---|---|",
            *[f"| {n} | {x:.2f} | {y:.2f} | {y - x:+.2f} |" for n, x, y in both]]


def quality_without_with_lines(seeds: Sequence[int], n: int,
                               quality: Sequence[tuple[Row, tuple[float, float]]]) -> list[str]:
    """FID and accuracy of each row with smoothing against (FID, accuracy) without, both means over the seeds."""
    return [f"Means over seeds {list(seeds)}, {n} samples each; the same seeds, x_T and noise.", "",
            "| setting | method | FID without | FID with | Acc. without | Acc. with |", "|---|---|---|---|---|---|",
            *[f"| {r.setting} | {r.method} | {f0:.3f} | {r.summary('fid')[0]:.3f} | {a0:.3f} | "
              f"{r.summary('classifier_accuracy')[0]:.3f} |" for r, (f0, a0) in quality]]


# The docs/ page (path from the repository root) holding each marked section `make demo` regenerates; the README
# itself stays short and is never written by code.
FASHION_PAGE = "docs/results-fashion.md"
RESULTS_PAGES = {"demo-results": FASHION_PAGE, "demo-bits-results": FASHION_PAGE,
                 "demo-pixel-results": "docs/cifar10.md", "demo-text-results": "docs/stable-diffusion.md",
                 "demo-qncd-results": "docs/qncd.md", "demo-dit-results": "docs/DIT.md"}


def results_page(tag: str) -> str:
    """The page of a section tag; every 250-step protocol section (demo-long-eta{η}-results) is on the Fashion page."""
    return FASHION_PAGE if tag.startswith("demo-long-") else RESULTS_PAGES[tag]


def update_results_page(report: Path, page: Path, tag: str = "demo-results",
                        keep: Sequence[str] | None = None) -> bool:
    """Copy the report's conditions, tables and total time between the page's ``<!-- {tag}:start/end -->`` markers
    (``results_page(tag)`` says which page: demo-results of `make demo` and the HARD / LONG sections on
    docs/results-fashion.md, demo-qncd-results of `make demo QNCD=1 SMOOTH=1` on docs/qncd.md, ...); ``keep``: only
    the report sections of these titles (default: all up to the stage times). False when the markers are absent."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    text = page.read_text()
    if start not in text or end not in text:
        return False
    md = report.read_text()
    body = md[md.index("Conditions:"):md.index("## Wall time")]
    if keep is not None:
        head, *parts = body.split("\n## ")
        body = "\n## ".join([head] + [part for part in parts if part.split("\n", 1)[0] in keep]) + "\n"
    # the report's sections become subsections of the page's "## ..." section that holds the markers
    body = body.replace("## ", "### ")
    total = next((line for line in md.splitlines() if line.startswith("| **total**")), None)
    if total:
        seconds = float(total.split("|")[2])
        body += f"Sum of the stage wall times: {seconds / 60:.1f} min (each stage in {report}).\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    write_text_atomic(page, f"{head}{start}\n{body.strip()}\n{end}{tail}")
    return True


update_readme = update_results_page   # the name before the results moved from README.md to docs/ pages


# ---- paired fidelity to FP (evaluation.fidelity records, one per variant and seed) ---------------------------------

def pooled(records: Sequence[dict], key: str) -> np.ndarray:
    """A per-sample metric over every seed's samples (the seeds' samples are disjoint, so they pool)."""
    return np.concatenate([np.asarray(r["per_sample"][key], dtype=np.float64) for r in records])


def fidelity_summary(records: Sequence[dict], boot: Bootstrap) -> dict:
    """Means and bootstrap intervals of the pooled per-sample metrics; FID to FP as mean ± half-range over seeds."""
    out = {k: boot.mean(pooled(records, k)) for k in PER_SAMPLE}
    fids = [r["metrics"]["fid_to_fp"]["mean"] for r in records]
    out["fid_to_fp"] = {"mean": statistics.fmean(fids), "spread": (max(fids) - min(fids)) / 2}
    out["n"] = sum(r["n"] for r in records)
    return out


def versus(records: Sequence[dict], baseline: Sequence[dict], boot: Bootstrap) -> dict:
    """Paired difference (method − baseline) of each per-sample metric, pooled over seeds, with its interval and
    whether the method is closer to FP (the interval excludes 0 on the closer side)."""
    out = {}
    for k in PER_SAMPLE:
        d = boot.mean(pooled(records, k) - pooled(baseline, k))
        lo, hi = d["ci"]
        better = (lo > 0) if HIGHER_IS_CLOSER[k] else (hi < 0)
        worse = (hi < 0) if HIGHER_IS_CLOSER[k] else (lo > 0)
        out[k] = {**d, "verdict": "closer" if better else "farther" if worse else "inside the noise"}
        if not (better or worse):
            out[k]["n_to_resolve"] = samples_to_resolve(d, sum(r["n"] for r in records))
    return out


def samples_to_resolve(d: dict, n: int) -> int | None:
    """About how many paired samples an interval like ``d`` (measured on ``n``) needs to exclude 0 at its mean: the
    half-width shrinks as 1/√N, so N ≈ n · (half-width / |mean|)². None for a mean of exactly 0."""
    half = (d["ci"][1] - d["ci"][0]) / 2
    return None if d["mean"] == 0 else int(np.ceil(n * (half / abs(d["mean"])) ** 2))


PAIRED_CELLS = (("psnr", ".2f"), ("ssim", ".4f"), ("feature_distance", ".4f"))
MISSES = ("†: this interval does not contain its estimate (evaluation.fidelity.check_interval: the bootstrap "
          "distribution is too skewed or too discrete at this N); read it with care.")


def interval_cell(d: dict, f: str) -> str:
    """``mean [lo, hi]`` of a per-sample metric's percentile interval, marked † when the interval misses its mean
    (evaluation.fidelity.check_interval; never at the demo's N, but said when it happens)."""
    mark = "" if d.get("contains_estimate", True) else "†"
    return f"{d['mean']:{f}} [{d['ci'][0]:{f}}, {d['ci'][1]:{f}}]{mark}"


def misses_note(lines: list[str]) -> list[str]:
    """The † footnote, when a table line holds a marked interval."""
    return ["", MISSES] if any("]†" in line for line in lines) else []


def fidelity_lines(groups: dict[str, list[tuple[str, str, list[dict]]]], boot: Bootstrap) -> tuple[list[str], dict]:
    """Per setting, the methods ranked by PSNR to the FP samples (same x_T and noise), with intervals, and a
    sentence on which corrections are closer to FP than the uncorrected model beyond the noise."""
    level = int(boot.level * 100)
    lines = [f"Each quantized sample against the FP sample made from the same x_T and sampler noise; per-sample "
             f"metrics pooled over the seeds, {level} % percentile bootstrap over samples ({boot.resamples} "
             f"resamples, seed {boot.seed}); FID to FP is the FID of the variant's samples with the FP samples as "
             f"reference (mean ± half-range over seeds). Higher PSNR/SSIM and lower distances are closer to FP."]
    data = {}
    for setting, methods in groups.items():
        summary = {m: fidelity_summary(recs, boot) for m, _, recs in methods}
        base = next((recs for m, s, recs in methods if s == "none"), None)
        lines += ["", f"**{setting}**", "", "| method | PSNR (dB) | SSIM | feature distance | FID to FP |",
                  "|---|---|---|---|---|"]
        for m in sorted(summary, key=lambda k: -summary[k]["psnr"]["mean"]):
            s = summary[m]
            cells = [interval_cell(s[k], f) for k, f in PAIRED_CELLS]
            lines.append(f"| {m} | {' | '.join(cells)} | {s['fid_to_fp']['mean']:.3f} ± "
                         f"{s['fid_to_fp']['spread']:.3f} |")
        data[setting] = {m: dict(summary[m]) for m in summary}
        if base is not None and len(methods) > 1:
            verdicts = {m: versus(recs, base, boot) for m, s, recs in methods if s != "none"}
            for m, v in verdicts.items():
                data[setting][m]["vs_uncorrected"] = v
            lines += ["", verdict_sentence(setting, verdicts, level)]
    return lines + misses_note(lines), data


def sweep_lines(fidelity: dict[str, dict], rows: Sequence[Row], sqnr: dict[str, dict],
                settings: Sequence[str]) -> tuple[list[str], dict]:
    """One table over the bit-width sweep: per setting and method the paired metrics with their intervals, the
    paired Δ PSNR against the uncorrected model (and, inside the noise, about how many samples would resolve it),
    FID to the reference and to FP, and the setting's ε SQNR; then each setting's verdict sentence."""
    fid = {(r.setting, r.method): r.summary("fid") for r in rows}
    lines = ["| setting | ε SQNR (dB) | method | PSNR (dB) | SSIM | feature distance | Δ PSNR vs uncorrected "
             "(paired) | FID | FID to FP |", "|---|---|---|---|---|---|---|---|---|"]
    data = {}
    for setting in (s for s in settings if s in fidelity):
        q = sqnr.get(setting, {}).get("sqnr")
        for method, d in sorted(fidelity[setting].items(), key=lambda kv: -kv[1]["psnr"]["mean"]):
            cells = [interval_cell(d[k], f) for k, f in PAIRED_CELLS]
            v = d.get("vs_uncorrected", {}).get("psnr")
            delta = "—" if v is None else interval_cell(v, "+.3f") + (
                f" (N≈{v['n_to_resolve']:,} to resolve)" if v.get("n_to_resolve") else
                " ✓" if v["verdict"] == "closer" else " ✗" if v["verdict"] == "farther" else "")
            f = fid.get((setting, method))
            lines.append(f"| {setting} | {'—' if q is None else f'{q:.2f}'} | {method} | {' | '.join(cells)} | "
                         f"{delta} | {'—' if f is None else f'{f[0]:.3f}'} | {d['fid_to_fp']['mean']:.3f} |")
            data.setdefault(setting, {})[method] = {"sqnr_db": q, "fid": None if f is None else f[0]}
    lines += ["", "✓: closer to FP than the uncorrected model beyond the noise (95 % paired bootstrap, PSNR); ✗: "
              "farther; N≈: paired samples an interval of this width needs to exclude 0 at the measured mean "
              "(the half-width shrinks as 1/√N)."]
    for setting in (s for s in settings if s in fidelity):
        verdicts = {m: d["vs_uncorrected"] for m, d in fidelity[setting].items() if "vs_uncorrected" in d}
        if verdicts:
            lines += ["", verdict_sentence(setting, verdicts, 95)]
    return lines + misses_note(lines), data


def verdict_sentence(setting: str, verdicts: dict[str, dict], level: int) -> str:
    """One sentence: which methods are closer to / farther from FP than the uncorrected model, on which metrics."""
    closer = {m: [k for k, d in v.items() if d["verdict"] == "closer"] for m, v in verdicts.items()}
    farther = {m: [k for k, d in v.items() if d["verdict"] == "farther"] for m, v in verdicts.items()}
    name = {"psnr": "PSNR", "ssim": "SSIM", "feature_distance": "feature distance"}
    parts = [f"{m} ({', '.join(name[k] for k in ks)})" for m, ks in closer.items() if ks]
    worse = [f"{m} ({', '.join(name[k] for k in ks)})" for m, ks in farther.items() if ks]
    noise = [m + (f" (N≈{v['psnr']['n_to_resolve']:,} samples would resolve its PSNR difference)"
                  if v["psnr"].get("n_to_resolve") else "")
             for m, v in verdicts.items() if not closer[m] and not farther[m]]
    text = f"{setting}: closer to FP than the uncorrected model beyond the noise ({level} % paired bootstrap): "
    text += ", ".join(parts) if parts else "none"
    if worse:
        text += f"; farther: {', '.join(worse)}"
    if noise:
        text += f"; inside the noise on every metric: {', '.join(noise)}"
    return text + "."
