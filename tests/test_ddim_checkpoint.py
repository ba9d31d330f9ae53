"""The released pixel-DDPM checkpoints: cache paths as the original looks them up, MD5 verification of a present
file and of a download (through a file:// URL here: nothing is fetched from the network), and a strict load whose
refusals name the first mismatched keys."""
from __future__ import annotations

import pytest
import torch

from ldm.modules.diffusionmodules import ddim_checkpoint as K
from ldm.modules.diffusionmodules.ddim_unet import Model
from ldm.util import CheckpointError

TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, in_channels=3,
            resamp_with_conv=True, resolution=32)


def test_cache_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert K.released_path("ema_cifar10") == (tmp_path / "diffusion_models_converted" / "ema_diffusion_cifar10_model"
                                              / "model-790000.ckpt")
    with pytest.raises(CheckpointError, match="unknown released checkpoint 'lsun'"):
        K.released_path("lsun")


@pytest.fixture
def released_tiny(tmp_path, monkeypatch):
    """A tiny model's state_dict registered as a 'released' checkpoint with its real MD5."""
    torch.manual_seed(0)
    src = tmp_path / "upstream.ckpt"
    torch.save(Model(**TINY).state_dict(), src)
    monkeypatch.setitem(K.RELEASED, "tiny", (src.as_uri(), K.file_md5(src), "tiny_model/model.ckpt"))
    return src


def test_fetch_downloads_verifies_and_reuses(released_tiny, tmp_path):
    root = tmp_path / "cache"
    path = K.fetch_released("tiny", root)
    assert path == root / "tiny_model" / "model.ckpt" and path.read_bytes() == released_tiny.read_bytes()
    assert K.fetch_released("tiny", root) == path                      # present and verified: no download
    path.write_bytes(path.read_bytes()[:-100])                         # truncated
    with pytest.raises(CheckpointError, match="a corrupt or partial download; delete it"):
        K.fetch_released("tiny", root)


def test_a_bad_download_never_gets_the_final_name(released_tiny, tmp_path):
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"not the file")
    with pytest.raises(CheckpointError, match="has MD5 .* corrupt or incomplete"):
        K.fetch_released("tiny", tmp_path / "cache", url=other.as_uri())
    assert list((tmp_path / "cache").rglob("*")) in ([], [tmp_path / "cache" / "tiny_model"])
    with pytest.raises(CheckpointError, match="cannot download tiny"):
        K.fetch_released("tiny", tmp_path / "cache", url=(tmp_path / "missing").as_uri())


def test_strict_load_and_named_mismatches(released_tiny, tmp_path):
    model = K.load_unet_state(Model(**TINY), released_tiny)
    ref = torch.load(released_tiny, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
    wider = Model(**{**TINY, "ch": 64})
    with pytest.raises(CheckpointError, match=r"143 with other shapes: temb.dense.0.weight ckpt \[128, 32\] vs "
                                              r"model \[256, 64\]"):
        K.load_unet_state(wider, released_tiny)
    deeper = Model(**{**TINY, "num_res_blocks": 2})
    with pytest.raises(CheckpointError, match=r"missing: down.0.block.1.norm1.weight"):
        K.load_unet_state(deeper, released_tiny)
    training = tmp_path / "ckpt.pth"
    torch.save([{f"module.{k}": v for k, v in ref.items()}, {}, 1, 2, ref], training)
    with pytest.raises(CheckpointError, match="is a training checkpoint .* ckpt\\[-1\\]"):
        K.load_unet_state(Model(**TINY), training)
