"""The centered probe (``cprobe-tensor``, issue 34 item 3) against QNCD's probe, D-D² and the uncorrected model,
paired on the same seeds, on the three embedded defaults at W4A8.

    python benchmarks/qncd_probe_variant.py                            # fashion, fashion-ddim, fashion-txt2img
    python benchmarks/qncd_probe_variant.py --preset fashion --json outputs/probe34/fashion.json

Each preset runs the pipeline's typed steps under ``--outdir/<preset>/`` with this benchmark's counts (smaller than
the demo's, to fit a 2-core CPU): calibration (``--n_cal`` + ``--n_holdout`` inputs), W4 weights (BRECQ/AdaRound,
``--weight_iters``), W4A8 activations (``--act_iters`` step-size iterations after ``--act_init`` samples' ranges),
noise statistics (``--stats`` FP trajectories), the Gaussian fits, then ``--n_eval`` evaluation samples from
``--seed`` for fp32, none, qncd, cprobe-tensor and dd2-channel at the preset's sampling settings (20 DDIM steps).
Steps whose artifacts exist skip themselves, so a rerun continues.

Reported: each variant's paired fidelity to the FP samples of the same seed (``evaluation.fidelity.compare``: PSNR,
SSIM, feature distance with bootstrap 95 % intervals, FID to FP), and the paired difference cprobe − other for
other in (qncd, dd2-channel, none), with its interval and whether it is inside the noise (interval contains 0).

And the check the variant is built for (``--fp_check``): both probes run on the *FP* model itself (same plan, same
x_T, noise and probe seeds as step 7's), the centered one with the W4A8 run's tensor-wise fit (its m_fp = μ_x − μ_y
is the FP model's mean ε, whatever the quantization): the mean |μ| each estimates, and the relative L2 change of the
FP samples it causes (0 for a probe that measures no bias where there is none).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from correction.gaussian import GaussianFit  # noqa: E402
from correction.qncd import CenteredProbe, QNCDProbe  # noqa: E402

from evaluation.generation import Plan  # noqa: E402
from evaluation.fidelity import NAMES, PER_SAMPLE, Bootstrap, compare  # noqa: E402
from ldm.fileio import write_json_atomic  # noqa: E402
from ldm.util import ArgumentParser, at_least  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.artifacts import load_artifact  # noqa: E402
from pipeline.generate import sample_batch  # noqa: E402
from pipeline.layout import FP32, QuantTag  # noqa: E402
from pipeline.quantize import CacheSettings  # noqa: E402
from pipeline.run import Preset, SamplerChoice  # noqa: E402
from pipeline.sampler_spec import SamplerSpec  # noqa: E402
from pipeline.steps import (calibrate, evaluation_samples, fit_noise, noise_statistics,  # noqa: E402
                            quantize_activations, quantize_weights)
from quant.api import QuantConfig  # noqa: E402

PRESETS = ("fashion", "fashion-ddim", "fashion-txt2img")
W4A8 = QuantTag(4, 8)
VARIANT = "cprobe-tensor"
SAMPLERS = ("none", "qncd", VARIANT, "dd2-channel")
RIVALS = ("qncd", "dd2-channel", "none")
METRICS = (*PER_SAMPLE, "fid_to_fp")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--outdir", default="outputs/probe34")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--n_eval", type=at_least(1), default=300)
    p.add_argument("--n_cal", type=at_least(1), default=512)
    p.add_argument("--n_holdout", type=at_least(0), default=64)
    p.add_argument("--traj", type=at_least(1), default=8,
                   help="calibration trajectories per class (class-conditional)")
    p.add_argument("--weight_iters", type=at_least(0), default=100)
    p.add_argument("--act_iters", type=at_least(0), default=50)
    p.add_argument("--act_init", type=at_least(1), default=128)
    p.add_argument("--stats", type=at_least(1), default=256)
    p.add_argument("--fp_check", type=at_least(0), default=300,
                   help="samples of the probes-on-the-FP-model check (0: skip)")
    p.add_argument("--json", default=None, help="write the records (per preset) here")
    return p.parse_args(argv)


def build(args, name: str) -> tuple:
    """Steps 1-5 and 7 of one preset; the run and {sampler: samples.npz}."""
    preset = Preset.load(name)
    run = preset.run(args.outdir)   # (the layout puts the preset under outdir/<preset>/)
    cache = CacheSettings(**{k: v for k, v in (("dtype", preset.get("cache_dtype")),
                                               ("batch_size", preset.get("cache_batch_size"))) if v is not None})
    traj = args.traj if preset.get("classes") else -(-5 * (args.n_cal + args.n_holdout) // (4 * run.sampling.steps))
    calibrate.run(run, calibrate.CalibrationSettings(n=args.n_cal, n_holdout=args.n_holdout,
                                                     batch_size=preset["batch_size"], trajectories_per_condition=traj))
    quantize_weights.run(run, QuantConfig(4, smoothing=preset.get("smoothing")),
                         quantize_weights.WeightSettings(args.weight_iters, cache=cache))
    quantize_activations.run(run, QuantConfig(4, 8, smoothing=preset.get("smoothing")),
                             quantize_activations.ActivationSettings(args.act_iters, args.act_init, cache=cache))
    noise_statistics.run(run, noise_statistics.StatisticsSettings(args.stats, preset["batch_size"]), W4A8)
    fit_noise.run(run, W4A8)
    ev = evaluation_samples.EvalSettings(args.n_eval, args.seed, preset["batch_size"])
    paths = {}
    for sampler in ("fp32", *SAMPLERS):
        evaluation_samples.generate(run, ev, SamplerChoice(SamplerSpec.parse(sampler)).check(False), W4A8)
        paths[sampler] = run.layout.eval_samples(FP32 if sampler == "fp32" else W4A8, sampler, args.n_eval,
                                                 args.seed) / "samples.npz"
    return run, paths


def fp_check(run, n: int, seed: int, batch_size: int) -> dict:
    """QNCD's probe and the centered probe on the FP model: mean |μ| over the probes and the relative L2 change of
    the FP samples (float images in [-1, 1], per sample, averaged) against the same plan without a probe."""
    fit = GaussianFit.from_dict(load_artifact(run.layout.gaussian(W4A8, "tensor"), "gaussian")["fit"])
    family, model = run.load(torch.device("cpu"))
    plan = Plan(n, batch_size, seed, family.num_classes(run.model.config_yaml))
    images, mus = {}, {}
    for name, make in (("fp32", None), ("qncd", lambda g: QNCDProbe(generator=g)),
                       (VARIANT, lambda g: CenteredProbe(fit, generator=g))):
        out, mus[name] = [], []
        with torch.inference_mode(), family.ema_scope(model):
            for b in range(plan.num_batches):
                probes = []
                maker = None if make is None else (lambda g, make=make: probes.append(make(g)) or probes[-1])
                out.append(sample_batch(family, model, plan.batch(b), run.sampling, correction_for=maker))
                mus[name] += [(i, float(mu.mean()), float(mu.abs().mean()))
                              for p in probes for i, _, mu in p.estimates]
        images[name] = np.concatenate(out).astype(np.float64) / 127.5 - 1
    ref = images["fp32"].reshape(n, -1)
    out = {}
    for name in ("qncd", VARIANT):
        diff = np.linalg.norm(images[name].reshape(n, -1) - ref, axis=1) / np.linalg.norm(ref, axis=1)
        out[name] = {"mean_abs_mu": float(np.mean([a for _, _, a in mus[name]])), "probes": len(mus[name]),
                     "mu": [(i, m) for i, m, _ in mus[name]],
                     "relative_change": float(diff.mean()), "identical": int((diff == 0).sum())}
    out["fp_mean_eps"] = [float(v) for v in (fit.mu_x - fit.mu_y).flatten()]
    return out


def measure(paths: dict) -> dict:
    """Fidelity of every sampler to fp32, and cprobe − rival paired differences."""
    boot = Bootstrap()
    out = {"fidelity": {}, "difference": {}}
    for rival in RIVALS:
        rec = compare(paths["fp32"], paths[VARIANT], paths[rival], boot=boot)
        out["fidelity"][VARIANT] = rec["metrics"]
        out["fidelity"][rival] = rec["vs"]["metrics"]
        out["difference"][rival] = rec["vs"]["difference"]
        out["n"] = rec["n"]
    return out


def fmt(d: dict, pattern: str, signed: bool = False) -> str:
    p = pattern.replace("{:", "{:+") if signed else pattern
    v = d.get("estimate", d["mean"])
    return p.format(v) if d["ci"] is None else f"{p.format(v)} [{p.format(d['ci'][0])}, {p.format(d['ci'][1])}]"


def table(name: str, rec: dict) -> list[str]:
    head = " | ".join(NAMES[k][0] for k in METRICS)
    lines = [f"### {name} (W4A8, N = {rec['n']}, seed {rec['seed']})", "",
             f"| sampler | {head} |", "|---|" + "---|" * len(METRICS)]
    for s in SAMPLERS:
        lines.append(f"| {s} | " + " | ".join(fmt(rec['fidelity'][s][k], NAMES[k][1]) for k in METRICS) + " |")
    for r in RIVALS:
        diff = rec["difference"][r]
        cells = []
        for k in METRICS:
            d = diff[k]
            verdict = f"{'cprobe' if d['closer_to_fp'] == 'samples' else r} closer" if d["excludes_zero"] else "noise"
            cells.append(f"{fmt(d, NAMES[k][1], signed=True)} ({verdict})")
        lines.append(f"| Δ {VARIANT} − {r} | " + " | ".join(cells) + " |")
    if "fp_check" in rec:
        c = rec["fp_check"]
        m = c["fp_mean_eps"]
        lines += ["", f"on the FP model ({args_n(rec)} samples): m_fp(t) {min(m):+.4f}..{max(m):+.4f}"]
        for s in ("qncd", VARIANT):
            lines.append(f"  {s}: mean |μ| {c[s]['mean_abs_mu']:.4f} over {c[s]['probes']} probes, relative change "
                         f"of the FP samples {100 * c[s]['relative_change']:.2f} %")
    return lines + [""]


def args_n(rec: dict) -> int:
    return rec.get("fp_check_n", rec["n"])


def main(argv=None) -> None:
    args = parse_args(argv)
    records = {}
    for name in args.preset:
        t0 = time.perf_counter()
        run, paths = build(args, name)
        rec = measure(paths)
        if args.fp_check:
            rec["fp_check"] = fp_check(run, args.fp_check, args.seed, Preset.load(name)["batch_size"])
            rec["fp_check_n"] = args.fp_check
        rec.update(seed=args.seed, wall_s=round(time.perf_counter() - t0, 1),
                   paths={k: str(v) for k, v in paths.items()})
        records[name] = rec
        print("\n".join(table(name, rec)), flush=True)
    conditions = {k: v for k, v in vars(args).items() if k not in ("json", "preset")}
    conditions.update(machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch "
                              f"{torch.__version__}", bootstrap=f"{Bootstrap().resamples} resamples, 95 %")
    print(f"conditions: {conditions}")
    if args.json:
        write_json_atomic(args.json, {"conditions": conditions, "presets": records})


if __name__ == "__main__":
    cli.run_cli(main)
