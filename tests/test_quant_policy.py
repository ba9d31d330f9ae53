"""The layer policies on the cin256-v2 UNet (built on the meta device), as the CompVis family provides them."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import REPO
from ldm.util import instantiate_from_config, load_config
from pipeline.families.compvis_ldm import ClassConditionalLDM
from quant.policy import POLICIES, QUANTIZABLE, Precision, quantize_all_policy

SPECIALS = ClassConditionalLDM().quant_specials()
d2dpm_policy = SPECIALS.policy("d2dpm")


def test_d2dpm_policy_on_cin256():
    cfg = load_config(REPO / "configs" / "latent-diffusion" / "cin256-v2.yaml")
    with torch.device("meta"):
        unet = instantiate_from_config(cfg.model.params.unet_config)
    roles = {n: d2dpm_policy(n, m) for n, m in unet.named_modules() if isinstance(m, QUANTIZABLE)}
    fp32 = sorted(n for n, r in roles.items() if r is Precision.FP32)
    eight = sorted(n for n, r in roles.items() if r is Precision.EIGHT_BIT)
    assert eight == ["input_blocks.0.0", "out.2", "time_embed.0"]
    assert [n for n in fp32 if n.endswith(".op")] == ["input_blocks.3.0.op", "input_blocks.6.0.op",
                                                       "input_blocks.9.0.op"]
    skips = [n for n in fp32 if "skip_connection" in n]
    # 1×1 skip convs where a ResBlock changes width: 3 in the encoder, 12 in the decoder, none in the middle
    assert len(skips) == 15 and len(fp32) == 18
    assert roles["time_embed.2"] is Precision.TARGET
    assert roles["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] is Precision.TARGET
    counts = Counter(roles.values())
    assert counts[Precision.TARGET] == len(roles) - 21
    assert all(quantize_all_policy(n, unet.get_submodule(n)) is Precision.TARGET for n in roles)
    assert d2dpm_policy("norm", torch.nn.GroupNorm(32, 64)) is Precision.FP32
    sd = SPECIALS.policy("qncd-sd")
    assert [n for n in roles if sd(n, unet.get_submodule(n)) is Precision.FP32] == \
        [n for n in roles if ".transformer_blocks." in n]
    assert set(SPECIALS.policies) == set(POLICIES)             # every policy name the CLI offers
    with pytest.raises(ValueError, match="unknown layer policy 'nope'; this model family knows"):
        SPECIALS.policy("nope")
