"""Packed export: integer codes round-trip exactly to the fake-quantized weights; W4 files are smaller than W8."""
from __future__ import annotations

import io

import pytest
import torch

import tiny_models
from quant.export import pack_bits, pack_quant_model, unpack_bits, unpack_weights
from quant.layers import WeightRounding
from quant.model import QuantModel


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (1001,))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


def size_of(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


@torch.no_grad()
def test_packed_weights_equal_the_fake_quantized_ones():
    torch.set_num_threads(1)
    unet = tiny_models.build(tiny_models.config(tiny_models.CLASS_COND)).model.diffusion_model
    sizes = {}
    for bits in (4, 8):
        qm = QuantModel(unet, w_bits=bits, a_bits=None).init_weights_()
        if bits == 4:  # a hard AdaRound layer: codes use the learned round-up mask
            name, layer = next((n, m) for n, m in qm.quant_layers() if m.w_scheme.bits == 4)
            layer.init_adaround_()
            layer.alpha.data = torch.randn_like(layer.alpha)
            layer.harden_()
            assert layer.rounding is WeightRounding.ADAROUND_HARD and layer.alpha is None
        packed = pack_quant_model(qm)
        weights = unpack_weights(packed)
        for n, m in qm.quant_layers():
            torch.testing.assert_close(weights[f"{n}.weight"], m.quantized_weight(), rtol=0, atol=1e-6)
        sizes[bits] = size_of(packed)
    sizes["fp32"] = size_of(unet.state_dict())
    assert sizes[4] < sizes[8] < sizes["fp32"]
