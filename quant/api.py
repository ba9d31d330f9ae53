"""The one way to make a quantized UNet: a frozen config and a layer filter, as torchao's
``quantize_(model, config, filter_fn)``.

    cfg = QuantConfig(w_bits=4, a_bits=8)                       # D²-DPM: per-tensor weights, A8
    qm = quantize(unet, cfg, filter_fn=d2dpm_policy)            # uncalibrated QuantModel (a copy of unet)
    qm = quantize(unet, cfg, filter_fn=d2dpm_policy, state=s)   # restored exactly from quantized_state(qm)

Calibration and reconstruction stay explicit verbs on the result (``init_weights_``, ``calibrate_activations_``,
``quant.reconstruction.reconstruct_``); QNCD's smoothing is applied by ``quant.smoothing.apply_smoothing_`` before
the weight ranges are chosen, and ``state`` restores it (re-folded before the quantizer parameters, as made).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from quant.model import QuantModel
from quant.policy import Precision, d2dpm_policy
from quant.quantizer import PerChannel, PerTensor
from quant.smoothing import load_smoothing_, smoothing_state

LayerFilter = Callable[[str, nn.Module], Precision]


@dataclass(frozen=True)
class QuantConfig:
    """What a quantized UNet is, apart from its layer filter and its calibrated values.

    ``w_bits``: e.g. 4 or 8 (the paper's W4 / W8), 3; ``a_bits``: None (weights only, step 2), 8, 6 or 4. ``granularity``:
    of the weight ranges. ``sm_abit``: also quantize the attention matmuls, the softmax output at this many bits
    (Q-Diffusion; needs ``a_bits``). ``split_shortcut``: Q-Diffusion's separate ranges for the [h ; skip] halves of
    the decoder skip convs' input."""

    w_bits: int
    a_bits: int | None = None
    granularity: PerTensor | PerChannel = PerTensor()
    sm_abit: int | None = None
    split_shortcut: bool = False

    def __post_init__(self):
        if not 2 <= self.w_bits <= 16:
            raise ValueError(f"w_bits must be in 2..16, got {self.w_bits}")
        if self.a_bits is not None and not 2 <= self.a_bits <= 16:
            raise ValueError(f"a_bits must be in 2..16 or None, got {self.a_bits}")
        if self.sm_abit is not None and (self.a_bits is None or not 2 <= self.sm_abit <= 16):
            raise ValueError(f"sm_abit must be in 2..16 and needs a_bits, got sm_abit={self.sm_abit}, "
                             f"a_bits={self.a_bits}")
        if not isinstance(self.granularity, (PerTensor, PerChannel)):
            raise TypeError(f"granularity must be PerTensor() or PerChannel(axis), got {self.granularity!r}")


def quantize(unet: nn.Module, config: QuantConfig, filter_fn: LayerFilter = d2dpm_policy,
             state: dict[str, Any] | None = None, fresh_attention: bool = False, copy: bool = True) -> QuantModel:
    """A QuantModel over a copy of ``unet`` whose layers ``filter_fn`` selects, shaped by ``config``. With
    ``state`` (``quantized_state(qm)`` of a model made with the same config and filter from the same weights), its
    smoothing, Δ, z and rounding are restored exactly; ``ValueError`` if it does not fit. ``fresh_attention``: the
    state is a weights-only model's and ``config.sm_abit`` adds attention quantizers, left to calibrate.
    ``copy=False`` wraps ``unet`` itself instead of a copy (its layers are replaced): one UNet in memory instead
    of two, for callers that need no separate FP network (with quantization off the QuantModel is exactly FP)."""
    qm = QuantModel(unet, w_bits=config.w_bits, a_bits=config.a_bits, policy=filter_fn,
                    granularity=config.granularity, sm_abit=config.sm_abit, split_shortcut=config.split_shortcut,
                    copy_model=copy)
    if state is not None:
        if state.get("smoothing") is not None:  # S re-folded into the checkpoint weights, before the qparams
            load_smoothing_(qm, state["smoothing"])
        qm.load_quant_state_dict_(state["quant_state"], fresh_attention=fresh_attention)
    return qm


def quantized_state(qm: QuantModel, smoothed: bool = False) -> dict[str, Any]:
    """What ``quantize(..., state=)`` restores: the quantizer state and, for a smoothed model, its factors."""
    return {"quant_state": qm.quant_state_dict(), **({"smoothing": smoothing_state(qm)} if smoothed else {})}
