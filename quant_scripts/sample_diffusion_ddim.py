"""QNCD's CIFAR-10 command, working as its README intends: quantize the pixel DDPM and sample it with DDIM.

    # QNCD README, CIFAR-10 8/8-bit (the released EMA checkpoint; fetched and MD5-checked if missing):
    python quant_scripts/sample_diffusion_ddim.py --config configs/cifar10.yml --use_pretrained --timesteps 100 \\
        --eta 0 --skip_type quad --ptq --weight_bit 8 --quant_mode qncd -l outputs --sample_reverse 4
    # the same on the embedded Fashion pixel default, on a laptop CPU:
    python quant_scripts/sample_diffusion_ddim.py --preset fashion-ddim --timesteps 50 --skip_type quad --ptq \\
        --weight_bit 8 --quant_mode qncd -l outputs --sample_reverse 4 --max_images 1000

QNCD's own script rejects this command (``--quant_mode`` only accepts ``qdiff``, ``--sample_reverse`` does not exist,
its ``quant`` package imports a missing ``qdiff``, and it moves tensors to CUDA unconditionally). Here each flag maps
onto the pipeline (quant_scripts/ steps 1-7, run in this process; each step skips what a matching artifact already
holds, so a rerun resumes):

* ``--ptq``: step 1 (calibration inputs along FP trajectories: ``--cali_n`` of them from ``--cali_trajectories``
  random x_T), step 2 (W``--weight_bit``, BRECQ/AdaRound, ``--cali_iters``), step 3 (A``--act_bit``,
  ``--cali_iters_a``); the activations are quantized with ``--ptq`` whenever ``--act_bit`` is set (default 8: the
  README's command is "8/8-bit" without ``--quant_act``, which is accepted for compatibility). ``--quant_mode qncd``
  adds QNCD's embedding-derived smoothing and running statistics; ``--split`` is Q-Diffusion's shortcut splitting.
* ``--cali_ckpt FILE``: a quantized model made earlier (``quant_w{b}a{b}.pt`` of steps 2-3) instead of steps 1-3; its
  metadata must name this model, grid and settings.
* ``--sample_reverse [R]``: QNCD's runtime noise estimation, a probe every R steps (alone: R = 10).
* Sampling: ``--timesteps`` DDIM steps on the ``--skip_type`` grid (``quad``: the original's truncated grid, repeats
  and all; ``--corrected_grid`` for the fixed one), ``--eta``; ``--max_images`` samples (default: the preset's,
  50,000 for CIFAR-10) from ``--seed``, sharded and resumable, into
  ``<-l>/<preset>/scale1_eta{η}_steps{T}_<grid>/…/samples.npz`` (uint8, evaluator.py's input). Score them with
  ``python evaluator.py REF.npz samples.npz``.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


from ldm.fileio import atomic_path  # noqa: E402
from ldm.modules.diffusionmodules.ddim_checkpoint import fetch_released  # noqa: E402
from ldm.util import ArgumentParser, UserFacingError, run_cli  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.artifacts import load_artifact  # noqa: E402
from pipeline.cli import preset_names, resolve  # noqa: E402
from pipeline.sampling import quant_expect  # noqa: E402
from pipeline.steps import evaluation_samples  # noqa: E402
from quant_scripts import (collect_imagenet_calibration_set, generate_evaluation_samples_dist,  # noqa: E402
                           quantize_weight, quantize_weight_activation)

SEED = 1234   # QNCD's default
# the step scripts' flags -> this script's (messages name what was typed)
RENAMED = {"--steps": "--timesteps", "--n_samples": "--max_images", "--reverse_interval": "--sample_reverse",
           "--w_bits": "--weight_bit", "--a_bits": "--act_bit", "--n": "--cali_n", "--weight_iters": "--cali_iters",
           "--act_iters": "--cali_iters_a", "--calibration_trajectories_per_class": "--cali_trajectories"}
# numeric flags (dest: minimum), checked before anything runs; 0 iterations = no reconstruction
MINIMUM = {"max_images": 1, "batch_size": 1, "seed": 0, "sample_reverse": 1, "cali_n": 1, "cali_trajectories": 1,
           "cali_iters": 0, "cali_iters_a": 0}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    model = p.add_argument_group("model")
    model.add_argument("--config", default=None, help="the DDPM's yml (configs/cifar10.yml; a bare name is looked "
                                                      "up in configs/)")
    model.add_argument("--use_pretrained", action="store_true",
                       help="the released EMA CIFAR-10 checkpoint (downloaded to ~/.cache/diffusion_models_converted "
                            "and MD5-checked, as the original)")
    model.add_argument("--ckpt", default=None, help="a plain state_dict of the model instead (your own training)")
    model.add_argument("--preset", default=None, choices=preset_names(), help="a pixel preset (fashion-ddim: the "
                                                                               "embedded default)")
    model.add_argument("--device", default="auto")
    s = p.add_argument_group("sampling")
    s.add_argument("--timesteps", type=int, default=None, help="DDIM steps (QNCD CIFAR-10: 100)")
    s.add_argument("--eta", type=float, default=None)
    s.add_argument("--skip_type", default=None, choices=("uniform", "quad"))
    s.add_argument("--corrected_grid", action="store_true", help="the corrected grid (no repeated timesteps)")
    s.add_argument("--max_images", type=int, default=None, help="samples to make (default: the preset's)")
    s.add_argument("--batch_size", type=int, default=None)
    s.add_argument("--seed", type=int, default=SEED)
    s.add_argument("--sample_reverse", nargs="?", type=int, const=10, default=None, metavar="R",
                   help="QNCD runtime noise estimation, a probe every R steps (alone: R = 10)")
    s.add_argument("-l", "--logdir", "--outdir", dest="outdir", default="outputs", help="where the run's files go")
    q = p.add_argument_group("quantization")
    q.add_argument("--ptq", action="store_true", help="quantize (without it: FP32 sampling)")
    q.add_argument("--weight_bit", type=int, default=8, choices=(3, 4, 8))
    q.add_argument("--act_bit", type=int, default=8, choices=(4, 6, 8))
    q.add_argument("--quant_act", action="store_true", help="accepted for QNCD compatibility: --ptq quantizes "
                                                             "activations at --act_bit")
    q.add_argument("--quant_mode", default="qncd", choices=("qncd", "brecq", "qdiff"),
                   help="qncd: smoothing + running statistics; brecq / qdiff (its name in QNCD): plain BRECQ")
    q.add_argument("--split", action="store_true", help="Q-Diffusion shortcut splitting")
    q.add_argument("--cali_ckpt", default=None, help="a quantized model from an earlier run (skips steps 1-3)")
    q.add_argument("--cali_n", type=int, default=None, help="calibration inputs (default 1024)")
    q.add_argument("--cali_trajectories", type=int, default=None, help="FP trajectories they are drawn from")
    q.add_argument("--cali_iters", type=int, default=None, help="AdaRound iterations per unit (default: preset)")
    q.add_argument("--cali_iters_a", type=int, default=None, help="activation-step iterations per unit")
    return p.parse_args(argv)


def model_flags(args: argparse.Namespace) -> list[str]:
    """--preset / --config --ckpt for the step scripts."""
    if args.use_pretrained:
        if args.ckpt is not None:
            raise UserFacingError("--use_pretrained and --ckpt both name a checkpoint; pass one")
        fetch_released("ema_cifar10")   # as the original: download if missing (here: verified either way)
        config = args.config or "configs/cifar10.yml"
        return ["--preset", "cifar10", "--config", str(_config(config))]
    if args.preset is not None:
        return ["--preset", args.preset] + (["--config", str(_config(args.config))] if args.config else []) + \
            (["--ckpt", args.ckpt] if args.ckpt else [])
    if args.config is None or args.ckpt is None:
        raise UserFacingError("say which model: --use_pretrained (the released CIFAR-10 DDPM), --preset fashion-ddim "
                              "(the embedded default) or --config YML --ckpt FILE")
    return ["--config", str(_config(args.config)), "--ckpt", args.ckpt]


def _config(name: str) -> Path:
    path = resolve(name)
    if not path.is_file() and (resolve("configs") / name).is_file():
        path = resolve("configs") / name   # QNCD passes the name relative to configs/
    if not path.is_file():
        raise UserFacingError(f"config not found: {name}; pass --config configs/cifar10.yml")
    return path


def run_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--scale", "1", "--outdir", args.outdir, "--device", args.device]
    for flag, value in (("--steps", args.timesteps), ("--eta", args.eta), ("--skip_type", args.skip_type),
                        ("--batch_size", args.batch_size)):
        if value is not None:
            flags += [flag, str(value)]
    return flags + (["--corrected_grid"] if args.corrected_grid else [])


def place_cali_ckpt(args: argparse.Namespace, common: list[str]) -> None:
    """Put ``--cali_ckpt`` where this run's steps look for W{b}A{b} (its metadata is checked when it loads)."""
    from pipeline.quantize import QUANT_KIND
    src = Path(args.cali_ckpt)
    meta = load_artifact(src, QUANT_KIND, {}, "quant_scripts/quantize_weight_activation.py")["meta"]
    if (meta.get("w_bits"), meta.get("a_bits")) != (args.weight_bit, args.act_bit):
        raise UserFacingError(f"--cali_ckpt {src} is W{meta.get('w_bits')}A{meta.get('a_bits')}, but --weight_bit "
                              f"{args.weight_bit} --act_bit {args.act_bit} is asked for")
    ns = generate_evaluation_samples_dist.parse_args(common)
    cli.apply_preset(ns, generate_evaluation_samples_dist.PRESET)
    cli.check_sampling_args(ns)
    tag = cli.quant_tag(ns)   # (the file must be this run's model before it is copied in)
    load_artifact(src, QUANT_KIND, quant_expect(cli.model_meta(ns), tag),
                  "quant_scripts/quantize_weight_activation.py")
    dest = cli.layout(ns).quant(tag)
    if dest.resolve() != src.resolve():
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        print(f"--cali_ckpt: using {src} as {dest}")


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.flag_names(RENAMED):
        run(args)


def run(args: argparse.Namespace) -> None:
    for name, minimum in MINIMUM.items():
        cli.check_positive(args, name, minimum=minimum)
    if not args.ptq and args.sample_reverse is not None:
        raise UserFacingError("--sample_reverse corrects a quantized model's noise; add --ptq")
    common = model_flags(args) + run_flags(args)
    bits = ["--w_bits", str(args.weight_bit), "--a_bits", str(args.act_bit)]
    mode = ["--quant_mode", "qncd" if args.quant_mode == "qncd" else "brecq"] + (["--split"] if args.split else [])
    sample = common + (bits + ["--sampler", "none"] if args.ptq else ["--sampler", "fp32"])   # + the probe: qncd-rR
    if args.sample_reverse is not None:
        sample += ["--sample_reverse", "--reverse_interval", str(args.sample_reverse)]
    sample += ["--seed", str(args.seed)] + (["--n_samples", str(args.max_images)]
                                            if args.max_images is not None else [])
    generate_evaluation_samples_dist.preflight(generate_evaluation_samples_dist.parse_args(sample))  # before work
    if args.ptq and args.cali_ckpt is not None:
        place_cali_ckpt(args, common + bits)
    elif args.ptq:
        cal = common + (["--n", str(args.cali_n)] if args.cali_n is not None else []) + \
            (["--calibration_trajectories_per_class", str(args.cali_trajectories)]
             if args.cali_trajectories is not None else [])
        collect_imagenet_calibration_set.main(cal)
        quantize_weight.main(common + ["--w_bits", str(args.weight_bit)] + mode +
                             (["--weight_iters", str(args.cali_iters)] if args.cali_iters is not None else []))
        act_init = ["--act_init_samples", str(min(args.cali_n, 256))] if args.cali_n is not None else []  # ≤ set
        quantize_weight_activation.main(common + bits + mode + act_init +
                                        (["--act_iters", str(args.cali_iters_a)] if args.cali_iters_a is not None
                                         else []))
    generate_evaluation_samples_dist.main(sample)


if __name__ == "__main__":
    run_cli(main)
