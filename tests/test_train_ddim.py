"""train_ddim.py (the embedded pixel default's trainer) on generated Fashion-MNIST-format files: an interrupted run
resumes to the same weights, the export is a plain state_dict the pixel family loads strictly, bad configs are one
line."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util

import numpy as np
import pytest
import torch
import yaml

import ldm.data.fashion as fm
from conftest import REPO, idx_bytes
from ldm.util import UserFacingError

TINY = {"data": {"dataset": "FashionMNIST", "image_size": 32, "channels": 1, "random_flip": True, "rescaled": True},
        "model": {"type": "simple", "in_channels": 1, "out_ch": 1, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [16], "dropout": 0.1, "ema_rate": 0.9, "resamp_with_conv": True},
        "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                      "num_diffusion_timesteps": 1000},
        "training": {"batch_size": 3, "n_iters": 4, "snapshot_freq": 2, "seed": 0},
        "optim": {"weight_decay": 0.0, "optimizer": "Adam", "lr": 0.001, "warmup": 2, "beta1": 0.9, "amsgrad": False,
                  "eps": 1e-8, "grad_clip": 1.0}}


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """5,008 'training' images: the first 8 are the training subset (the last 5,000 are held out)."""
    rng = np.random.default_rng(0)
    hashes = {}
    for split, n in (("train", fm.HELDOUT + 8), ("test", 4)):
        img_name, lbl_name = fm.FILES[split]
        for name, arr in ((img_name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                          (lbl_name, np.arange(n, dtype=np.uint8) % 10)):
            data = idx_bytes(arr)
            hashes[name] = hashlib.sha256(data).hexdigest()
            (tmp_path / name).write_bytes(gzip.compress(data))
    monkeypatch.setattr(fm, "SHA256", hashes)
    return tmp_path


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_ddim", REPO / "train_ddim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_config(path, **changes) -> str:
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    for section, values in changes.items():
        cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_resume_gives_the_same_weights_and_the_family_loads_the_export(trainer, data_dir, tmp_path):
    cfg = write_config(tmp_path / "tiny-ddim.yml")
    common = ["--config", cfg, "--data_root", str(data_dir)]
    trainer.main(common + ["--logdir", str(tmp_path / "a"), "--out", str(tmp_path / "a" / "model.ckpt")])
    b = ["--logdir", str(tmp_path / "b"), "--out", str(tmp_path / "b" / "model.ckpt")]
    trainer.main(common + b + ["--n_iters", "2"])          # interrupted after 2 steps ...
    trainer.main(common + b)                                # ... and resumed
    sd_a = torch.load(tmp_path / "a" / "model.ckpt", weights_only=True)
    sd_b = torch.load(tmp_path / "b" / "model.ckpt", weights_only=True)
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)

    from ldm.util import load_config
    from pipeline.families import family_for
    config = load_config(tmp_path / "a" / "config.yml")
    family = family_for(config)
    model = family.load(config, tmp_path / "a" / "model.ckpt", device=torch.device("cpu"))
    assert family.name == "pixel-ddpm" and family.latent_shape(model) == (1, 32, 32)
    images = family.decode(model, torch.randn(2, 1, 32, 32))
    assert images.shape == (2, 3, 32, 32)                   # grayscale repeated to RGB for the evaluator


def test_bad_training_configs_are_one_line(trainer, tmp_path):
    with pytest.raises(UserFacingError, match="cannot be trained here"):
        trainer.main(["--config", write_config(tmp_path / "c.yml", data={"dataset": "CIFAR10"})])
    (tmp_path / "d.yml").write_text("model: {}\n")
    with pytest.raises(UserFacingError, match="no 'data' section"):
        trainer.main(["--config", str(tmp_path / "d.yml")])
