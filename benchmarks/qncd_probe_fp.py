"""What QNCD's runtime noise estimation measures on a model with no quantization at all: the probe run on the FP
model, against the same FP samples without it (issue 34).

    python benchmarks/qncd_probe_fp.py                       # embedded text default, PLMS, R = 2, 5, 10, N = 200
    python benchmarks/qncd_probe_fp.py --preset fashion --ddim --n 500 --json probe_fp.json

The probe (``correction.qncd.QNCDProbe``, QNCD's plms.py) estimates μ = mean(ε̂(x̂_t, t) − z) on a latent x̂_t
re-noised with known noise z. An ideal denoiser's μ is not 0 for one draw: it is the model's own mean guided ε at
x̂_t (an ε-model's mean over a batch, channels and pixels is not constrained to 0 at guidance scale > 1 or on a
finite batch) plus minus the mean of the one noise draw z (its spread over B·C·H·W elements is 1/√(B·C·H·W)). Run on
the FP model, whatever the probe subtracts is therefore not quantization error; how far it moves the samples is the
floor any quantized-model gain has to clear.

Every variant samples the same step-7 plan (``evaluation.generation.Plan``; sample i from the same x_T and noise,
through ``pipeline.generate.sample_batch``); the probe draws its z from its own generator (seeded per batch from the
plan, as step 7 seeds corrections). Reported per R: the mean |μ| the probes estimated, the relative L2 change of the
final images (float, [-1, 1]) against the no-probe FP samples, and ``evaluation.fidelity.compare``'s paired fidelity
(PSNR / SSIM / feature distance with bootstrap 95 % intervals, FID to the no-probe samples) — beside the FP32
seed-to-seed FID floor (``--no_floor`` skips it).
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from correction.qncd import QNCDProbe  # noqa: E402
from evaluation import fidelity as F  # noqa: E402
from evaluation.generation import Plan  # noqa: E402
from ldm.fileio import write_json_atomic  # noqa: E402
from ldm.util import at_least  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.generate import sample_batch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision_fidelity import seed_floor, write_set  # noqa: E402

PRESET = "fashion-txt2img"
BATCH_SIZE = 50


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.script_parser(__doc__, PRESET)
    p.add_argument("--n", type=at_least(1), default=200,
                   help="samples per variant (a multiple of the condition count)")
    p.add_argument("--seed", type=at_least(0), default=0, help="the plan's base seed (the same for every variant)")
    p.add_argument("--intervals", nargs="+", type=at_least(1), default=[2, 5, 10], help="probe intervals R")
    p.add_argument("--no_floor", action="store_true", help="skip the FP32 seed-to-seed FID floor")
    p.add_argument("--json", default=None, help="write the record here (atomically)")
    p.set_defaults(outdir="outputs")   # (cli.run_of's Run: FP sampling, nothing is written there)
    args = p.parse_args(argv)
    if args.plms is None and args.preset in (None, PRESET):
        args.plms = True          # QNCD's probe exists in its PLMS sampler (SD's txt2img)
    if args.batch_size is None:
        args.batch_size = BATCH_SIZE
    return args


def sample_set(family, model, plan: Plan, settings, interval: int | None) -> tuple[np.ndarray, list[float]]:
    """uint8 samples of ``plan`` (with a probe of interval R, or none) and the |μ| of every probe."""
    images, mus = [], []

    def probe_for(generator: torch.Generator) -> QNCDProbe:
        probe = QNCDProbe(interval, generator=generator)
        probes.append(probe)
        return probe

    with torch.inference_mode(), family.ema_scope(model):
        for b in range(plan.num_batches):
            probes: list[QNCDProbe] = []
            images.append(sample_batch(family, model, plan.batch(b), settings,
                                       correction_for=probe_for if interval else None))
            mus += [float(mu.abs().mean()) for p in probes for _, _, mu in p.estimates]
    return np.concatenate(images), mus


def relative_change(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖a‖ over the images in [-1, 1], per sample, averaged."""
    fa, fb = (x.astype(np.float64) / 127.5 - 1 for x in (a, b))
    num = np.sqrt(((fa - fb) ** 2).reshape(len(fa), -1).sum(1))
    return float((num / np.sqrt((fa ** 2).reshape(len(fa), -1).sum(1))).mean())


def main(argv=None) -> None:
    args = parse_args(argv)
    cli.apply_preset(args, PRESET)
    run = cli.run_of(args)
    settings = run.sampling
    device = cli.pick_device(args.device)
    family, model = run.load(device)
    plan = Plan(args.n, args.batch_size, args.seed, family.num_classes(run.model.config_yaml))
    base = {**run.meta(), "n": plan.n, "seed": plan.seed, "batch_size": plan.batch_size,
            "device": device.type, "sampler": "fp32"}
    boot = F.Bootstrap()
    fp, _ = sample_set(family, model, plan, settings, None)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = write_set(Path(tmp), "fp32", fp, plan.labels, base)
        for r in args.intervals:
            images, mus = sample_set(family, model, plan, settings, r)
            path = write_set(Path(tmp), f"fp32-probe{r}", images, plan.labels, {**base, "sampler": f"fp32+probe{r}"})
            rec = F.compare(fp_path, path, features="auto", boot=boot, device="cpu")
            rows[r] = {"mean_abs_mu": float(np.mean(mus)), "probes": len(mus),
                       "relative_change": relative_change(fp, images), "metrics": rec["metrics"]}
            print(f"R={r}: |μ| {rows[r]['mean_abs_mu']:.4f} over {len(mus)} probes, relative change "
                  f"{rows[r]['relative_change']:.4f}, PSNR {rec['metrics']['psnr']['mean']:.2f} dB", flush=True)
        floor = None
        if not args.no_floor:
            other = dataclasses.replace(plan, seed=plan.seed + 1)
            images, _ = sample_set(family, model, other, settings, None)
            floor = seed_floor(fp_path, write_set(Path(tmp), "fp32_seed+1", images, other.labels,
                                                  {**base, "seed": other.seed}), boot, "cpu")
    print(f"\nprobe on the FP model ({args.preset_used}, N {plan.n}, seed {plan.seed}, {settings.steps} "
          f"{settings.loop} steps, η {settings.eta:g}, scale {settings.scale:g}):")
    print(f"{'R':>3} {'mean |μ|':>9} {'rel. change':>12} {'PSNR to no-probe FP (dB)':>26} {'FID to it':>10}")
    for r, row in rows.items():
        m = row["metrics"]
        print(f"{r:>3} {row['mean_abs_mu']:9.4f} {row['relative_change']:12.4f} "
              f"{m['psnr']['mean']:8.2f} [{m['psnr']['ci'][0]:.2f}, {m['psnr']['ci'][1]:.2f}] "
              f"{m['fid_to_fp']['mean']:10.4f}")
    if floor is not None:
        print(f"FP seed-to-seed FID at this N (the floor): {floor['mean']:.4f}")
    if args.json:
        write_json_atomic(args.json, {"conditions": {"preset": args.preset_used, "n": plan.n, "seed": plan.seed,
                                                     "steps": settings.steps, "loop": settings.loop,
                                                     "eta": settings.eta, "scale": settings.scale},
                                      "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                  "threads": torch.get_num_threads()},
                                      "intervals": rows, "seed_floor": floor})


if __name__ == "__main__":
    cli.run_cli(main)
