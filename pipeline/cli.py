"""What the pipeline scripts share: one-line argument errors, presets, the model/sampling/quantization flags and
their checks, device choice, loading a model through its family, the run layout and the meta every artifact of a
run records. The scripts in quant_scripts/ are argument parsing plus calls into this package."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ldm.fileio import file_fingerprint
from ldm.precision import Precision
from ldm.util import ArgumentParser, CheckpointError, UserFacingError, download_hint, load_config, parse_device
from ldm.util import run_cli  # noqa: F401  (the scripts take it from here)
from pipeline.basics import (REPO_ROOT, check_at_least, disable_grad_checkpointing, ensure_writable_dir,  # noqa: F401
                             exact_cuda_numerics, load_preset, pick_device, preset_names, resolve)
from pipeline.families import ModelFamily, family_for
from pipeline.layout import QuantTag, RunLayout
from pipeline.packed import Execution
from pipeline.quantize import CACHE_BATCH_SIZE, CacheSettings
from pipeline.run import ModelSource, Run, SamplerChoice
from pipeline.sampler_spec import LISTED, SamplerSpec
from pipeline.settings import SamplingSettings, grid_name
from quant.api import QuantConfig
from quant.quantizer import PerChannel, PerTensor

W_BITS = (3, 4, 8)   # the paper's W4 / W8, and W3 where 4-bit weights stop being hard
A_BITS = (4, 6, 8)   # A8, QNCD's A6, and A4 where pure PTQ breaks in the literature



def apply_preset(args: argparse.Namespace, default_preset: str) -> dict:
    """Fill every flag left at None from the preset. ``--config``/``--ckpt`` without ``--preset`` mean a custom
    model: then only the sampling defaults come from the preset, not its classes."""
    custom = args.preset is None and (args.config is not None or args.ckpt is not None)
    preset = load_preset(args.preset or default_preset)
    if custom:
        if args.config is None or args.ckpt is None:
            raise UserFacingError("a custom model needs both --config and --ckpt (or pick a --preset)")
        preset = {k: v for k, v in preset.items() if k not in ("config", "ckpt", "classes", "prompts", "description")}
    for key, value in preset.items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    args.preset_used = "custom" if custom else (args.preset or default_preset)
    return preset


def script_parser(doc: str, preset: str, sampling: bool = True) -> ArgumentParser:
    """A script's parser: its docstring's first line, the model flags and (``sampling``) the DDIM settings."""
    p = ArgumentParser(description=doc.split("\n")[0])
    add_model_args(p, preset)
    if sampling:
        add_sampling_args(p)
    return p


def add_output_args(p: argparse.ArgumentParser, outdir: str = "outputs", seed: int | None = None,
                    force: str | None = "redo even if a matching artifact exists") -> None:
    """--outdir, and --seed / --force where the script has them."""
    p.add_argument("--outdir", default=outdir)
    if seed is not None:
        p.add_argument("--seed", type=int, default=seed)
    if force is not None:
        p.add_argument("--force", action="store_true", help=force)


# ---- the typed objects the steps take, built once from the flags ---------------------------------------------------

def model_source(args: argparse.Namespace) -> ModelSource:
    """--config/--ckpt (after the preset), --trust_checkpoint, --prompts (or a script's prompt list) and
    --no_grad_ckpt as a ``ModelSource``."""
    prompt_list = getattr(args, "prompt_list", None)
    return ModelSource(str(args.config), str(args.ckpt), args.preset_used,
                       trust=bool(getattr(args, "trust_checkpoint", False)), prompts=getattr(args, "prompts", None),
                       prompt_list=tuple(prompt_list) if prompt_list else None,
                       grad_ckpt=not getattr(args, "no_grad_ckpt", False))


def run_of(args: argparse.Namespace) -> Run:
    """The ``Run`` the flags describe (the preset applied first: ``apply_preset``), checked: sampling settings,
    --batch_size, --seed, and the step count against the family's grid."""
    settings = sampling_of(args)
    return Run(model_source(args), settings, Path(args.outdir), args.device,
               bool(getattr(args, "force", False))).check()


def sampler_of(args: argparse.Namespace, steps: int, compare: bool = False) -> SamplerChoice:
    """--sampler with --sample_reverse / --reverse_interval, --execution, --packed and --precision as a checked
    ``SamplerChoice`` for a run of ``steps`` steps (``compare``: step 6's --compare rows)."""
    spec = resolve_sampler(args, steps)
    precision = check_precision_args(args)
    choice = SamplerChoice(spec, Execution(getattr(args, "execution", Execution.FAKE.value)),
                           getattr(args, "packed", None), precision)
    return choice.check(compare)


def grid_of(args: argparse.Namespace):
    """Steps 0 and 6: --classes, --n_samples_per_class, --n_samples, --uncond_class, --no_ema, --seed,
    --batch_size, --no_progress as ``GridSettings``."""
    from pipeline.steps.sample_grid import GridSettings
    check_positive(args, "n_samples_per_class", "n_samples")
    return GridSettings(seed=args.seed, batch_size=args.batch_size,
                        n_samples_per_class=1 if args.n_samples_per_class is None else args.n_samples_per_class,
                        n_samples=args.n_samples,
                        classes=args.classes, uncond=getattr(args, "uncond_class", None),
                        ema=not getattr(args, "no_ema", False), progress=not getattr(args, "no_progress", False))


def quant_of(args: argparse.Namespace, run: Run) -> QuantConfig:
    """Steps 2-3: the quantization flags as the one ``QuantConfig`` (what the artifact's meta serializes), checked
    against the family's layer policies. ``--quant_mode qncd`` is a recipe: it sets the flags it stands for (QNCD's
    smoothing, and at step 3 the running statistics), so the artifacts' meta name them."""
    if args.quant_mode == "qncd":
        args.smoothing = args.smoothing or "code"
        if hasattr(args, "running_stat"):
            args.running_stat = args.running_stat or "all"
    policies = run.family.quant_specials().policies
    if args.policy not in policies:
        raise UserFacingError(f"unknown --policy '{args.policy}'; choose one of {sorted(policies)}")
    check_bits(args)
    a_bits = getattr(args, "a_bits", None)
    return QuantConfig(args.w_bits, a_bits, PerChannel(0) if args.channel_wise else PerTensor(),
                       getattr(args, "sm_abit", None) if a_bits else None, bool(args.split_shortcut), args.policy,
                       args.smoothing)


def cache_of(args: argparse.Namespace) -> CacheSettings:
    """--cache_dtype, --cache_batch_size (the preset's, else float32 and 128), --cache_dir, --fp_capture_mb and
    --keep_activations_mb."""
    return CacheSettings("float32" if args.cache_dtype is None else args.cache_dtype,
                         CACHE_BATCH_SIZE if args.cache_batch_size is None else args.cache_batch_size, args.cache_dir,
                         args.fp_capture_mb, args.keep_activations_mb)


def tag_of(args: argparse.Namespace, weights_only: bool = False) -> QuantTag:
    """The quantized model the flags select (--w_bits, --a_bits, --sm_abit), --sm_abit checked."""
    check_bits(args)
    return quant_tag(args, weights_only)


def add_model_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--preset", default=None, choices=preset_names(),
                   help=f"model and defaults from configs/presets/ (default: {default_preset}; "
                        f"--config/--ckpt alone select a custom model)")
    p.add_argument("--config", default=None, help="CompVis model config (yaml); overrides the preset's")
    p.add_argument("--ckpt", default=None, help="CompVis checkpoint ({'state_dict': ...}); overrides the preset's")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow full unpickling of a checkpoint that weights_only loading refuses (only for files "
                        "from a source you trust; also LDM_TRUST_CHECKPOINT=1)")
    p.add_argument("--prompts", default=None, help="text-to-image models: the prompt list, one per line (condition "
                                                   "i = line i; default: the preset's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """DDIM settings shared by every sampling step; unset ones come from the preset."""
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (paper: 20)")
    p.add_argument("--eta", type=float, default=None, help="DDIM η (0 deterministic, 1 DDPM-like; paper: 0)")
    p.add_argument("--scale", type=float, default=None, help="classifier-free guidance scale (1 = none; paper: 3)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--skip_type", default=None, choices=("uniform", "quad"),
                   help="timestep grid of the pixel DDIM (QNCD CIFAR-10: quad; default: the preset's); LDMs sample "
                        "their CompVis uniform grid")
    p.add_argument("--plms", action="store_const", const=True, default=None,
                   help="sample with PLMS instead of DDIM (Stable Diffusion's and QNCD's sampler; η 0)")
    p.add_argument("--ddim", dest="plms", action="store_const", const=False,
                   help="sample with DDIM where the preset says PLMS (sd-v1)")
    p.add_argument("--corrected_grid", action="store_true",
                   help="the corrected grid instead of the original's (quad: rounded and de-duplicated, no repeated "
                        "timesteps; uniform: exactly --steps steps)")


def sampling_of(args: argparse.Namespace) -> SamplingSettings:
    """The sampling flags (after the preset) as ``SamplingSettings``, with --batch_size and --seed checked (one line
    each, before any model is loaded)."""
    check_at_least("batch_size", args.batch_size)
    check_at_least("seed", getattr(args, "seed", None), minimum=0)   # (every script: torch seeds are >= 0)
    grid = grid_name(getattr(args, "skip_type", None), getattr(args, "corrected_grid", False))
    return SamplingSettings(args.steps, args.eta, args.scale, grid, bool(getattr(args, "plms", None)))


@contextlib.contextmanager
def flag_names(renamed: dict[str, str]) -> Iterator[None]:
    """Scripts that map their own flags onto a step's (txt2img's --ddim_steps is the step's --steps) run the step
    inside this: a refusal then names the flag the user typed ({step flag: script flag}), wherever it was raised."""
    try:
        yield
    except UserFacingError as e:
        message = str(e.args[0]) if e.args else str(e)
        for step_flag, typed in renamed.items():
            message = re.sub(rf"(?<![\w-]){re.escape(step_flag)}(?![\w-])", typed, message)
        e.args = (message, *e.args[1:])
        raise


def check_positive(args: argparse.Namespace, *names: str, minimum: float = 1, flag: dict[str, str] | None = None
                   ) -> None:
    """One line for the first of ``names`` that is set and not a finite number >= ``minimum``
    (``pipeline.basics.check_at_least``; ``flag`` renames a dest to the flag typed)."""
    for name in names:
        check_at_least((flag or {}).get(name, name), getattr(args, name, None), minimum)


def add_sampler_args(p: argparse.ArgumentParser, sampler: str, w_bits: int, a_bits: int) -> None:
    """--sampler (parsed by ``resolve_sampler``), QNCD's probe flags and the bits of the quantized model it uses."""
    p.add_argument("--sampler", default=sampler, help=sampler_help(sampler))
    add_probe_args(p)
    add_bits_args(p, w_bits, a_bits)


def add_execution_args(p: argparse.ArgumentParser) -> None:
    """--packed FILE (the quantized UNet from a packed export alone) and --execution fake|compiled|integer."""
    p.add_argument("--packed", default=None, metavar="FILE",
                   help="the quantized UNet from this packed file (quant_scripts/export_packed.py) instead of the "
                        "quant artifact and the checkpoint's UNet weights; the first stage and the conditioning "
                        "encoder still come from --ckpt")
    p.add_argument("--execution", choices=[e.value for e in Execution], default=Execution.FAKE.value,
                   help="fake: fake-quant emulation (the research code's arithmetic); compiled: the same numbers "
                        "with each activation fake-quant one torch.compile'd kernel (one pass over the activation "
                        "instead of four; needs a C++ compiler on CPU, compiles for ~10 s on first use); integer: "
                        "int8 kernels for every layer they compute exactly (quant.integer; oneDNN on x86, "
                        "torch._int_mm on CUDA)")


def add_precision_args(p: argparse.ArgumentParser) -> None:
    """--precision fp32|tf32|bf16: the arithmetic of the UNet and decoder while sampling (steps 0, 6, 7, txt2img;
    ``ldm.precision``), parsed here once into a ``Precision``."""
    p.add_argument("--precision", type=precision_arg, default=Precision.FP32, metavar="{fp32,tf32,bf16}",
                   help="arithmetic of the UNet and decoder: fp32 exact (default), tf32 (CUDA: TF32 matmuls and "
                        "convolutions), bf16 (bfloat16 autocast); the DDIM update stays float32; non-fp32 runs "
                        "add -tf32 / -bf16 to their file or folder name")


def precision_arg(text: str) -> Precision:
    """argparse ``type=`` for --precision: the one-line error names the valid modes."""
    try:
        return Precision.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_precision_args(args: argparse.Namespace) -> Precision:
    """``args.precision`` as a ``Precision`` (FP32 when the script has no flag), refused with one line before
    anything is loaded or written where the device cannot run it (TF32 off CUDA); beside integer kernels it is
    ``SamplerChoice`` that refuses it."""
    precision = getattr(args, "precision", None) or Precision.FP32
    if not isinstance(precision, Precision):
        try:
            precision = Precision.parse(precision)
        except ValueError as e:
            raise UserFacingError(f"--precision: {e}") from None
    if precision is Precision.TF32:
        precision.check_device(parse_device(args.device))
    args.precision = precision
    return precision


def add_probe_args(p: argparse.ArgumentParser) -> None:
    """QNCD's sampling-time flags (spec qncd_ptqd.md A.5), as a modifier of ``--sampler``."""
    p.add_argument("--sample_reverse", action="store_true",
                   help="QNCD runtime noise estimation on top of --sampler: none -> qncd, dd2-channel -> "
                        "qncd+dd2-channel (the probe then estimates the bias left after the base correction)")
    p.add_argument("--reverse_interval", type=int, default=None,
                   help="QNCD probe period R in steps (default 10); needs --sample_reverse")


def resolve_sampler(args: argparse.Namespace, steps: int | None = None) -> SamplerSpec:
    """``args.sampler`` parsed, with ``--sample_reverse [--reverse_interval R]`` folded in (the name becomes
    qncd[-rR][+base], so sample folders and metadata name the probe and its period); one-line errors for unknown
    names and for what means nothing (a probe that never fires in ``steps`` steps)."""
    if args.reverse_interval is not None and not args.sample_reverse:
        raise UserFacingError("--reverse_interval sets the period of QNCD's probe; add --sample_reverse")
    spec = SamplerSpec.parse(args.sampler)
    if args.sample_reverse:
        spec = spec.with_probe() if args.reverse_interval is None else spec.with_probe(args.reverse_interval)
    if spec.probe is not None and steps is not None:
        check_probe_fires(spec.probe, steps)
    return spec


def check_probe_fires(interval: int, steps: int) -> None:
    """A probe period that never comes round in the run would do nothing: refused, with the largest that acts."""
    from correction.qncd import probe_steps
    if not probe_steps(steps, interval):
        most = max((r for r in range(1, 2 * steps + 2) if probe_steps(steps, r)), default=None)
        fix = f"pass --reverse_interval {most} or less" if most else "it needs at least 2 steps"
        raise UserFacingError(f"--reverse_interval {interval}: QNCD's probe runs at step {interval // 2 + 1}, "
                              f"{interval + interval // 2 + 1}, ... and the run has {steps} steps, so it would "
                              f"never run; {fix} (or drop --sample_reverse)")


def sampler_help(default: str) -> str:
    return f"sampler: one of {', '.join(LISTED)}, or qncd[-rR]+<base> (default {default})"


# ---- steps 2+: the run directory, the calibration set and quantized models ----------------------------------------


def quant_tag(args: argparse.Namespace, weights_only: bool = False) -> QuantTag:
    """The quantized model the flags select (--w_bits, --a_bits, --sm_abit)."""
    if weights_only:
        return QuantTag(args.w_bits)
    return QuantTag(args.w_bits, args.a_bits, getattr(args, "sm_abit", None))


def add_quant_args(p: argparse.ArgumentParser, w_bits: int, policy: str, channel_wise: bool) -> None:
    add_bits_args(p, w_bits)
    p.add_argument("--policy", default=policy, help="layer policy: d2dpm (skip/Downsample FP32, head/stem W8A8) or "
                                                   "all (Q-Diffusion: every Conv/Linear at the target bits)")
    p.add_argument("--channel_wise", action=argparse.BooleanOptionalAction, default=channel_wise,
                   help="per-output-channel weight scales (D²-DPM: per-tensor)")
    p.add_argument("--split", dest="split_shortcut", action="store_true",
                   help="Q-Diffusion shortcut splitting: separate ranges for the [h ; skip] halves of the decoder "
                        "skip convs' input (only matters with --policy all: d2dpm keeps skip convs in FP32)")
    p.add_argument("--scale_split_static", dest="smoothing", nargs="?", const="code", default=None,
                   choices=("code", "paper"),
                   help="QNCD embedding-derived smoothing of the ResBlocks' second conv input, folded into its "
                        "weights "
                        "before quantization: 'code' (the official code's formula, default) or 'paper' (|·|-mean)")
    p.add_argument("--quant_mode", default="brecq", choices=("brecq", "qncd"),
                   help="qncd: QNCD's calibration recipe, i.e. --scale_split_static (code formula unless given) and, "
                        "at step 3, --running_stat")
    p.add_argument("--no_grad_ckpt", action="store_true",
                   help="no gradient checkpointing in the transformer blocks during reconstruction (faster, more "
                        "memory; Q-Diffusion / QNCD pass it for Stable Diffusion)")
    p.add_argument("--cache_dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="precision of the reconstruction caches (float16 halves their memory; default: the "
                        "preset's, else float32)")
    p.add_argument("--cache_batch_size", type=int, default=None,
                   help=f"rows per forward pass while the caches fill (memory of that pass; default: the preset's, "
                        f"else {CACHE_BATCH_SIZE})")
    p.add_argument("--cache_dir", default=None, help="keep the reconstruction caches in memmap files here instead "
                                                     "of memory (full-size UNets on small hosts)")
    p.add_argument("--fp_capture_mb", type=float, default=CacheSettings.fp_capture_mb,
                   help="one FP pass fills the targets of every next unit whose caches fit this many MiB (extra "
                        "host memory; 0: one pass a unit; the same results either way)")
    p.add_argument("--keep_activations_mb", type=float, default=CacheSettings.keep_activations_mb,
                   help="a unit keeps its forward activations for the backward, instead of recomputing them, when "
                        "they fit this many MiB (device memory; 0: recompute wherever the model's blocks do; the "
                        "same results either way)")
    add_output_args(p)


def add_bits_args(p: argparse.ArgumentParser, w_bits: int, a_bits: int | None = None,
                  sm_help: str = "the model step 3 made with --sm_abit (attention matmuls quantized, softmax at "
                                 "these bits)") -> None:
    """Which quantized model: --w_bits, and (``a_bits`` given) --a_bits and --sm_abit."""
    p.add_argument("--w_bits", type=int, default=w_bits, choices=W_BITS, help="weight bits")
    if a_bits is not None:
        p.add_argument("--a_bits", type=int, default=a_bits, choices=A_BITS, help="activation bits")
        p.add_argument("--sm_abit", type=int, default=None, help=sm_help)


def check_bits(args: argparse.Namespace) -> None:
    if getattr(args, "sm_abit", None) is not None and not 2 <= args.sm_abit <= 16:
        raise UserFacingError(f"--sm_abit must be in 2..16, got {args.sm_abit}")


