"""The one way to make a quantized UNet: a frozen config and a layer filter, as torchao's
``quantize_(model, config, filter_fn)``.

    cfg = QuantConfig(w_bits=4, a_bits=8)                       # D²-DPM: per-tensor weights, A8
    specials = family.quant_specials()                          # the model family's (pipeline/families/)
    qm = quantize(unet, cfg, "d2dpm", specials=specials)        # uncalibrated QuantModel (a copy of unet)
    qm = quantize(unet, cfg, "d2dpm", state=s, specials=specials)   # restored exactly from quantized_state(qm)

Calibration and reconstruction stay explicit verbs on the result (``init_weights_``, ``calibrate_activations_``,
``quant.reconstruction.reconstruct_``); QNCD's smoothing is applied by ``quant.smoothing.apply_smoothing_`` before
the weight ranges are chosen, and ``state`` restores it (re-folded before the quantizer parameters, as made).
``specials`` (``QuantSpecials``) is what the model family knows: its reconstruction units, smoothing sites,
shortcut splits and layer policies by name; the QuantModel keeps it for those verbs.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from quant.config import QuantConfig
from quant.model import QuantModel
from quant.policy import LayerFilter
from quant.smoothing import load_smoothing_, smoothing_state
from quant.specials import QuantSpecials, SmoothingSite


def quantize(unet: nn.Module, config: QuantConfig, filter_fn: LayerFilter | str = "d2dpm",
             state: dict[str, Any] | None = None, fresh_attention: bool = False, copy: bool = True, *,
             specials: QuantSpecials) -> QuantModel:
    """A QuantModel over a copy of ``unet`` whose layers ``filter_fn`` selects (a predicate, or the name of one of
    ``specials.policies``), shaped by ``config``; ``specials``: the model family's. With
    ``state`` (``quantized_state(qm)`` of a model made with the same config and filter from the same weights), its
    smoothing, Δ, z and rounding are restored exactly; ``ValueError`` if it does not fit. ``fresh_attention``: the
    state is a weights-only model's and ``config.sm_abit`` adds attention quantizers, left to calibrate.
    ``copy=False`` wraps ``unet`` itself instead of a copy (its layers are replaced): one UNet in memory instead
    of two, for callers that need no separate FP network (with quantization off the QuantModel is exactly FP)."""
    qm = QuantModel(unet, config, filter_fn=filter_fn, copy_model=copy, specials=specials)
    if state is not None:
        if state.get("smoothing") is not None:  # S re-folded into the checkpoint weights, before the qparams
            load_smoothing_(qm, state["smoothing"])
        qm.load_quant_state_dict_(state["quant_state"], fresh_attention=fresh_attention)
    return qm


def quantized_state(qm: QuantModel, smoothed: bool = False) -> dict[str, Any]:
    """What ``quantize(..., state=)`` restores: the quantizer state and, for a smoothed model, its factors."""
    return {"quant_state": qm.quant_state_dict(), **({"smoothing": smoothing_state(qm)} if smoothed else {})}


__all__ = ["QuantConfig", "QuantSpecials", "SmoothingSite", "LayerFilter", "quantize", "quantized_state"]
