"""Does step 3's step-size learning earn its keep, and from which unit inputs? ε SQNR before and after, per setting.

    python benchmarks/activation_reconstruction.py                      # W4A8, W4A6, W4A4 on the default demo run
    python benchmarks/activation_reconstruction.py --a_bits 4 --act_iters 100

For each activation width and each source of the units' inputs while their step sizes are learned (``fp``: the FP
model's, D²-DPM; ``quantized``: the quantized prefix's, weights and activations on, as BRECQ and Q-Diffusion do), it
runs the real step-3 script (quant_scripts/quantize_weight_activation.py) on a copy of an existing run's calibration
set and W4 weights, and reads the ε SQNRs the script measured on the held-out calibration inputs: with the initial
L2.4 ranges, and after learning. Everything is measured in this run; the run it reads is the default demo's
(`make demo`, or steps 1-2 by hand), checked by the script against the preset like any other.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.fileio import write_json_atomic  # noqa: E402
from ldm.util import ArgumentParser, UserFacingError, at_least, run_cli  # noqa: E402
from pipeline.artifacts import load_artifact  # noqa: E402
from pipeline.cli import A_BITS, REPO_ROOT, W_BITS, load_preset  # noqa: E402
from pipeline.layout import QuantTag, RunLayout  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--outdir", default="outputs", help="the run to read calibration.pt and w{b}/quant_w{b}.pt from")
    p.add_argument("--preset", default="fashion")
    p.add_argument("--w_bits", type=int, default=4, choices=W_BITS)
    p.add_argument("--a_bits", type=int, nargs="+", default=[8, 6, 4], choices=A_BITS)
    p.add_argument("--inputs", nargs="+", default=["fp", "quantized"], choices=("fp", "quantized"))
    p.add_argument("--act_iters", type=at_least(0), default=None, help="iterations per unit (default: the preset's)")
    p.add_argument("--act_init_samples", type=at_least(1), default=None,
                   help="inputs for the initial ranges (default: the preset's, at most the run's calibration inputs)")
    p.add_argument("--json", default="outputs/benchmarks/activation_reconstruction.json")
    return p.parse_args(argv)


def step3(outdir: Path, preset: str, w_bits: int, a_bits: int, inputs: str, act_iters: int | None,
          init_samples: int) -> dict:
    from quant_scripts import quantize_weight_activation as script
    argv = ["--preset", preset, "--outdir", str(outdir), "--w_bits", str(w_bits), "--a_bits", str(a_bits),
            "--act_inputs", inputs, "--act_init_samples", str(init_samples), "--force"] + \
        (["--act_iters", str(act_iters)] if act_iters is not None else [])
    script.main(argv)
    preset_cfg = load_preset(preset)
    layout = RunLayout(outdir, preset, preset_cfg["steps"], float(preset_cfg["eta"]), float(preset_cfg["scale"]))
    return load_artifact(layout.quant(QuantTag(w_bits, a_bits)), "quant")["meta"]


def main(argv=None) -> None:
    args = parse_args(argv)
    preset = load_preset(args.preset)
    source = RunLayout(Path(args.outdir), args.preset, preset["steps"], float(preset["eta"]), float(preset["scale"]))
    needed = [source.calibration, source.quant(QuantTag(args.w_bits))]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise UserFacingError(f"{', '.join(missing)} not found: run `make demo` (or steps 1-2 with --outdir "
                              f"{args.outdir}) first, or pass --outdir of a run that has them")
    n_cal = load_artifact(source.calibration, "calibration")["meta"]["n"]
    init_samples = args.act_init_samples or min(preset["act_init_samples"], n_cal)   # (a quick run keeps fewer)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = RunLayout(Path(tmp), args.preset, source.steps, source.eta, source.scale)
        for p in needed:  # a copy: this benchmark never writes into the run it reads
            dst = work.run_dir / p.relative_to(source.run_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
        for a in args.a_bits:
            for inputs in args.inputs:
                t0 = time.perf_counter()
                meta = step3(Path(tmp), args.preset, args.w_bits, a, inputs, args.act_iters, init_samples)
                results.append({"setting": f"W{args.w_bits}A{a}", "inputs": inputs, "act_iters": meta["act_iters"],
                                "sqnr_weight_only_db": meta["sqnr_weight_only_db"],
                                "sqnr_init_db": meta["sqnr_act_init_db"], "sqnr_learned_db": meta["sqnr_db"],
                                "seconds": time.perf_counter() - t0})
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}")
    print(f"\nε SQNR (dB) on the held-out calibration inputs of {source.run_dir}; {machine}")
    print(f"{'setting':8} {'inputs':10} {'iters':>5} {'W only':>7} {'init':>7} {'learned':>8} {'Δ':>6} {'s':>6}")
    for r in results:
        print(f"{r['setting']:8} {r['inputs']:10} {r['act_iters']:>5} {r['sqnr_weight_only_db']:7.2f} "
              f"{r['sqnr_init_db']:7.2f} {r['sqnr_learned_db']:8.2f} "
              f"{r['sqnr_learned_db'] - r['sqnr_init_db']:+6.2f} {r['seconds']:6.0f}")
    write_json_atomic(REPO_ROOT / args.json, {"run": str(source.run_dir), "machine": machine, "results": results})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
