"""QNCD's CIFAR-10 command, working as its README intends: quantize the pixel DDPM and sample it with DDIM.

    # QNCD README, CIFAR-10 8/8-bit (the released EMA checkpoint; fetched and MD5-checked if missing):
    python quant_scripts/sample_diffusion_ddim.py --config configs/cifar10.yml --use_pretrained --timesteps 100 \\
        --eta 0 --skip_type quad --ptq --weight_bit 8 --quant_mode qncd -l outputs --sample_reverse 4
    # the same on the embedded Fashion pixel default, on a laptop CPU:
    python quant_scripts/sample_diffusion_ddim.py --preset fashion-ddim --timesteps 50 --skip_type quad --ptq \\
        --weight_bit 8 --quant_mode qncd -l outputs --sample_reverse 4 --max_images 1000

QNCD's own script rejects this command (``--quant_mode`` only accepts ``qdiff``, ``--sample_reverse`` does not exist,
its ``quant`` package imports a missing ``qdiff``, and it moves tensors to CUDA unconditionally). Here each flag maps
onto the pipeline (its steps 1-3 and 7, called in this process; each step skips what a matching artifact already
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
from pathlib import Path

from ldm.modules.diffusionmodules.ddim_checkpoint import fetch_released
from ldm.util import ArgumentParser, UserFacingError, run_cli
from pipeline import cli
from pipeline.basics import preset_names, resolve
from pipeline.layout import QuantTag
from pipeline.quantize import CacheSettings, adopt_quant_artifact
from pipeline.run import ModelSource, Preset, Run, SamplerChoice
from pipeline.sampler_spec import SamplerSpec
from pipeline.sampling import quant_expect
from pipeline.settings import SamplingSettings, grid_name
from pipeline.steps import calibrate, evaluation_samples, quantize_activations, quantize_weights
from quant.api import QuantConfig

SEED = 1234   # QNCD's default
CUSTOM_DEFAULTS = "fashion"   # the preset whose defaults a --config/--ckpt model takes (the step scripts' default)
# the step scripts' flags -> this script's (messages name what was typed)
RENAMED = {"--steps": "--timesteps", "--n_samples": "--max_images", "--reverse_interval": "--sample_reverse",
           "--w_bits": "--weight_bit", "--a_bits": "--act_bit", "--n": "--cali_n", "--weight_iters": "--cali_iters",
           "--act_iters": "--cali_iters_a", "--calibration_trajectories_per_class": "--cali_trajectories"}
# numeric flags (dest: minimum), checked before anything runs; 0 iterations = no reconstruction
MINIMUM = {"max_images": 1, "batch_size": 1, "seed": 0, "sample_reverse": 1, "cali_n": 1, "cali_trajectories": 1,
           "cali_iters": 0, "cali_iters_a": 0}
# flags that act on the quantized model only (dest: its default): without --ptq they would do nothing, so they are
# refused (issue 32: options that do nothing say so)
PTQ_ONLY = {"cali_ckpt": None, "cali_n": None, "cali_trajectories": None, "cali_iters": None, "cali_iters_a": None,
            "split": False, "weight_bit": 8, "act_bit": 8}


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

# ---- the typed objects, built once from the flags ------------------------------------------------------------------

def model_of(args: argparse.Namespace) -> tuple[Preset, ModelSource]:
    """The preset whose defaults fill unset flags, and the model: --use_pretrained (the released CIFAR-10 DDPM, fetched
    and MD5-checked), --preset [--config --ckpt], or --config --ckpt (a custom model: run folder "custom", the
    step scripts' default preset's defaults)."""
    if args.use_pretrained:
        if args.ckpt is not None:
            raise UserFacingError("--use_pretrained and --ckpt both name a checkpoint; pass one")
        fetch_released("ema_cifar10")   # as the original: download if missing (here: verified either way)
        preset = Preset.load("cifar10")
        return preset, ModelSource(str(_config(args.config or "configs/cifar10.yml")), preset["ckpt"], preset.name)
    if args.preset is not None:
        preset = Preset.load(args.preset)
        config = str(_config(args.config)) if args.config else preset["config"]
        return preset, ModelSource(config, args.ckpt or preset["ckpt"], preset.name, prompts=preset.get("prompts"))
    if args.config is None or args.ckpt is None:
        raise UserFacingError("say which model: --use_pretrained (the released CIFAR-10 DDPM), --preset fashion-ddim "
                              "(the embedded default) or --config YML --ckpt FILE")
    return Preset.load(CUSTOM_DEFAULTS), ModelSource(str(_config(args.config)), args.ckpt)


def _config(name: str) -> Path:
    path = resolve(name)
    if not path.is_file() and (resolve("configs") / name).is_file():
        path = resolve("configs") / name   # QNCD passes the name relative to configs/
    if not path.is_file():
        raise UserFacingError(f"config not found: {name}; pass --config configs/cifar10.yml")
    return path


def sampling_of(args: argparse.Namespace, preset: Preset) -> SamplingSettings:
    """--timesteps, --eta, --skip_type [--corrected_grid] over the preset's; no guidance (scale 1)."""
    grid = grid_name(args.skip_type if args.skip_type is not None else preset.get("skip_type"), args.corrected_grid)
    given = {"steps": args.timesteps, "eta": args.eta}
    return preset.sampling(scale=1.0, grid=grid, **{k: v for k, v in given.items() if v is not None})


def sampler_of(args: argparse.Namespace, steps: int) -> SamplerChoice:
    """FP32, or (--ptq) the quantized model, with QNCD's probe every --sample_reverse R steps."""
    spec = SamplerSpec.parse("none" if args.ptq else "fp32")
    if args.sample_reverse is not None:
        spec = spec.with_probe(args.sample_reverse)
        cli.check_probe_fires(spec.probe, steps)
    return SamplerChoice(spec).check()


def quant_config_of(args: argparse.Namespace) -> QuantConfig:
    """W--weight_bit A--act_bit, D²-DPM's per-tensor layer policy; --quant_mode qncd adds QNCD's smoothing (the
    code's formula), --split Q-Diffusion's shortcut splitting."""
    return QuantConfig(args.weight_bit, args.act_bit, split_shortcut=args.split,
                       smoothing="code" if args.quant_mode == "qncd" else None)


def quantize(args: argparse.Namespace, run: Run, preset: Preset, config: QuantConfig, batch_size: int) -> None:
    """Steps 1-3: --cali_n inputs along FP trajectories from --cali_trajectories x_T, W--weight_bit by BRECQ /
    AdaRound (--cali_iters), A--act_bit (--cali_iters_a; QNCD's running statistics with --quant_mode qncd)."""
    cal = calibrate.CalibrationSettings(
        n=calibrate.CalibrationSettings.n if args.cali_n is None else args.cali_n,
        trajectories_per_condition=args.cali_trajectories or preset.get("calibration_trajectories_per_class") or 1,
        batch_size=batch_size)
    calibrate.run(run, cal)
    dtype, cache_batch = preset.get("cache_dtype"), preset.get("cache_batch_size")
    cache = CacheSettings(CacheSettings.dtype if dtype is None else dtype,
                          CacheSettings.batch_size if cache_batch is None else cache_batch)
    iters = preset.get("weight_iters") if args.cali_iters is None else args.cali_iters
    quantize_weights.run(run, config, quantize_weights.WeightSettings(iters, cache=cache))
    acts = quantize_activations.ActivationSettings(
        iters=preset.get("act_iters") if args.cali_iters_a is None else args.cali_iters_a,
        init_samples=preset.get("act_init_samples") if args.cali_n is None else min(args.cali_n, 256),  # <= the set
        running_stat="all" if args.quant_mode == "qncd" else None, cache=cache)
    quantize_activations.run(run, config, acts)


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.flag_names(RENAMED):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Every check first (one line, nothing written), then steps 1-3 (or --cali_ckpt), then step 7."""
    for name, minimum in MINIMUM.items():
        cli.check_positive(args, name, minimum=minimum)
    if not args.ptq and args.sample_reverse is not None:
        raise UserFacingError("--sample_reverse corrects a quantized model's noise; add --ptq")
    given = [f"--{name}" for name, default in PTQ_ONLY.items() if getattr(args, name) != default]
    if not args.ptq and given:
        one = len(given) == 1
        raise UserFacingError(f"{', '.join(given)} {'acts' if one else 'act'} on the quantized model (steps 1-3), and "
                              f"without --ptq the FP32 model is sampled: add --ptq, or drop {'it' if one else 'them'}")
    preset, source = model_of(args)
    job = Run(source, sampling_of(args, preset), Path(args.outdir), args.device).check()
    batch_size = preset["batch_size"] if args.batch_size is None else args.batch_size
    n = preset.get("eval_samples") if args.max_images is None else args.max_images
    if n is None:
        raise UserFacingError("the preset has no eval_samples; pass --max_images")
    flag = "--max_images" if args.max_images is not None else "the preset's eval_samples"
    ev = evaluation_samples.EvalSettings(n, args.seed, batch_size, flag=flag)
    sampler = sampler_of(args, job.sampling.steps)
    config = quant_config_of(args)
    tag = QuantTag.of(config)
    evaluation_samples.preflight(job, ev)   # the plan and the checkpoint, before any work
    if args.ptq and args.cali_ckpt is not None:
        adopt_quant_artifact(args.cali_ckpt, job.layout.quant(tag), quant_expect(job.meta(), tag),
                             (args.weight_bit, args.act_bit),
                             f"--weight_bit {args.weight_bit} --act_bit {args.act_bit} is asked for")
    elif args.ptq:
        quantize(args, job, preset, config, batch_size)
    evaluation_samples.torchrun_protocol(lambda: evaluation_samples.generate(job, ev, sampler, tag))


if __name__ == "__main__":
    run_cli(main)
