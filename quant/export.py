"""Packed export of a quantized UNet: the integer weights as they would be stored for deployment, so the model size
in reports is measured on a real file, not computed.

    packed = pack_quant_model(qm)           # {"layers": {fqn: {...}}, "fp": {name: tensor}}
    save_atomic(packed, "unet_w4.pt")       # 4-bit codes two per byte, 8-bit one per byte
    weights = unpack_weights(packed)        # {fqn.weight: dequantized tensor} == the fake-quantized weights

Each quantized layer stores its integer codes q = clamp(floor(W/Δ) + h + z) (h: AdaRound's hard rounding, or
round-to-nearest), Δ and z; everything that stays in floating point (FP32 layers, biases, norms, embeddings) is
stored as float32.
"""
from __future__ import annotations

import math

import torch

from quant.layers import QuantLayer, WeightRounding
from quant.model import QuantModel
from quant.quantizer import pack_bits, quantize, unpack_bits


def integer_codes(layer: QuantLayer) -> torch.Tensor:
    """The unsigned integer grid values of the layer's quantized weight (int64)."""
    s = layer.w_scheme
    if layer.rounding is WeightRounding.NEAREST:
        q = quantize(layer.weight, layer.w_scale, layer.w_zero_point, s.qmin, s.qmax)
    elif layer.rounding is WeightRounding.ADAROUND_HARD:
        h = layer.round_up.to(layer.weight.dtype)
        q = torch.clamp(torch.floor(layer.weight / layer.w_scale) + h + layer.w_zero_point, s.qmin, s.qmax)
    else:
        raise ValueError("soft AdaRound rounding cannot be exported; finish reconstruction first")
    return (q - s.qmin).round().long()  # shift signed grids to 0..2^b − 1


@torch.no_grad()
def pack_quant_model(qm: QuantModel) -> dict:
    layers, quant_params = {}, set()
    for name, layer in qm.quant_layers():
        bits = layer.w_scheme.bits
        store_bits = 1 << math.ceil(math.log2(bits))  # 4 -> 4, 6 -> 8, 8 -> 8
        layers[name] = {"codes": pack_bits(integer_codes(layer), store_bits), "bits": bits,
                        "store_bits": store_bits, "shape": list(layer.weight.shape), "qmin": layer.w_scheme.qmin,
                        "scale": layer.w_scale.detach().cpu(), "zero_point": layer.w_zero_point.detach().cpu()}
        quant_params.add(f"{name}.weight")
    fp = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
          for k, v in qm.model.state_dict().items()
          if k not in quant_params and not _is_quant_state(k)}
    return {"layers": layers, "fp": fp}


def _is_quant_state(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf in ("w_scale", "w_zero_point", "a_scale", "a_zero_point", "alpha")


def unpack_weights(packed: dict) -> dict[str, torch.Tensor]:
    """Dequantized weights {fqn.weight: tensor}: (q + qmin − z)·Δ."""
    out = {}
    for name, d in packed["layers"].items():
        numel = math.prod(d["shape"])
        q = unpack_bits(d["codes"], d["store_bits"], numel).view(d["shape"]).float() + d["qmin"]
        out[f"{name}.weight"] = (q - d["zero_point"]) * d["scale"]
    return out
