"""The pixel-space DDPM of Ho et al. (2020) sampled with DDIM as ermongroup/ddim samples it (Song et al. 2021): QNCD's
CIFAR-10 experiment (released EMA checkpoint, 100 steps on the quad grid, η 0) and the embedded Fashion pixel
default. Unconditional, no first stage: the sample is the image.

The config is the ermongroup yml (``configs/cifar10.yml``: ``data`` / ``model`` / ``diffusion`` sections, no
``target``); the checkpoint a plain ``state_dict`` of the ``Model`` keys (the released file's format), loaded
strictly and weights-only. ``load`` returns a ``generalized.GeneralizedDDPM``: the UNet with its β schedule and the
timestep grid (``--skip_type``), whose ``sampling_schedule`` every loop, calibration and statistics run uses.
Its quantization specials (``PIXEL_DDPM_SPECIALS``) name the ``Model``'s own blocks and layers.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from ldm.models.diffusion.ddim import ModelFn
from ldm.models.diffusion.generalized import GeneralizedDDPM, get_beta_schedule, parse_grid, timestep_sequence
from ldm.modules.diffusionmodules.ddim_checkpoint import RELEASED, load_unet_state, verify_md5
from ldm.modules.diffusionmodules.ddim_unet import Model, UNetSpec, get_timestep_embedding
from ldm.modules.diffusionmodules.model import AttnBlock, ResnetBlock, nonlinearity
from ldm.util import ConfigError, UserFacingError
from pipeline.families.base import ModelFamily
from quant.policy import D2DPMPolicy, quantize_all_policy
from quant.specials import QuantSpecials, SmoothingSite


def _section(config: Any, name: str) -> Any:
    return config.get(name) if hasattr(config, "get") else None


def pixel_time_embedding(unet: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """temb = dense1(swish(dense0(sinusoid(t)))) (the ermongroup sinusoid: sin first), what every temb_proj reads."""
    param = next(unet.parameters())
    t_emb = get_timestep_embedding(t.to(param.device), unet.ch).to(param.dtype)
    return unet.temb.dense[1](nonlinearity(unet.temb.dense[0](t_emb)))


def resnet_block_embedding(block: nn.Module, temb: torch.Tensor) -> torch.Tensor:
    return block.temb_proj(nonlinearity(temb))


def takes_embedding(block: nn.Module) -> bool:
    return hasattr(block, "temb_proj")


def pixel_shortcut_splits(unet: nn.Module) -> dict[str, int]:
    """{fqn of a decoder ResnetBlock's nin_shortcut: channels of h in its input [h ; skip]}: the decoder blocks take
    cat([h, hs.pop()]); the stack holds conv_in's output, every encoder block's and every Downsample's, in order."""
    spec = unet.spec
    skips = [spec.ch]
    for i, mult in enumerate(spec.ch_mult):
        skips += [spec.ch * mult] * spec.num_res_blocks + ([spec.ch * mult] if i != len(spec.ch_mult) - 1 else [])
    splits = {}
    for i in reversed(range(len(spec.ch_mult))):
        for j, block in enumerate(unet.up[i].block):
            skip = skips.pop()
            if isinstance(getattr(block, "nin_shortcut", None), nn.Conv2d):
                splits[f"up.{i}.block.{j}.nin_shortcut"] = block.in_channels - skip
    return splits


# ResnetBlock: e = temb_proj(swish(temb)) added after conv1, then norm2, swish, dropout, conv2 (QNCD smooths conv2's
# input, as in the LDM ResBlock); a block without temb_proj takes no embedding and is no site
PIXEL_DDPM_SPECIALS = QuantSpecials(
    unit_types=(ResnetBlock, AttnBlock),
    smoothing_sites=(SmoothingSite(ResnetBlock, norm="norm2", conv="conv2", slot="dropout",
                                   time_embedding=pixel_time_embedding,
                                   block_embedding=resnet_block_embedding, applies=takes_embedding),),
    shortcut_splits=pixel_shortcut_splits,
    # the same roles as the LDM UNet's under the released CIFAR-10 checkpoint's names; no transformer blocks, so
    # QNCD's SD policy quantizes every layer here
    policies={"d2dpm": D2DPMPolicy(eight_bit=("temb.dense.0", "conv_in", "conv_out"), fp32_parts=("nin_shortcut",),
                                   fp32_suffixes=("downsample.conv",)),
              "all": quantize_all_policy,
              "qncd-sd": quantize_all_policy})


class PixelDDPM(ModelFamily):
    name = "pixel-ddpm"
    description = "pixel-space DDPM (ermongroup/ddim Model; QNCD CIFAR-10), unconditional, DDIM on uniform/quad grids"

    def matches(self, config: Any) -> bool:
        model, diffusion = _section(config, "model"), _section(config, "diffusion")
        return hasattr(model, "get") and hasattr(diffusion, "get") and model.get("target") is None \
            and "beta_schedule" in diffusion

    def check_config(self, config: Any, config_name: str) -> None:
        try:
            UNetSpec.from_config(config)
            self._betas(config)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{config_name}: {e}") from None

    @staticmethod
    def _betas(config: Any):
        d = config["diffusion"]
        return get_beta_schedule(str(d["beta_schedule"]), float(d["beta_start"]), float(d["beta_end"]),
                                 int(d["num_diffusion_timesteps"]))

    def load(self, config: Any, ckpt: str | os.PathLike | None, *, device: torch.device, trust: bool = False,
             config_name: str = "config", without_unet: bool = False) -> nn.Module:
        if without_unet:   # the whole checkpoint is the UNet: a packed file replaces all of it
            unet = Model(config)
            return GeneralizedDDPM(unet, self._betas(config), channels=unet.spec.in_channels,
                                   image_size=unet.spec.resolution).eval().to(device)
        if ckpt is None:
            raise ConfigError(f"{config_name}: the pixel DDPM needs a checkpoint (--ckpt)")
        for name, (_, _, rel) in RELEASED.items():   # a released file is MD5-checked before it is used
            if str(ckpt).replace(os.sep, "/").endswith(rel):
                verify_md5(ckpt, name)
        unet = load_unet_state(Model(config), ckpt, trust=trust)
        spec = unet.spec
        model = GeneralizedDDPM(unet, self._betas(config), channels=spec.in_channels, image_size=spec.resolution)
        return model.eval().to(device)

    def unet(self, model: nn.Module) -> nn.Module:
        return model.model

    def quant_specials(self) -> QuantSpecials:
        return PIXEL_DDPM_SPECIALS

    def unet_model_fn(self, model: nn.Module, unet: nn.Module) -> ModelFn:
        def model_fn(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            return unet(x, t)   # unconditional: cond is always None
        return model_fn

    def guidance_scale(self, scale: float) -> float:
        return 1.0

    def check_steps(self, config: Any, steps: int, grid: str | None) -> None:
        """The ermongroup grids have no +1 offset: any S from 1 to T (``timestep_sequence``)."""
        num_timesteps = int(config["diffusion"]["num_diffusion_timesteps"])
        skip, corrected = parse_grid(grid or "uniform")
        try:
            timestep_sequence(skip, steps, num_timesteps, corrected=corrected)
        except ValueError as e:
            raise UserFacingError(f"--steps {steps}: {e}; pass --steps 1..{num_timesteps}") from None

    def decode(self, model: nn.Module, z: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """The sample is the image ([-1, 1], ``data.rescaled``); a grayscale model's channel is repeated to RGB."""
        x = z.clamp(-1, 1)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


FAMILIES = (PixelDDPM(),)
