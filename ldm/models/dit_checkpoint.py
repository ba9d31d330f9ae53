"""DiT checkpoints (Peebles & Xie 2023): the released files and ``train.py`` checkpoints, loaded strictly and with
``weights_only=True`` (facts from the original ``download.py`` / ``train.py``; fixture README
``../shared/fixtures/dit``).

* Released ``DiT-XL-2-256x256.pt`` / ``DiT-XL-2-512x512.pt``: a plain ``state_dict`` of exactly the model's 292
  keys (no prefix, ``pos_embed`` included). The original reads them from ``pretrained_models/`` relative to the
  working directory, downloading from ``RELEASED_URL`` if absent; here the path is given and a missing file is one
  line with the download command.
* ``train.py`` checkpoints: ``{"model", "ema", "opt", "args"}`` with ``args`` an ``argparse.Namespace``; the EMA
  weights are the ones sampled (the original's ``find_model`` unwraps ``"ema"``). Since torch 2.6 ``torch.load``
  defaults to ``weights_only=True`` and refuses ``argparse.Namespace``, so the original fails on these files. We load
  with ``weights_only=True`` inside ``torch.serialization.safe_globals([argparse.Namespace])``: a Namespace is a plain
  attribute bag whose reconstruction runs no code from the file, so allowing it keeps the load safe.

Any key mismatch is one ``CheckpointError`` line naming the keys (``ldm.util.load_state_dict_checked``); nothing is
loaded non-strictly.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from ldm.modules.dit import VAE_DOWNSAMPLING, DiT, dit_config
from ldm.util import CheckpointError, compare_state_dict, load_checkpoint_file, load_state_dict_checked

RELEASED_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"
# released file -> (model name, image size), as DiT's sample.py pairs them
RELEASED = {"DiT-XL-2-256x256.pt": ("DiT-XL/2", 256), "DiT-XL-2-512x512.pt": ("DiT-XL/2", 512)}
# what train.py pickles besides tensors; nothing else is allowed
TRAIN_GLOBALS = (argparse.Namespace,)


def read_dit_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, train args) of a released file or a ``train.py`` checkpoint; args is {} for a plain file.

    The EMA weights of a training checkpoint are returned (as the original samples them); a dict with ``model``
    but no ``ema`` is refused rather than guessed at."""
    path = Path(path)
    if not path.is_file():
        hint = (f"download it with: wget {RELEASED_URL.format(name=path.name)} -O {path}" if path.name in RELEASED
                else f"pass a released file ({', '.join(RELEASED)}) or a train.py checkpoint")
        raise CheckpointError(f"DiT checkpoint not found: {path}; {hint}")
    with torch.serialization.safe_globals(list(TRAIN_GLOBALS)):
        obj = load_checkpoint_file(path)
    args: dict[str, Any] = {}
    if set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):   # a .safetensors file, as util reads it
        obj = obj["state_dict"]
    if "ema" in obj and isinstance(obj["ema"], dict):
        if isinstance(obj.get("args"), argparse.Namespace):
            args = vars(obj["args"])
        obj = obj["ema"]
    elif "model" in obj and isinstance(obj["model"], dict):
        raise CheckpointError(f"{path} is a training checkpoint without 'ema' weights (keys: {sorted(obj)[:6]}); "
                              f"DiT samples the EMA model: pass a checkpoint written by train.py")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not obj or bad:
        raise CheckpointError(f"{path} is not a DiT state_dict of tensors (entries {bad[:4] or 'none'}); pass a "
                              f"released DiT file or a train.py checkpoint")
    return dict(obj), args


def load_dit_state(model: DiT, path: str | os.PathLike) -> DiT:
    """Strictly load a DiT checkpoint (released or train.py) into ``model``; returns it in eval mode."""
    sd, _ = read_dit_checkpoint(path)
    if any(k.startswith("module.") for k in sd):   # a DDP model's state_dict saved without .module
        raise CheckpointError(f"{path} has DDP keys ('module.' prefix, e.g. {next(iter(sd))}); save "
                              f"model.module.state_dict() (train.py does) or strip the prefix once")
    side = model.input_size * VAE_DOWNSAMPLING
    size = f"{side}×{side}"
    load_state_dict_checked(model, sd, strict=True, source=f"DiT checkpoint {path}",
                            config=f"this {len(model.blocks)}-block DiT (hidden {model.pos_embed.shape[-1]}, patch "
                                   f"{model.patch_size}, {size}): use the config of the size it was trained as")
    return model.eval()


def dit_from_checkpoint(path: str | os.PathLike, name: str | None = None, image_size: int | None = None,
                        num_classes: int | None = None, **overrides: Any) -> DiT:
    """Build and load a DiT from a checkpoint alone where it says what it is: a released file by its name, a
    ``train.py`` checkpoint by its ``args`` (``model``, ``image_size``, ``num_classes``); explicit arguments and
    ``overrides`` (constructor arguments) win. The model is built on the meta device and compared with the file
    first, so a mismatch costs no allocation and a match no random initialisation."""
    sd, args = read_dit_checkpoint(path)
    known = RELEASED.get(Path(path).name, (args.get("model"), args.get("image_size")))
    name, image_size = name or known[0], image_size or known[1]
    if name is None or image_size is None:
        raise CheckpointError(f"{path} does not say which DiT it holds (no train.py args); pass the model name "
                              f"(e.g. DiT-XL/2) and the image size")
    num_classes = num_classes or args.get("num_classes", 1000)
    with torch.device("meta"):
        model = DiT(**dit_config(name, image_size, num_classes, **overrides))
    mismatch = compare_state_dict(model, sd)
    if mismatch:
        raise CheckpointError(f"DiT checkpoint {path} does not match {name} at {image_size}×{image_size} with "
                              f"{num_classes} classes: {mismatch.summary()}")
    model = model.to_empty(device="cpu")
    model.load_state_dict(sd, strict=True)   # every parameter comes from the file (DiT has no buffers)
    return model.eval()
