"""One reconstruction iteration, measured per unit kind: milliseconds and ATen operator calls per iteration (the
kernel launches a GPU pays for one by one: leaf operators, forward, backward and optimiser; issue 29), for the
weight phase (AdaRound) and the activation phase (step sizes), on cin256-v2's UNet with random weights (timing
does not depend on the values) or the embedded default.

    python benchmarks/reconstruction_step.py                          # cin256-v2 structure, CPU, one unit a kind
    python benchmarks/reconstruction_step.py --compare ../other-checkout   # the same in that checkout, alternating

With ``--compare DIR`` every measurement also runs in a process importing DIR's code, the two alternating repeat by
repeat in this one run, and the ratios are printed: a before/after table of a change measured side by side. The
operator count is torch.profiler's, over ``--profile_iters`` iterations; the time is the median over ``--repeats``
runs of ``--iters`` iterations (one CPU thread: reconstruction's own setting, ``ReconConfig.cpu_threads``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and os.environ.get("RECON_STEP_CHILD"):   # a child: the other checkout's code first
    sys.path.insert(0, os.environ["RECON_STEP_CHILD"])
else:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ldm.util import ArgumentParser, at_least, instantiate_from_config, load_config  # noqa: E402

KINDS = ("BasicTransformerBlock", "ResBlock", "layer")


def build(model: str, n: int, device: torch.device, grad_ckpt: bool = True):
    """The quantized UNet (W4A8, weight ranges set), its calibration inputs and one unit of each kind;
    ``grad_ckpt=False``: no activation recomputation in the blocks' backward (the steps' ``--no_grad_ckpt``)."""
    from pipeline.families.compvis_ldm import ClassConditionalLDM
    from quant.config import QuantConfig
    from quant.model import QuantModel
    from quant.reconstruction import CalibrationData, find_units
    name = {"cin256": "configs/latent-diffusion/cin256-v2.yaml",
            "fashion": "models/ldm/fashion-ldm-vq-4/config.yaml"}[model]
    cfg = load_config(REPO / name).model.params.unet_config
    torch.manual_seed(0)
    unet = instantiate_from_config(cfg).eval().to(device)
    if not grad_ckpt:
        from pipeline.basics import disable_grad_checkpointing
        disable_grad_checkpointing(unet)
    p, g = cfg.params, torch.Generator().manual_seed(0)
    x = torch.randn(n, p.in_channels, p.image_size, p.image_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    c = (torch.randn(n, 1, p.context_dim, generator=g) if p.get("context_dim") else
         torch.randint(0, p.get("num_classes", 10), (n,), generator=g))
    qm = QuantModel(unet, QuantConfig(4, 8), specials=ClassConditionalLDM().quant_specials(), copy_model=False)
    qm.to(device).init_weights_()
    qm.eval()
    for p in qm.model.parameters():
        p.requires_grad_(False)   # as reconstruct_ has it: only α or Δ_a are learned
    qm.set_quant_state(weight=True)
    data = CalibrationData(x, t, c, device)
    qm.calibrate_activations_(data.batches(16))
    units = {}
    for unit in find_units(qm):
        units.setdefault(type(unit.module).__name__ if unit.is_block else "layer", unit)
    return qm, data, units


# ATen operators that launch no kernel on a GPU: views, allocations, metadata, dtype promotion of wrapped scalars
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::view",
             "aten::_unsafe_view", "aten::reshape", "aten::expand", "aten::detach", "aten::detach_", "aten::alias",
             "aten::resolve_conj", "aten::resolve_neg", "aten::result_type", "aten::scalar_tensor", "aten::lift_fresh",
             "aten::t", "aten::transpose", "aten::permute", "aten::squeeze", "aten::unsqueeze", "aten::slice",
             "aten::select", "aten::to", "aten::_to_copy", "aten::resize_", "aten::set_", "aten::is_nonzero",
             "aten::_local_scalar_dense", "aten::item", "aten::size", "aten::stride", "aten::numel"}


def count_kernels(events) -> tuple[int, int]:
    """(kernel-launching operator calls, host syncs) among profiler ``events``. Each outermost ATen call (from
    Python, the autograd engine or the optimiser) counts once when it computes: not metadata (``NO_KERNEL``), not
    the copy that materialises a Python number as a 0-dim tensor (an argument on a GPU, not a launch); a metadata
    call that computes inside (``.to`` of a real tensor: a copy) counts what it calls.
    ``.item()`` reads are the syncs."""
    def is_aten(e) -> bool:
        return e.name.startswith("aten::")

    def launches(e) -> int:
        if e.name in ("aten::copy_", "aten::fill_") and all(not shape for shape in e.input_shapes):
            return 0   # a Python number materialised as a 0-dim tensor: an argument on a GPU
        if e.name not in NO_KERNEL:
            return 1
        return sum(launches(ch) for ch in e.cpu_children if is_aten(ch))

    def outermost(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if is_aten(p):
                return False
            p = p.cpu_parent
        return True

    roots = [e for e in events if is_aten(e) and outermost(e)]
    return sum(launches(e) for e in roots), sum(1 for e in events if e.name == "aten::_local_scalar_dense")


def measure(model: str, n: int, iters: int, profile_iters: int, device: torch.device, grad_ckpt: bool = True,
            always_recompute: bool = False) -> dict:
    """{phase/kind: {"ms": [per repeat...], "ops": ATen calls per iteration, "recompute": whether the unit
    recomputed its activations}} for this process's code: a unit keeps or recomputes its activations as
    ``reconstruct_`` decides (``recompute_as_fits``; checkouts before it: as their model says), or always recomputes
    (``always_recompute``: a budget of 0)."""
    import contextlib

    import quant.reconstruction as recon
    from torch.profiler import ProfilerActivity, profile
    from quant.reconstruction import CacheSpec, Phase, ReconConfig, capture_unit_io, optimise_unit
    budget = {"recompute_above": 0} if always_recompute else {}
    torch.set_num_threads(1)
    qm, data, units = build(model, n, device, grad_ckpt)
    out = {}
    for phase in (Phase.WEIGHT, Phase.ACTIVATION):
        for kind in KINDS:
            if kind not in units:
                continue
            unit, act = units[kind], phase is Phase.ACTIVATION
            inputs, target = capture_unit_io(qm, unit, data, 16, CacheSpec(), quantized=False, act=False,
                                             want_output=True)
            qm.set_quant_state(weight=True, act=act)
            cfg = ReconConfig(iters=iters, **budget) if not act else \
                ReconConfig.activation_defaults(iters=iters, **budget)
            decide = getattr(recon, "recompute_as_fits", None)
            keep = (decide(unit, qm.specials.keep_activations, inputs, cfg, device) if decide is not None else
                    contextlib.nullcontext())
            steps = [(m, m.a_scale.detach().clone()) for m in [*unit.layers(), *unit.act_quantizers()]]

            def run(k: int, c=cfg) -> float:
                """``k`` iterations from the same starting point (AdaRound hardens at its end, LSQ moves Δ_a)."""
                for m, a_scale in steps:
                    m.a_scale.data.copy_(a_scale)
                for layer in unit.layers() if not act else ():
                    layer.rounding, layer.alpha, layer.round_up = type(layer.rounding).NEAREST, None, None
                t0 = time.perf_counter()
                optimise_unit(unit, phase, inputs, target, c, 0, device, progress=False)
                return (time.perf_counter() - t0) / k

            with keep as recompute:
                run(2)   # warm-up
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    run(profile_iters, ReconConfig(iters=profile_iters) if not act else
                        ReconConfig.activation_defaults(iters=profile_iters))
                kernels, syncs = count_kernels(prof.events())
                out[f"{phase.value}/{kind}"] = {"s_per_iter": run(iters), "ops": kernels / profile_iters,
                                                "syncs": syncs / profile_iters, "recompute": recompute}
            qm.set_quant_state(weight=True)
    return out


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("cin256", "fashion"), default="cin256")
    p.add_argument("--n", type=at_least(8), default=32, help="calibration rows the unit caches hold")
    p.add_argument("--iters", type=at_least(1), default=20, help="iterations timed per repeat")
    p.add_argument("--profile_iters", type=at_least(1), default=3, help="iterations whose operators are counted")
    p.add_argument("--repeats", type=at_least(1), default=3, help="alternating repeats (median reported)")
    p.add_argument("--no_grad_ckpt", action="store_true", help="no activation recomputation in the blocks' backward")
    p.add_argument("--always_recompute", action="store_true",
                   help="every unit recomputes its activations (reconstruction keeps those that fit "
                        "ReconConfig.recompute_above)")
    p.add_argument("--compare", default=None, help="another checkout measured alternately in the same run")
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def one_repeat(args, tree: Path | None) -> dict:
    """One measurement in a fresh process (``tree``: that checkout's code; None: this one)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if tree is not None:
        env["RECON_STEP_CHILD"] = str(tree.resolve())
    argv = [sys.executable, __file__, "--child", "--model", args.model, "--n", str(args.n), "--iters",
            str(args.iters), "--profile_iters", str(args.profile_iters),
            *(["--no_grad_ckpt"] if args.no_grad_ckpt else []),
            *(["--always_recompute"] if args.always_recompute else [])]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"error: the measurement in {tree or REPO} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model, args.n, args.iters, args.profile_iters, torch.device("cpu"),
                                 grad_ckpt=not args.no_grad_ckpt, always_recompute=args.always_recompute)))
        return
    trees = {"this": None, **({"compare": Path(args.compare)} if args.compare else {})}
    if args.compare and not (Path(args.compare) / "quant").is_dir():
        raise SystemExit(f"error: --compare {args.compare} is not a checkout of this project (no quant/ in it)")
    runs = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, tree in trees.items():
            runs[name].append(one_repeat(args, tree))
    rows = {}
    for key in runs["this"][0]:
        rows[key] = {name: {"ms": 1000 * statistics.median(r[key]["s_per_iter"] for r in rs),
                            "ops": rs[0][key]["ops"], "recompute": rs[0][key].get("recompute")}
                     for name, rs in runs.items() if key in rs[0]}
    print(f"{args.model} UNet (random weights), W4A8, one unit a kind, {args.n} cached rows, batch 8 (weight) / 16 "
          f"(activation), {'no ' if args.no_grad_ckpt else ''}gradient checkpointing"
          f"{', every unit recomputing' if args.always_recompute else ''}, 1 CPU thread, torch "
          f"{torch.__version__}; median of {args.repeats} repeats of {args.iters} "
          f"iterations; ATen operator calls per iteration over {args.profile_iters}")
    head = f"  {'phase/unit kind':<34}{'ms/iter':>9}{'ops/iter':>10}{'activations':>13}"
    if args.compare:
        head += f"{'compare ms':>12}{'ops':>8}{'time ratio':>12}{'ops ratio':>11}"
    print(head)
    for key, r in rows.items():
        kept = {True: "recomputed", False: "kept", None: "-"}[r["this"]["recompute"]]
        line = f"  {key:<34}{r['this']['ms']:>9.2f}{r['this']['ops']:>10.0f}{kept:>13}"
        if "compare" in r:
            c = r["compare"]
            line += (f"{c['ms']:>12.2f}{c['ops']:>8.0f}{r['this']['ms'] / c['ms']:>12.3f}"
                     f"{r['this']['ops'] / c['ops']:>11.3f}")
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
