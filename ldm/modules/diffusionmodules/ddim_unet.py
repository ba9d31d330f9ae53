"""The pixel-space ε-prediction UNet of DDPM / DDIM on CIFAR-10 (ermongroup/ddim ``Model``, as QNCD uses it).

Architecture of Ho et al. (2020), "Denoising Diffusion Probabilistic Models", Appendix B (a PixelCNN++-style
Wide-ResNet UNet with group normalisation, single-head self-attention at 16×16 and a sinusoidal timestep
embedding), in the PyTorch port that Song et al. (2021), "Denoising Diffusion Implicit Models", sample with. The
released CIFAR-10 weights are Ho et al.'s TensorFlow checkpoint converted to this layout, so the parameter names,
their order and the arithmetic below follow that port exactly (``state_dict`` = the 328 keys of the checkpoint,
35,746,307 parameters for ``configs/cifar10.yml``; strict load, no prefix).

The building blocks (GroupNorm(32, eps 1e-6), swish, ``ResnetBlock``, ``AttnBlock``, ``Downsample``,
``Upsample``) are the project's VQGAN/LDM autoencoder blocks: those descend from the same port and have identical
parameter names and arithmetic, so both model families share one implementation of them.

Differences from QNCD's copy, none of which changes a number: the model needs nothing but its config (QNCD's
``forward`` reads ``config.split_shortcut``, which only its sampling script sets), the timestep embedding follows
the input's dtype after being computed as the original does (so ``model.double()`` runs instead of raising a dtype
error), and bad inputs raise ``ValueError`` instead of failing an ``assert``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import (AttnBlock, Downsample, Normalize, ResnetBlock, Upsample,
                                                nonlinearity)

__all__ = ["Model", "UNetSpec", "get_timestep_embedding"]


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, embedding_dim] of Ho et al. (2020) (Vaswani et al. 2017, §3.5).

    ``[sin(t·f_0), …, sin(t·f_{h-1}), cos(t·f_0), …, cos(t·f_{h-1})]`` with h = dim // 2 and
    f_i = exp(−i · ln(10000) / (h − 1)); a zero column is appended when ``embedding_dim`` is odd. Sine comes first and
    the exponent divides by h − 1: both differ from the LDM UNet's ``timestep_embedding`` (cosine first, / h), so the
    two are not interchangeable with trained weights. The original always evaluates it in float32 (``t.float()``);
    ``dtype=torch.float64`` evaluates the same formula in float64.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must be a 1-D tensor [B], got shape {tuple(timesteps.shape)}")
    half = embedding_dim // 2
    if half < 2:
        raise ValueError(f"embedding_dim must be at least 4 (the exponent divides by dim // 2 - 1), "
                         f"got {embedding_dim}")
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -scale).to(timesteps.device)
    args = timesteps.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


@dataclass(frozen=True)
class UNetSpec:
    """The hyper-parameters the architecture depends on (``model.*`` and ``data.image_size`` of the yml)."""

    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    in_channels: int
    resamp_with_conv: bool
    resolution: int

    @classmethod
    def from_config(cls, config: Any = None, **overrides: Any) -> "UNetSpec":
        """Read ``config.model.*`` and ``config.data.image_size`` (argparse namespace as the original's
        ``dict2namespace`` makes it, plain dict from ``yaml.safe_load``, or OmegaConf); keyword arguments override
        or replace it (``resolution`` is ``data.image_size``)."""
        model = _section(config, "model")
        data = _section(config, "data")
        kind = _get(model, "type", "simple")
        if kind != "simple":
            raise ValueError(f"model.type '{kind}' is not supported: only the 'simple' ε-prediction UNet is built")
        values: dict[str, Any] = {}
        for name in ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_channels",
                     "resamp_with_conv"):
            values[name] = _get(model, name, None)
        values["resolution"] = _get(data, "image_size", None)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown UNet hyper-parameters: {unknown}")
        missing = sorted(k for k, v in values.items() if v is None)
        if missing:
            raise ValueError(f"the DDIM UNet config lacks {missing} "
                             f"(model.* in the yml; resolution = data.image_size)")
        spec = cls(ch=int(values["ch"]), out_ch=int(values["out_ch"]),
                   ch_mult=tuple(int(m) for m in values["ch_mult"]),
                   num_res_blocks=int(values["num_res_blocks"]),
                   attn_resolutions=tuple(int(r) for r in values["attn_resolutions"]),
                   dropout=float(values["dropout"]), in_channels=int(values["in_channels"]),
                   resamp_with_conv=bool(values["resamp_with_conv"]), resolution=int(values["resolution"]))
        spec.validate()
        return spec

    def validate(self) -> None:
        if not self.ch_mult or min(self.ch_mult) < 1 or self.ch < 1 or self.num_res_blocks < 1:
            raise ValueError(f"ch, ch_mult entries and num_res_blocks must be positive, got {self}")
        # every Downsample halves the side; an odd side would not come back to the skip's size on the way up
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"image_size {self.resolution} is not divisible by 2**{len(self.ch_mult) - 1} "
                             f"(one halving per level after the first)")


def _section(config: Any, name: str) -> Any:
    if config is None:
        return None
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def _get(section: Any, key: str, default: Any) -> Any:
    if section is None:
        return default
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)


class Model(nn.Module):
    """ε_θ(x_t, t) for images in [-1, 1] (``data.rescaled``), x [B, in_channels, R, R], t [B] int or float.

    Levels i = 0 … L−1 run at R / 2^i with ``ch · ch_mult[i]`` channels: ``num_res_blocks`` ResnetBlocks each
    (followed by an AttnBlock where the side is in ``attn_resolutions``), then a Downsample except on the last
    level. The decoder mirrors it with ``num_res_blocks + 1`` blocks per level, each concatenating one encoder
    activation (the skip), and an Upsample except on level 0. Construct with ``Model(config)`` (the yml's namespace
    or dict) and/or keyword arguments ``ch``, ``out_ch``, ``ch_mult``, ... , ``resolution``. Dropout (0.1 for
    CIFAR-10) is active in training mode only: sample after ``eval()``.
    """

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__()
        self.config = config  # kept, as the original keeps it, for code that reads model.config
        spec = UNetSpec.from_config(config, **kwargs)
        self.spec = spec
        self.ch, self.temb_ch = spec.ch, spec.ch * 4
        self.num_resolutions, self.num_res_blocks = len(spec.ch_mult), spec.num_res_blocks
        self.resolution, self.in_channels = spec.resolution, spec.in_channels

        # Attribute assignment order fixes the state_dict order of the checkpoint: temb first, then conv_in.
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(self.ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(spec.in_channels, self.ch, kernel_size=3, stride=1, padding=1)
        self.down, skip_channels, block_in = self._build_down(spec)
        self.mid = nn.Module()
        self.mid.block_1 = self._resblock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = self._resblock(block_in, block_in)
        self.up, block_in = self._build_up(spec, skip_channels, block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, spec.out_ch, kernel_size=3, stride=1, padding=1)

    def _resblock(self, cin: int, cout: int) -> ResnetBlock:
        # The released model never uses the 3×3 conv_shortcut: channel changes go through the 1×1 nin_shortcut.
        return ResnetBlock(in_channels=cin, out_channels=cout, conv_shortcut=False, temb_channels=self.temb_ch,
                           dropout=self.spec.dropout)

    def _build_down(self, spec: UNetSpec) -> tuple[nn.ModuleList, list[int], int]:
        """Encoder levels; also returns the channel count of every activation pushed onto the skip stack."""
        levels = nn.ModuleList()
        skips = [self.ch]  # conv_in's output is the first skip
        block_in, res = self.ch, spec.resolution
        for i, mult in enumerate(spec.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(spec.num_res_blocks):
                level.block.append(self._resblock(block_in, spec.ch * mult))
                block_in = spec.ch * mult
                if res in spec.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
                skips.append(block_in)
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, spec.resamp_with_conv)
                skips.append(block_in)
                res //= 2
            levels.append(level)
        return levels, skips, block_in

    def _build_up(self, spec: UNetSpec, skips: list[int], block_in: int) -> tuple[nn.ModuleList, int]:
        """Decoder levels, built deepest first; ``up[i]`` is the level at R / 2^i, as in the checkpoint."""
        levels: list[nn.Module] = []
        skips = list(skips)
        res = spec.resolution // 2 ** (self.num_resolutions - 1)
        for i in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = spec.ch * spec.ch_mult[i]
            for _ in range(spec.num_res_blocks + 1):
                level.block.append(self._resblock(block_in + skips.pop(), block_out))
                block_in = block_out
                if res in spec.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in, spec.resamp_with_conv)
                res *= 2
            levels.insert(0, level)
        return nn.ModuleList(levels), block_in

    def _timesteps(self, t: torch.Tensor | int | float, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or a [B] = [{batch}] tensor, got shape {tuple(t.shape)}")
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float, context: None = None) -> torch.Tensor:
        # ``context`` only so that code written for the LDM UNet's (x, t, context) call can call this one
        if context is not None:
            raise ValueError("this DDPM is unconditional: it takes no context")
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] != x.shape[3] or x.shape[2] != self.resolution:
            raise ValueError(f"x must be [B, {self.in_channels}, {self.resolution}, {self.resolution}], "
                             f"got {tuple(x.shape)}")
        t = self._timesteps(t, x.shape[0], x.device)
        # float32 as in the original (bit-identical parity); a float64 model gets the float64 formula instead of a
        # rounded float32 one, and half precision gets the float32 values rounded once.
        emb_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        temb = get_timestep_embedding(t, self.ch, emb_dtype).to(x.dtype)
        temb = self.temb.dense[1](nonlinearity(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if i != self.num_resolutions - 1:
                hs.append(level.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)

        return self.conv_out(nonlinearity(self.norm_out(h)))
