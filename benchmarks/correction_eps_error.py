"""ε error of each correction against the FP model, along FP DDIM trajectories (issue: D²-DPM on the embedded default).

    python benchmarks/correction_eps_error.py                 # fashion, W4A8, 200 trajectories, seed 1000
    python benchmarks/correction_eps_error.py --n 500 --seed 7 --json out.json

For every step of guided FP trajectories (fresh seeds, not those of the statistics pass), it evaluates on the same
x_t the FP guided ε and the quantized guided ε̂, applies each correction to ε̂ and accumulates ‖ε' − ε_fp‖² per
element. Printed: the MSE averaged over the trajectory, per variant, and its ratio to the uncorrected one. The
artifacts come from the pipeline (steps 1-5) in outputs/<preset>/scale{s}_eta{η}_steps{S}.
"""
from __future__ import annotations


import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.models.diffusion.ddim import DDIMSchedule, cfg_eps, randn_sampler, sample_ddim  # noqa: E402
from ldm.util import at_least  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.sampler_spec import SamplerSpec  # noqa: E402
from pipeline.sampling import build_variant  # noqa: E402

VARIANTS = ("none", "ptqd", "sd2-tensor", "dd2-tensor", "sd2-channel", "dd2-channel")


def parse_args(argv=None):
    """The flags; the counts checked by the parser, the sampling settings where the run is built (main, before the
    model loads)."""
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_model_args(p, "fashion")
    cli.add_sampling_args(p)
    cli.add_bits_args(p, 4, 8)
    p.add_argument("--n", type=at_least(1), default=200, help="trajectories (class-balanced)")
    p.add_argument("--seed", type=at_least(0), default=1000)
    p.add_argument("--outdir", default="outputs")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cli.apply_preset(args, "fashion")
    run = cli.run_of(args)
    device = torch.device("cpu")
    expect = run.meta()
    family, model = run.load(device)
    layout, tag = run.layout, cli.tag_of(args)
    variants = {v: build_variant(SamplerSpec.parse(v), family, model, layout, tag, expect) for v in VARIANTS}
    schedule = DDIMSchedule.make(model.alphas_cumprod, args.steps, args.eta)
    conditions = family.conditions(model, 1)
    labels = [conditions[i % len(conditions)] for i in range(args.n)]
    conditioner = family.conditioner(model, args.scale)
    sq = {v: 0.0 for v in VARIANTS}
    count = 0
    fp_fn, q_fn = family.model_fn(model), variants["none"].model_fn  # FP and quantized UNet, same conditioning routing
    with torch.no_grad():
        for start in range(0, args.n, args.batch_size):
            y = labels[start:start + args.batch_size]
            c, uc = conditioner(y)
            g = torch.Generator().manual_seed(args.seed + start)
            x_T = torch.randn((len(y), *family.latent_shape(model)), generator=g)
            corrections = {v: variants[v].correction_for(torch.Generator().manual_seed(args.seed + start + 1))
                           for v in VARIANTS}

            def eps_fn(x, t, step, c=c, uc=uc, corrections=corrections):
                nonlocal count
                e_fp = cfg_eps(fp_fn, x, t, c, uc, args.scale)
                e_q = cfg_eps(q_fn, x, t, c, uc, args.scale)
                sigma = torch.tensor(step.sigma, dtype=x.dtype)
                for v, corr in corrections.items():
                    e = e_q if corr is None else corr(e_q, sigma, step, x)[0]
                    sq[v] += float((e - e_fp).double().pow(2).sum())
                count += e_fp.numel()
                return e_fp  # the FP trajectory

            sample_ddim(eps_fn, x_T, schedule, noise_sampler=randn_sampler(x_T.shape, device, g))
    mse = {v: sq[v] / count for v in VARIANTS}
    print(f"{args.preset_used}: W{args.w_bits}A{args.a_bits}, {args.n} FP trajectories (seed {args.seed}), "
          f"{args.steps} DDIM steps, η {args.eta}, scale {args.scale}; {platform.machine()} CPU, torch "
          f"{torch.__version__}")
    print(f"{'variant':<14}{'ε MSE vs FP':>14}{'ratio':>8}")
    for v in VARIANTS:
        print(f"{v:<14}{mse[v]:>14.6g}{mse[v] / mse['none']:>8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"mse": mse, "n": args.n, "seed": args.seed}, indent=1))


if __name__ == "__main__":
    main()
