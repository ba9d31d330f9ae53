"""Time of each quantization stage (steps 1-3), and per-unit reconstruction time with a projection to a full run.

    python benchmarks/quantization_stages.py                         # embedded default (fashion), CPU
    python benchmarks/quantization_stages.py --model cin256 --units 6 --iters 20   # full-size UNet, random weights

fashion: the real checkpoint; it records a calibration set (step 1), initialises W4 weight ranges, times AdaRound on
every unit for ``--iters`` iterations, initialises activation ranges and times step-size learning, and projects both
phases to the preset's iteration counts. cin256: cin256-v2's UNet with random weights and random calibration inputs
(timing does not depend on values), first ``--units`` units only; the per-unit times project a 10k/5k-iteration
calibration. Everything is measured in this run; nothing is hard-coded.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.models.diffusion.settings import SamplingSettings
from ldm.util import (ArgumentParser, at_least, instantiate_from_config, load_config,  # noqa: E402
                      load_model_from_config)
from pipeline.cli import A_BITS, W_BITS  # noqa: E402
from pipeline.families.compvis_ldm import ClassConditionalLDM  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from quant.model import QuantModel  # noqa: E402
from quant.reconstruction import (CacheSpec, CalibrationData, Phase, ReconConfig, capture_unit_io,  # noqa: E402
                                  find_units, optimise_unit)

REPO = Path(__file__).resolve().parents[1]


def timed(fn, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def fashion_setup(device, n):
    from quant.calibration import TimestepDistribution, collect_calibration_set
    model = load_model_from_config(load_config(REPO / "models/ldm/fashion-ldm-vq-4/config.yaml"),
                                   REPO / "models/ldm/fashion-ldm-vq-4/model.ckpt", device=device)
    labels = [c for c in range(10) for _ in range(26)]
    cal, secs = timed(lambda: collect_calibration_set(model, labels, n=n, settings=SamplingSettings(20, 0.0, 3.0),
                                                      distribution=TimestepDistribution.UNIFORM, seed=0,
                                                      progress=False), device)
    return model.model.diffusion_model, CalibrationData(cal["x"], cal["t"], cal["c"], device), secs


def cin256_setup(device, n):
    cfg = load_config(REPO / "configs/latent-diffusion/cin256-v2.yaml").model.params.unet_config
    torch.manual_seed(0)
    unet = instantiate_from_config(cfg).eval().to(device)
    p = cfg.params
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, p.in_channels, p.image_size, p.image_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    c = torch.randn(n, 1, p.context_dim, generator=g)
    return unet, CalibrationData(x, t, c, device), None


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every count checked by the parser (one line, before the calibration inputs are collected)."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("fashion", "cin256"), default="fashion")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=at_least(1), default=None, help="calibration inputs (fashion 1024, cin256 64)")
    p.add_argument("--iters", type=at_least(1), default=50, help="iterations timed per unit and phase")
    p.add_argument("--units", type=at_least(1), default=None, help="time only the first N units")
    p.add_argument("--w_bits", type=int, default=4, choices=W_BITS)
    p.add_argument("--a_bits", type=int, default=8, choices=A_BITS)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    n = args.n if args.n is not None else 1024 if args.model == "fashion" else 64
    unet, data, collect_s = (fashion_setup if args.model == "fashion" else cin256_setup)(device, n)
    from pipeline.cli import load_preset
    preset = load_preset(args.model)
    full_iters = (preset["weight_iters"], preset["act_iters"])  # what the preset's steps 2-3 run

    qm = QuantModel(unet, QuantConfig(args.w_bits, args.a_bits), specials=ClassConditionalLDM().quant_specials()).to(device)
    _, init_w_s = timed(qm.init_weights_, device)
    units = find_units(qm)[:args.units]
    rows = []
    per_kind = defaultdict(list)
    for phase in (Phase.WEIGHT, Phase.ACTIVATION):
        if phase is Phase.ACTIVATION:
            qm.set_quant_state(weight=True)
            _, init_a_s = timed(lambda: qm.calibrate_activations_(data.subset(min(256, n)).batches(32)), device)
        cfg = (ReconConfig(iters=args.iters) if phase is Phase.WEIGHT
               else ReconConfig.activation_defaults(iters=args.iters))
        for i, unit in enumerate(units):
            (inputs, target), cap_s = timed(partial(capture_unit_io, qm, unit, data, 32, CacheSpec(),
                                                    quantized=False, act=False, want_output=True), device)
            qm.set_quant_state(weight=True, act=phase is Phase.ACTIVATION)
            _, opt_s = timed(partial(optimise_unit, unit, phase, inputs, target, cfg, i, device, progress=False),
                             device)
            ms = 1000 * opt_s / args.iters
            kind = type(unit.module).__name__ if unit.is_block else "layer"
            per_kind[(phase.value, kind)].append(ms)
            rows.append({"phase": phase.value, "unit": unit.name, "kind": kind, "capture_s": cap_s,
                         "ms_per_iter": ms})

    print(f"{args.model} on {device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads); {n} calibration inputs, W{args.w_bits}A{args.a_bits}, "
          f"{len(units)} units, {args.iters} iterations timed per unit and phase")
    if collect_s is not None:
        print(f"  step 1  calibration set (260 guided trajectories x 20 steps): {collect_s:8.1f} s")
    print(f"  init    weight ranges (L2.4 search, all layers):            {init_w_s:8.2f} s")
    print(f"  init    activation ranges ({min(256, n)} inputs):                  {init_a_s:8.2f} s")
    print(f"  {'phase':<11}{'unit kind':<24}{'units':>6}{'ms/iter':>10}")
    for (phase, kind), ms in sorted(per_kind.items()):
        print(f"  {phase:<11}{kind:<24}{len(ms):>6}{statistics.mean(ms):>10.2f}")
    total = {}
    for phase, iters in zip(("weight", "activation"), full_iters, strict=True):
        sel = [r for r in rows if r["phase"] == phase]
        total[phase] = sum(r["ms_per_iter"] * iters / 1000 + r["capture_s"] * 2 for r in sel)
        print(f"  projected {phase} phase at {iters} iterations/unit over these {len(sel)} units: "
              f"{total[phase] / 60:.1f} min (captures counted twice: FP targets + quantized inputs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "device": str(device), "n": n, "rows": rows,
                                               "collect_s": collect_s, "projected_s": total}, indent=1))


if __name__ == "__main__":
    main()
