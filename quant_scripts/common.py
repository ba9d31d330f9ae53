"""Plumbing shared by the pipeline scripts: model loading flags, device choice, one-line errors."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.util import ConfigError, UserFacingError, load_config, load_model_from_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(main: Callable[[], None]) -> None:
    """Run ``main``; a UserFacingError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserFacingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


PRESET_DIR = REPO_ROOT / "configs" / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    """A named bundle of model paths and sampling defaults (configs/presets/<name>.yaml)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserFacingError(f"unknown preset '{name}'; choose one of {preset_names()} or pass --config/--ckpt")
    import yaml
    return yaml.safe_load(path.read_text())


def apply_preset(args: argparse.Namespace, default_preset: str) -> dict:
    """Fill every flag left at None from the preset. ``--config``/``--ckpt`` without ``--preset`` mean a custom
    model: then only the sampling defaults come from the preset, not its classes."""
    custom = args.preset is None and (args.config is not None or args.ckpt is not None)
    preset = load_preset(args.preset or default_preset)
    if custom:
        if args.config is None or args.ckpt is None:
            raise UserFacingError("a custom model needs both --config and --ckpt (or pick a --preset)")
        preset = {k: v for k, v in preset.items() if k not in ("config", "ckpt", "classes", "description")}
    for key, value in preset.items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    args.preset_used = "custom" if custom else (args.preset or default_preset)
    return preset


def add_model_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--preset", default=None, choices=preset_names(),
                   help=f"model and defaults from configs/presets/ (default: {default_preset}; "
                        f"--config/--ckpt alone select a custom model)")
    p.add_argument("--config", default=None, help="CompVis model config (yaml); overrides the preset's")
    p.add_argument("--ckpt", default=None, help="CompVis checkpoint ({'state_dict': ...}); overrides the preset's")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow full unpickling of a checkpoint that weights_only loading refuses (only for files "
                        "from a source you trust; also LDM_TRUST_CHECKPOINT=1)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """DDIM settings shared by every sampling step; unset ones come from the preset."""
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (paper: 20)")
    p.add_argument("--eta", type=float, default=None, help="DDIM η (0 deterministic, 1 DDPM-like; paper: 0)")
    p.add_argument("--scale", type=float, default=None, help="classifier-free guidance scale (1 = none; paper: 3)")
    p.add_argument("--batch_size", type=int, default=None)


def check_sampling_args(args: argparse.Namespace) -> None:
    """One-line errors for sampling settings, before any model is loaded."""
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UserFacingError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.eta < 0:
        raise UserFacingError(f"--eta must be >= 0, got {args.eta}")
    try:  # the step count alone decides whether the CompVis grid fits in T = 1000
        make_ddim_timesteps("uniform", args.steps, 1000)
    except ValueError as e:
        raise UserFacingError(f"--steps {args.steps}: {e}") from None


def add_probe_args(p: argparse.ArgumentParser) -> None:
    """QNCD's sampling-time flags (spec qncd_ptqd.md A.5), as a modifier of ``--sampler``."""
    p.add_argument("--sample_reverse", action="store_true",
                   help="QNCD runtime noise estimation on top of --sampler: none -> qncd, dd2-channel -> "
                        "qncd+dd2-channel (the probe then estimates the bias left after the base correction)")
    p.add_argument("--reverse_interval", type=int, default=None,
                   help="QNCD probe period R in steps (default 10); needs --sample_reverse")


def resolve_sampler(args: argparse.Namespace) -> None:
    """Fold ``--sample_reverse [--reverse_interval R]`` into ``args.sampler`` (qncd[-rR][+base]), so sample folders
    and metadata name the probe and its period, then check the name; one-line errors for what means nothing."""
    if args.reverse_interval is not None and not args.sample_reverse:
        raise UserFacingError("--reverse_interval sets the period of QNCD's probe; add --sample_reverse")
    if args.sample_reverse:
        from correction.qncd import DEFAULT_INTERVAL
        from correction.variants import qncd_name
        args.sampler = qncd_name(args.sampler, DEFAULT_INTERVAL if args.reverse_interval is None
                                 else args.reverse_interval)
    if args.sampler != "fp32":
        from correction.variants import spec_for
        spec_for(args.sampler)  # an unknown name is one line naming the known ones, before anything loads


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserFacingError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserFacingError(f"device '{name}' asked for, but CUDA is not available; use --device cpu")
    return device


def resolve(path: str) -> Path:
    """Paths in the constants are relative to the repository root; user-given relative paths to the cwd."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def load_ldm(args: argparse.Namespace, device: torch.device):
    config = load_config(resolve(args.config))
    try:
        model = load_model_from_config(config, resolve(args.ckpt), trust=args.trust_checkpoint, device=device,
                                       config_name=f"config {args.config}")
    except TypeError as e:  # wrong or unknown params in the config
        raise ConfigError(f"config {args.config} does not fit the model code: {e}") from None
    return config, model


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` and check that files can be written there (before any compute is spent)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as e:
        raise UserFacingError(f"output directory {path} is not writable ({e.strerror}); pass another --outdir") \
            from None
    return path


# ---- steps 2+: the run directory, the calibration set and quantized models ----------------------------------------


def run_dir(args: argparse.Namespace) -> Path:
    """outputs/<preset>/scale{s}_eta{η}_steps{S}: where every artifact of one sampler setting lives."""
    return Path(args.outdir) / args.preset_used / f"scale{args.scale:g}_eta{args.eta:g}_steps{args.steps}"


def model_meta(args: argparse.Namespace) -> dict:
    """What identifies the model and sampler settings in every artifact's meta."""
    from quant.artifacts import file_fingerprint
    ckpt = resolve(args.ckpt)
    if not ckpt.is_file():
        raise UserFacingError(f"checkpoint not found: {args.ckpt}")
    return {"model": str(args.config), "ckpt": file_fingerprint(ckpt), "steps": args.steps,
            "eta": float(args.eta), "scale": float(args.scale)}


def add_quant_args(p: argparse.ArgumentParser, w_bits: int, policy: str, channel_wise: bool) -> None:
    p.add_argument("--w_bits", type=int, default=w_bits, choices=(4, 8), help="weight bits")
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
    p.add_argument("--cache_dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="precision of the reconstruction caches (float16 halves their memory)")
    p.add_argument("--cache_dir", default=None, help="keep the reconstruction caches in memmap files here instead "
                                                     "of memory (full-size UNets on small hosts)")
    p.add_argument("--outdir", default="outputs")
    p.add_argument("--force", action="store_true", help="redo even if a matching artifact exists")


def check_quant_args(args: argparse.Namespace) -> None:
    from quant.policy import POLICIES
    if args.quant_mode == "qncd":  # a recipe: it sets the flags it stands for, so the artifacts' meta name them
        args.smoothing = args.smoothing or "code"
        if hasattr(args, "running_stat"):
            args.running_stat = args.running_stat or "all"
    if args.policy not in POLICIES:
        raise UserFacingError(f"unknown --policy '{args.policy}'; choose one of {sorted(POLICIES)}")
    if getattr(args, "sm_abit", None) is not None and not 2 <= args.sm_abit <= 16:
        raise UserFacingError(f"--sm_abit must be in 2..16, got {args.sm_abit}")
    for name in ("weight_iters", "act_init_samples", "recon_batch_size"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            raise UserFacingError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "act_iters", 0) is not None and getattr(args, "act_iters", 0) < 0:
        raise UserFacingError(f"--act_iters must be >= 0 (0: no step learning), got {args.act_iters}")


def cache_spec(args: argparse.Namespace):
    from quant.reconstruction import CacheSpec
    if args.cache_dir is not None:
        ensure_writable_dir(args.cache_dir)
    return CacheSpec(dtype=getattr(torch, args.cache_dtype), directory=args.cache_dir)
