"""Integer execution (quant.integer): each int8 layer equals its fake-quant QuantLayer up to float summation, with
asymmetric activation zero points, per-tensor and per-channel weights, 4- and 8-bit weights, and the conv shapes the
UNets use; a whole quantized UNet converted in place gives the fake-quant model's ε."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import tiny_models
from quant.api import QuantConfig, quantize
from quant.integer import Backend, FloatWeightLayer, IntegerLayer, onednn_int8_exact, to_integer_
from quant.layers import QuantLayer
from quant.policy import Precision
from quant.quantizer import PerChannel, PerTensor, QScheme

LAYERS = {
    "linear": (lambda: nn.Linear(64, 40), (3, 7, 64)),
    "conv3x3": (lambda: nn.Conv2d(16, 24, 3, padding=1), (2, 16, 9, 9)),
    "conv3x3_stride2": (lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1), (2, 16, 9, 9)),
    "conv1x1": (lambda: nn.Conv2d(32, 16, 1), (2, 32, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(32, 24, 1), (2, 32, 11)),
    "conv3x3_groups2": (lambda: nn.Conv2d(16, 24, 3, padding=1, groups=2), (2, 16, 6, 6)),
}


def quant_layer(name: str, w_bits: int, a_bits: int, granularity) -> tuple[QuantLayer, torch.Tensor]:
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    module = make()
    with torch.no_grad():   # skewed weights: z_w away from the middle, so 8-bit codes − z_w do not fit int8
        module.weight.add_(module.weight.abs().mean())
    layer = QuantLayer(module, QScheme(w_bits, granularity=granularity), QScheme(a_bits))
    x = torch.randn(shape) * 1.5 + 0.7          # asymmetric range: z_a far from 0 and from the middle
    layer.init_weight_qparams_()
    layer.init_act_qparams_(x)
    layer.weight_quant = layer.act_quant = True
    return layer, torch.randn(shape) * 1.5 + 0.7


def assert_close_to_fake(layer: QuantLayer, integer: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref, out = layer(x), integer(x)
    assert out.shape == ref.shape
    # float summation order only: a few float32 ulps of the largest partial sums
    torch.testing.assert_close(out.contiguous(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0)], ids=["tensor", "channel"])
@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (8, 8), (8, 6)])
def test_onednn_layer_equals_fake_quant(name, granularity, w_bits, a_bits):
    layer, x = quant_layer(name, w_bits, a_bits, granularity)
    report = to_integer_(wrapper := nn.Sequential(layer), Backend.ONEDNN)
    integer = wrapper[0]
    assert isinstance(integer, IntegerLayer)
    expected = "onednn" if w_bits == 4 or a_bits <= 6 or onednn_int8_exact() else "float: u8×s8"
    assert report["0"].startswith(expected)
    assert integer.has_offset == (w_bits == 8)          # 8-bit asymmetric weights need the offset term
    assert integer.w_int.dtype == torch.int8 and not hasattr(integer, "weight")
    assert integer.w_codes.numel() == -(-layer.weight.numel() * (4 if w_bits == 4 else 8) // 8)   # stored packed
    assert_close_to_fake(layer, integer, x)


@pytest.mark.parametrize("name", ["linear", "conv1x1", "conv1d", "conv3x3"])
@pytest.mark.parametrize("w_bits", [4, 8])
def test_int_mm_layer_equals_fake_quant(name, w_bits):
    """torch._int_mm (the CUDA path; the CPU runs the same code slowly): A shifted to int8, z_a folded in the bias."""
    layer, x = quant_layer(name, w_bits, 8, PerChannel(0))
    report = to_integer_(wrapper := nn.Sequential(layer), Backend.INT_MM)
    assert report["0"] == ("float: not a Linear or 1×1 conv (no int8 conv kernel on this device)"
                           if name == "conv3x3" else "int_mm")
    assert_close_to_fake(layer, wrapper[0], x)


def test_saturation_probe_detects_avx2():
    """The probe's answer agrees with a direct computation at the codes that saturate an int16 pair sum."""
    torch.manual_seed(1)
    layer, _ = quant_layer("conv1x1", 8, 8, PerTensor())
    x = torch.full((1, 32, 3, 3), 100.0)                    # every code at the top of the grid
    integer = IntegerLayer.from_quant(layer, layer.weight_codes(), Backend.ONEDNN)
    with torch.no_grad():
        exact = torch.allclose(integer(x), layer(x), rtol=0, atol=1e-4 * layer(x).abs().max().item())
    if onednn_int8_exact():
        assert exact
    else:
        assert not exact, "the probe says the kernels saturate, but an extreme 8-bit input came out exact"


def test_weight_only_and_split_layers():
    layer, x = quant_layer("conv3x3", 4, 8, PerTensor())
    layer.act_quant = False
    report = to_integer_(wrapper := nn.Sequential(layer), Backend.ONEDNN)
    assert isinstance(wrapper[0], FloatWeightLayer) and report["0"].startswith("float: weight-only")
    assert_close_to_fake(layer, wrapper[0], x)
    split = QuantLayer(nn.Conv2d(8, 4, 1), QScheme(4), QScheme(8))
    split.set_split_(3)
    split.init_weight_qparams_()
    split.init_act_qparams_(torch.randn(2, 8, 3, 3))
    split.weight_quant = split.act_quant = True
    report = to_integer_(wrapper := nn.Sequential(split))
    assert wrapper[0] is split and report["0"] == "fake-quant: shortcut split (two input ranges)"


def test_uncalibrated_model_is_refused():
    layer = QuantLayer(nn.Linear(8, 8), QScheme(4), QScheme(8))
    with pytest.raises(ValueError, match="set_quant_state"):
        to_integer_(nn.Sequential(layer))


@torch.no_grad()
@pytest.mark.parametrize("w_bits", [4, 8])
def test_whole_unet_integer_equals_fake_quant(w_bits):
    """Every layer of a converted UNet, given its fake-quant twin's input, returns its output within float
    rounding; end to end the difference stays far below the quantization error (a code at a rounding tie may flip
    by one step in the integer model, and the flip propagates)."""
    torch.set_num_threads(1)
    model = tiny_models.build(tiny_models.config(tiny_models.CLASS_COND))
    unet = model.model.diffusion_model
    qm = quantize(unet, QuantConfig(w_bits=w_bits, a_bits=8, granularity=PerChannel(0))).init_weights_()
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 8, 8), torch.randint(0, 1000, (2,)),
                model.get_learned_conditioning({"class_label": torch.tensor([0, 1])})) for _ in range(2)]
    qm.calibrate_activations_(batches)
    qm.set_quant_state(weight=True, act=True)
    x, t, c = batches[0]
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
             for n, m in qm.quant_layers()]
    ref = qm(x, t, context=c)
    for h in hooks:
        h.remove()
    fake = copy.deepcopy(qm)
    target = {n for n, m in qm.quant_layers() if m.precision is Precision.TARGET}
    report = to_integer_(qm)
    assert set(report) == set(seen)
    if w_bits == 4:   # every 4-bit layer fits int8 without saturating: all run in integers
        assert all(report[n] == "onednn" for n in target)
    assert not any(isinstance(m, QuantLayer) for m in qm.modules())
    for name, (inp, out) in seen.items():
        torch.testing.assert_close(qm.model.get_submodule(name)(inp).contiguous(), out, rtol=0,
                                   atol=2e-5 * out.abs().max().item(), msg=name)
    fake.set_quant_state(weight=False, act=False)
    assert (qm(x, t, context=c) - ref).norm() < 0.1 * (fake(x, t, context=c) - ref).norm()
