"""The committed embedded default: checkpoints load (weights_only), sample finite images, classify well."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO
from evaluation.fashion_classifier import compute_features, load_fashion_classifier
from evaluation.fashion_reference import DEFAULT_OUT
from ldm.models.diffusion.settings import SamplingSettings
from ldm.models.autoencoder import VQModelInterface
from ldm.modules.attention import SpatialTransformer
from ldm.modules.encoders.modules import ClassEmbedder
from ldm.sample import decode_latents, null_class, sample_latents
from ldm.util import load_config, load_model_from_config

MODEL_DIR = REPO / "models" / "ldm" / "fashion-ldm-vq-4"


@pytest.fixture(scope="module")
def fashion():
    return load_model_from_config(load_config(MODEL_DIR / "config.yaml"), MODEL_DIR / "model.ckpt")


@pytest.fixture(scope="module")
def classifier():
    return load_fashion_classifier()


def test_structure_is_cin256_like(fashion):
    assert isinstance(fashion.first_stage_model, VQModelInterface)
    assert isinstance(fashion.cond_stage_model, ClassEmbedder) and null_class(fashion) == 10
    assert any(isinstance(m, SpatialTransformer) for m in fashion.model.diffusion_model.modules())
    assert fashion.model.conditioning_key == "crossattn" and float(fashion.scale_factor) > 0
    sd = torch.load(MODEL_DIR / "model.ckpt", map_location="cpu", weights_only=True)
    assert set(sd) >= {"state_dict", "global_step"} and sd["global_step"] > 0


def test_short_guided_sampling_gives_finite_recognisable_images(fashion, classifier):
    """One short FP32 run: 2 samples of each class, 10 DDIM steps, scale 3."""
    labels = [c for c in range(10) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    z = sample_latents(fashion, labels, settings=SamplingSettings(10, 0.0, 3.0),
                       generator=g, batch_size=20, progress=False)
    images = decode_latents(fashion, z)
    assert images.shape == (20, 1, 32, 32) and torch.isfinite(images).all()
    assert images.std() > 0.2  # not a constant image
    from evaluation.images import to_uint8
    pred = compute_features(classifier, to_uint8(images))["logits"].argmax(1)
    assert (pred == np.array(labels)).mean() >= 0.7


def test_reference_batch_layout_and_classifier_accuracy(classifier):
    ref = np.load(DEFAULT_OUT)
    assert ref["arr_0"].shape == (10000, 32, 32, 3) and ref["arr_0"].dtype == np.uint8
    assert ref["mu"].shape == (classifier.pool_dim,) and ref["sigma"].shape == (classifier.pool_dim,) * 2
    d_s = 8 * 8 * classifier.spatial_channels
    assert ref["mu_s"].shape == (d_s,) and ref["sigma_s"].shape == (d_s, d_s)
    feats = compute_features(classifier, ref["arr_0"][:1000])
    assert (feats["logits"].argmax(1) == ref["arr_1"][:1000]).mean() >= 0.9
    np.testing.assert_allclose(feats["softmax"].sum(1), 1, rtol=1e-5)


def test_committed_files_stay_small():
    files = [p for d in (MODEL_DIR, REPO / "models" / "eval") for p in d.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total < 40e6, f"committed models take {total / 1e6:.1f} MB"
