"""Families own their quantization specials (issue 30): a family defined here, at test time, with a residual block
class quant/ has never seen and its own ``QuantSpecials``, is quantized through ``quant.api.quantize`` and the
pipeline's ``make_quant_model``: its blocks are BRECQ units, QNCD's smoothing and Q-Diffusion's shortcut split land
where its specials say, its layer policy is used by name, all without an edit to quant/. quant/ itself holds no model
code: no module of it imports the network modules of ldm/."""
from __future__ import annotations

import ast

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from conftest import REPO
from pipeline.families import ModelFamily, family_for, register, unregister
from pipeline.families.base import config_target
from pipeline.quantize import make_quant_model
from quant.api import QuantConfig, QuantSpecials, SmoothingSite, quantize, quantized_state
from quant.layers import QuantLayer
from quant.policy import D2DPMPolicy, Precision, quantize_all_policy
from quant.reconstruction import CalibrationData, Phase, ReconConfig, find_units, reconstruct_
from quant.smoothing import ChannelSmoothing, apply_smoothing_, smoothing_factors

CH, EMB = 8, 16


class Mixer(nn.Module):
    """A residual block of a layout no family has: e = proj(emb) after conv_a, then mix = [GroupNorm, SiLU,
    Dropout] and out_conv; a 1×1 ``skip`` conv where the widths differ."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.out_channels = cout
        self.conv_a = nn.Conv2d(cin, cout, 3, padding=1)
        self.proj = nn.Linear(EMB, cout)
        self.mix = nn.Sequential(nn.GroupNorm(4, cout), nn.SiLU(), nn.Dropout(0.0))
        self.out_conv = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv_a(x) + self.proj(emb)[:, :, None, None]
        return self.skip(x) + self.out_conv(self.mix(h))


class TinyNet(nn.Module):
    """UNet-like: an encoder Mixer, a decoder Mixer over cat([h ; skip]), a time embedding of t alone."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Sequential(nn.Linear(1, EMB), nn.SiLU(), nn.Linear(EMB, EMB))
        self.inp = nn.Conv2d(3, CH, 3, padding=1)
        self.down = Mixer(CH, 2 * CH)
        self.up = Mixer(2 * CH + CH, CH)
        self.out = nn.Conv2d(CH, 3, 3, padding=1)

    def embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.emb(t.float()[:, None] / 1000)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context=None) -> torch.Tensor:
        e = self.embedding(t)
        h0 = self.inp(x)
        h1 = self.down(h0, e)
        return self.out(self.up(torch.cat([h1, h0], 1), e))


# everything the family knows about its network, in one place (as pipeline/families/<name>.py would hold it)
SPECIALS = QuantSpecials(
    unit_types=(Mixer,),
    smoothing_sites=(SmoothingSite(Mixer, norm="mix.0", conv="out_conv", slot="mix.2",
                                   time_embedding=lambda net, t: net.embedding(t),
                                   block_embedding=lambda block, e: block.proj(e)),),
    shortcut_splits=lambda net: {"up.skip": net.down.out_channels},   # the decoder's input is [h1 ; h0]
    policies={"all": quantize_all_policy,
              "d2dpm": D2DPMPolicy(eight_bit=("inp", "out"), fp32_parts=("skip",), fp32_suffixes=())})


class ThrowawayFamily(ModelFamily):
    name = "test-throwaway"
    description = "a network with its own residual blocks (test plug-in)"

    def matches(self, config) -> bool:
        return config_target(config) == "tests.TinyNet"

    def unet(self, model: nn.Module) -> nn.Module:
        return model

    def unet_model_fn(self, model: nn.Module, unet: nn.Module):
        return lambda x, t, c: unet(x, t)

    def quant_specials(self) -> QuantSpecials:
        return SPECIALS


@pytest.fixture
def family():
    fam = register(ThrowawayFamily())
    yield fam
    unregister(fam)


def net_and_data(seed: int = 0) -> tuple[TinyNet, CalibrationData]:
    torch.manual_seed(seed)
    net = TinyNet().eval()
    for m in net.modules():   # non-trivial γ: S is not all ones
        if isinstance(m, nn.GroupNorm):
            m.weight.data = torch.rand_like(m.weight) + 0.5
    g = torch.Generator().manual_seed(1)
    data = CalibrationData(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g), None,
                           torch.device("cpu"))
    return net, data


def test_the_familys_blocks_are_units_and_its_policy_is_used_by_name():
    torch.set_num_threads(1)
    net, _ = net_and_data()
    qm = quantize(net, QuantConfig(w_bits=4, a_bits=8), "all", specials=SPECIALS)
    units = find_units(qm)
    assert [u.name for u in units] == ["emb.0", "emb.2", "inp", "down", "up", "out"]
    assert [u.name for u in units if u.is_block] == ["down", "up"]
    d2 = quantize(net, QuantConfig(w_bits=4, a_bits=8), specials=SPECIALS)   # "d2dpm", the family's predicate
    kinds = {n: m.precision for n, m in d2.quant_layers()}
    assert kinds["inp"] is kinds["out"] is Precision.EIGHT_BIT and "down.skip" not in kinds
    assert [u.name for u in find_units(d2)] == ["emb.0", "emb.2", "down", "up"]   # 8-bit layers not reconstructed
    # the knowledge is the specials': CompVis' default knows no Mixer, so every layer is its own unit
    plain = quantize(net, QuantConfig(w_bits=4, a_bits=8), "all", specials=ModelFamily().quant_specials())
    assert not any(u.is_block for u in find_units(plain))
    with pytest.raises(ValueError, match="unknown layer policy 'qncd-sd'; this model family knows"):
        quantize(net, QuantConfig(w_bits=4), "qncd-sd", specials=SPECIALS)


def test_smoothing_and_the_shortcut_split_land_where_the_specials_say():
    torch.set_num_threads(1)
    net, data = net_and_data()
    config = QuantConfig(w_bits=4, a_bits=8, split_shortcut=True)
    qm = quantize(net, config, "all", specials=SPECIALS)
    assert qm.model.up.skip.split == 2 * CH and qm.model.down.skip.split is None
    x, t, _ = next(data.batches(8))
    with torch.no_grad():
        before = qm(x, t)
    factors = smoothing_factors(qm, data)
    assert set(factors) == {"down", "up"} and factors["down"].shape == (2 * CH,)
    apply_smoothing_(qm, factors)
    assert isinstance(qm.model.down.mix[2], ChannelSmoothing) and isinstance(qm.model.down.out_conv, QuantLayer)
    with torch.no_grad():   # quantization off: the smoothed model is the FP function
        torch.testing.assert_close(qm(x, t), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass specials=family.quant_specials()"):
        smoothing_factors(net, data)   # a bare network: only its family knows its blocks
    qm.init_weights_()
    reconstruct_(qm, data, Phase.WEIGHT, ReconConfig(iters=2, batch_size=4), progress=False)   # Mixer(x, emb)
    qm.set_quant_state(weight=True).calibrate_activations_(data.batches(8)).set_quant_state(weight=True, act=True)
    with torch.no_grad():
        ref = qm(x, t)
    other, _ = net_and_data(seed=0)
    again = quantize(other, config, "all", state=quantized_state(qm, smoothed=True), specials=SPECIALS)
    again.set_quant_state(weight=True, act=True)
    with torch.no_grad():
        assert torch.equal(again(x, t), ref)   # smoothing, split and rounding restored exactly


def test_the_pipeline_builds_the_familys_quant_model(family):
    cfg = OmegaConf.create({"model": {"target": "tests.TinyNet"}})
    assert family_for(cfg) is family
    net, _ = net_and_data()
    meta = {"w_bits": 4, "a_bits": 8, "policy": "d2dpm", "channel_wise": False, "split_shortcut": True}
    qm = make_quant_model(net, meta, family=family)
    ref = quantize(net, QuantConfig(w_bits=4, a_bits=8, split_shortcut=True), "d2dpm", specials=SPECIALS)
    assert {n: (m.precision, m.split) for n, m in qm.quant_layers()} == \
        {n: (m.precision, m.split) for n, m in ref.quant_layers()}


def test_quant_holds_no_network_code():
    """Model families' networks live in ldm.modules; quant/ reaches them only through the specials (the attention
    wrappers too: ``QuantSpecials.attention``, CompVis' in pipeline/families/compvis_attention.py)."""
    offenders = []
    for path in sorted((REPO / "quant").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("ldm.modules")]
    assert not offenders
