"""Full-size rehearsal of QNCD's CIFAR-10 pipeline: the real architecture with random weights, every step through the
real scripts at reduced counts, measured per stage and projected to the paper's counts.

    python benchmarks/cifar10_rehearsal.py --device cpu --workdir /tmp/c10 --json c10.json   # ~10 min, 2 CPU cores
    python benchmarks/cifar10_rehearsal.py --device cuda --json c10.json

The model is ``configs/cifar10.yml`` (35.7 M parameters, exactly the released checkpoint's 328 keys) with seeded
PyTorch-default weights, saved as a plain state_dict (the released format). Every stage is a pipeline script run with
``--preset cifar10 --ckpt <that file>``, so the preset's grid (100 quad steps, η 0, repeated timesteps included),
policy, units and QNCD recipe (``--quant_mode qncd``: smoothing + running statistics, W8A8 as the README command) are
what is measured, at a few trajectories, inputs, iterations and samples. Each stage runs in its own process
(benchmarks/stage_probe.py: wall time, model load, peak host and GPU memory); steps 2-3 also record per-unit cache and
optimisation times. A last probe runs one no-grad UNet forward at the sampling batch (100) for its memory.

Projection to the preset's counts (256 calibration trajectories, 1,024 calibration inputs, 20,000 / 5,000
iterations per unit, 1,024 statistics trajectories, 50,000 samples, batch 100): trajectories and samples scale the
compute linearly (the forward at batch 100 is measured, not extrapolated, for memory), cache passes scale with the
calibration inputs, optimisation with the iterations (and the mini-batch when the rehearsal's rows were fewer), and
the reconstruction peak grows by the largest unit's cache bytes times the input ratio. The FID needs the CIFAR-10
reference batch (``python -m evaluation.cifar10_reference``) and TensorFlow's Inception; it is not part of this run.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldm.util import ArgumentParser, at_least  # noqa: E402
from stage_probe import GiB, fmt_s, run_stage  # noqa: E402

CONFIG = "configs/cifar10.yml"
TAG_FLAGS = ["--w_bits", "8", "--a_bits", "8"]
SAMPLERS = ("fp32", "none", "qncd", "dd2-channel")


def write_checkpoint(path: Path, seed: int) -> dict:
    import torch

    from ldm.fileio import save_atomic
    from ldm.modules.diffusionmodules.ddim_unet import Model
    from ldm.util import load_config
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = Model(load_config(REPO / CONFIG))
    sd = model.state_dict()
    save_atomic(sd, path)
    return {"seconds": time.perf_counter() - t0, "bytes": path.stat().st_size, "keys": len(sd),
            "parameters": sum(v.numel() for v in sd.values())}


def forward_main(device: str, batch: int) -> int:
    """One no-grad forward at ``batch`` (run by run_stage: its record holds the peak memory and the time)."""
    import torch

    from ldm.modules.diffusionmodules.ddim_unet import Model
    from ldm.util import load_config
    torch.manual_seed(0)
    net = Model(load_config(REPO / CONFIG)).eval().to(device)
    with torch.inference_mode():
        net(torch.randn(batch, 3, 32, 32, device=device), torch.full((batch,), 500, device=device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return 0


def stages(args, work: Path) -> list[tuple[str, str, list[str]]]:
    common = ["--preset", "cifar10", "--ckpt", str(work / "model.pt"), "--outdir", str(work / "outputs"),
              "--device", args.device]
    # one FP pass serves the units whose caches fit the budget: scaled by the rows, it groups them as at the paper's
    # 1,024 inputs, so the cache passes project linearly
    qncd = ["--quant_mode", "qncd"]
    fp = ["--fp_capture_mb", f"{1024 * args.n_calibration / 1024:g}"]
    out = [
        ("1 calibration", "quant_scripts/collect_imagenet_calibration_set.py",
         [*common, "--calibration_trajectories_per_class", str(args.trajectories), "--n", str(args.n_calibration),
          "--n_holdout", str(args.n_holdout), "--batch_size", str(args.trajectories)]),
        ("2 weights W8 (BRECQ/AdaRound)", "quant_scripts/quantize_weight.py",
         [*common, "--w_bits", "8", *qncd, *fp, "--weight_iters", str(args.iters)]),
        ("3 activations A8 (qncd)", "quant_scripts/quantize_weight_activation.py",
         [*common, *TAG_FLAGS, *qncd, *fp, "--act_iters", str(args.iters), "--act_init_samples",
          str(min(args.n_calibration, 256))]),
        ("4 noise statistics", "quant_scripts/collect_timestep_aware_statistics.py",
         [*common, *TAG_FLAGS, "--n", str(args.samples), "--batch_size", str(args.samples), "--no_progress"]),
        ("5 Gaussian + PTQD fits", "quant_scripts/gaussian_modeling.py", [*common, *TAG_FLAGS]),
    ]
    for sampler in SAMPLERS:
        probe = ["--sampler", "none", "--sample_reverse", "--reverse_interval", "4"] if sampler == "qncd" else \
            ["--sampler", sampler]
        out.append((f"7 samples ({sampler})", "quant_scripts/generate_evaluation_samples_dist.py",
                    [*common, *TAG_FLAGS, *probe, "--n_samples", str(args.samples), "--batch_size",
                     str(args.samples), "--seed", "1234"]))
    out.append(("forward, batch 100", str(Path(__file__).resolve()), ["--_forward", "100", "--device", args.device]))
    return out


def project(args, work: Path, recs: dict) -> list[dict]:
    from pipeline.artifacts import timing_path
    from pipeline.cli import load_preset
    from pipeline.layout import QuantTag, RunLayout
    preset = load_preset("cifar10")
    layout = RunLayout(work / "outputs", "cifar10", preset["steps"], float(preset["eta"]), 1.0, preset["skip_type"])
    counts = {"trajectories": preset["calibration_trajectories_per_class"], "calibration": 1024, "holdout": 128,
              "weight_iters": preset["weight_iters"], "weight_batch": 8, "act_iters": preset["act_iters"],
              "act_batch": 16, "stats": preset["stats_samples"], "eval": preset["eval_samples"]}
    rows = []
    for name, rec in recs.items():
        load, compute, step = rec["load_s"], rec["wall_s"] - rec["load_s"], name.split()[0]
        peak, rule, seconds = rec["peak_host_bytes"], "as measured", rec["wall_s"]
        if step == "1":
            f = counts["trajectories"] / args.trajectories
            seconds, rule = load + compute * f, f"trajectories x{f:g}"
        elif step in ("2", "3"):
            path = layout.quant(QuantTag(8) if step == "2" else QuantTag(8, 8))
            t = json.loads(timing_path(path).read_text())
            units = t["units"]
            iters, used_rows = units[0]["iters"], units[0]["rows"]
            want_iters, want_batch = ((counts["weight_iters"], counts["weight_batch"]) if step == "2" else
                                      (counts["act_iters"], counts["act_batch"]))
            used_batch = min(want_batch, used_rows)
            cap, opt = sum(u["capture_s"] for u in units), sum(u["optimise_s"] for u in units)
            rest = rec["wall_s"] - cap - opt
            seconds = (rest + cap * counts["calibration"] / used_rows
                       + opt * want_iters / iters * want_batch / used_batch)
            peak += max(u["cache_bytes"] for u in units) * (counts["calibration"] / used_rows - 1)
            rule = (f"{len(units)} units; caches x{counts['calibration'] / used_rows:g}, iterations "
                    f"x{want_iters / iters:g}" + (f" (batch {used_batch} -> {want_batch})" if used_batch < want_batch
                                                  else ""))
        elif step == "4":
            f = counts["stats"] / args.samples
            seconds, rule = load + compute * f, f"trajectories x{f:g}"
        elif step == "7":
            f = counts["eval"] / args.samples
            seconds, rule = load + compute * f, f"samples x{f:g} (memory: the batch-100 forward below)"
        rows.append({"stage": name, "measured_s": rec["wall_s"], "measured_peak_bytes": rec["peak_host_bytes"],
                     "measured_peak_gpu_bytes": rec.get("peak_gpu_bytes"), "projected_s": seconds,
                     "projected_peak_bytes": peak, "rule": rule})
    return rows



def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every count checked by the parser (one line, before any stage runs)."""
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder)")
    ap.add_argument("--trajectories", type=at_least(1), default=2, help="calibration trajectories (preset: 256)")
    ap.add_argument("--n_calibration", type=at_least(1), default=16, help="calibration inputs (script default: 1,024)")
    ap.add_argument("--n_holdout", type=at_least(0), default=4,
                    help="held-out inputs for the SQNRs (default set: 128)")
    ap.add_argument("--iters", type=at_least(1), default=4, help="reconstruction iterations per unit, both phases")
    ap.add_argument("--samples", type=at_least(1), default=2, help="statistics trajectories and samples per sampler")
    ap.add_argument("--seed", type=at_least(0), default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--fresh", action="store_true", help="with --workdir: measure every stage again")
    ap.add_argument("--_forward", type=at_least(1), default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._forward is not None:
        return forward_main(args.device, args._forward)

    started = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cifar10_rehearsal_"))
    if args.fresh:
        shutil.rmtree(work / "records", ignore_errors=True)
    (work / "records").mkdir(parents=True, exist_ok=True)
    print(f"CIFAR-10 rehearsal in {work} on {args.device}; script output in {work / 'rehearsal.log'}")
    try:
        made_rec = work / "records" / "checkpoint.json"
        if not ((work / "model.pt").is_file() and made_rec.is_file()):
            made_rec.write_text(json.dumps(write_checkpoint(work / "model.pt", args.seed)))
        made = json.loads(made_rec.read_text())
        print(f"checkpoint: {made['keys']} keys, {made['parameters']:,} parameters, {made['bytes'] / 2**20:.1f} MiB")
        with open(work / "rehearsal.log", "a") as log:
            recs = {name: run_stage(name, script, argv_, work, log) for name, script, argv_ in stages(args, work)}
        rows = project(args, work, recs)
        print(f"\n{'stage':32s} {'measured':>10s} {'peak GiB':>9s} | {'projected':>10s} {'peak GiB':>9s}  rule")
        for r in rows:
            print(f"{r['stage']:32s} {fmt_s(r['measured_s']):>10s} {r['measured_peak_bytes'] / GiB:9.2f} | "
                  f"{fmt_s(r['projected_s']):>10s} {r['projected_peak_bytes'] / GiB:9.2f}  {r['rule']}")
        cal = sum(r["projected_s"] for r in rows if r["stage"][0] in "123")
        print(f"projected steps 1-3 at the preset's counts: {fmt_s(cal)} on this {args.device}; largest projected "
              f"peak {max(r['projected_peak_bytes'] for r in rows) / GiB:.1f} GiB host")
        report = {"machine": {"platform": platform.platform(), "device": args.device}, "settings": vars(args),
                  "checkpoint": made, "stages": rows, "total_s": time.perf_counter() - started}
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
