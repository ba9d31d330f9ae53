"""DiT's training objective (ldm.models.diffusion.dit_training: Improved DDPM's hybrid loss) against closed forms,
and train_dit.py's seeded batches and its export in DiT's train.py layout."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, load_script
from ldm.models.diffusion.dit_training import (TrainingTables, discretized_gaussian_log_likelihood, hybrid_loss,
                                               normal_kl, q_sample, vlb_bits)
from ldm.models.dit_checkpoint import load_dit_state, read_dit_checkpoint
from ldm.modules.dit import DiT


@pytest.fixture(scope="module")
def tables():
    return TrainingTables.make(1000)


def test_normal_kl_is_the_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    assert float(normal_kl(m1, lv1, m1, lv1).abs().max()) < 1e-15


def test_discretized_likelihood_sums_to_one_over_the_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.0, math.log(0.1)), (0.93, math.log(0.02)), (-0.4, math.log(0.5))):
        logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)
        if log_scale < math.log(0.1) + 1e-9:   # narrow: the bin holding the mean is the likeliest (wide: an edge)
            assert int(logp.argmax()) == int(((mean + 1) * 127.5 + 0.5) // 1)


def test_tables_are_the_linear_schedule(tables):
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(tables.sqrt_alphas_cumprod.numpy(), np.sqrt(abar), rtol=1e-6)
    np.testing.assert_allclose(tables.log_betas.numpy(), np.log(betas), rtol=1e-5)
    post = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    np.testing.assert_allclose(tables.posterior_log_variance_clipped[1:].numpy(), np.log(post), rtol=1e-5)
    assert tables.sqrt_alphas_cumprod.dtype == torch.float32 and len(tables) == 1000


def test_vlb_is_zero_for_the_true_posterior_and_the_closed_form_at_v_plus_one(tables):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 10, 500, 999])
    x_t = q_sample(tables, x0, t, noise)
    exact = vlb_bits(tables, x0, x_t, t, noise, -torch.ones_like(x0))      # ε exact, v = −1: Σ = β̃
    assert float(exact.abs().max()) < 2e-4
    # v = +1 (Σ = β'), mean exact: KL = ½(−1 + log β − log β̃ + β̃/β) per element, in bits
    upper = vlb_bits(tables, x0, x_t, t, noise, torch.ones_like(x0))
    lb, lmin = tables.log_betas[t].double(), tables.posterior_log_variance_clipped[t].double()
    closed = 0.5 * (-1 + lb - lmin + torch.exp(lmin - lb)) / math.log(2)
    torch.testing.assert_close(upper.double(), closed, rtol=1e-3, atol=2e-5)
    # t = 0 is the decoder's negative log-likelihood: positive, and small where the mean is right
    t0 = torch.zeros(4, dtype=torch.long)
    nll = vlb_bits(tables, x0, q_sample(tables, x0, t0, noise), t0, noise, -torch.ones_like(x0))
    wrong = vlb_bits(tables, x0, q_sample(tables, x0, t0, noise), t0, noise + 1, -torch.ones_like(x0))
    assert bool((nll > 0).all()) and bool((wrong > nll + 1).all())


def test_hybrid_loss_trains_v_only_through_the_bound(tables):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 3, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([5, 300, 900])
    x_t = q_sample(tables, x0, t, noise)
    out = torch.randn(3, 6, 4, 4, generator=g, requires_grad=True)
    terms = hybrid_loss(out, tables, x0, x_t, t, noise)
    terms["loss"].sum().backward()
    # ε's gradient is L_simple's alone: −2(ε − ε_θ)/n per sample
    torch.testing.assert_close(out.grad[:, :3], -2 * (noise - out.detach()[:, :3]) / 48)
    assert float(out.grad[:, 3:].abs().max()) > 0
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    with pytest.raises(ValueError, match="2·3 channels"):
        hybrid_loss(out[:, :5], tables, x0, x_t, t, noise)


def test_training_batches_are_seeded_and_the_export_is_dit_train_py_layout(tmp_path):
    train = load_script(REPO / "train_dit.py")
    latents, labels = torch.randn(100, 3, 8, 8), torch.arange(100) % 10
    a, b, c = (train.step_batch(latents, labels, step, 0, 16, 1000) for step in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[3], c[3])
    config = OmegaConf.create({
        "model": {"target": "ldm.modules.dit.DiT", "params": dict(input_size=8, patch_size=2, in_channels=3,
                                                                  hidden_size=32, depth=1, num_heads=2,
                                                                  num_classes=10, learn_sigma=True)},
        "image_size": 32, "first_stage": {"ldm_folder": "models/ldm/fashion-ldm-vq-4"},
        "training": {"batch_size": 16, "seed": 0, "steps": 3, "ema_decay": 0.9, "lr": 1e-3, "warmup": 0}})
    model = DiT(**config.model.params)
    ema = {k: v.detach().clone() + (0.0 if k == "pos_embed" else 0.5) for k, v in model.state_dict().items()}
    out = tmp_path / "dit" / "model.pt"
    (tmp_path / "c.yaml").write_text(OmegaConf.to_yaml(config))
    train.export(model, ema, 3, [(1.0, 0.9, 0.1)] * 3, tmp_path / "c.yaml", config, out, 100)
    sd, args = read_dit_checkpoint(out)
    assert args["num_classes"] == 10 and args["steps"] == 3 and args["model"] == "c"
    loaded = load_dit_state(DiT(**config.model.params), out)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k               # the EMA weights are the ones loaded
    assert (out.parent / "config.yaml").is_file() and (out.parent / "training.json").is_file()
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(out, weights_only=True, map_location="cpu")
    assert set(raw) == {"model", "ema", "args"} and isinstance(raw["args"], argparse.Namespace)
    assert not torch.equal(raw["model"]["blocks.0.attn.qkv.weight"], raw["ema"]["blocks.0.attn.qkv.weight"])
