"""Time cost of the noise corrections: DDIM sampling with the quantized model, uncorrected vs each correction.

    python benchmarks/correction_overhead.py                       # embedded default, W4A8, 20 steps, η 0, scale 3
    python benchmarks/correction_overhead.py --n 80 --repeats 5 --json out.json

D²-DPM claims its correction costs next to nothing at sampling time (a few elementwise operations per step, no
extra UNet call). Every sampler of ``pipeline.sampler_spec`` (fp32 included, for scale) samples the same N latents
from the same seed in the same run; repeats go round-robin over the variants so a machine whose load changes
during the run affects them alike. Reported: the median time, its ratio to the uncorrected quantized model
("none"), the time per DDIM step, and the time spent inside the correction itself (per call -- one call per step
and batch -- and as a share of the run): the direct cost, which the end-to-end ratio on a busy machine can hide in
noise. Needs the artifacts of steps 3-5 for the preset's run directory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.util import at_least  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.generate import sample_latents  # noqa: E402
from pipeline.sampler_spec import LISTED, SamplerSpec  # noqa: E402
from pipeline.sampling import build_variant, check_present  # noqa: E402

PRESET = "fashion"


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_model_args(p, PRESET)
    cli.add_sampling_args(p)
    cli.add_bits_args(p, 4, 8)
    p.add_argument("--variants", nargs="+", default=list(LISTED), help=cli.sampler_help("all listed"))
    p.add_argument("--n", type=at_least(1), default=40, help="samples per timed run (class-balanced labels)")
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--warmup", type=at_least(0), default=1)
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--outdir", default="outputs")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


class TimedCorrection:
    """Wraps a StepCorrection and sums the wall time spent inside it (the direct cost, free of the UNet's noise)."""

    def __init__(self, correction):
        self.correction, self.seconds, self.calls = correction, 0.0, 0

    def __call__(self, eps, sigma, step, x):
        t0 = time.perf_counter()
        out = self.correction(eps, sigma, step, x)
        if out[0].device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def machine_info(device: torch.device) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def main(argv=None) -> None:
    args = parse_args(argv)
    cli.apply_preset(args, PRESET)
    run = cli.run_of(args)
    settings = run.sampling
    if args.threads:
        torch.set_num_threads(args.threads)
    layout, tag = run.layout, cli.tag_of(args)
    names = list(dict.fromkeys(["none"] + args.variants))  # the reference row first
    specs = {n: SamplerSpec.parse(n) for n in names}
    check_present(specs.values(), layout, tag)
    expect = run.meta()
    device = cli.pick_device(args.device)
    family, model = run.load(device)
    variants = {n: build_variant(s, family, model, layout, tag, expect) for n, s in specs.items()}
    conditions = family.conditions(model, 1)
    labels = None if conditions is None else [conditions[i % len(conditions)] for i in range(args.n)]
    scale = family.guidance_scale(settings.scale)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    inside = {n: [0.0, 0] for n in names}  # seconds inside the correction, calls (timed runs only)

    def run(name: str, timed: bool = True) -> float:
        v = variants[name]
        corr = v.correction_for(torch.Generator(device).manual_seed(1))
        corr = corr if corr is None else TimedCorrection(corr)
        sync()
        t0 = time.perf_counter()
        with family.ema_scope(model):
            sample_latents(family, model, labels, settings=settings, n=args.n, batch_size=args.batch_size,
                           generator=torch.Generator(device).manual_seed(args.seed), model_fn=v.model_fn,
                           correction=corr, progress=False)
        sync()
        if corr is not None and timed:
            inside[name][0] += corr.seconds
            inside[name][1] += corr.calls
        return time.perf_counter() - t0

    info = machine_info(device)
    print(f"[{args.preset_used}] W{args.w_bits}A{args.a_bits}: N {args.n}, {args.steps} DDIM steps, eta {args.eta:g}, "
          f"scale {scale:g}, batch {args.batch_size}, {args.repeats} repeats (+{args.warmup} warm-up)")
    print(f"machine: {info}")
    for _ in range(args.warmup):
        for n in names:
            run(n, timed=False)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:
            times[n].append(run(n))
    ref = statistics.median(times["none"])
    rows = []
    print(f"{'sampler':<12} {'median s':>9} {'min s':>8} {'ratio':>7} {'ms/step':>8} {'corr ms/call':>12} "
          f"{'corr share':>10}  description")
    for n in names:
        med = statistics.median(times[n])
        secs, calls = inside[n]
        per_call = secs / calls * 1e3 if calls else 0.0
        share = secs / sum(times[n]) if calls else 0.0
        rows.append({"sampler": n, "median_s": med, "min_s": min(times[n]), "times_s": times[n],
                     "ratio_to_uncorrected": med / ref, "ms_per_step": med / args.steps * 1e3,
                     "correction_ms_per_call": per_call, "correction_share": share})
        print(f"{n:<12} {med:>9.3f} {min(times[n]):>8.3f} {med / ref:>7.3f} {med / args.steps * 1e3:>8.1f} "
              f"{per_call:>12.3f} {100 * share:>9.2f}%  {variants[n].description}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "preset": args.preset_used, "w_bits": args.w_bits, "a_bits": args.a_bits, "n": args.n,
            "steps": args.steps, "eta": args.eta, "scale": scale, "batch_size": args.batch_size,
            "repeats": args.repeats, "machine": info, "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    cli.run_cli(main)
