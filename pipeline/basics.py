"""The run-independent helpers every step uses: ``resolve`` (paths of the repository and the user), the presets
(``configs/presets/<name>.yaml``), ``pick_device`` (exact CUDA numerics), ``ensure_writable_dir`` (before any
compute), ``check_at_least`` (a numeric setting's one-line refusal) and ``disable_grad_checkpointing``."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ldm.util import UserFacingError, parse_device

REPO_ROOT = Path(__file__).resolve().parents[1]
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


def resolve(path: str | os.PathLike) -> Path:
    """Paths in the constants are relative to the repository root; user-given relative paths to the cwd;
    ``released:NAME`` is where a released pixel-DDPM checkpoint is kept (``ddim_checkpoint.released_path``)."""
    if str(path).startswith("released:"):
        from ldm.modules.diffusionmodules.ddim_checkpoint import released_path
        return released_path(str(path).removeprefix("released:"))
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def pick_device(name: str) -> torch.device:
    device = parse_device(name)
    if device.type == "cuda":
        exact_cuda_numerics()
    return device


def exact_cuda_numerics() -> None:
    """FP32 means FP32 on a GPU too: PyTorch runs FP32 convolutions in TF32 by default (10-bit mantissa, ~1e-3
    relative error), which would blur the very quantization noise being measured (SQNRs, reconstruction targets,
    Δ = ε_q − ε_fp). TF32 off for convolutions and matmuls, cuDNN's deterministic algorithms, and deterministic
    PyTorch ops where they exist (warn, not fail, where they do not), so a rerun on the same GPU repeats itself."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # (read when cuBLAS starts: before any CUDA work)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def ensure_writable_dir(path: str | os.PathLike, create: bool = False, flag: str = "--outdir") -> Path:
    """Check, before any compute is spent, that files can be written in ``path``: it or its nearest existing
    ancestor must be a writable directory. Nothing is created unless ``create`` (the writers make their folders as
    they write), so a run that then fails validation leaves no empty folder behind."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "a file is in the way" if probe.exists() and not probe.is_dir() else "permission denied"
        raise UserFacingError(f"output directory {path} is not writable ({why} at {probe}); pass another {flag}")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserFacingError(f"output directory {path} is not writable ({e.strerror}); pass another {flag}") \
                from None
    return path


def grad_checkpoint_flags(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, bool]]:
    """Every (module, flag name, value) of CompVis' recomputation switches in ``model``: transformer blocks'
    ``checkpoint``, ResBlocks' and attention blocks' ``use_checkpoint``."""
    return [(m, name, getattr(m, name)) for m in model.modules() for name in ("checkpoint", "use_checkpoint")
            if isinstance(getattr(m, name, None), bool)]


def disable_grad_checkpointing(model: torch.nn.Module) -> None:
    """--no_grad_ckpt (Q-Diffusion / QNCD for SD): no activation recomputation in the transformer blocks and
    ResBlocks while reconstruction back-propagates: faster, more memory, the same numbers."""
    for m, name, _ in grad_checkpoint_flags(model):
        setattr(m, name, False)


def check_at_least(flag: str, value: float | None, minimum: float = 1) -> None:
    """One line for a setting that is given and not a finite number >= ``minimum`` (``flag``: how it is typed)."""
    if value is not None and (not math.isfinite(value) or value < minimum):
        what = "" if math.isfinite(value) else "a finite number "
        raise UserFacingError(f"--{flag} must be {what}>= {minimum:g}, got {value}")
