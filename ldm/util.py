"""Config instantiation and safe checkpoint loading for CompVis-format latent diffusion models.

A CompVis ``model.ckpt`` is a PyTorch Lightning checkpoint: a dict whose ``"state_dict"`` entry holds every tensor
of ``LatentDiffusion.state_dict()`` (see shared spec ldm.md §1). Everything else in it is optional. Loading always
uses ``torch.load(weights_only=True)``; a file that needs arbitrary unpickling is refused unless the caller opts in
with ``trust=True`` (CLI flag ``--trust_checkpoint``, or the environment variable ``LDM_TRUST_CHECKPOINT=1``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ldm.errors import UserFacingError  # noqa: F401  (re-exported: every layer raises it from here)
from ldm.fileio import save_atomic  # noqa: F401  (re-exported: the one atomic torch.save)
from omegaconf import OmegaConf

# Where users get the released checkpoints (CompVis/latent-diffusion README). Keyed by models/ldm/<name>/.
CHECKPOINT_URLS = {
    "cin256-v2": "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt",
    "lsun_beds256": "https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip",
    "lsun_churches256": "https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip",
}
TRUST_ENV_VAR = "LDM_TRUST_CHECKPOINT"



class ConfigError(UserFacingError):
    pass


class CheckpointError(UserFacingError):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <script>: <what>`` on stderr and exit status 2, no usage dump
    (``--help`` still prints the whole usage). Every script of the project parses with it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse ``type=`` for an integer count that must be >= ``minimum`` (the parser's one-line error names the
    flag and the bound; no traceback from deep inside a run)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's ``main``; a UserFacingError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserFacingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------------------------------
# Configs


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Resolve a dotted ``module.Class`` target string (CompVis config convention)."""
    module_name, _, cls_name = string.rpartition(".")
    if not module_name:
        raise ConfigError(f"config target '{string}' is not a dotted path like 'ldm.models.autoencoder.VQModel'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"config target '{string}': module '{module_name}' not found ({e.name} is missing); "
                          f"check the 'target:' string in the config") from None
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, cls_name)
    except AttributeError:
        raise ConfigError(f"config target '{string}': '{module_name}' has no '{cls_name}'; "
                          f"check the 'target:' string in the config") from None


def instantiate_from_config(config: Mapping) -> Any:
    """Build ``target(**params)`` from a ``{target, params}`` mapping, as CompVis configs are laid out."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise ConfigError(f"config entry has no 'target' key: {dict(config) if hasattr(config, 'keys') else config}")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def load_config(path: str | os.PathLike) -> Any:
    """Load a yaml config; a missing or unparsable file is a ConfigError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        config = OmegaConf.load(path)
    except Exception as e:  # yaml errors come in several types
        raise ConfigError(f"cannot parse config {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if "model" not in config:
        raise ConfigError(f"config {path} has no top-level 'model:' section (expected the CompVis layout)")
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def parse_device(name: str) -> torch.device:
    """``--device``: auto (CUDA when present), cpu, cuda, cuda:N; one-line errors for a bad name or absent CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserFacingError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserFacingError(f"device '{name}' asked for, but CUDA is not available; use --device cpu")
    return device


def download_hint(path: Path) -> str:
    """How to get a missing checkpoint: the download command for the released ones, else a pointer to --ckpt."""
    name = path.parent.name
    url = CHECKPOINT_URLS.get(name)
    if url is None:
        return "pass the right --ckpt path"
    fetch = f"wget -O {path} {url}" if url.endswith(".ckpt") else f"wget {url} and unzip it into {path.parent}/"
    return f"download it with: mkdir -p {path.parent} && {fetch}"


def trust_from_env() -> bool:
    return os.environ.get(TRUST_ENV_VAR, "").strip().lower() in ("1", "true", "yes")


# Globals that Lightning checkpoints reference without needing them to read the weights: SD v1 .ckpt files key their
# "callbacks" entry by the ModelCheckpoint class itself (diffusers#8874). They load as inert stand-ins, so
# weights_only loading works without pytorch_lightning and without running any code from the file.
LIGHTNING_ALLOWED_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)


def _allowed_globals() -> list[tuple[type, str]]:
    return [(type(name.rsplit(".", 1)[1], (), {"__module__": __name__, "qualified_name": name}), name)
            for name in LIGHTNING_ALLOWED_GLOBALS]


def load_checkpoint_file(path: str | os.PathLike, trust: bool = False, accept: tuple[type, ...] = (dict,)) -> Any:
    """Read a ``.ckpt``/``.pt`` file into a dict, with ``weights_only=True`` unless ``trust`` is set.

    Raises CheckpointError with a one-line message for: a missing file (with the download command for the
    released models), a corrupt or truncated file, and a file that needs unsafe unpickling (naming the opt-in).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; {download_hint(path)}")
    if path.suffix == ".safetensors":   # (v1-5 and fp16 SD files; the format holds tensors only: nothing to trust)
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path} is a .safetensors file: pip install safetensors to read it") from None
        return {"state_dict": load_file(str(path))}
    trust = trust or trust_from_env()
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found is None:  # not a refusal of a global: a damaged file, or a raw pickle torch's reader cannot walk
            op = re.search(r"Unsupported operand \d+", text)
            if op:
                raise CheckpointError(f"cannot read checkpoint {path} with weights_only loading ({op.group(0)}): a "
                                      f"corrupt file, or a plain pickle that only loads by running code from it; "
                                      f"download it again, or if you trust its source, rerun with --trust_checkpoint "
                                      f"(or {TRUST_ENV_VAR}=1)") from None
            lines = [line.strip() for line in text.split("\n") if line.strip()]
            raise CheckpointError(f"cannot read checkpoint {path} (corrupt or truncated? "
                                  f"{(lines[-3] if len(lines) > 2 else lines[0])[:120]}); download it again") from None
        why = found.group(1)  # a global weights_only loading refuses: it would only load by running code
        raise CheckpointError(
            f"{path} holds Python objects that weights_only loading refuses ({why}); if you trust its "
            f"source, rerun with --trust_checkpoint (or {TRUST_ENV_VAR}=1), or convert it once with "
            f"'python -m ldm.convert_checkpoint --trust_checkpoint {path} OUT.ckpt'") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or truncated? {msg[:160]}); "
                              f"download it again") from None
    if not isinstance(obj, accept):  # (``accept`` widens it for callers that explain other layouts themselves)
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict with 'state_dict'")
    return obj


def state_dict_from_checkpoint(ckpt: Mapping, path: str | os.PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model state dict of a CompVis/Lightning checkpoint ({'state_dict': ...}) or of a bare state dict."""
    sd = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    if not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"checkpoint {path} has no 'state_dict' of tensors (keys: {list(ckpt)[:6]})")
    return dict(sd)


@dataclass
class StateDictMismatch:
    missing: list[tuple[str, tuple]]      # (key, model shape)
    unexpected: list[tuple[str, tuple]]   # (key, checkpoint shape)
    shape: list[tuple[str, tuple, tuple]]  # (key, checkpoint shape, model shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shape)

    def summary(self, limit: int = 3) -> str:
        def fmt(items, f):
            head = ", ".join(f(i) for i in items[:limit])
            return head + (f", ... ({len(items)} in all)" if len(items) > limit else "")
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: " + fmt(self.missing, lambda i: f"{i[0]} {list(i[1])}"))
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: " + fmt(self.unexpected,
                                                                      lambda i: f"{i[0]} {list(i[1])}"))
        if self.shape:
            parts.append(f"{len(self.shape)} with other shapes: " + fmt(
                self.shape, lambda i: f"{i[0]} ckpt {list(i[1])} vs model {list(i[2])}"))
        return "; ".join(parts)


def compare_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> StateDictMismatch:
    own = model.state_dict()
    missing = [(k, tuple(v.shape)) for k, v in own.items() if k not in sd]
    unexpected = [(k, tuple(v.shape)) for k, v in sd.items() if k not in own]
    shape = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    return StateDictMismatch(missing, unexpected, shape)


def load_state_dict_checked(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], strict: bool = True,
                            source: str = "checkpoint", config: str = "config",
                            exclude_prefix: str | tuple[str, ...] = ()) -> StateDictMismatch:
    """Load ``sd`` into ``model``; with ``strict`` any missing, unexpected or reshaped key is a CheckpointError.

    The original CompVis loaders use ``strict=False`` and silently ignore mismatches; we report them.
    With ``strict=False`` the mismatch is returned (and shape mismatches are still refused). ``exclude_prefix``: keys
    under it (a prefix or a tuple of them) are neither loaded from ``sd`` nor required of it.
    """
    if exclude_prefix:
        sd = {k: v for k, v in sd.items() if not k.startswith(exclude_prefix)}
    mismatch = compare_state_dict(model, sd)
    if exclude_prefix:
        mismatch.missing = [m for m in mismatch.missing if not m[0].startswith(exclude_prefix)]
    if mismatch.shape or (strict and mismatch):
        raise CheckpointError(f"{source} does not match {config}: {mismatch.summary()}")
    model.load_state_dict(sd, strict=False)
    return mismatch


def adapt_checkpoint(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Let every submodule with an ``adapt_checkpoint(sd, prefix)`` method bring its keys to the layout it
    registers (known, documented layout differences of released files, each announced by the module), before the
    strict comparison."""
    for name, module in model.named_modules():
        fn = getattr(module, "adapt_checkpoint", None)
        if callable(fn):
            sd = fn(sd, f"{name}." if name else "")
    return sd


def load_model_from_config(config: Any, ckpt: str | os.PathLike | None, *, trust: bool = False,
                           strict: bool = True, device: str | torch.device = "cpu",
                           config_name: str = "config", exclude_prefix: str | tuple[str, ...] | None = None
                           ) -> torch.nn.Module:
    """Instantiate ``config.model`` and load ``ckpt`` into it (eval mode, on ``device``).

    ``ckpt=None`` keeps the random initialisation (for tests and benchmarks). ``exclude_prefix``: the checkpoint's
    keys under it (a prefix or a tuple of them) are not loaded and the model's are left as initialised, for the caller
    to fill from another file (a packed quantized UNet: ``model.diffusion_model.``); every other key is still checked
    strictly.
    """
    model = instantiate_from_config(config.model)
    if ckpt is not None:
        raw = load_checkpoint_file(ckpt, trust=trust)
        sd = adapt_checkpoint(model, state_dict_from_checkpoint(raw, ckpt))
        load_state_dict_checked(model, sd, strict=strict, source=f"checkpoint {ckpt}", config=config_name,
                                exclude_prefix=exclude_prefix or ())
        model.global_step_loaded = raw.get("global_step")
    return model.to(device).eval()


def init_from_ckpt(module: torch.nn.Module, path: str | os.PathLike, ignore_keys=(),
                   prefix: str = "") -> tuple[list, list]:
    """Config-driven ``ckpt_path`` loading (CompVis): keys under ``ignore_keys`` prefixes are dropped, the rest
    loaded non-strictly, and the missing/unexpected keys are printed rather than silently ignored. ``prefix``
    (``ckpt_prefix`` in configs) takes the submodule out of a bigger checkpoint, e.g. ``first_stage_model.`` of
    a whole LDM."""
    sd = state_dict_from_checkpoint(load_checkpoint_file(path), path)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"{path} has no keys under {prefix!r} (ckpt_prefix)")
    sd = {k: v for k, v in sd.items() if not any(k.startswith(ik) for ik in ignore_keys)}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    print(f"Restored {type(module).__name__} from {path}: {len(missing)} missing, {len(unexpected)} unexpected keys")
    if missing:
        print(f"Missing keys (first 5): {missing[:5]}")
    if unexpected:
        print(f"Unexpected keys (first 5): {unexpected[:5]}")
    return missing, unexpected


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers used across the model code (CompVis names)


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    if exists(val):
        return val
    return d() if callable(d) else d


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {total * 1.e-6:.2f} M params.")
    return total
