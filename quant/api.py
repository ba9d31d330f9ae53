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

from dataclasses import dataclass, replace
from typing import Any

import torch.nn as nn

from quant.model import QuantModel
from quant.policy import LayerFilter
from quant.quantizer import PerChannel, PerTensor
from quant.smoothing import load_smoothing_, smoothing_state
from quant.specials import QuantSpecials, SmoothingSite


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
    policy: str = "d2dpm"            # the layer policy's name (the family's specials hold the predicate)
    smoothing: str | None = None     # QNCD's smoothing formula folded in before the weight ranges: code | paper

    def __post_init__(self):
        if self.smoothing not in (None, "code", "paper"):
            raise ValueError(f"smoothing must be None, 'code' or 'paper', got {self.smoothing!r}")
        if not 2 <= self.w_bits <= 16:
            raise ValueError(f"w_bits must be in 2..16, got {self.w_bits}")
        if self.a_bits is not None and not 2 <= self.a_bits <= 16:
            raise ValueError(f"a_bits must be in 2..16 or None, got {self.a_bits}")
        if self.sm_abit is not None and (self.a_bits is None or not 2 <= self.sm_abit <= 16):
            raise ValueError(f"sm_abit must be in 2..16 and needs a_bits, got sm_abit={self.sm_abit}, "
                             f"a_bits={self.a_bits}")
        if not isinstance(self.granularity, (PerTensor, PerChannel)):
            raise TypeError(f"granularity must be PerTensor() or PerChannel(axis), got {self.granularity!r}")

    # ---- the artifact's meta is this config, serialized -----------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """The config as a quant artifact's meta records it (the keys and order every artifact has had:
        ``channel_wise`` for the granularity, ``split_shortcut`` True or None; ``sm_abit`` only with ``a_bits``)."""
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "policy": self.policy,
                "channel_wise": isinstance(self.granularity, PerChannel), "split_shortcut": self.split_shortcut or None,
                "smoothing": self.smoothing, **({"sm_abit": self.sm_abit} if self.a_bits is not None else {})}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "QuantConfig":
        """The config a quant artifact's meta (or a request shaped like one) records."""
        a_bits = meta.get("a_bits")
        return cls(w_bits=meta["w_bits"], a_bits=a_bits,
                   granularity=PerChannel(0) if meta["channel_wise"] else PerTensor(),
                   sm_abit=meta.get("sm_abit") if a_bits else None, split_shortcut=bool(meta.get("split_shortcut")),
                   policy=meta["policy"], smoothing=meta.get("smoothing"))

    @property
    def weights_only(self) -> "QuantConfig":
        """Step 2's config of this model: the weights alone."""
        return replace(self, a_bits=None, sm_abit=None)


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
    qm = QuantModel(unet, w_bits=config.w_bits, a_bits=config.a_bits, policy=filter_fn,
                    granularity=config.granularity, sm_abit=config.sm_abit, split_shortcut=config.split_shortcut,
                    copy_model=copy, specials=specials)
    if state is not None:
        if state.get("smoothing") is not None:  # S re-folded into the checkpoint weights, before the qparams
            load_smoothing_(qm, state["smoothing"])
        qm.load_quant_state_dict_(state["quant_state"], fresh_attention=fresh_attention)
    return qm


def quantized_state(qm: QuantModel, smoothed: bool = False) -> dict[str, Any]:
    """What ``quantize(..., state=)`` restores: the quantizer state and, for a smoothed model, its factors."""
    return {"quant_state": qm.quant_state_dict(), **({"smoothing": smoothing_state(qm)} if smoothed else {})}


__all__ = ["QuantConfig", "QuantSpecials", "SmoothingSite", "LayerFilter", "quantize", "quantized_state"]
