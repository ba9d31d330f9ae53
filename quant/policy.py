"""Which layers are quantized, and at what precision: the keep-in-higher-precision policy, in one place.

D²-DPM (spec d2dpm.md §3.2): ResBlock skip 1×1 convs and Downsample convs stay FP32; the first time-embedding
Linear, the input conv and the output conv run at W8A8; every other Conv/Linear runs at the target bits.
Q-Diffusion's "quantize everything" is the other policy; QNCD's released Stable Diffusion path (spec qncd_ptqd.md
§A.4) quantizes everything but the transformer blocks (self-/cross-attention and GEGLU FF stay FP).
"""
from __future__ import annotations

import enum

import torch.nn as nn

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


class Precision(enum.Enum):
    FP32 = "fp32"      # left as it is
    EIGHT_BIT = "w8a8"  # W8A8 whatever the target
    TARGET = "target"  # the requested bits (e.g. W4A8)


# UNet-relative names: the LDM UNet (CompVis checkpoints without the model.diffusion_model prefix) and the pixel DDPM
# ``Model`` (the released CIFAR-10 checkpoint's keys), which name the same roles differently
EIGHT_BIT_LAYERS = ("time_embed.0", "input_blocks.0.0", "out.2",   # first embedding Linear, input conv, output conv
                    "temb.dense.0", "conv_in", "conv_out")
SKIP_CONVS = ("skip_connection", "nin_shortcut")                    # ResBlock 1×1 shortcuts


def d2dpm_policy(fqn: str, module: nn.Module) -> Precision:
    """D²-DPM's layer policy for a module of the UNet named ``fqn`` (relative to the UNet)."""
    if not isinstance(module, QUANTIZABLE):
        return Precision.FP32
    if set(SKIP_CONVS) & set(fqn.split(".")) or fqn.endswith(".op") or fqn.endswith("downsample.conv"):
        return Precision.FP32
    if fqn in EIGHT_BIT_LAYERS:
        return Precision.EIGHT_BIT
    return Precision.TARGET


def quantize_all_policy(fqn: str, module: nn.Module) -> Precision:
    """Q-Diffusion: every Conv/Linear at the target bits."""
    return Precision.TARGET if isinstance(module, QUANTIZABLE) else Precision.FP32


def qncd_sd_policy(fqn: str, module: nn.Module) -> Precision:
    """QNCD's SD: every Conv/Linear at the target bits except inside the SpatialTransformers' transformer blocks."""
    return Precision.FP32 if "transformer_blocks" in fqn.split(".") else quantize_all_policy(fqn, module)


POLICIES = {"d2dpm": d2dpm_policy, "all": quantize_all_policy, "qncd-sd": qncd_sd_policy}
