"""The whole pipeline on the embedded default, then a report: `make demo` (QUICK=1 for a smoke run).

    python quant_scripts/demo.py              # ~30 min on a 2-core CPU: outputs/fashion/report.md
    python quant_scripts/demo.py --quick      # ~3 min, small counts: outputs/quick/fashion/report.md
    python quant_scripts/demo.py --paper      # paper-sized iteration and sample counts (a GPU run)
    python quant_scripts/demo.py --fresh      # start over (deletes this mode's outputs first)
    python quant_scripts/demo.py --qncd       # + QNCD probe rows at W4A8 and the W4A6 setting
    python quant_scripts/demo.py --smooth     # the same with QNCD smoothing at quantization (outputs-smooth/)
    python quant_scripts/demo.py --hard       # the bit-width sweep W8A8 … W4A4, W3A8 x every method (fashion/bits/)
    python quant_scripts/demo.py --long --eta 1   # the paper's 250-step, scale-1.5 protocol at W4A8 (η 0 or 1)
    python quant_scripts/demo.py --preset fashion-ddim --n_eval 500   # the pixel default: FP32, W8A8, W4A8 x
                                                  # {uncorrected, PTQD, D-D², QNCD probe} (outputs/fashion-ddim/)
    python quant_scripts/demo.py --preset fashion-txt2img --n_eval 500   # the text default: FP32, W8A8, W4A8 x
                                                  # {uncorrected, D-D², QNCD probe} (outputs/fashion-txt2img/)

    python quant_scripts/demo.py --hard --list    # the stages of a mode, in order; nothing is run or written

A thin driver: every stage is a pipeline step (``pipeline.steps``, and the evaluator's and the paired fidelity's
library functions) called in this process with its typed settings: one ``Run`` (the preset's model at the mode's
sampling settings) and each step's settings: the mode's counts (``MODES``) over the preset's values, and for the rest
the settings classes' defaults (which the step scripts' flags default to). Steps whose artifacts exist with matching
metadata skip themselves, so a rerun after an interruption continues where it stopped (reconstruction and sample
generation resume mid-step). Stage wall times are recorded when a stage actually runs (demo_timings.json) and
reported.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from evaluation.evaluate import evaluate
from evaluation.fidelity import Bootstrap, paired_fidelity
from evaluation.report import (Row, fidelity_lines, quality_without_with_lines, report_figures, results_page,
                               smoothing_effect_lines, sqnr_without_with_lines, sweep_lines, update_results_page,
                               write_report)
from ldm.fileio import save_atomic, write_json_atomic
from ldm.util import UserFacingError, at_least
from pipeline.artifacts import load_artifact
from pipeline.basics import REPO_ROOT, load_preset, pick_device
from pipeline.cli import ArgumentParser, check_probe_fires, run_cli
from pipeline.layout import FP32, QuantTag, RunLayout
from pipeline.quantize import CacheSettings
from pipeline.run import Preset, Run, SamplerChoice
from pipeline.sampler_spec import SamplerSpec
from pipeline.steps import (calibrate, evaluation_samples, fit_noise, noise_statistics, quantize_activations,
                            quantize_weights, sample_grid)
from pipeline.steps.sample_grid import GridSettings
from quant.api import QuantConfig

PRESET = "fashion"
SEEDS = (0, 1)
REFERENCE = "models/eval/fashion_test_reference.npz"


class Variant(NamedTuple):
    """One report row: the setting and method shown, the sampler name, and the quantized model (None: FP32)."""

    setting: str
    method: str
    sampler: str
    tag: QuantTag | None


W8A8, W4A8, W4A6 = QuantTag(8, 8), QuantTag(4, 8), QuantTag(4, 6)
VARIANTS = (
    Variant("FP32", "—", "fp32", None),
    Variant("W8A8", "uncorrected", "none", W8A8),
    Variant("W4A8", "uncorrected", "none", W4A8),
    Variant("W4A8", "PTQD", "ptqd", W4A8),
    Variant("W4A8", "S-D² (tensor)", "sd2-tensor", W4A8),
    Variant("W4A8", "D-D² (tensor)", "dd2-tensor", W4A8),
    Variant("W4A8", "S-D² (channel)", "sd2-channel", W4A8),
    Variant("W4A8", "D-D² (channel)", "dd2-channel", W4A8),
)
# --qncd adds QNCD's runtime noise estimation (probe every 10 steps), alone and on top of D², and the W4A6 setting
# QNCD's paper headlines (outside the default's 30-minute CPU budget)
QNCD_VARIANTS = (
    Variant("W4A8", "QNCD probe", "qncd", W4A8),
    Variant("W4A8", "QNCD probe + D-D² (channel)", "qncd+dd2-channel", W4A8),
    Variant("W4A8", "QNCD probe + S-D² (channel)", "qncd+sd2-channel", W4A8),
    Variant("W4A6", "uncorrected", "none", W4A6),
    Variant("W4A6", "QNCD probe", "qncd", W4A6),
    Variant("W4A6", "D-D² (channel)", "dd2-channel", W4A6),
    Variant("W4A6", "QNCD probe + D-D² (channel)", "qncd+dd2-channel", W4A6),
)


# --preset fashion-ddim (the pixel default, unconditional): W8A8 and W4A8, each uncorrected, with PTQD, D-D² and the
# QNCD probe (QNCD's CIFAR-10 experiment in miniature); its report goes to <outdir>/fashion-ddim/
PIXEL_PRESETS = ("fashion-ddim",)
PIXEL_METHODS = (("uncorrected", "none"), ("PTQD", "ptqd"), ("D-D² (channel)", "dd2-channel"),
                 ("QNCD probe", "qncd"))
PIXEL_VARIANTS = (Variant("FP32", "—", "fp32", None),) + tuple(
    Variant(tag.title(), method, sampler, tag) for tag in (W8A8, W4A8) for method, sampler in PIXEL_METHODS)

# --preset fashion-txt2img (the text default, SD v1's structure; conditions are the class prompts, so the evaluator's
# accuracy is prompt-class agreement): W8A8 and W4A8, each uncorrected, with D-D² and the QNCD probe (QNCD's SD
# experiment in miniature); its report goes to <outdir>/fashion-txt2img/
TEXT_PRESETS = ("fashion-txt2img",)
TEXT_METHODS = (("uncorrected", "none"), ("D-D² (channel)", "dd2-channel"), ("QNCD probe", "qncd"))
TEXT_VARIANTS = (Variant("FP32", "—", "fp32", None),) + tuple(
    Variant(tag.title(), method, sampler, tag) for tag in (W8A8, W4A8) for method, sampler in TEXT_METHODS)

# --preset fashion-dit (the embedded DiT, class-conditional, a transformer denoiser): W8A8 and W4A8, each uncorrected,
# with PTQD, D-D² and the QNCD probe (no PTQ paper has corrected a DiT's quantization noise at sampling time); its
# report goes to <outdir>/fashion-dit/
DIT_PRESETS = ("fashion-dit",)
DIT_VARIANTS = (Variant("FP32", "—", "fp32", None),) + tuple(
    Variant(tag.title(), method, sampler, tag) for tag in (W8A8, W4A8) for method, sampler in PIXEL_METHODS)

W4A4, W3A8 = QuantTag(4, 4), QuantTag(3, 8)
# the methods every setting of the bit-width sweep runs (--hard), and the settings in report order
METHODS = (("uncorrected", "none"), ("PTQD", "ptqd"), ("S-D² (tensor)", "sd2-tensor"), ("D-D² (tensor)", "dd2-tensor"),
           ("S-D² (channel)", "sd2-channel"), ("D-D² (channel)", "dd2-channel"), ("QNCD probe", "qncd"))
SWEEP = (W8A8, W4A8, W4A6, W4A4, W3A8)
# --hard: the bit-width sweep W8A8 … W4A4, W3A8, each with every method (issue: a benchmark that can tell the
# methods apart); its report goes to <outdir>/<preset>/bits/
HARD_VARIANTS = tuple(Variant(tag.title(), method, sampler, tag) for tag in SWEEP for method, sampler in METHODS)
SWEEP_SECTION = "Bit-width sweep: fidelity to FP, quality and ε SQNR"
SETTING_ORDER = ("FP32",) + tuple(t.title() for t in SWEEP)
# --long: the paper's second protocol (D²-DPM Table 2: 250 DDIM steps, guidance scale 1.5, η 0 or 1) at W4A8
LONG_PROTOCOL = dict(steps=250, scale=1.5)
LONG_VARIANTS = (Variant("FP32", "—", "fp32", None),) + tuple(
    Variant("W4A8", method, sampler, W4A8) for method, sampler in METHODS[:2] + METHODS[4:6] + METHODS[3:4])


def sm_variants(sm_abit: int) -> tuple[Variant, ...]:
    """--sm_abit B: W4A8 with the attention matmuls quantized too (softmax at B bits), uncorrected and with D-D²."""
    tag = QuantTag(4, 8, sm_abit)
    return (Variant(f"W4A8 sm{sm_abit}", "uncorrected", "none", tag),
            Variant(f"W4A8 sm{sm_abit}", "D-D² (channel)", "dd2-channel", tag))


# the counts of each mode; None = the preset's value. AdaRound gains far less at W8 than at W4 on the embedded default
# (+1.4 dB over nearest at 40 dB), so the CPU modes give W8 fewer iterations than W4.
MODES = {
    "default": dict(outdir="outputs", seeds=SEEDS, n_eval=1000, n_cal=None, n_holdout=None, traj=None,
                    weight_iters=None, weight_iters_8=100, act_iters=None, act_init=None, stats=None),
    "quick": dict(outdir="outputs/quick", seeds=(0,), n_eval=30, n_cal=160, n_holdout=32, traj=2, weight_iters=4,
                  weight_iters_8=2, act_iters=2, act_init=32, stats=20),
    "paper": dict(outdir="outputs/paper", seeds=SEEDS, n_eval=10000, n_cal=1024, n_holdout=128, traj=None,
                  weight_iters=10000, weight_iters_8=10000, act_iters=5000, act_init=32, stats=1024),
    # 250 steps cost 12.5x the default's per sample: fewer samples, trajectories, statistics and iterations
    "long": dict(outdir="outputs", seeds=(0,), n_eval=100, n_cal=None, n_holdout=None, traj=3, weight_iters=250,
                 weight_iters_8=100, act_iters=100, act_init=None, stats=64),
}


GRID_SEED = 42   # steps 0 and 6: the seed of the grids (the grid scripts' default)


@dataclass
class Stage:
    name: str
    work: Callable[[], object]    # the step, called with its typed settings (it skips work whose artifact is current)
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
        stage.work()
        seconds = time.perf_counter() - t0
        if _stamp(stage.outputs) != before:  # it did work (not a metadata-matched skip): record its time
            self.timings[stage.name] = seconds
            write_json_atomic(self.timings_path, self.timings)


def variants(args) -> tuple[Variant, ...]:
    """The report's rows: each (model, sampler) once, FP32 first, then the settings in SETTING_ORDER."""
    if args.mode == "long":
        return LONG_VARIANTS
    if args.preset in PIXEL_PRESETS:
        return PIXEL_VARIANTS
    if args.preset in TEXT_PRESETS:
        return TEXT_VARIANTS
    if args.preset in DIT_PRESETS:
        return DIT_VARIANTS
    chosen = (VARIANTS + (QNCD_VARIANTS if args.qncd else ()) + (HARD_VARIANTS if args.hard else ())
              + (sm_variants(args.sm_abit) if args.sm_abit else ()))
    unique = list({(v.tag, v.sampler): v for v in reversed(chosen)}.values())[::-1]  # the first of each kept
    order = {s: i for i, s in enumerate(SETTING_ORDER)}
    return tuple(sorted(unique, key=lambda v: order.get(v.setting, len(order))))  # stable: methods keep their order


def quant_settings(args) -> list[QuantTag]:
    """The step-3 models of this run (those of the variants), in a stable order."""
    return sorted({v.tag for v in variants(args) if v.tag}, key=lambda t: (t.w_bits, t.a_bits, t.sm_abit or 0))


def _given(**values) -> dict:
    """The settings this mode or the preset gives (None: the settings class's own default)."""
    return {k: v for k, v in values.items() if v is not None}


def _count(m: dict, preset: Preset, mode_key: str, preset_key: str):
    """A count of the mode (``m``), else the preset's."""
    return m[mode_key] if m[mode_key] is not None else preset.get(preset_key)


def quant_config(args, preset: Preset, tag: QuantTag) -> QuantConfig:
    """Steps 2-3's model: ``tag``'s bits, D²-DPM's layer policy and per-tensor weight ranges; --smooth: QNCD's
    smoothing (the code formula)."""
    return QuantConfig(tag.w_bits, tag.a_bits, sm_abit=tag.sm_abit,
                       smoothing="code" if args.smooth else preset.get("smoothing"))


def quant_stages(args, run: Run, preset: Preset, m: dict) -> list[Stage]:
    """Steps 2-5: weights per bit width, activations per model, statistics and fits for the corrected ones."""
    layout, tags = run.layout, quant_settings(args)
    cache = CacheSettings(**_given(dtype=preset.get("cache_dtype"), batch_size=preset.get("cache_batch_size")))
    stages = []
    for w in sorted({t.w_bits for t in tags}):
        iters = _count(m, preset, "weight_iters_8" if w == 8 else "weight_iters", "weight_iters")
        weights = quantize_weights.WeightSettings(iters, cache=cache)
        stages.append(Stage(f"W{w} weights (BRECQ/AdaRound)",
                            partial(quantize_weights.run, run, quant_config(args, preset, QuantTag(w)), weights),
                            [layout.quant(QuantTag(w))]))
    for t in tags:
        acts = quantize_activations.ActivationSettings(
            _count(m, preset, "act_iters", "act_iters"), _count(m, preset, "act_init", "act_init_samples"),
            cache=cache)
        stages.append(Stage(f"{t.title()} activations (learned steps)",
                            partial(quantize_activations.run, run, quant_config(args, preset, t), acts),
                            [layout.quant(t)]))
    fitted = sorted({v.tag for v in variants(args) if v.tag and v.sampler not in ("none", "qncd")},
                    key=lambda t: (-t.w_bits, -t.a_bits, t.sm_abit or 0))  # the models some variant's fit is of
    n_stats = _count(m, preset, "stats", "stats_samples")
    if fitted and n_stats is None:
        raise UserFacingError(f"preset {args.preset} has no stats_samples (step 4's sample count); add it")
    statistics = noise_statistics.StatisticsSettings(n_stats, preset["batch_size"]) if fitted else None
    for t in fitted:
        stages += [
            Stage(f"{t.title()} noise statistics", partial(noise_statistics.run, run, statistics, t),
                  [layout.noise_stats(t)]),
            Stage(f"{t.title()} Gaussian + PTQD fits", partial(fit_noise.run, run, t), [layout.gaussian(t, "tensor")])]
    return stages


def sampler_choice(name: str, steps: int, compare: bool = False) -> SamplerChoice:
    """A sampler by name, run with fake quantization in FP32 (a QNCD probe checked to fire within ``steps``)."""
    spec = SamplerSpec.parse(name)
    if spec.probe is not None:
        check_probe_fires(spec.probe, steps)
    return SamplerChoice(spec).check(compare)


def grid_stages(args, run: Run, preset: Preset) -> list[Stage]:
    """Steps 0 and 6: the FP32 grid and the comparison grid (left out of the 250-step protocol: its report is about
    numbers, and they would cost minutes)."""
    if args.mode == "long":
        return []
    where = run.layout.run_dir
    fp32 = GridSettings(**_given(seed=GRID_SEED, batch_size=preset.get("batch_size"), classes=preset.get("classes"),
                                 n_samples_per_class=preset.get("n_samples_per_class")))
    compare = GridSettings(**_given(seed=GRID_SEED, batch_size=preset.get("batch_size"),
                                    classes=preset.get("classes")), progress=False)   # (one sample per class)
    sampler = sampler_choice("dd2-channel", run.sampling.steps, compare=True)
    return [
        Stage("FP32 grid", partial(sample_grid.fp32_grid, preset.run(where / "grids"), fp32), [where / "grids"],
              skip_if_exists=True, pattern="fp32_*.png"),
        Stage("comparison grid (FP / uncorrected / PTQD / D-D²)",
              partial(sample_grid.quantized_grid, run, compare, sampler, W4A8, compare=True),
              [run.layout.grids(W4A8)], skip_if_exists=True, pattern="compare_*.png")]


def calibration_stage(args, run: Run, preset: Preset, m: dict) -> Stage:
    """Step 1: the calibration set (the modes count trajectories per class; an unconditional model gets enough for
    the inputs, with a margin)."""
    traj = m["traj"]
    if traj is not None and args.preset in PIXEL_PRESETS:
        traj = -(-5 * (m["n_cal"] + m["n_holdout"]) // (4 * run.sampling.steps))
    cal = calibrate.CalibrationSettings(**_given(
        n=m["n_cal"], n_holdout=m["n_holdout"], batch_size=preset.get("batch_size"),
        trajectories_per_condition=traj if traj is not None else preset.get("calibration_trajectories_per_class")))
    return Stage("calibration set", partial(calibrate.run, run, cal), [run.layout.calibration])


def sample_stages(args, run: Run, preset: Preset, m: dict, v: Variant, seed: int) -> list[Stage]:
    """Step 7 of one variant and seed, its evaluator record and (quantized) its paired fidelity to the FP samples of
    the same seed (same x_T and noise)."""
    layout = run.layout
    d = layout.eval_samples(v.tag or FP32, v.sampler, m["n_eval"], seed)
    ev = evaluation_samples.EvalSettings(m["n_eval"], seed, preset["batch_size"], flag="--n_eval")
    sampler = sampler_choice(v.sampler, run.sampling.steps)
    stages = [
        Stage(f"samples {v.setting} {v.method} seed {seed}",   # (the tag is ignored for FP32)
              partial(evaluation_samples.generate, run, ev, sampler, v.tag or W4A8), [d / "samples.npz"]),
        Stage(f"evaluate {v.setting} {v.method} seed {seed}",
              partial(evaluate, REPO_ROOT / REFERENCE, d / "samples.npz", d / "eval.json",
                      cache_dir=layout.run_dir.parent / "evaluator_cache", pick_device=pick_device),
              [d / "eval.json"], skip_if_exists=True)]
    if v.tag is not None:
        fp = layout.eval_samples(FP32, "fp32", m["n_eval"], seed) / "samples.npz"
        stages.append(Stage(f"fidelity {v.setting} {v.method} seed {seed}",
                            partial(paired_fidelity, fp, d / "samples.npz", d / "fidelity.json"),
                            [d / "fidelity.json"], skip_if_exists=True))
    return stages


def build_stages(args, run: Run, m: dict) -> list[Stage]:
    """Every stage of this mode, in order, each a pipeline step called with its typed settings."""
    preset = Preset.load(args.preset)
    grids = grid_stages(args, run, preset)
    stages = [*grids[:1], calibration_stage(args, run, preset, m), *quant_stages(args, run, preset, m), *grids[1:]]
    for seed in args.seeds:
        for v in variants(args):
            stages += sample_stages(args, run, preset, m, v, seed)
    return stages


def eval_rows(args, layout: RunLayout, m: dict) -> list[Row]:
    rows = []
    for v in variants(args):
        row = Row(v.setting, v.method, v.sampler)
        for seed in args.seeds:
            d = layout.eval_samples(v.tag or FP32, v.sampler, m["n_eval"], seed)
            row.records[seed] = json.loads((d / "eval.json").read_text())
        rows.append(row)
    return rows


def model_sizes(args, layout: RunLayout):
    """The FP32 UNet and the packed W4 / W8 files (quant.export), written to <run>/export; (sizes, unet). The
    quantized models are checked against this preset's model and sampler settings before they are packed."""
    from ldm.fileio import file_fingerprint
    from ldm.util import load_config
    from pipeline.families import family_for
    from pipeline.packed import export_packed

    preset = load_preset(args.preset)
    config = load_config(REPO_ROOT / preset["config"])
    family = family_for(config, preset["config"])
    model = family.load(config, REPO_ROOT / preset["ckpt"], device=torch.device("cpu"))
    unet = family.unet(model)  # the presets (fashion, cin256-v2) have use_ema false: these are the weights quantized
    expect = {"model": preset["config"], "ckpt": file_fingerprint(REPO_ROOT / preset["ckpt"]),
              "steps": layout.steps, "eta": layout.eta, "scale": layout.scale,
              **({"grid": layout.grid} if layout.grid else {})}
    export = layout.run_dir / "export"
    save_atomic(unet.state_dict(), export / "unet_fp32.pt")
    sizes = {"FP32": (export / "unet_fp32.pt").stat().st_size}
    for w in sorted({t.w_bits for t in quant_settings(args)}):
        export_packed(unet, layout.quant(QuantTag(w)), export / f"unet_w{w}.pt",
                      {**expect, "w_bits": w, "a_bits": None}, family=family)
        sizes[f"W{w}"] = (export / f"unet_w{w}.pt").stat().st_size
    return sizes, unet


def report_dir(args, layout: RunLayout) -> Path:
    """Where this mode's report goes: <root>/ for the default, <root>/bits/ for the sweep, the run folder for the
    250-step protocol (one per η), so no mode overwrites another's report."""
    root = layout.run_dir.parent
    return layout.run_dir if args.mode == "long" else root / "bits" if args.hard else root


def readme_tag(args) -> str | None:
    """The docs/ results-page section this run's report regenerates (None: it updates none)."""
    if args.outdir is not None or args.sm_abit or args.mode in ("quick", "paper"):
        return None
    if args.mode == "long":
        return f"demo-long-eta{args.eta:g}-results"
    if args.preset in PIXEL_PRESETS:
        return "demo-pixel-results" if not (args.qncd or args.smooth or args.hard) else None
    if args.preset in TEXT_PRESETS:
        return "demo-text-results" if not (args.qncd or args.smooth or args.hard) else None
    if args.preset in DIT_PRESETS:
        return "demo-dit-results" if not (args.qncd or args.smooth or args.hard) else None
    if args.preset != PRESET:
        return None
    if args.hard:
        return "demo-bits-results"
    return {(False, False): "demo-results", (True, True): "demo-qncd-results"}.get((args.qncd, args.smooth))


def noise_figure(layout: RunLayout, tag: QuantTag, path: Path) -> dict | None:
    """The paper's Fig. 2 for one model's fits, drawn into the report folder; {"file", "caption", "data"}."""
    from correction.gaussian import GaussianFit
    from pipeline.steps.fit_noise import plot_noise

    files = [layout.gaussian(tag, g) for g in ("channel", "tensor")]
    if not all(f.exists() for f in files):
        return None
    fits = [GaussianFit.from_dict(load_artifact(f, "gaussian")["fit"]) for f in files]
    caption = f"Quantization noise per timestep ({tag.title()}; D²-DPM Fig. 2)"
    data = plot_noise(path, fits, f"{tag.title()}: Δ = ε̂_q − ε̂ per timestep, {layout.steps} steps, η "
                                  f"{layout.eta:g}, scale {layout.scale:g}")
    return {"file": path.name, "caption": caption, "data": data}


def make_report(args, layout: RunLayout, m: dict, driver: Driver, stages: list[Stage]) -> Path:
    run, where = layout.run_dir, report_dir(args, layout)
    where.mkdir(parents=True, exist_ok=True)
    rows = eval_rows(args, layout, m)
    sizes, unet = model_sizes(args, layout)
    sqnr = sqnr_rows(args, layout)
    images = {}
    for caption, pattern in (("FP32 samples", "grids/fp32_*.png"), ("FP | uncorrected | PTQD | D-D² (W4A8)",
                                                                     "w4a8/samples/compare_*.png")):
        found = sorted(run.glob(pattern))
        if found:
            images[caption] = os.path.relpath(found[-1], where)
    what = ("PTQD / D²-DPM / QNCD on the embedded pixel default" if args.preset in PIXEL_PRESETS else
            "D²-DPM / QNCD on the embedded text-to-image default" if args.preset in TEXT_PRESETS else
            "PTQD / D²-DPM / QNCD on the embedded DiT" if args.preset in DIT_PRESETS else
            "D²-DPM / PTQD on the embedded default")
    context = {"title": f"{what} ({args.preset}), mode {args.mode}"
                        + (", bit-width sweep" if args.hard else "") + (", QNCD smoothing" if args.smooth else ""),
               "n": m["n_eval"], "seeds": list(args.seeds), "steps": layout.steps, "eta": layout.eta,
               "scale": layout.scale, "reference": REFERENCE, "grid": layout.grid,
               "unconditional": args.preset in PIXEL_PRESETS,
               "features": rows[0].records[args.seeds[0]].get("feature_network"),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                          f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}"}
    # per-stage times; the many sampling and evaluation stages are summed (the JSON keeps each one)
    timings: dict[str, float] = {}
    names = {stage.name for stage in stages}  # (the sweep shares its timings file with the default run)
    for name, seconds in driver.timings.items():
        if name not in names:
            continue
        key = ("evaluation samples (all variants and seeds)" if name.startswith("samples ")
               else "evaluator (all variants and seeds)" if name.startswith("evaluate ")
               else "paired fidelity (all variants and seeds)" if name.startswith("fidelity ") else name)
        timings[key] = timings.get(key, 0.0) + seconds
    context["stage_times_each"] = {k: v for k, v in driver.timings.items() if k in names}
    lines, fidelity = fidelity_lines(fidelity_groups(args, layout, m), Bootstrap())
    sections, extra = {"Paired fidelity to the FP samples": lines}, {"fidelity": fidelity}
    if args.smooth:
        more_sections, more_extra = smoothing_sections(args, layout, m, unet, rows, sqnr)
        sections.update(more_sections)
        extra.update(more_extra)
    if args.hard:
        lines, data = sweep_lines(fidelity, rows, sqnr, SETTING_ORDER[1:])
        sections = {SWEEP_SECTION: lines, **sections}
        extra["sweep"] = data
    figures = report_figures(where, rows, fidelity, SETTING_ORDER[1:])
    noise = noise_figure(layout, W4A8, where / "noise_statistics_w4a8.png")
    if noise:
        figures["noise_w4a8"] = noise
    return write_report(where, rows, context, sizes, timings, sqnr, images, sections, extra, figures)


def fidelity_groups(args, layout: RunLayout, m: dict) -> dict[str, list[tuple[str, str, list[dict]]]]:
    """{setting: [(method, sampler, [fidelity record per seed])]} of every quantized variant."""
    groups: dict[str, list] = {}
    for v in variants(args):
        if v.tag is not None:
            recs = [json.loads((layout.eval_samples(v.tag, v.sampler, m["n_eval"], seed) / "fidelity.json")
                               .read_text()) for seed in args.seeds]
            groups.setdefault(v.setting, []).append((v.method, v.sampler, recs))
    return groups


def sqnr_rows(args, layout: RunLayout) -> dict[str, dict]:
    """{row name: {"sqnr": dB, "note": ...}} from the meta of the run's quant artifacts (the ε SQNRs steps 2-3
    measured on the held-out inputs); a missing artifact is left out."""
    rows = {}
    for w in sorted({4, 8} | {t.w_bits for t in quant_settings(args)}):
        path = layout.quant(QuantTag(w))
        if path.exists():
            meta = load_artifact(path, "quant")["meta"]
            rows[f"W{w} round-to-nearest"] = {"sqnr": meta["sqnr_nearest_db"], "note": "before reconstruction"}
            rows[f"W{w} AdaRound"] = {"sqnr": meta["sqnr_adaround_db"],
                                      "note": f"{meta['weight_iters']} iterations/unit"}
    for tag in quant_settings(args):
        path = layout.quant(tag)
        if path.exists():
            meta = load_artifact(path, "quant")["meta"]
            name = f"W{tag.w_bits}A{tag.a_bits}" + ("" if tag.sm_abit is None else f" sm{tag.sm_abit}")
            rows[name] = {"sqnr": meta["sqnr_db"], "note": f"initial ranges {meta['sqnr_act_init_db']:.2f} dB, "
                                                           f"{meta['act_iters']} step-size iterations/unit"}
    return rows


def _unsmoothed(layout: RunLayout, m: dict) -> RunLayout:
    """The same mode's run without smoothing (``outputs/…`` for ``outputs-smooth/…``), for side-by-side numbers."""
    return RunLayout(Path(m["outdir"].removesuffix("-smooth")), layout.preset, layout.steps, layout.eta, layout.scale,
                     layout.grid, layout.plms)


def smoothing_sections(args, layout: RunLayout, m: dict, unet, rows: list, sqnr: dict) -> tuple[dict, dict]:
    """The QNCD-smoothing part of the report: per-block effect on the second conv (quant.smoothing.smoothing_effect
    on the held-out calibration inputs), ε SQNR with and without smoothing, and sample quality with and without
    (read from the unsmoothed run of the same mode, where it has been made)."""
    from ldm.util import load_config
    from pipeline.families import family_for
    from quant.quantizer import PerChannel, PerTensor
    from quant.reconstruction import CalibrationData
    from quant.smoothing import smoothing_effect

    w4 = load_artifact(layout.quant(QuantTag(4)), "quant")
    factors, meta = w4["smoothing"]["factors"], w4["meta"]
    calib = load_artifact(layout.calibration, "calibration")
    held = CalibrationData(calib["holdout_x"], calib["holdout_t"], calib.get("holdout_c"), torch.device("cpu"))
    a_bits = sorted({v.tag.a_bits for v in variants(args) if v.tag and v.tag.w_bits == 4}, reverse=True)
    family = family_for(load_config(REPO_ROOT / load_preset(args.preset)["config"]))   # whose blocks S names
    effect = smoothing_effect(unet, factors, held.batches(64), a_bits=a_bits, w_bits=4,
                              granularity=PerChannel(0) if meta.get("channel_wise") else PerTensor(),
                              specials=family.quant_specials())
    sections = {"QNCD smoothing: effect on each ResBlock's second conv":
                smoothing_effect_lines(effect, factors, meta["smoothing"], len(held), a_bits)}
    extra = {"smoothing_effect": effect}
    plain = _unsmoothed(layout, m)
    plain_sqnr = sqnr_rows(args, plain)
    both = [(name, plain_sqnr[name]["sqnr"], d["sqnr"]) for name, d in sqnr.items() if name in plain_sqnr]
    if both:
        sections["ε SQNR without and with smoothing"] = sqnr_without_with_lines(str(plain.run_dir), both)
        extra["sqnr_without_with"] = {n: (x, y) for n, x, y in both}
    quality = []
    for r, v in zip(rows, variants(args), strict=True):
        files = [plain.eval_samples(v.tag, v.sampler, m["n_eval"], seed) / "eval.json" for seed in args.seeds] \
            if v.tag else []
        if files and all(f.exists() for f in files):
            recs = [json.loads(f.read_text())["metrics"] for f in files]
            quality.append((r, tuple(sum(x[k] for x in recs) / len(recs) for k in ("fid", "classifier_accuracy"))))
    if quality:
        sections["Sample quality without and with smoothing"] = quality_without_with_lines(args.seeds, m["n_eval"],
                                                                                           quality)
        extra["quality_without_with"] = {
            f"{r.setting} {r.method}": {"fid": (f0, r.summary("fid")[0]),
                                        "classifier_accuracy": (a0, r.summary("classifier_accuracy")[0])}
            for r, (f0, a0) in quality}
    return sections, extra


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small counts, about 3 minutes on a CPU")
    group.add_argument("--paper", action="store_true", help="paper-sized counts (for a GPU)")
    group.add_argument("--long", action="store_true",
                       help="the paper's second protocol at W4A8: 250 DDIM steps, guidance scale 1.5, η from --eta")
    p.add_argument("--eta", type=float, default=0.0, choices=(0.0, 1.0), help="DDIM η of --long (0 or 1)")
    p.add_argument("--fresh", action="store_true", help="delete this mode's outputs and start over")
    p.add_argument("--qncd", action="store_true", help="add the QNCD probe rows (W4A8) and the W4A6 setting")
    p.add_argument("--smooth", action="store_true",
                   help="quantize with QNCD's embedding-derived smoothing (--scale_split_static); its own outdir "
                        "(<outdir>-smooth), so every row of the report is then the smoothed model's")
    p.add_argument("--hard", action="store_true",
                   help="add W4A4 and W3A8, each uncorrected, with PTQD, the four D² variants and the QNCD probe")
    p.add_argument("--sm_abit", type=int, default=None, choices=(8, 16),
                   help="add W4A8 rows with the attention matmuls quantized too (softmax at this many bits)")
    p.add_argument("--preset", default=PRESET)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (quick: 0)")
    p.add_argument("--outdir", default=None, help="artifact root (default: outputs, outputs/quick, outputs/paper)")
    p.add_argument("--n_eval", type=at_least(1), default=None,
                   help="evaluation samples per variant and seed (default: the mode's)")
    p.add_argument("--list", action="store_true", help="print this mode's stages in order and stop (nothing is run "
                                                       "or written)")
    return p.parse_args(argv)


def setup(argv=None) -> tuple:
    """(flags, this mode's counts and outdir from ``MODES``, the ``Run`` every stage works on)."""
    args = parse_args(argv)
    args.mode = "quick" if args.quick else "paper" if args.paper else "long" if args.long else "default"
    if args.eta and not args.long:
        raise UserFacingError("--eta applies to --long (the 250-step protocol); the other modes use the preset's η")
    m = dict(MODES[args.mode])
    if args.outdir is not None:
        m["outdir"] = args.outdir
    if args.smooth:
        m["outdir"] = m["outdir"].rstrip("/") + "-smooth"
    args.seeds = list(args.seeds or m["seeds"])
    if args.n_eval is not None:
        m["n_eval"] = args.n_eval
    preset = Preset.load(args.preset)
    steps, eta, scale = ((LONG_PROTOCOL["steps"], args.eta, LONG_PROTOCOL["scale"]) if args.long
                         else (preset["steps"], preset["eta"], preset["scale"]))
    return args, m, preset.run(m["outdir"], steps=steps, eta=float(eta), scale=float(scale))


def stage_names(argv=None) -> list[str]:
    """The names of the stages the demo with these flags runs, in order (nothing is run or written)."""
    args, m, run = setup(argv)
    return [stage.name for stage in build_stages(args, run, m)]


def main(argv=None) -> None:
    args, m, run = setup(argv)
    stages = build_stages(args, run, m)
    if args.list:
        print("\n".join(stage.name for stage in stages))
        return
    layout = run.layout
    root = layout.run_dir.parent
    fresh = layout.run_dir if args.long else root  # (the 250-step runs share the root with the default's)
    if args.fresh and fresh.exists():
        print(f"--fresh: removing {fresh}")
        shutil.rmtree(fresh)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    # the 250-step protocol's stages have the default's names: its times are kept in its own run folder
    driver = Driver(root, (layout.run_dir if args.long else root) / "demo_timings.json")
    t0 = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        driver.run(stage, len(stages), i)
    report = make_report(args, layout, m, driver, stages)
    print(f"\nwrote {report} ({time.perf_counter() - t0:.0f} s this run)")
    tag = readme_tag(args)
    if tag and update_results_page(report, REPO_ROOT / results_page(tag), tag=tag,
                                   keep=[SWEEP_SECTION] if args.hard else None):
        print(f"updated the {tag} section of {results_page(tag)}")
    print(report.read_text())


if __name__ == "__main__":
    run_cli(main)
