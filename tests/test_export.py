"""Packed export: integer codes round-trip exactly to the fake-quantized weights; W4 files are smaller than W8."""
from __future__ import annotations

import io

import pytest
import torch

import tiny_models
from quant.config import QuantConfig
from quant.export import pack_bits, pack_quant_model, unpack_bits, unpack_weights
from quant.layers import WeightRounding
from pipeline.families.compvis_ldm import ClassConditionalLDM
from quant.model import QuantModel

SPECIALS = ClassConditionalLDM().quant_specials()   # the family of the tiny class-conditional LDM
d2dpm_policy = SPECIALS.policy("d2dpm")


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
        qm = QuantModel(unet, QuantConfig(bits, None), specials=SPECIALS).init_weights_()
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


@torch.no_grad()
@pytest.mark.parametrize("smoothed", [False, True], ids=["plain", "qncd-smoothed"])
def test_packed_file_alone_rebuilds_the_fake_quant_model(smoothed):
    """load_packed over a UNet with OTHER random weights gives the fake-quant model's ε bit for bit: hard AdaRound
    codes, per-channel weights, shortcut splits and (QNCD) smoothing factors all travel in the file."""
    from quant.api import QuantConfig, quantize
    from quant.export import load_packed
    from quant.policy import quantize_all_policy
    from quant.quantizer import PerChannel
    from quant.smoothing import ChannelSmoothing, apply_smoothing_, resblocks
    torch.set_num_threads(1)
    cfg = tiny_models.config(tiny_models.CLASS_COND)
    model = tiny_models.build(cfg)
    config = QuantConfig(w_bits=4, a_bits=8, granularity=PerChannel(0), split_shortcut=True)
    qm = quantize(model.model.diffusion_model, config, quantize_all_policy, specials=SPECIALS)
    if smoothed:
        apply_smoothing_(qm, {n: torch.rand(b.out_layers[3].weight.shape[1]) + 0.5 for n, b in resblocks(qm)})
    qm.init_weights_()
    _, layer = next(iter(qm.quant_layers()))
    layer.init_adaround_()
    layer.alpha.data = torch.randn_like(layer.alpha)
    layer.harden_()
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 8, 8), torch.randint(0, 1000, (2,)),
                model.get_learned_conditioning({"class_label": torch.tensor([0, 4])}))]
    qm.calibrate_activations_(batches)
    qm.set_quant_state(weight=True, act=True)
    assert any(m.split for _, m in qm.quant_layers())
    x, t, c = batches[0]
    ref = qm(x, t, context=c)
    packed = pack_quant_model(qm)
    other = tiny_models.build(cfg, seed=1).model.diffusion_model     # other weights: all replaced from the file
    rebuilt = load_packed(other, packed, config, quantize_all_policy, specials=SPECIALS)
    assert any(isinstance(m, ChannelSmoothing) for m in rebuilt.modules()) == smoothed
    assert torch.equal(rebuilt(x, t, context=c), ref)
    with pytest.raises(ValueError, match="does not fit"):    # another layer policy: the layer sets differ
        load_packed(tiny_models.build(cfg, seed=1).model.diffusion_model, packed, config,
                    lambda n, m: quantize_all_policy(n, m) if "input_blocks" not in n else d2dpm_policy(n, m),
                    specials=SPECIALS)
