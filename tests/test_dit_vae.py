"""The VAE DiT decodes with, read from a diffusers-format folder into the CompVis AutoencoderKL
(ldm.models.diffusers_vae, ldm.safetensors_file) against ../shared/fixtures/dit (key map, manifest, tiny VAE and
the original's decode/encode outputs)."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from conftest import SHARED, require_shared
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusers_vae import (DIFFUSERS_DEFAULT_SCALING, compvis_ddconfig, compvis_key, load_diffusers_vae,
                                      to_compvis_state)
from ldm.safetensors_file import load_safetensors
from ldm.util import CheckpointError, ConfigError, UserFacingError

DIT = SHARED / "fixtures" / "dit"


def assert_rel(ours, ref, name, rel=1e-5):
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"{name}: max |ours - ref| = {err:.3e}"


@pytest.fixture(scope="module")
def key_map():
    return json.loads(require_shared(DIT / "vae_key_map.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    folder = require_shared(DIT / "small")
    load = lambda name: torch.load(folder / name, map_location="cpu", weights_only=True)  # noqa: E731
    return folder / "vae", load("inputs.pt"), load("outputs.pt")


def copy_folder(src, dst, config_change=None):
    dst.mkdir()
    shutil.copy(src / "diffusion_pytorch_model.safetensors", dst)
    config = json.loads((src / "config.json").read_text())
    config.update(config_change or {})
    config = {k: v for k, v in config.items() if v is not ...}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_key_map_rules_reproduce_the_verified_map(key_map):
    for table, levels in (("tiny", 4), ("full_size_sd_vae_ft_ema", 4)):
        rows = key_map[table]
        for row in rows:
            assert compvis_key(row["diffusers"], levels) == row["compvis"], row["diffusers"]
        sd = {r["diffusers"]: torch.empty(r["diffusers_shape"], device="meta") for r in rows}
        mapped = to_compvis_state(sd, levels)
        assert {k: list(v.shape) for k, v in mapped.items()} == {r["compvis"]: r["compvis_shape"] for r in rows}
    assert len(key_map["full_size_sd_vae_ft_ema"]) == key_map["num_keys_full"] == 248


def test_full_size_config_builds_the_compvis_kl_f8(key_map):
    manifest = json.loads(require_shared(DIT / "vae_manifest.json").read_text())
    ddconfig, embed_dim = compvis_ddconfig(manifest["hub_config_json"])
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=embed_dim)
    sd = model.state_dict()
    assert list(sd) == key_map["compvis_verification"]["full_size"]["compvis_key_order"]
    assert sum(v.numel() for v in sd.values()) == manifest["num_parameters"] == 83_653_863
    diffusers = {e["key"]: torch.empty(e["shape"], device="meta") for e in manifest["keys"]}
    mapped = to_compvis_state(diffusers, 4)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in sd.items()}


def test_tiny_vae_decodes_and_encodes_as_diffusers(tiny, one_thread):
    folder, inputs, outputs = tiny
    vae = load_diffusers_vae(folder)
    assert vae.scale_factor == 0.18215 and "scaling_factor" in vae.scale_source
    assert sum(p.numel() for p in vae.model.parameters()) == 1_028_935
    with torch.no_grad():
        assert_rel(vae.decode(inputs["vae_latents"]), outputs["vae_decode"], "decode")
        assert_rel(vae.decode(outputs["ddpm_samples"]), outputs["e2e_images"], "e2e decode")
        posterior = vae.model.encode(inputs["vae_images"])
        assert_rel(posterior.mean, outputs["vae_enc_mean"], "encoder mean")
        assert_rel(posterior.logvar, outputs["vae_enc_logvar"], "encoder logvar")
        assert_rel(posterior.std, outputs["vae_enc_std"], "encoder std")


def test_scale_factor_comes_from_the_config(tiny, tmp_path, one_thread):
    folder, inputs, _ = tiny
    hub_like = load_diffusers_vae(copy_folder(folder, tmp_path / "hub", {"scaling_factor": ...}))
    assert hub_like.scale_factor == DIFFUSERS_DEFAULT_SCALING and "default" in hub_like.scale_source
    other = load_diffusers_vae(copy_folder(folder, tmp_path / "half", {"scaling_factor": 0.5}))
    z = inputs["vae_latents"]
    with torch.no_grad():
        assert torch.equal(other.decode(z), other.model.decode(z / 0.5))
        assert not torch.allclose(other.decode(z), hub_like.decode(z))


def test_bin_weights_and_old_attention_names(tiny, tmp_path, one_thread):
    folder, inputs, outputs = tiny
    sd = load_safetensors(folder / "diffusion_pytorch_model.safetensors")
    old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
            .replace("to_out.0.", "proj_attn."): v for k, v in sd.items()}
    assert sum(k != o for k, o in zip(sd, old)) == 16   # as the fixture's deprecated-names check
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    shutil.copy(folder / "config.json", pipeline / "vae")
    torch.save(old, pipeline / "vae" / "diffusion_pytorch_model.bin")
    vae = load_diffusers_vae(pipeline)   # a whole pipeline folder: its vae/ is used
    with torch.no_grad():
        assert_rel(vae.decode(inputs["vae_latents"]), outputs["vae_decode"], "decode from .bin")


def test_bad_folders_are_one_line(tiny, tmp_path):
    folder, _, _ = tiny
    with pytest.raises(CheckpointError, match="no VAE config.json"):
        load_diffusers_vae(tmp_path)
    with pytest.raises(ConfigError, match="norm_num_groups = 16"):
        load_diffusers_vae(copy_folder(folder, tmp_path / "groups", {"norm_num_groups": 16}))
    with pytest.raises(ConfigError, match="UpDecoderBlock2D"):
        load_diffusers_vae(copy_folder(folder, tmp_path / "blocks", {"up_block_types": ["UpDecoderBlock2D"]}))
    sd = load_safetensors(folder / "diffusion_pytorch_model.safetensors")
    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(folder / "config.json", missing)
    torch.save({k: v for k, v in sd.items() if "conv_out.bias" not in k}, missing / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"2 missing: encoder.conv_out.bias \[8\], decoder.conv_out.bias"):
        load_diffusers_vae(missing)
    (missing / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="has config.json but no weights"):
        load_diffusers_vae(missing)


def write_safetensors(path, tensors: dict, metadata=None):
    """A safetensors file written by hand from the format description (8-byte length, JSON header, raw bytes)."""
    header, blobs, offset = {}, [], 0
    names = {torch.float32: "F32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16"}
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_reader(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).half(),
               "d": torch.randn(3).bfloat16(), "e": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "ok.safetensors", tensors, {"format": "pt"})
    loaded = load_safetensors(tmp_path / "ok.safetensors")
    assert list(loaded) == list(tensors)
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in tensors.items())
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(UserFacingError, match="do not fit the file"):
        load_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserFacingError, match="header length .* is impossible"):
        load_safetensors(tmp_path / "junk.safetensors")
