"""The released pixel-space DDPM checkpoints (Ho et al. 2020, converted by pesser/pytorch_diffusion) that the DDIM
and QNCD CIFAR-10 code samples: where they live, how they are fetched and verified, and a strict load.

QNCD's ``sample_diffusion_ddim.py`` always loads the **EMA** CIFAR-10 model from
``$XDG_CACHE_HOME/diffusion_models_converted/ema_diffusion_cifar10_model/model-790000.ckpt`` (default
``~/.cache/...``), a plain ``state_dict`` of exactly the ``Model`` keys (no prefix). The original checks the MD5 only
right after a download; here an existing file is verified too (about a second for the 143 MB file), so a truncated
copy is named before 50,000 samples are made from it.
"""
from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

import torch
import torch.nn as nn

from ldm.fileio import atomic_path, file_md5
from ldm.util import CheckpointError, load_checkpoint_file, load_state_dict_checked

# name -> (URL, MD5, path under the cache root); facts from the original code (fixture README of ddim_cifar10)
RELEASED = {
    "ema_cifar10": ("https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1",
                    "1fa350b952534ae442b1d5235cce5cd3", "ema_diffusion_cifar10_model/model-790000.ckpt"),
    "cifar10": ("https://heibox.uni-heidelberg.de/f/869980b53bf5416c8a28/?dl=1",
                "82ed3067fd1002f5cf4c339fb80c4669", "diffusion_cifar10_model/model-790000.ckpt"),
}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/diffusion_models_converted`` (default ``~/.cache/...``), where the original looks."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffusion_models_converted"


def released_path(name: str, root: str | os.PathLike | None = None) -> Path:
    if name not in RELEASED:
        raise CheckpointError(f"unknown released checkpoint {name!r}; known: {', '.join(sorted(RELEASED))}")
    return Path(root or cache_root()) / RELEASED[name][2]


def verify_md5(path: str | os.PathLike, name: str) -> Path:
    """The file, if its MD5 is the published one; else one line naming both and the fix."""
    path = Path(path)
    want = RELEASED[name][1]
    got = file_md5(path)
    if got != want:
        raise CheckpointError(f"{path} has MD5 {got}, the released {name} checkpoint {want}: a corrupt or partial "
                              f"download; delete it and fetch it again ({RELEASED[name][0]})")
    return path


def fetch_released(name: str, root: str | os.PathLike | None = None, url: str | None = None) -> Path:
    """The released checkpoint ``name``: verified if present, else downloaded (atomically: an interrupted download
    leaves no file under the final name) and verified. ``url`` overrides the published address (a mirror, a local
    ``file://`` copy)."""
    path = released_path(name, root)
    if path.is_file():
        return verify_md5(path, name)
    source = url or RELEASED[name][0]
    print(f"downloading {name} from {source} to {path}")
    try:
        with atomic_path(path) as tmp:
            with urllib.request.urlopen(source) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            got, want = file_md5(tmp), RELEASED[name][1]
            if got != want:  # checked before the rename: a bad download never gets the final name
                raise CheckpointError(f"the download of {name} from {source} has MD5 {got}, the released file "
                                      f"{want}: corrupt or incomplete; try again")
    except OSError as e:
        raise CheckpointError(f"cannot download {name} from {source} ({e}); download it by hand to {path}") \
            from None
    return path


def load_unet_state(model: nn.Module, path: str | os.PathLike, trust: bool = False) -> nn.Module:
    """Strictly load a plain ``state_dict`` (the released format) into ``model``. A file of another architecture is
    one line naming the first missing, unexpected and mis-shaped keys; an ermongroup training checkpoint (a list
    ``[model, optimizer, epoch, step, ema]`` with ``module.`` keys) is named as such, with what to pass instead."""
    sd = load_checkpoint_file(path, trust=trust, accept=(dict, list, tuple))
    if isinstance(sd, (list, tuple)):
        raise CheckpointError(f"{path} is a training checkpoint (a list of {len(sd)} states), not a model state_dict; "
                              f"save its EMA state with the 'module.' prefix removed: torch.save({{k[7:]: v for k, v "
                              f"in ckpt[-1].items()}}, OUT)")
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a plain state_dict of tensors (keys: {list(sd)[:4]}); pass the "
                              f"released model-790000.ckpt or a file saved as torch.save(model.state_dict(), OUT)")
    load_state_dict_checked(model, sd, strict=True, source=str(path), config="this config's model (pass the config "
                                                                              "the checkpoint was trained with)")
    return model


def main(argv=None) -> None:
    """``python -m ldm.modules.diffusionmodules.ddim_checkpoint ema_cifar10 [--root DIR] [--url URL]``: fetch (or
    verify) a released checkpoint where the pipeline's ``released:NAME`` looks for it."""
    import argparse

    from ldm.util import run_cli
    p = argparse.ArgumentParser(description="fetch or verify a released pixel-DDPM checkpoint")
    p.add_argument("name", choices=sorted(RELEASED))
    p.add_argument("--root", default=None, help=f"cache root (default {cache_root()})")
    p.add_argument("--url", default=None, help="a mirror or a local file:// copy instead of the published URL")
    args = p.parse_args(argv)
    run_cli(lambda: print(f"{fetch_released(args.name, args.root, args.url)}: MD5 OK"))


if __name__ == "__main__":
    main()
