"""DiT sampling helpers (Peebles & Xie 2023; the protocol of DiT's ``sample.py`` / ``sample_ddp.py``) and the first
stages a DiT decodes with.

* ``VQFirstStage``: the VQ-f4 first stage of a CompVis LDM export (``config.yaml`` + ``model.ckpt``: its
  ``first_stage_model.*`` weights and ``scale_factor``), the embedded Fashion DiT's latent space. Encoding is LDM's
  ``scale_factor · encoder(x)`` (before the quantizer); decoding is LDM's ``decode_first_stage``:
  quantize ``(1/scale)·z``, then decode.
* ``sample_dit_latents``: DiT's sampling of one batch: z ~ N(0, I) [n, C, H, W]; with guidance (scale > 1) the
  batch is [z; z] with labels [y; null] through ``forward_with_cfg`` and the conditional half is kept, without
  it ``forward`` on z alone (``sample_ddp.py``'s ``using_cfg``); DDPM with the learned variance or DDIM (η) over
  a ``RespacedSchedule``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ldm.models.diffusion.dit_sampling import sample_learned
from ldm.models.diffusion.respace import RespacedSchedule
from ldm.modules.dit import DiT
from ldm.util import (CheckpointError, ConfigError, instantiate_from_config, load_checkpoint_file, load_config,
                      load_state_dict_checked)

FIRST_STAGE_PREFIX = "first_stage_model."


@dataclass
class VQFirstStage:
    """A CompVis first stage with its latent scale: ``encode`` images [N, C, H, W] in [−1, 1] -> scaled latents,
    ``decode`` scaled latents -> images in [−1, 1] (unclamped)."""

    model: torch.nn.Module
    scale_factor: float
    source: str

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_factor * self.model.encode(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(1. / self.scale_factor * z)


def load_ldm_first_stage(folder: str | os.PathLike, device: str | torch.device = "cpu") -> VQFirstStage:
    """The first stage of the CompVis LDM export in ``folder`` (``config.yaml``'s ``first_stage_config``, the
    checkpoint's ``first_stage_model.*`` keys strictly, and its ``scale_factor``); the rest of the LDM is not built."""
    folder = Path(folder)
    config, ckpt = folder / "config.yaml", folder / "model.ckpt"
    if not config.is_file() or not ckpt.is_file():
        raise CheckpointError(f"{folder} is not an LDM export (needs config.yaml and model.ckpt); pass the folder "
                              f"of an exported LDM such as models/ldm/fashion-ldm-vq-4")
    params = load_config(config).model.get("params", {})
    if "first_stage_config" not in params:
        raise ConfigError(f"{config} has no model.params.first_stage_config; pass an LDM export's folder")
    stage_config = dict(params["first_stage_config"])
    stage_config["params"] = {k: v for k, v in dict(stage_config.get("params", {})).items() if k != "ckpt_path"}
    model = instantiate_from_config(stage_config)
    obj = load_checkpoint_file(ckpt)
    sd = obj.get("state_dict", obj)
    if "scale_factor" not in sd:
        raise CheckpointError(f"{ckpt} has no scale_factor; pass an LDM export trained with its first stage")
    stage = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in sd.items() if k.startswith(FIRST_STAGE_PREFIX)}
    load_state_dict_checked(model, stage, strict=True, source=f"{ckpt} ({FIRST_STAGE_PREFIX}*)",
                            config=f"{config}'s first_stage_config")
    return VQFirstStage(model.to(device).eval(), float(sd["scale_factor"]), str(folder))


def dit_model_fn(model: DiT, labels: torch.Tensor, cfg_scale: float) -> Callable:
    """``(x, t, step) -> model output`` for ``sample_learned``: guided through ``forward_with_cfg`` with the batch
    [x; x] and labels [y; null] when ``cfg_scale > 1``, else ``forward`` with the labels."""
    if cfg_scale > 1.0:
        y = torch.cat([labels, torch.full_like(labels, model.null_class)])
        return lambda x, t, step: model.forward_with_cfg(x, t, y, cfg_scale)
    return lambda x, t, step: model(x, t, labels)


@torch.no_grad()
def sample_dit_latents(model: DiT, labels: torch.Tensor, schedule: RespacedSchedule, *, method: str = "ddpm",
                       eta: float = 0.0, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
                       progress: bool = False) -> torch.Tensor:
    """Latents [n, C, H, W] for ``labels`` [n] by DiT's protocol: x_T and every step's noise from ``generator``
    (drawn on its device) over the doubled batch when guided, the conditional half returned."""
    if cfg_scale < 1.0:
        raise ConfigError(f"cfg scale {cfg_scale} < 1; DiT guides with scale > 1 (1 = no guidance)")
    device = next(model.parameters()).device
    labels = labels.to(device)
    n, c, s = len(labels), model.in_channels, model.input_size
    gen_device = generator.device if generator is not None else device
    z = torch.randn(n, c, s, s, generator=generator, device=gen_device).to(device)
    guided = cfg_scale > 1.0
    if guided:
        z = torch.cat([z, z])

    def noise_sampler(step):
        return torch.randn(z.shape, generator=generator, device=gen_device).to(device)

    out = sample_learned(dit_model_fn(model, labels, cfg_scale), z, schedule, method=method, eta=eta,
                         noise_sampler=noise_sampler, progress=progress)
    return out[:n] if guided else out
