"""Which layers are quantized, and at what precision: the keep-in-higher-precision policies, as mechanisms.

D²-DPM (spec d2dpm.md §3.2): ResBlock skip 1×1 convs and Downsample convs stay FP32; the first time-embedding
Linear, the input conv and the output conv run at W8A8; every other Conv/Linear runs at the target bits.
Q-Diffusion's "quantize everything" is the other policy; QNCD's released Stable Diffusion path (spec qncd_ptqd.md
§A.4) quantizes everything but the transformer blocks (self-/cross-attention and GEGLU FF stay FP).

Which layers those are is a model family's knowledge: each family fills ``D2DPMPolicy`` / ``ExcludeParts`` with its
own layer names and hands them over by policy name in its ``quant.specials.QuantSpecials``. ``POLICIES`` names the
policies every family provides (the ``--policy`` choices and the artifacts' ``policy``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


class Precision(enum.Enum):
    FP32 = "fp32"      # left as it is
    EIGHT_BIT = "w8a8"  # W8A8 whatever the target
    TARGET = "target"  # the requested bits (e.g. W4A8)


LayerFilter = Callable[[str, nn.Module], Precision]


@dataclass(frozen=True)
class D2DPMPolicy:
    """D²-DPM's layer policy over one family's UNet-relative layer names: ``eight_bit`` (exact names: the first
    time-embedding Linear, the input conv, the output conv) at W8A8; a layer with a name component in ``fp32_parts``
    (the residual blocks' 1×1 shortcuts) or a name ending in one of ``fp32_suffixes`` (the Downsample convs) FP32;
    every other Conv/Linear at the target bits."""

    eight_bit: tuple[str, ...]
    fp32_parts: tuple[str, ...]
    fp32_suffixes: tuple[str, ...]

    def __call__(self, fqn: str, module: nn.Module) -> Precision:
        if not isinstance(module, QUANTIZABLE):
            return Precision.FP32
        if set(self.fp32_parts) & set(fqn.split(".")) or fqn.endswith(self.fp32_suffixes):
            return Precision.FP32
        if fqn in self.eight_bit:
            return Precision.EIGHT_BIT
        return Precision.TARGET


def quantize_all_policy(fqn: str, module: nn.Module) -> Precision:
    """Q-Diffusion: every Conv/Linear at the target bits."""
    return Precision.TARGET if isinstance(module, QUANTIZABLE) else Precision.FP32


@dataclass(frozen=True)
class ExcludeParts:
    """Every Conv/Linear at the target bits except those with a name component in ``parts`` (QNCD's SD: the
    SpatialTransformers' transformer blocks stay FP)."""

    parts: tuple[str, ...]

    def __call__(self, fqn: str, module: nn.Module) -> Precision:
        return Precision.FP32 if set(self.parts) & set(fqn.split(".")) else quantize_all_policy(fqn, module)


# the policies every family provides, by the name the CLI and the artifacts' meta use
POLICIES = {"d2dpm": "D²-DPM: skip and Downsample convs FP32; time embedding, input and output conv W8A8",
            "all": "Q-Diffusion: every Conv/Linear at the target bits",
            "qncd-sd": "QNCD's Stable Diffusion: all but the transformer blocks"}
