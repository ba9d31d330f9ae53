"""Safe checkpoint loading and the one-line errors for bad configs and checkpoints."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import tiny_models
from ldm.util import (CheckpointError, ConfigError, instantiate_from_config, load_checkpoint_file, load_config,
                      load_model_from_config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cfg = tiny_models.config(tiny_models.CLASS_COND)
    model = tiny_models.build(cfg)
    cfg_path, ckpt_path = tiny_models.write(cfg, model, d)
    return cfg, model, cfg_path, ckpt_path


def test_round_trip_reproduces_outputs(tiny):
    cfg, model, _, ckpt = tiny
    loaded = load_model_from_config(cfg, ckpt)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 500])
    c = model.get_learned_conditioning({"class_label": torch.tensor([1, 2])})
    with torch.no_grad():
        assert torch.equal(loaded.apply_model(x, t, c), model.apply_model(x, t, c))
    assert loaded.global_step_loaded == 0


def test_missing_checkpoint_names_path_and_download(tmp_path):
    path = tmp_path / "models" / "ldm" / "cin256-v2" / "model.ckpt"
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_file(path)
    msg = str(e.value)
    assert str(path) in msg and "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt" in msg
    assert "\n" not in msg


def test_mismatched_checkpoint_lists_keys_and_shapes(tiny, tmp_path):
    _, _, _, ckpt = tiny
    other = tiny_models.config(tiny_models.CLASS_COND, model_channels=64)
    with pytest.raises(CheckpointError) as e:
        load_model_from_config(other, ckpt, config_name="config wide.yaml")
    msg = str(e.value)
    assert "does not match config wide.yaml" in msg and "with other shapes" in msg
    assert "time_embed.0.weight ckpt [128, 32] vs model [256, 64]" in msg
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    sd.pop("model.diffusion_model.out.2.bias")
    sd["model.extra.weight"] = torch.zeros(2)
    torch.save({"state_dict": sd}, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_model_from_config(tiny[0], tmp_path / "edited.ckpt")
    msg = str(e.value)
    assert "1 missing: model.diffusion_model.out.2.bias [3]" in msg and "1 unexpected: model.extra.weight [2]" in msg
    m = load_model_from_config(tiny[0], tmp_path / "edited.ckpt", strict=False)  # explicit opt-out still loads
    assert m is not None


def test_corrupt_checkpoint(tiny, tmp_path):
    data = Path(tiny[3]).read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint_file(tmp_path / "cut.ckpt")
    # bytes torch reads as a legacy pickle: it cannot tell junk from a pickle that would run code, and says both
    with pytest.raises(CheckpointError, match=r"a corrupt file, or a plain pickle that only loads by running code "
                                              r"from it; .* --trust_checkpoint"):
        load_checkpoint_file(tmp_path / "junk.ckpt")


def test_a_pickle_that_would_run_code_names_what_and_the_opt_in(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"state_dict": {"w": Payload()}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"holds Python objects that weights_only loading refuses "
                                              r"\((posix|nt).system\); if you trust its source, rerun with "
                                              r"--trust_checkpoint"):
        load_checkpoint_file(tmp_path / "evil.ckpt")


def test_unsafe_pickle_needs_explicit_opt_in(tiny, tmp_path, monkeypatch):
    sd = torch.load(tiny[3], weights_only=True)["state_dict"]
    path = tmp_path / "lightning_style.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError, match="--trust_checkpoint") as e:
        load_checkpoint_file(path)
    assert "argparse.Namespace" in str(e.value)
    assert "state_dict" in load_checkpoint_file(path, trust=True)
    monkeypatch.setenv("LDM_TRUST_CHECKPOINT", "1")
    assert "state_dict" in load_checkpoint_file(path)


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint_file(tmp_path / "list.pt")


def test_unknown_targets_and_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="module 'ldm.models.nothing' not found"):
        instantiate_from_config({"target": "ldm.models.nothing.Model"})
    with pytest.raises(ConfigError, match="has no 'Nope'"):
        instantiate_from_config({"target": "ldm.models.autoencoder.Nope"})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse config"):
        load_config(tmp_path / "bad.yaml")
    OmegaConf.save(OmegaConf.create({"foo": 1}), tmp_path / "nomodel.yaml")
    with pytest.raises(ConfigError, match="no top-level 'model:'"):
        load_config(tmp_path / "nomodel.yaml")


def test_convert_checkpoint_makes_a_weights_only_file(tiny, tmp_path):
    from ldm.convert_checkpoint import convert
    sd = torch.load(tiny[3], weights_only=True)["state_dict"]
    src = tmp_path / "lightning_style.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "callbacks": {argparse.Namespace: {}}}, src)
    with pytest.raises(CheckpointError):
        convert(str(src), str(tmp_path / "out.ckpt"), trust=False)
    assert not (tmp_path / "out.ckpt").exists()
    assert convert(str(src), str(tmp_path / "out.ckpt"), trust=True) == len(sd)
    out = load_checkpoint_file(tmp_path / "out.ckpt")
    assert out["global_step"] == 7 and all(torch.equal(out["state_dict"][k], v) for k, v in sd.items())
