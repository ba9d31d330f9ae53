"""The layer policy on the cin256-v2 UNet (built on the meta device)."""
from __future__ import annotations

from collections import Counter

import torch

from conftest import REPO
from ldm.util import instantiate_from_config, load_config
from quant.policy import QUANTIZABLE, Precision, d2dpm_policy, quantize_all_policy


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
