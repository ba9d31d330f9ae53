"""A model family added by one module, outside pipeline/families/: CompVis' pixel-space ``DDPM`` (unconditional,
no first stage), as QNCD's CIFAR-10 DDPM is. It implements the ``ModelFamily`` interface and nothing else: no edit to
quant/ or correction/ (or anywhere else) is needed for steps 1-7 to run on it."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from pipeline.families import ModelFamily, register, unregister
from pipeline.families.base import config_target


class PixelDDPM(ModelFamily):
    name = "test-pixel-ddpm"
    description = "CompVis DDPM in pixel space, unconditional (test plug-in)"

    def matches(self, config: Any) -> bool:
        return config_target(config).endswith("ddpm.DDPM")

    def unet_model_fn(self, model: nn.Module, unet: nn.Module):
        def model_fn(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            return unet(x, t)  # no conditioning: DiffusionWrapper with conditioning_key None
        return model_fn

    def guidance_scale(self, scale: float) -> float:
        return 1.0

    def decode(self, model: nn.Module, z: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        return z.clamp(-1, 1)  # pixel space: the sample is the image


PIXEL_DDPM = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.DDPM",
        "params": {
            "linear_start": 0.0001, "linear_end": 0.02, "timesteps": 1000, "image_size": 8, "channels": 3,
            "use_ema": False, "monitor": None,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 1}},
        },
    }
}

__all__ = ["PixelDDPM", "PIXEL_DDPM", "register", "unregister"]
