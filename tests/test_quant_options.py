"""Q-Diffusion's options on tiny random UNets: attention-matmul quantization (q, k, v, softmax at sm_abit) for
SpatialTransformer and legacy AttentionBlock attention, and shortcut splitting of the decoder skip convs."""
from __future__ import annotations

import pytest
import torch

import tiny_models
from pipeline.families import ModelFamily
from pipeline.families.compvis_attention import QuantCrossAttention, QuantQKVAttention
from quant.attention import ActQuantizer
from quant.config import QuantConfig
from quant.model import QuantModel
from quant.quantizer import choose_qparams
from quant.reconstruction import CalibrationData, Phase, ReconConfig, find_units, reconstruct_, sqnr_db

SPECIALS = ModelFamily().quant_specials()   # the default, CompVis' UNetModel: both tiny LDM families'


@pytest.fixture(scope="module", params=["CLASS_COND", "UNCOND_KL"])
def unet_and_data(request):
    torch.set_num_threads(1)
    base = getattr(tiny_models, request.param)
    model = tiny_models.build(tiny_models.config(base))
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    c = model.params_cond = None
    if model.is_conditional:
        c = model.get_learned_conditioning({"class_label": torch.tensor([0, 1, 2, 3] * 4)}).detach()
    x = torch.randn(16, unet.in_channels, 8, 8, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    return request.param, unet, CalibrationData(x, t, c, torch.device("cpu"))


@torch.no_grad()
def test_attention_quantization(unet_and_data):
    name, unet, data = unet_and_data
    qm = QuantModel(unet, QuantConfig(8, 8, sm_abit=8, policy="all"), specials=SPECIALS).init_weights_()
    wrappers = [m for m in qm.modules() if isinstance(m, (QuantCrossAttention, QuantQKVAttention))]
    assert wrappers and len(list(qm.act_quantizers())) == 4 * len(wrappers)
    x, t, c = next(data.batches(16))
    assert torch.equal(qm(x, t, context=c), unet(x, t, context=c))  # all off: the fused FP attention, exactly
    qm.set_quant_state(weight=True)
    qm.calibrate_activations_(data.batches(8))
    assert all(q.a_ready for _, q in qm.act_quantizers())
    sm = [q for n, q in qm.act_quantizers() if n.endswith("sm_quant")]
    assert all(float(q.a_zero_point) == 0 for q in sm)  # probabilities: unsigned grid, z = 0
    qm.set_quant_state(weight=True, act=True)
    with_attn = sqnr_db(qm, data, act=True)
    assert with_attn > 20, with_attn
    out = qm(x, t, context=c)
    for _, q in qm.act_quantizers():
        q.enabled = False
    assert not torch.equal(qm(x, t, context=c), out)  # the matmul quantizers do act
    qm.set_quant_state(weight=True, act=True)
    # exact round trip of the state, attention quantizers included
    again = QuantModel(unet, QuantConfig(8, 8, sm_abit=8, policy="all"), specials=SPECIALS)
    again.load_quant_state_dict_(qm.quant_state_dict()).set_quant_state(weight=True, act=True)
    assert torch.equal(again(x, t, context=c), qm(x, t, context=c))
    with pytest.raises(ValueError, match="bits"):
        QuantModel(unet, QuantConfig(8, 8, sm_abit=16, policy="all"), specials=SPECIALS).load_quant_state_dict_(
            qm.quant_state_dict())
    # the activation phase learns the matmul quantizers' steps too
    before = {n: float(q.a_scale) for n, q in qm.act_quantizers()}
    reconstruct_(qm, data, Phase.ACTIVATION, ReconConfig.activation_defaults(iters=3, cache_batch_size=16),
                 progress=False)
    assert any(float(q.a_scale) != before[n] for n, q in qm.act_quantizers())
    assert all(isinstance(q, ActQuantizer) for u in find_units(qm) for q in u.act_quantizers())


@torch.no_grad()
def test_shortcut_split(unet_and_data):
    name, unet, data = unet_and_data
    # the split is the channel count of h in [h ; skip]: check it against a real forward
    seen = {}
    outs = []

    def record_in(i, args):
        seen[f"in{i}"] = args[0].shape[1]

    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: record_in(i, a))
             for i, blk in enumerate(unet.output_blocks)]
    hooks += [blk.register_forward_hook(lambda m, a, o: outs.append(o.shape[1]) and None)
              for blk in unet.input_blocks]
    x, t, c = next(data.batches(2))
    unet(x, t, context=c)
    for h in hooks:
        h.remove()
    splits = SPECIALS.shortcut_splits(unet)
    assert splits
    for fqn, split in splits.items():
        i = int(fqn.split(".")[1])
        assert split == seen[f"in{i}"] - outs[-(i + 1)]
    qm = QuantModel(unet, QuantConfig(4, 8, split_shortcut=True, policy="all"), specials=SPECIALS).init_weights_()
    layers = dict(qm.quant_layers())
    layer = layers[next(iter(splits))]
    split = layer.split
    assert split == splits[next(iter(splits))]
    w = layer.weight
    s1, _ = choose_qparams(w[:, :split], layer.w_scheme)
    s2, _ = choose_qparams(w[:, split:], layer.w_scheme)
    assert torch.equal(layer.w_scale[:, :split], s1.expand_as(w[:, :split]))
    assert torch.equal(layer.w_scale[:, split:], s2.expand_as(w[:, split:]))
    qm.set_quant_state(weight=True)
    qm.calibrate_activations_(data.batches(8))
    assert layer.a_scale.shape == (2,) and layer.a_scale[0] != layer.a_scale[1]
    qm.set_quant_state(weight=True, act=True)
    out = qm(x, t, context=c)
    again = QuantModel(unet, QuantConfig(4, 8, split_shortcut=True, policy="all"), specials=SPECIALS)
    again.load_quant_state_dict_(qm.quant_state_dict()).set_quant_state(weight=True, act=True)
    assert torch.equal(again(x, t, context=c), out)
    with pytest.raises(ValueError, match="split"):
        QuantModel(unet, QuantConfig(4, 8, policy="all"), specials=SPECIALS).load_quant_state_dict_(
            qm.quant_state_dict())
    # the D²-DPM policy keeps skip convs in FP32: nothing to split
    d2 = QuantModel(unet, QuantConfig(4, 8, split_shortcut=True), specials=SPECIALS)
    assert not any(m.split for _, m in d2.quant_layers())
