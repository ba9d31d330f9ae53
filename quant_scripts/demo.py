"""The whole pipeline on the embedded default, then a report: `make demo` (QUICK=1 for a smoke run).

    python quant_scripts/demo.py              # ~30 min on a 2-core CPU: outputs/fashion/report.md
    python quant_scripts/demo.py --quick      # ~3 min, small counts: outputs/quick/fashion/report.md
    python quant_scripts/demo.py --paper      # paper-sized iteration and sample counts (a GPU run)
    python quant_scripts/demo.py --fresh      # start over (deletes this mode's outputs first)
    python quant_scripts/demo.py --qncd       # + QNCD probe rows at W4A8 and the W4A6 setting
    python quant_scripts/demo.py --smooth     # the same with QNCD smoothing at quantization (outputs-smooth/)

A thin driver: every step is the real pipeline script, called in this process with its command line. Steps whose
artifacts exist with matching metadata are skipped by the scripts themselves, so a rerun after an interruption
continues where it stopped (reconstruction and sample generation resume mid-step). Stage wall times are recorded
when a stage actually runs (demo_timings.json) and reported.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from quant_scripts.common import REPO_ROOT, load_preset, run_cli  # noqa: E402

PRESET = "fashion"
SEEDS = (0, 1)
REFERENCE = "models/eval/fashion_test_reference.npz"
# (setting, method shown in the report, sampler, w_bits, a_bits)
VARIANTS = (
    ("FP32", "—", "fp32", None, None),
    ("W8A8", "uncorrected", "none", 8, 8),
    ("W4A8", "uncorrected", "none", 4, 8),
    ("W4A8", "PTQD", "ptqd", 4, 8),
    ("W4A8", "S-D² (tensor)", "sd2-tensor", 4, 8),
    ("W4A8", "D-D² (tensor)", "dd2-tensor", 4, 8),
    ("W4A8", "S-D² (channel)", "sd2-channel", 4, 8),
    ("W4A8", "D-D² (channel)", "dd2-channel", 4, 8),
)
# --qncd adds QNCD's runtime noise estimation (probe every 10 steps), alone and on top of D², and the W4A6 setting
# QNCD's paper headlines (outside the default's 30-minute CPU budget)
QNCD_VARIANTS = (
    ("W4A8", "QNCD probe", "qncd", 4, 8),
    ("W4A8", "QNCD probe + D-D² (channel)", "qncd+dd2-channel", 4, 8),
    ("W4A8", "QNCD probe + S-D² (channel)", "qncd+sd2-channel", 4, 8),
    # W4A6, the setting QNCD's paper headlines
    ("W4A6", "uncorrected", "none", 4, 6),
    ("W4A6", "QNCD probe", "qncd", 4, 6),
    ("W4A6", "D-D² (channel)", "dd2-channel", 4, 6),
    ("W4A6", "QNCD probe + D-D² (channel)", "qncd+dd2-channel", 4, 6),
)

EXTRA_QUANT = ()  # settings quantized and reported (SQNR) even without sample rows (W4A6 comes with --qncd)
# the counts of each mode; None = the preset's value. AdaRound gains far less at W8 than at W4 on the embedded default
# (+1.4 dB over nearest at 40 dB), so the CPU modes give W8 fewer iterations than W4.
MODES = {
    "default": dict(outdir="outputs", seeds=SEEDS, n_eval=1000, n_cal=None, n_holdout=None, traj=None,
                    weight_iters=None, weight_iters_8=100, act_iters=None, act_init=None, stats=None),
    "quick": dict(outdir="outputs/quick", seeds=(0,), n_eval=30, n_cal=160, n_holdout=32, traj=2, weight_iters=4,
                  weight_iters_8=2, act_iters=2, act_init=32, stats=20),
    "paper": dict(outdir="outputs/paper", seeds=SEEDS, n_eval=10000, n_cal=1024, n_holdout=128, traj=None,
                  weight_iters=10000, weight_iters_8=10000, act_iters=5000, act_init=32, stats=1024),
}


def script(name: str):
    """A pipeline script as a module (each has main(argv))."""
    path = REPO_ROOT / ("evaluator.py" if name == "evaluator" else f"quant_scripts/{name}.py")
    spec = importlib.util.spec_from_file_location(f"demo_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Stage:
    name: str
    script: str
    argv: list[str]
    outputs: list[Path]           # what the stage writes: it "ran" when one of them changed
    skip_if_exists: bool = False  # for steps without their own metadata check (grids, evaluator records)
    pattern: str | None = None    # a glob (in outputs[0]) that marks a grid step as done


def _stamp(paths: list[Path]) -> list[float | None]:
    return [p.stat().st_mtime if p.exists() else None for p in paths]


class Driver:
    def __init__(self, root: Path, timings_path: Path):
        self.root, self.timings_path = root, timings_path
        self.timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    def run(self, stage: Stage, total: int, index: int) -> None:
        print(f"\n=== [{index}/{total}] {stage.name}", flush=True)
        done = (any(stage.outputs[0].glob(stage.pattern)) if stage.pattern
                else stage.outputs and all(p.exists() for p in stage.outputs))
        if stage.skip_if_exists and done:
            print("already done; skipping")
            return
        before = _stamp(stage.outputs)  # (directories count as changed when a file is added to them)
        t0 = time.perf_counter()
        script(stage.script).main(stage.argv)
        seconds = time.perf_counter() - t0
        if _stamp(stage.outputs) != before:  # it did work (not a metadata-matched skip): record its time
            self.timings[stage.name] = seconds
            tmp = self.timings_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.timings, indent=1))
            os.replace(tmp, self.timings_path)


def variants(args) -> tuple:
    return VARIANTS + (QNCD_VARIANTS if args.qncd else ())


def build_stages(args, run: Path, m: dict) -> list[Stage]:
    common = ["--preset", args.preset, "--outdir", m["outdir"]]

    def opt(flag, value):
        return [flag, str(value)] if value is not None else []

    quant = quant_settings(args)
    fitted = sorted({(w, a) for _, _, s, w, a in variants(args) if w and s not in ("none", "qncd")},
                    reverse=True)  # the settings whose noise statistics and fits some variant reads
    smooth = ["--scale_split_static"] if args.smooth else []
    stages = [
        Stage("FP32 grid", "sample_fp32_imagenet", ["--preset", args.preset, "--outdir", str(run / "grids")],
              [run / "grids"], skip_if_exists=True, pattern="fp32_*.png"),
        Stage("calibration set", "collect_imagenet_calibration_set",
              common + opt("--n", m["n_cal"]) + opt("--n_holdout", m["n_holdout"])
              + opt("--calibration_trajectories_per_class", m["traj"]), [run / "calibration.pt"]),
    ]
    for w in sorted({w for w, _ in quant}):
        stages.append(Stage(f"W{w} weights (BRECQ/AdaRound)", "quantize_weight",
                            common + ["--w_bits", str(w)] + smooth
                            + opt("--weight_iters", m["weight_iters_8"] if w == 8 else m["weight_iters"]),
                            [run / f"w{w}" / f"quant_w{w}.pt"]))
    for w, a in sorted(quant):
        stages.append(Stage(f"W{w}A{a} activations (learned steps)", "quantize_weight_activation",
                            common + ["--w_bits", str(w), "--a_bits", str(a)] + smooth
                            + opt("--act_iters", m["act_iters"])
                            + opt("--act_init_samples", m["act_init"]), [run / f"w{w}a{a}" / f"quant_w{w}a{a}.pt"]))
    for w, a in fitted:
        bits = ["--w_bits", str(w), "--a_bits", str(a)]
        stages += [
            Stage(f"W{w}A{a} noise statistics", "collect_timestep_aware_statistics",
                  common + bits + opt("--n", m["stats"]), [run / f"w{w}a{a}" / "noise_stats.pt"]),
            Stage(f"W{w}A{a} Gaussian + PTQD fits", "gaussian_modeling", common + bits,
                  [run / f"w{w}a{a}" / "gaussian_tensor.pt"])]
    stages += [
        Stage("comparison grid (FP / uncorrected / PTQD / D-D²)", "sample_quantized_ldm_imagenet",
              common + ["--compare", "--sampler", "dd2-channel", "--no_progress"], [run / "w4a8" / "samples"],
              skip_if_exists=True, pattern="compare_*.png"),
    ]
    from evaluation.generation import sample_dir
    for seed in args.seeds:
        for setting, method, sampler, w, a in variants(args):
            tag = f"w{w}a{a}" if w else "fp32"
            d = sample_dir(run, tag, sampler, m["n_eval"], seed)
            bits = ["--w_bits", str(w), "--a_bits", str(a)] if w else []
            stages.append(Stage(f"samples {setting} {method} seed {seed}", "generate_evaluation_samples_dist",
                                common + ["--sampler", sampler, "--n_samples", str(m["n_eval"]), "--seed", str(seed)]
                                + bits, [d / "samples.npz"]))
            stages.append(Stage(f"evaluate {setting} {method} seed {seed}", "evaluator",
                                [str(REPO_ROOT / REFERENCE), str(d / "samples.npz"), "--json", str(d / "eval.json"),
                                 "--cache_dir", str(run.parent / "evaluator_cache")],
                                [d / "eval.json"], skip_if_exists=True))
    return stages


def make_report(args, run: Path, m: dict, driver: Driver) -> Path:
    from evaluation.generation import sample_dir
    from evaluation.report import Row, write_report
    from quant.export import pack_quant_model
    from quant.pipeline import load_quant_model
    from ldm.util import load_config, load_model_from_config, save_atomic

    rows = []
    for setting, method, sampler, w, a in variants(args):
        row = Row(setting, method, sampler)
        for seed in args.seeds:
            d = sample_dir(run, f"w{w}a{a}" if w else "fp32", sampler, m["n_eval"], seed)
            row.records[seed] = json.loads((d / "eval.json").read_text())
        rows.append(row)
    preset = load_preset(args.preset)
    model = load_model_from_config(load_config(REPO_ROOT / preset["config"]), REPO_ROOT / preset["ckpt"])
    unet = model.model.diffusion_model
    export = run / "export"
    export.mkdir(exist_ok=True)
    save_atomic(unet.state_dict(), export / "unet_fp32.pt")
    sizes = {"FP32": (export / "unet_fp32.pt").stat().st_size}
    for w in (4, 8):
        qm, _ = load_quant_model(unet, run / f"w{w}" / f"quant_w{w}.pt", {})
        save_atomic(pack_quant_model(qm), export / f"unet_w{w}.pt")
        sizes[f"W{w}"] = (export / f"unet_w{w}.pt").stat().st_size
    sqnr = sqnr_rows(args, run)
    images = {}
    for caption, pattern in (("FP32 samples", "grids/fp32_*.png"), ("FP | uncorrected | PTQD | D-D² (W4A8)",
                                                                     "w4a8/samples/compare_*.png"),
                             ("Quantization noise per timestep (W4A8)", "w4a8/noise_stats.png")):
        found = sorted(run.glob(pattern))
        if found:
            images[caption] = os.path.relpath(found[-1], run.parent)
    context = {"title": f"D²-DPM / PTQD on the embedded default ({args.preset}), mode {args.mode}"
                        + (", QNCD smoothing" if args.smooth else ""),
               "n": m["n_eval"], "seeds": list(args.seeds), "steps": 20, "eta": 0.0, "scale": 3.0,
               "reference": REFERENCE, "features": rows[0].records[args.seeds[0]].get("feature_network"),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                          f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}"}
    # per-stage times; the many sampling and evaluation stages are summed (the JSON keeps each one)
    timings: dict[str, float] = {}
    for name, seconds in driver.timings.items():
        key = ("evaluation samples (all variants and seeds)" if name.startswith("samples ")
               else "evaluator (all variants and seeds)" if name.startswith("evaluate ") else name)
        timings[key] = timings.get(key, 0.0) + seconds
    context["stage_times_each"] = driver.timings
    sections, extra = smoothing_sections(args, run, m, unet, rows, sqnr) if args.smooth else ({}, {})
    return write_report(run.parent, rows, context, sizes, timings, sqnr, images, sections, extra)


def quant_settings(args) -> set[tuple[int, int]]:
    """The (w_bits, a_bits) settings quantized in this run: those of the variants, and EXTRA_QUANT."""
    return {(w, a) for _, _, _, w, a in variants(args) if w} | set(EXTRA_QUANT)


def sqnr_rows(args, run: Path) -> dict[str, dict]:
    """{row name: {"sqnr": dB, "note": ...}} from the meta of ``run``'s quant artifacts (the ε SQNRs steps 2-3
    measured on the held-out inputs); a missing artifact is left out."""
    from quant.artifacts import load_artifact
    rows = {}
    for w in (4, 8):
        path = run / f"w{w}" / f"quant_w{w}.pt"
        if path.exists():
            meta = load_artifact(path, "quant")["meta"]
            rows[f"W{w} round-to-nearest"] = {"sqnr": meta["sqnr_nearest_db"], "note": "before reconstruction"}
            rows[f"W{w} AdaRound"] = {"sqnr": meta["sqnr_adaround_db"],
                                      "note": f"{meta['weight_iters']} iterations/unit"}
    for w, a in sorted(quant_settings(args)):
        path = run / f"w{w}a{a}" / f"quant_w{w}a{a}.pt"
        if path.exists():
            meta = load_artifact(path, "quant")["meta"]
            rows[f"W{w}A{a}"] = {"sqnr": meta["sqnr_db"], "note": f"initial ranges {meta['sqnr_act_init_db']:.2f} dB, "
                                                                  f"{meta['act_iters']} step-size iterations/unit"}
    return rows


def _unsmoothed_run(run: Path, m: dict) -> Path:
    """The same mode's run without smoothing (``outputs/…`` for ``outputs-smooth/…``), for side-by-side numbers."""
    return Path(m["outdir"].removesuffix("-smooth")) / run.parent.name / run.name


def smoothing_sections(args, run: Path, m: dict, unet, rows: list, sqnr: dict) -> tuple[dict, dict]:
    """The QNCD-smoothing part of the report: per-block effect on the second conv (quant.smoothing.smoothing_effect
    on the held-out calibration inputs), ε SQNR with and without smoothing, and sample quality with and without
    (read from the unsmoothed run of the same mode, where it has been made)."""
    from evaluation.generation import sample_dir
    from quant.artifacts import load_artifact
    from quant.reconstruction import CalibrationData
    from quant.smoothing import smoothing_effect

    w4 = load_artifact(run / "w4" / "quant_w4.pt", "quant")
    factors, meta = w4["smoothing"]["factors"], w4["meta"]
    calib = load_artifact(run / "calibration.pt", "calibration")
    held = CalibrationData(calib["holdout_x"], calib["holdout_t"], calib.get("holdout_c"), torch.device("cpu"))
    a_bits = sorted({a for _, _, _, w, a in variants(args) if w == 4}, reverse=True)
    effect = smoothing_effect(unet, factors, held.batches(64), a_bits=a_bits, w_bits=4,
                              channel_wise=bool(meta.get("channel_wise")))
    acts = " | ".join(f"A{b} SQNR before → after" for b in a_bits)
    lines = [f"S from the {meta['smoothing']} formula over the calibration timesteps; measured on the "
             f"{len(held)} held-out calibration inputs with the FP UNet. Range: max − min of the input of each "
             f"ResBlock's second conv, before and after a ↦ a/S. SQNR (dB) of that conv's output with only its "
             f"input (A) or only its weights (W4, W·S after) quantized, per-tensor, MSE-searched ranges.", "",
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
    sections = {"QNCD smoothing: effect on each ResBlock's second conv": lines}
    extra = {"smoothing_effect": effect}

    plain = _unsmoothed_run(run, m)
    plain_sqnr = sqnr_rows(args, plain)
    both = [(name, plain_sqnr[name]["sqnr"], d["sqnr"]) for name, d in sqnr.items() if name in plain_sqnr]
    if both:
        sections["ε SQNR without and with smoothing"] = [
            f"Held-out inputs as above; without = the same mode's unsmoothed run ({plain}).", "",
            "| model | without (dB) | with (dB) | Δ (dB) |", "|---|---|---|---|",
            *[f"| {n} | {x:.2f} | {y:.2f} | {y - x:+.2f} |" for n, x, y in both]]
        extra["sqnr_without_with"] = {n: (x, y) for n, x, y in both}
    quality = []
    for r, (_, _, sampler, w, a) in zip(rows, variants(args), strict=True):
        files = [sample_dir(plain, f"w{w}a{a}", sampler, m["n_eval"], seed) / "eval.json" for seed in args.seeds]
        if w and all(f.exists() for f in files):
            recs = [json.loads(f.read_text())["metrics"] for f in files]
            quality.append((r, [sum(x[k] for x in recs) / len(recs) for k in ("fid", "classifier_accuracy")]))
    if quality:
        sections["Sample quality without and with smoothing"] = [
            f"Means over seeds {list(args.seeds)}, {m['n_eval']} samples each; the same seeds, x_T and noise.", "",
            "| setting | method | FID without | FID with | Acc. without | Acc. with |", "|---|---|---|---|---|---|",
            *[f"| {r.setting} | {r.method} | {f0:.3f} | {r.summary('fid')[0]:.3f} | {a0:.3f} | "
              f"{r.summary('classifier_accuracy')[0]:.3f} |" for r, (f0, a0) in quality]]
        extra["quality_without_with"] = {
            f"{r.setting} {r.method}": {"fid": (f0, r.summary("fid")[0]),
                                        "classifier_accuracy": (a0, r.summary("classifier_accuracy")[0])}
            for r, (f0, a0) in quality}
    return sections, extra


def update_readme(report: Path, readme: Path = REPO_ROOT / "README.md", tag: str = "demo-results") -> bool:
    """Copy the report's conditions, tables and total time between the README's ``<!-- {tag}:start/end -->``
    markers (demo-results: `make demo`; demo-qncd-results: `make demo QNCD=1 SMOOTH=1`)."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        return False
    md = report.read_text()
    body = md[md.index("Conditions:"):md.index("## Wall time")]
    # the report's sections become subsections of the README section holding the markers
    depth = "####" if tag == "demo-qncd-results" else "###"
    body = body.replace("## ", f"{depth} ").replace("![FID by method](fid_by_method.png)\n", "")
    total = next((line for line in md.splitlines() if line.startswith("| **total**")), None)
    if total:
        seconds = float(total.split("|")[2])
        body += f"Sum of the stage wall times: {seconds / 60:.1f} min (each stage in {report}).\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = readme.with_name(f".{readme.name}.tmp{os.getpid()}")
    tmp.write_text(f"{head}{start}\n{body.strip()}\n{end}{tail}")
    os.replace(tmp, readme)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small counts, about 3 minutes on a CPU")
    group.add_argument("--paper", action="store_true", help="paper-sized counts (for a GPU)")
    p.add_argument("--fresh", action="store_true", help="delete this mode's outputs and start over")
    p.add_argument("--qncd", action="store_true", help="add the QNCD probe rows (W4A8) and the W4A6 setting")
    p.add_argument("--smooth", action="store_true",
                   help="quantize with QNCD's embedding-derived smoothing (--scale_split_static); its own outdir "
                        "(<outdir>-smooth), so every row of the report is then the smoothed model's")
    p.add_argument("--preset", default=PRESET)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (quick: 0)")
    p.add_argument("--outdir", default=None, help="artifact root (default: outputs, outputs/quick, outputs/paper)")
    args = p.parse_args(argv)
    args.mode = "quick" if args.quick else "paper" if args.paper else "default"
    m = dict(MODES[args.mode])
    if args.outdir is not None:
        m["outdir"] = args.outdir
    if args.smooth:
        m["outdir"] = m["outdir"].rstrip("/") + "-smooth"
    args.seeds = list(args.seeds or m["seeds"])
    root = Path(m["outdir"]) / args.preset
    if args.fresh and root.exists():
        print(f"--fresh: removing {root}")
        shutil.rmtree(root)
    preset = load_preset(args.preset)
    run = root / f"scale{preset['scale']:g}_eta{preset['eta']:g}_steps{preset['steps']}"
    run.mkdir(parents=True, exist_ok=True)
    driver = Driver(root, root / "demo_timings.json")
    stages = build_stages(args, run, m)
    t0 = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        driver.run(stage, len(stages), i)
    report = make_report(args, run, m, driver)
    print(f"\nwrote {report} ({time.perf_counter() - t0:.0f} s this run)")
    tag = {(False, False): "demo-results", (True, True): "demo-qncd-results"}.get((args.qncd, args.smooth))
    if args.mode == "default" and args.outdir is None and tag and update_readme(report, tag=tag):
        print(f"updated the {tag} section of README.md")
    print(report.read_text())


if __name__ == "__main__":
    run_cli(main)
