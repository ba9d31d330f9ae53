"""QuantModel on a tiny random UNet: FP when off, SQNR floors against the FP copy, explicit calibration."""
from __future__ import annotations

import pytest
import torch

import tiny_models
from pipeline.families.compvis_ldm import ClassConditionalLDM
from quant.config import QuantConfig
from quant.layers import QuantLayer
from quant.model import QuantModel
from quant.policy import quantize_all_policy
from quant.quantizer import PerChannel

SPECIALS = ClassConditionalLDM().quant_specials()   # the family of the tiny class-conditional LDM


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - test).pow(2).mean()))


@pytest.fixture(scope="module")
def unet_and_data():
    model = tiny_models.build(tiny_models.config(tiny_models.CLASS_COND))
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    ctx = model.get_learned_conditioning({"class_label": torch.tensor([0, 1, 2, 3])}).detach()
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g), ctx)
               for _ in range(3)]
    return unet, batches


@torch.no_grad()
def test_off_state_is_exactly_fp(unet_and_data):
    unet, batches = unet_and_data
    qm = QuantModel(unet, QuantConfig(4, 8), specials=SPECIALS).init_weights_()
    x, t, c = batches[0]
    assert torch.equal(qm(x, t, context=c), unet(x, t, context=c))
    assert any(isinstance(m, QuantLayer) for m in qm.modules())
    assert not any(isinstance(m, QuantLayer) for m in unet.modules())  # the FP UNet is untouched


@torch.no_grad()
def test_sqnr_floors(unet_and_data):
    unet, batches = unet_and_data
    x, t, c = batches[-1]  # held out from calibration
    ref = unet(x, t, context=c)
    results = {}
    for w, a in ((8, None), (4, None), (8, 8)):
        qm = QuantModel(unet, QuantConfig(w, a, granularity=PerChannel(0)), specials=SPECIALS,
                        filter_fn=quantize_all_policy).init_weights_()
        qm.set_quant_state(weight=True)
        if a:
            qm.calibrate_activations_(batches[:2])
            qm.set_quant_state(weight=True, act=True)
        results[(w, a)] = sqnr_db(ref, qm(x, t, context=c))
    assert results[(8, None)] > 35
    assert results[(8, 8)] > 25
    assert results[(4, None)] < results[(8, None)] - 10  # 4 bits are much noisier than 8


def test_act_quant_without_calibration_is_an_error(unet_and_data):
    unet, batches = unet_and_data
    qm = QuantModel(unet, QuantConfig(8, 8), specials=SPECIALS).init_weights_().set_quant_state(weight=True, act=True)
    x, t, c = batches[0]
    with pytest.raises(RuntimeError, match="never calibrated"):
        qm(x, t, context=c)


@torch.no_grad()
def test_save_load_reproduces_outputs_exactly(unet_and_data, tmp_path):
    from pipeline.artifacts import load_artifact, save_artifact
    from quant.quantizer import adaround_fake_quant
    unet, batches = unet_and_data
    qm = QuantModel(unet, QuantConfig(4, 8), specials=SPECIALS).init_weights_()
    qm.calibrate_activations_(batches[:1])
    for _, layer in qm.quant_layers():
        layer.init_adaround_()
        layer.alpha.add_(torch.randn_like(layer.alpha))  # as if reconstruction had moved the rounding
        alpha, s = layer.alpha.detach().clone(), layer.w_scheme
        layer.harden_()                                   # only the mask [α ≥ 0] is kept, as a bool
        assert layer.alpha is None and layer.round_up.dtype == torch.bool
        assert torch.equal(layer.quantized_weight(), adaround_fake_quant(
            layer.weight, layer.w_scale, layer.w_zero_point, alpha, s.qmin, s.qmax, hard=True))
    qm.set_quant_state(weight=True, act=True)
    x, t, c = batches[-1]
    ref = qm(x, t, context=c)
    path = save_artifact(tmp_path / "q.pt", "quant_model", {"w_bits": 4, "a_bits": 8},
                         {"quant_state": qm.quant_state_dict()})
    fresh = QuantModel(unet, QuantConfig(4, 8), specials=SPECIALS)
    fresh.load_quant_state_dict_(load_artifact(path, "quant_model", {"w_bits": 4})["quant_state"])
    fresh.set_quant_state(weight=True, act=True)
    assert torch.equal(fresh(x, t, context=c), ref)
    # masks are stored 8 per byte; a file from before the packing (bool masks) loads to the same model
    state = qm.quant_state_dict()
    name, layer = next(iter(qm.quant_layers()))
    assert state[name]["round_up_bits"].numel() == -(-layer.weight.numel() // 8)
    old = {n: ({k: v for k, v in d.items() if k != "round_up_bits"} | {"round_up": dict(qm.quant_layers())[n].round_up}
               if "round_up_bits" in d else d) for n, d in state.items()}
    legacy = QuantModel(unet, QuantConfig(4, 8), specials=SPECIALS).load_quant_state_dict_(old)
    legacy.set_quant_state(weight=True, act=True)
    assert torch.equal(legacy(x, t, context=c), ref)
    state[name]["round_up_bits"] = state[name]["round_up_bits"][:-1]
    with pytest.raises(ValueError, match="round-up mask of .* bytes, this layer needs"):
        QuantModel(unet, QuantConfig(4, 8), specials=SPECIALS).load_quant_state_dict_(state)
    with pytest.raises(ValueError, match="does not fit this model"):
        QuantModel(unet, QuantConfig(4, 8), specials=SPECIALS, filter_fn=quantize_all_policy).load_quant_state_dict_(
            qm.quant_state_dict())


def test_sqnr_of_a_zero_output_model_is_one_clear_error(unet_and_data):
    import copy

    from ldm.util import UserFacingError
    from quant.reconstruction import CalibrationData
    from quant.reconstruction import sqnr_db as model_sqnr_db
    unet, batches = unet_and_data
    zero = copy.deepcopy(unet)
    torch.nn.init.zeros_(zero.out[-1].weight)   # CompVis' initialisation of the output conv
    torch.nn.init.zeros_(zero.out[-1].bias)
    qm = QuantModel(zero, QuantConfig(8, None), specials=SPECIALS).init_weights_()
    x, t, c = batches[0]
    with pytest.raises(UserFacingError, match="identically zero on these 4 inputs, so no SQNR exists"):
        model_sqnr_db(qm, CalibrationData(x, t, c, torch.device("cpu")))


@torch.no_grad()
def test_compiled_kernels_give_the_fake_quant_model_exactly(unet_and_data, compiled_kernels):
    """``use_kernel_(COMPILED)`` (``--execution compiled``) on a W4A8 model with quantized attention matmuls and
    split skip convs: every activation quantizer switched, the UNet's output bit-identical to the passes'."""
    from quant.attention import ActQuantizer
    from quant.quantizer import FakeQuantKernel
    unet, batches = unet_and_data
    qm = QuantModel(unet, QuantConfig(4, 8, sm_abit=8, split_shortcut=True), specials=SPECIALS,
                    filter_fn=quantize_all_policy).init_weights_()
    qm.calibrate_activations_(batches[:2])
    qm.set_quant_state(weight=True, act=True)
    x, t, c = batches[-1]
    want = qm(x, t, context=c)
    qm.use_kernel_(FakeQuantKernel.COMPILED)
    kernels = {m.kernel for m in qm.modules() if isinstance(m, (QuantLayer, ActQuantizer))}
    assert kernels == {FakeQuantKernel.COMPILED}
    assert any(isinstance(m, ActQuantizer) for m in qm.modules()) and any(m.split for _, m in qm.quant_layers())
    assert torch.equal(qm(x, t, context=c), want)
