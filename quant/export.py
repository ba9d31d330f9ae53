"""Packed export of a quantized UNet: the integer weights as they are stored for deployment, and everything else an
inference UNet needs, so that the file alone (without the FP32 UNet weights) rebuilds the quantized model.

    packed = pack_quant_model(qm)                     # payload below; the pipeline adds the meta and writes it
    qm = load_packed(unet, packed, config, filter, specials=specials)   # over any UNet of the same structure
    weights = unpack_weights(packed)                  # {fqn.weight: dequantized tensor} == the fake-quantized weights

Payload (format version 2):
    layers      {fqn: codes (uint8, 4-bit codes two per byte, 8-bit one), bits, store_bits, shape, qmin, scale,
                 zero_point}: q = clamp(floor(W/Δ) + h + z) (h: AdaRound's hard rounding, or round-to-nearest)
    quant_state QuantModel.quant_state_dict() without what ``layers`` holds (Δ_w, z_w) and with the rounding
                 recorded as the codes themselves (mode "nearest", no masks): activation Δ/z, attention quantizers,
                 shortcut splits
    smoothing   quant.smoothing.smoothing_state() of a QNCD-smoothed model, else None
    fp          {name: float32 tensor}: the layers kept in FP32, biases, norms, embeddings, smoothing factors
Loading is strict: every tensor of the UNet must come from ``fp`` or ``layers``, none may be left over.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from quant.api import LayerFilter, QuantConfig, quantize
from quant.layers import WeightRounding
from quant.model import QuantModel
from quant.quantizer import pack_bits, unpack_bits
from quant.smoothing import ChannelSmoothing, smoothing_state
from quant.specials import QuantSpecials

VERSION = 2
QUANT_STATE_LEAVES = ("w_scale", "w_zero_point", "a_scale", "a_zero_point", "alpha", "round_up")


@torch.no_grad()
def pack_quant_model(qm: QuantModel) -> dict:
    layers, quant_params = {}, set()
    for name, layer in qm.quant_layers():
        bits = layer.w_scheme.bits
        store_bits = 1 << math.ceil(math.log2(bits))  # 4 -> 4, 6 -> 8, 8 -> 8
        layers[name] = {"codes": pack_bits(layer.weight_codes().cpu(), store_bits), "bits": bits,
                        "store_bits": store_bits, "shape": list(layer.weight.shape), "qmin": layer.w_scheme.qmin,
                        "scale": layer.w_scale.detach().cpu(), "zero_point": layer.w_zero_point.detach().cpu()}
        quant_params.add(f"{name}.weight")
    fp = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
          for k, v in qm.model.state_dict().items()
          if k not in quant_params and not _is_quant_state(k)}
    state = qm.quant_state_dict()
    for d in state.values():   # the codes carry the rounding: dequantized weights round to themselves
        if "rounding" in d:    # (Δ_w and z_w are in "layers": written once)
            d["rounding"] = WeightRounding.NEAREST.value
            for key in ("round_up_bits", "alpha", "w_scale", "w_zero_point"):
                d.pop(key, None)
    smoothed = any(isinstance(m, ChannelSmoothing) for m in qm.model.modules())
    return {"version": VERSION, "layers": layers, "quant_state": state,
            "smoothing": smoothing_state(qm) if smoothed else None, "fp": fp}


def _is_quant_state(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in QUANT_STATE_LEAVES


def unpack_weights(packed: dict) -> dict[str, torch.Tensor]:
    """Dequantized weights {fqn.weight: tensor}: (q + qmin − z)·Δ."""
    out = {}
    for name, d in packed["layers"].items():
        numel = math.prod(d["shape"])
        if d["codes"].dtype != torch.uint8 or d["codes"].numel() != -(-numel * d["store_bits"] // 8):
            raise ValueError(f"{name}: {d['codes'].numel()} bytes of codes for a {d['shape']} weight at "
                             f"{d['store_bits']} bits (a damaged or edited file?)")
        q = unpack_bits(d["codes"], d["store_bits"], numel).view(d["shape"]).float() + d["qmin"]
        out[f"{name}.weight"] = (q - d["zero_point"]) * d["scale"]
    return out


@torch.no_grad()
def load_packed(unet: nn.Module, packed: dict, config: QuantConfig, filter_fn: LayerFilter | str, *,
                specials: QuantSpecials) -> QuantModel:
    """The quantized UNet a packed payload describes, built over ``unet`` in place (a UNet of the same structure;
    its weights are all overwritten, so it may come straight from the config; ``specials``: its family's, as for
    ``quant.api.quantize``). Quantization is on as packed
    (weights; activations when ``config.a_bits``). ValueError, naming the first keys, if the file does not fit."""
    if packed.get("version") != VERSION:
        raise ValueError(f"packed format version {packed.get('version')}, this code reads {VERSION}; re-export it")
    quant_state = {name: dict(d) for name, d in packed["quant_state"].items()}
    for name, d in quant_state.items():
        if "rounding" in d:
            if name not in packed["layers"]:
                raise ValueError(f"the packed file has a quantizer state for {name} but no weight codes")
            d["w_scale"], d["w_zero_point"] = packed["layers"][name]["scale"], packed["layers"][name]["zero_point"]
    state = {"quant_state": quant_state, "smoothing": packed.get("smoothing")}
    qm = quantize(unet, config, filter_fn, state=state, copy=False, specials=specials)
    weights = unpack_weights(packed)
    own = {k: v for k, v in qm.model.state_dict().items() if not _is_quant_state(k)}
    given = {**packed["fp"], **weights}
    missing, extra = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or extra:
        raise ValueError(f"the packed file does not fit this UNet: missing {missing[:3]}, unexpected {extra[:3]} "
                         f"(another model or layer policy?)")
    reshaped = [k for k, v in given.items() if tuple(v.shape) != tuple(own[k].shape)]
    if reshaped:
        k = reshaped[0]
        raise ValueError(f"the packed file does not fit this UNet: {k} is {list(given[k].shape)} there, "
                         f"{list(own[k].shape)} here ({len(reshaped)} such tensors)")
    for k, v in given.items():
        own[k].copy_(v)
    qm.set_quant_state(weight=True, act=config.a_bits is not None)
    return qm.eval()
