"""--precision measured: speed of each sampling mode against exact FP32, and its paired fidelity to FP32, on the
embedded default (preset ``fashion``, the committed checkpoint).

    python benchmarks/precision_fidelity.py --device cpu             # fp32 vs bf16, 500 samples
    python benchmarks/precision_fidelity.py --device cuda            # fp32 vs tf32 vs bf16
    python benchmarks/precision_fidelity.py --n 200 --json out.json  # --device auto: CUDA when present

Every mode samples the same step-7 plan (``evaluation.generation.Plan``: class i mod 10, batch seeds from --seed),
through the pipeline's own ``pipeline.generate.sample_batch``, so sample i of each mode starts from the same x_T and
draws the same DDIM noise: the modes differ only by their arithmetic. The modes alternate batch by batch (the order
rotating; --batch_size 50 unless given), after one untimed warm-up call each, so a loaded machine slows them alike;
the wall-time ratio is the sum over batches. Fidelity is ``evaluation.fidelity.compare`` on the saved sets (their
manifests differ only in ``precision``): PSNR / SSIM / feature distance with bootstrap 95 % intervals, and FID to
the FP32 samples (its bootstrap interval can lie above the point value: resampling with replacement repeats samples,
which raises a Fréchet distance between two nearly equal sets).

"Beyond the noise": the same FID between FP32 samples of seed S and of seed S + 1 (the seed-to-seed floor at this N,
``--no_floor`` skips it) is printed beside; a mode whose FID-to-FP32 sits far below that floor changes no
distribution-level result, and its PSNR says how far single images move.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluation import fidelity as F  # noqa: E402
from evaluation.features import compute_activations, load_network  # noqa: E402
from evaluation.generation import MANIFEST, Plan  # noqa: E402
from evaluation.npz_io import open_batch  # noqa: E402
from ldm.fileio import write_json_atomic  # noqa: E402
from ldm.precision import Precision  # noqa: E402
from ldm.util import at_least  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.generate import sample_batch  # noqa: E402

PRESET = "fashion"
BATCH_SIZE = 50   # not the preset's 250: several batches per mode, so the alternation evens out a loaded machine


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.script_parser(__doc__, PRESET)
    p.add_argument("--n", type=at_least(10), default=500, help="samples per mode (class-balanced: a multiple of 10)")
    p.add_argument("--seed", type=at_least(0), default=0, help="the plan's base seed (the same for every mode)")
    p.add_argument("--modes", nargs="+", type=cli.precision_arg, default=None, metavar="MODE",
                   help="modes to compare with fp32 (default: every mode the device has: cpu bf16; cuda tf32 bf16)")
    p.add_argument("--bootstrap", type=at_least(1), default=F.Bootstrap.resamples)
    p.add_argument("--fid_bootstrap", type=at_least(0), default=F.Bootstrap.fid_resamples)
    p.add_argument("--no_floor", action="store_true", help="skip the FP32 seed-to-seed FID floor (one more FP32 set)")
    p.add_argument("--samples_dir", default=None, help="keep the sample sets here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the record here (atomically)")
    p.set_defaults(batch_size=BATCH_SIZE, outdir="outputs")   # (cli.run_of's Run: FP sampling, nothing written there)
    args = p.parse_args(argv)
    if args.n % 10:
        p.error(f"argument --n: must be a multiple of 10 (class-balanced), got {args.n}")
    return args


def modes_for(device: torch.device, asked: list[Precision] | None) -> list[Precision]:
    """FP32 first (the reference), then the asked modes or every mode the device runs."""
    default = [Precision.TF32, Precision.BF16] if device.type == "cuda" else [Precision.BF16]
    modes = [m for m in (asked or default) if m is not Precision.FP32]
    for m in modes:
        m.check_device(device)
    return [Precision.FP32, *dict.fromkeys(modes)]


def timed(fn, device: torch.device):
    """(result, seconds) of ``fn()``, synchronising CUDA before and after (its kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def generate(family, model, plan: Plan, settings, modes: list[Precision], device: torch.device
             ) -> tuple[dict[Precision, np.ndarray], dict[Precision, float]]:
    """Every mode's uint8 samples of ``plan`` and its total sampling time. Modes alternate per batch, the order
    rotating, after an untimed two-sample warm-up each (autocast and cuDNN pick their kernels on the first call)."""
    images = {m: [] for m in modes}
    seconds = {m: 0.0 for m in modes}
    first = plan.batch(0)
    warm = dataclasses.replace(first, indices=first.indices[:2],
                               labels=None if first.labels is None else first.labels[:2])
    with torch.inference_mode(), family.ema_scope(model):
        for m in modes:
            sample_batch(family, model, warm, settings, precision=m)
        for b in range(plan.num_batches):
            batch = plan.batch(b)
            for m in modes[b % len(modes):] + modes[:b % len(modes)]:
                x, s = timed(lambda: sample_batch(family, model, batch, settings, precision=m), device)
                images[m].append(x)
                seconds[m] += s
            print(f"batch {b + 1}/{plan.num_batches}: " + ", ".join(f"{m.value} {seconds[m]:.1f} s" for m in modes),
                  file=sys.stderr)
    return {m: np.concatenate(v) for m, v in images.items()}, seconds


def write_set(directory: Path, name: str, images: np.ndarray, labels: np.ndarray, manifest: dict) -> Path:
    """A step-7-shaped sample set (samples.npz + manifest.json), so ``evaluation.fidelity`` checks the plans."""
    d = directory / name
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "samples.npz", arr_0=images, arr_1=labels)
    write_json_atomic(d / MANIFEST, manifest)
    return d / "samples.npz"


def seed_floor(fp_path: Path, other_path: Path, boot: F.Bootstrap, device: str) -> dict:
    """FID between two FP32 sets of different seeds (the floor a distribution-level change must clear)."""
    fp, other = open_batch(fp_path, "FP"), open_batch(other_path, "sample")
    network = load_network(F.choose_features("auto", fp), device=device)
    a = compute_activations(network, fp, desc="features FP")["pool"]
    b = compute_activations(network, other, desc="features FP seed+1")["pool"]
    return F.fid_entry(a, b, boot)   # plain FID as "mean"; the basic interval around the bias-corrected "estimate"


def fidelity(paths: dict[Precision, Path], seconds: dict[Precision, float], boot: F.Bootstrap, device: str) -> dict:
    """Per non-FP32 mode: its wall-time ratio to FP32 and ``evaluation.fidelity.compare``'s record against the FP32
    set (per-sample arrays dropped: the summary is what the table shows)."""
    out = {}
    for m, path in paths.items():
        if m is Precision.FP32:
            continue
        rec = F.compare(paths[Precision.FP32], path, features="auto", boot=boot, device=device)
        out[m.value] = {"seconds": seconds[m], "time_ratio_to_fp32": seconds[m] / seconds[Precision.FP32],
                        "speedup": seconds[Precision.FP32] / seconds[m], "n": rec["n"],
                        "identical_samples": rec["psnr_identical"], "feature_network": rec["feature_network"],
                        "metrics": rec["metrics"]}
    return out


def table(record: dict) -> list[str]:
    """The printed table: one row per mode, intervals in brackets, and the seed-to-seed floor."""
    c = record["conditions"]
    lines = [f"--precision on the embedded default ({c['preset']}): N {c['n']}, seed {c['seed']}, {c['steps']} "
             f"{c['loop']} steps, eta {c['eta']:g}, scale {c['scale']:g}, batch {c['batch_size']}, on "
             f"{c['device_name']}; FP32 {record['fp32_seconds']:.1f} s",
             f"{'mode':<6} {'time/fp32':>9} {'PSNR dB [95% CI]':>24} {'SSIM [95% CI]':>26} "
             f"{'feat. dist.':>11} {'FID to FP32 b.-c. [95% CI]':>26} {'identical':>9}"]
    for name, r in record["modes"].items():
        m = r["metrics"]

        def ci(d, f):   # the estimate each interval qualifies: the mean, or FID's bias-corrected value
            e = d.get("estimate", d["mean"])
            return f"{f.format(e)} [{f.format(d['ci'][0])}, {f.format(d['ci'][1])}]" if d["ci"] else f.format(e)
        lines.append(f"{name:<6} {r['time_ratio_to_fp32']:>9.3f} {ci(m['psnr'], '{:.2f}'):>24} "
                     f"{ci(m['ssim'], '{:.5f}'):>26} {m['feature_distance']['mean']:>11.4f} "
                     f"{ci(m['fid_to_fp'], '{:.4f}'):>26} {r['identical_samples']:>5}/{r['n']}")
    floor = record.get("seed_floor")
    if floor:
        ci = "" if floor["ci"] is None else (f"; bias-corrected {floor['estimate']:.3f} [{floor['ci'][0]:.3f}, "
                                             f"{floor['ci'][1]:.3f}]")
        lines.append(f"seed-to-seed floor: FID between FP32 seed {c['seed']} and seed {c['seed'] + 1}: "
                     f"{floor['mean']:.3f}{ci}")
    return lines


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> None:
    args = parse_args(argv)
    cli.apply_preset(args, PRESET)
    run = cli.run_of(args)
    settings = run.sampling
    out = Path(args.json) if args.json else None
    if out is not None:
        cli.ensure_writable_dir(out.parent, flag="--json")
    device = cli.pick_device(args.device)
    modes = modes_for(device, args.modes)
    family, model = run.load(device)
    plan = Plan(args.n, args.batch_size, args.seed, family.num_classes(run.model.config_yaml))
    images, seconds = generate(family, model, plan, settings, modes, device)
    base = {**run.meta(), "n": plan.n, "seed": plan.seed, "batch_size": plan.batch_size,
            "device": device.type, "sampler": "fp32"}
    boot = F.Bootstrap(args.bootstrap, args.fid_bootstrap)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.samples_dir) if args.samples_dir else Path(tmp)
        paths = {m: write_set(root, f"fp32{m.suffix}", images[m], plan.labels,
                              {**base, **({"precision": m.value} if m is not Precision.FP32 else {})})
                 for m in modes}
        record = {"conditions": {"preset": args.preset_used, "n": plan.n, "seed": plan.seed, "steps": settings.steps,
                                 "eta": settings.eta, "scale": settings.scale, "loop": settings.loop,
                                 "batch_size": plan.batch_size, "device_name": machine(device).get("gpu", "cpu")},
                  "machine": machine(device), "fp32_seconds": seconds[Precision.FP32],
                  "modes": fidelity(paths, seconds, boot, "cpu")}
        if not args.no_floor:
            other = dataclasses.replace(plan, seed=plan.seed + 1)
            floor, _ = generate(family, model, other, settings, [Precision.FP32], device)
            record["seed_floor"] = seed_floor(paths[Precision.FP32], write_set(
                root, "fp32_seed+1", floor[Precision.FP32], other.labels, {**base, "seed": other.seed}), boot, "cpu")
    print("\n".join(table(record)))
    if out is not None:
        write_json_atomic(out, record)
        print(f"wrote {out}")


if __name__ == "__main__":
    cli.run_cli(main)
