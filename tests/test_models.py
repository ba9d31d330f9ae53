"""Model-code paths beyond cin256-v2: unconditional KL LDMs (LSUN style), legacy attention, EMA, training."""
from __future__ import annotations

import math

import pytest
import torch

import tiny_models
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, QKVAttention, QKVAttentionLegacy, ResBlock
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


@pytest.fixture(scope="module")
def uncond():
    return tiny_models.build(tiny_models.config(tiny_models.UNCOND_KL))


def test_unconditional_kl_model_structure(uncond):
    unet = uncond.model.diffusion_model
    assert uncond.model.conditioning_key is None and uncond.cond_stage_model is None
    assert any(isinstance(m, AttentionBlock) and m.num_heads == 2 for m in unet.modules())  # 32 ch / 16 per head
    assert any(isinstance(m, ResBlock) and m.updown for m in unet.modules())
    sd = uncond.state_dict()
    assert "scale_factor" in sd and sd["scale_factor"].ndim == 0  # scale_by_std makes it a buffer
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd
    assert sd["model_ema.num_updates"].dtype == torch.int32
    assert "model.diffusion_model.input_blocks.1.1.qkv.weight" in sd
    assert sd["model.diffusion_model.input_blocks.1.1.qkv.weight"].shape == (96, 32, 1)  # Conv1d
    x = torch.randn(2, 4, 8, 8)
    assert uncond.apply_model(x, torch.tensor([3, 900]), None).shape == x.shape


def test_kl_first_stage_round_trip_shapes(uncond):
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    post = uncond.encode_first_stage(img)
    assert isinstance(post, DiagonalGaussianDistribution) and post.mean.shape == (2, 4, 8, 8)
    z = uncond.get_first_stage_encoding(post)
    assert uncond.decode_first_stage(z).shape == img.shape
    torch.testing.assert_close(post.mode(), post.mean)
    assert (post.logvar <= 20).all() and (post.logvar >= -30).all()


def _naive_attention(qkv, heads, legacy):
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(b, heads, 3 * ch, t).split(ch, dim=2)
    else:
        q, k, v = (u.reshape(b, heads, ch, t) for u in qkv.chunk(3, dim=1))
    w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(ch), dim=-1)
    return torch.einsum("bhts,bhcs->bhct", w, v).reshape(b, heads * ch, t)


@pytest.mark.parametrize("cls,legacy", [(QKVAttentionLegacy, True), (QKVAttention, False)])
def test_qkv_attention_layouts(cls, legacy):
    qkv = torch.randn(2, 3 * 4 * 8, 10, dtype=torch.float64)
    torch.testing.assert_close(cls(4)(qkv), _naive_attention(qkv, 4, legacy))


def test_timestep_embedding_is_cos_first():
    t = torch.tensor([0, 7])
    e = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(e[1, :4], torch.cos(7 * freqs))
    torch.testing.assert_close(e[1, 4:], torch.sin(7 * freqs))
    assert timestep_embedding(t, 9).shape == (2, 9) and not timestep_embedding(t, 9)[:, -1].any()


def test_ema_update_and_scope(uncond):
    m = tiny_models.build(tiny_models.config(tiny_models.UNCOND_KL), seed=1)
    p_name, p = next((n, q) for n, q in m.model.named_parameters() if q.requires_grad)
    shadow = getattr(m.model_ema, m.model_ema.m_name2s_name[p_name])
    s0 = shadow.clone()
    with torch.no_grad():
        p.add_(1.0)
    m.model_ema(m.model)  # n = 1: d = min(0.9999, 2/11)
    torch.testing.assert_close(shadow, s0 - (1 - 2 / 11) * (s0 - p.detach()))
    live = p.detach().clone()
    with m.ema_scope():
        torch.testing.assert_close(p.detach(), shadow)
    torch.testing.assert_close(p.detach(), live)


def test_scale_by_std_sets_the_scale_from_the_first_batch():
    m = tiny_models.build(tiny_models.config(tiny_models.UNCOND_KL))
    batch = {"image": torch.rand(4, 32, 32, 3) * 2 - 1}
    torch.manual_seed(0)
    m.on_train_batch_start(batch, 0)
    torch.manual_seed(0)  # the KL posterior sample draws the same noise again
    z = m.first_stage_model.encode(batch["image"].permute(0, 3, 1, 2)).sample()
    torch.testing.assert_close(m.scale_factor, 1 / z.flatten().std())
    assert "scale_factor" in m.state_dict()


@pytest.mark.filterwarnings("ignore:You called `self.log")
def test_lightning_training_steps_update_unet_and_class_embedder(tmp_path):
    import pytorch_lightning as pl
    cfg = tiny_models.config(tiny_models.CLASS_COND)
    m = tiny_models.build(cfg)
    m.train()
    m.learning_rate = 1e-3
    before_unet = m.model.diffusion_model.out[2].weight.detach().clone()
    before_emb = m.cond_stage_model.embedding.weight.detach().clone()
    before_vq = m.first_stage_model.encoder.conv_in.weight.detach().clone()
    data = [{"image": torch.rand(4, 32, 32, 3) * 2 - 1, "class_label": torch.randint(0, 4, (4,))}
            for _ in range(2)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(m, loader)
    assert not torch.equal(before_unet, m.model.diffusion_model.out[2].weight)
    assert not torch.equal(before_emb, m.cond_stage_model.embedding.weight)
    assert torch.equal(before_vq, m.first_stage_model.encoder.conv_in.weight)  # first stage stays frozen
    assert not m.first_stage_model.training
