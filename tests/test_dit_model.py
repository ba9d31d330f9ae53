"""DiT model layer (ldm.modules.dit, ldm.models.dit_checkpoint) against the reference data made with the original
facebookresearch/DiT code (../shared/fixtures/dit, README "Model semantics"): forward and every intermediate, guided
outputs, the real DiT-XL/2's 292-key manifest, the 12 named sizes, and checkpoint loading."""
from __future__ import annotations

import argparse
import json
import pickle

import pytest
import torch

from conftest import REPO, SHARED, require_shared
from ldm.models.dit_checkpoint import dit_from_checkpoint, load_dit_state, read_dit_checkpoint
from ldm.modules.dit import DIT_SIZES, DiT, build_dit, dit_config, named_dit, sincos_position_table, \
    timestep_features
from ldm.util import CheckpointError, UserFacingError, instantiate_from_config, load_config

DIT = SHARED / "fixtures" / "dit"
REL = 1e-5   # the tolerance: max |ours − ref| <= 1e-5 · max |ref|


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, name: str, rel: float = REL) -> None:
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"{name}: max |ours - ref| = {err:.3e}"


@pytest.fixture(scope="module")
def small():
    folder = require_shared(DIT / "small")
    load = lambda name: torch.load(folder / name, map_location="cpu", weights_only=True)  # noqa: E731
    config = json.loads((folder / "config.json").read_text())
    model = DiT(**config).eval()
    model.load_state_dict(load("model.pt"), strict=True)
    return model, config, load("inputs.pt"), load("outputs.pt"), load("model.pt")


@pytest.fixture(scope="module")
def manifest():
    return json.loads(require_shared(DIT / "manifest.json").read_text())


def test_tiny_state_dict_layout_is_the_original(small):
    model, config, _, _, sd = small
    ours = model.state_dict()
    assert list(ours) == list(sd)   # same keys, same order
    assert all(ours[k].shape == v.shape for k, v in sd.items())
    assert sum(p.numel() for p in model.parameters()) == 183_200
    assert not model.pos_embed.requires_grad and "pos_embed" in ours
    # a fresh model recomputes the position table the file carries (float64 table cast to float32)
    assert torch.equal(DiT(**config).pos_embed, sd["pos_embed"])


def test_embeddings_and_position_table(small, one_thread):
    model, _, inputs, outputs, _ = small
    assert torch.equal(torch.from_numpy(sincos_position_table(64, 16)), outputs["pos_embed_check"])
    assert torch.equal(model.pos_embed, outputs["pos_embed_model"])
    with torch.no_grad():
        assert_rel(timestep_features(inputs["temb_t"]), outputs["t_freq"], "t_freq")
        assert_rel(model.t_embedder(inputs["temb_t"]), outputs["t_emb"], "t_emb")
        assert_rel(model.y_embedder(inputs["yemb_labels"], False), outputs["y_emb"], "y_emb")
        dropped = model.y_embedder(inputs["drop_labels"], False, force_drop_ids=inputs["drop_ids"])
        assert_rel(dropped, outputs["y_emb_force_drop"], "y_emb_force_drop")
    # cos first: at t = 0 the first half is 1, the second 0
    assert torch.equal(outputs["t_freq"][0, :128], torch.ones(128))


def test_forward_and_every_intermediate(small, one_thread):
    model, config, inputs, outputs, _ = small
    seen = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
             for name in ("x_embedder", "t_embedder", "final_layer")]
    hooks.append(model.y_embedder.register_forward_hook(lambda m, a, out: seen.__setitem__("y_embedder", out)))
    hooks += [b.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"block{i}", out))
              for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            out = model(inputs["x"], inputs["t"], inputs["y"])
    finally:
        for h in hooks:
            h.remove()
    assert_rel(out, outputs["fwd_out"], "fwd_out")
    for name in ("x_embedder", "t_embedder", "y_embedder", "final_layer"):
        assert_rel(seen[name], outputs[f"fwd_{name}_out"], name)
    for i in range(config["depth"]):
        assert_rel(seen[f"block{i}"], outputs[f"fwd_block{i}_out"], f"block{i}")
    assert_rel(seen["t_embedder"] + seen["y_embedder"], outputs["fwd_c"], "c")
    assert out.shape == (6, 8, 8, 8)   # learn_sigma: ε and v


def test_forward_with_cfg_guides_three_channels_of_the_first_half(small, one_thread):
    model, _, inputs, outputs, _ = small
    x, t, y = inputs["cfg_x"], inputs["cfg_t"], inputs["cfg_y"]
    with torch.no_grad():
        half = x[:2]
        raw = model(torch.cat([half, half]), t, y)
        assert_rel(raw, outputs["cfg_raw_out"], "cfg_raw_out")
        for s in inputs["cfg_scales"].tolist():
            guided = model.forward_with_cfg(x, t, y, s)
            assert_rel(guided, outputs[f"cfg_out_{s}"], f"cfg_out_{s}")
        # the second half of x is ignored; channel 3 and the variance channels are not guided
        other = model.forward_with_cfg(torch.cat([half, torch.randn_like(half)]), t, y, 4.0)
        assert torch.equal(other, guided)
        # (exact against this machine's own unguided pass: the fixture's was computed with other kernels)
        assert torch.equal(guided[:, 3:], raw[:, 3:])
        assert not torch.allclose(guided[:2, :3], raw[:2, :3])
        assert torch.equal(guided[:2, :3], guided[2:, :3])
        with pytest.raises(UserFacingError, match="even batch"):
            model.forward_with_cfg(x[:3], t[:3], y[:3], 1.5)


def test_bad_inputs_are_one_line(small):
    model, config, inputs, _, _ = small
    with pytest.raises(UserFacingError, match=r"class labels must lie in \[0, 10\]"):
        model(inputs["x"][:1], inputs["t"][:1], torch.tensor([11]))
    with pytest.raises(UserFacingError, match="8×8 latents got"):
        model(torch.zeros(1, 4, 16, 16), inputs["t"][:1], inputs["y"][:1])
    assert model.null_class == 10
    with pytest.raises(UserFacingError, match="no null-class embedding"):
        _ = DiT(**{**config, "class_dropout_prob": 0.0}).null_class
    with pytest.raises(UserFacingError, match="unknown DiT size"):
        dit_config("DiT-M/2")


def test_dit_xl2_matches_the_released_manifest_key_for_key(manifest):
    with torch.device("meta"):
        model = named_dit("DiT-XL/2", 256)
    assert dit_config("DiT-XL/2", 256) == manifest["constructor_args"]
    sd = model.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(e["key"], e["shape"]) for e in manifest["keys"]]
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"] == 675_129_632
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == manifest["num_trainable_parameters"]
    with torch.device("meta"):
        big = named_dit("DiT-XL/2", 512)
    assert list(big.pos_embed.shape) == manifest["dit_xl2_512_shape_differences"]["pos_embed"]["512"]


def test_the_twelve_named_sizes(manifest):
    expected = manifest["all_named_configs"]
    assert len(DIT_SIZES) == 12 and len(expected) == 24
    for name in DIT_SIZES:
        for size in (256, 512):
            with torch.device("meta"):
                model = named_dit(name, size)
            ref = expected[f"{name} @ {size}"]
            sd = model.state_dict()
            assert len(sd) == ref["keys"], name
            assert sum(v.numel() for v in sd.values()) == ref["parameters"], (name, size)
            assert list(sd["pos_embed"].shape) == ref["pos_embed"]
            assert list(sd["final_layer.linear.weight"].shape) == ref["final_layer.linear.weight"]


@pytest.mark.parametrize("size", [256, 512])
def test_yaml_configs_build_dit_xl2(size):
    config = load_config(REPO / "configs" / "dit" / f"DiT-XL-2-{size}.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
        again = build_dit(config.model)
    assert isinstance(model, DiT) and model.input_size == size // 8
    assert dict(config.model.params) == dit_config("DiT-XL/2", size)
    assert [k for k in model.state_dict()] == [k for k in again.state_dict()]
    assert config.checkpoint == f"DiT-XL-2-{size}x{size}.pt" and "scaling_factor" in config.vae.scale_factor_from


def test_released_style_file_loads_strictly(small, tmp_path):
    model, config, inputs, outputs, sd = small
    path = tmp_path / "plain.pt"
    torch.save(sd, path)
    fresh = load_dit_state(DiT(**config), path)
    with torch.no_grad():
        assert torch.equal(fresh(inputs["x"], inputs["t"], inputs["y"]), model(inputs["x"], inputs["t"], inputs["y"]))
    assert not fresh.training


def test_train_checkpoint_with_namespace_args(small, tmp_path):
    """train.py's {"model", "ema", "opt", "args": Namespace}: the original's torch.load fails on it under torch >=
    2.6 (weights_only default, Namespace refused); we load the EMA weights with weights_only=True."""
    model, config, inputs, outputs, sd = small
    ema = {k: v.clone() for k, v in sd.items()}
    raw = {k: v + 1 for k, v in sd.items()}   # the non-EMA weights must not be the ones loaded
    args = argparse.Namespace(model="DiT-S/8", image_size=64, num_classes=10, global_seed=0)
    path = tmp_path / "0000100.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args}, path)
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, weights_only=True)   # what the original's find_model runs into
    state, train_args = read_dit_checkpoint(path)
    assert train_args["model"] == "DiT-S/8" and train_args["image_size"] == 64
    assert all(torch.equal(state[k], sd[k]) for k in sd)
    fresh = load_dit_state(DiT(**config), path)
    with torch.no_grad():
        assert_rel(fresh(inputs["x"], inputs["t"], inputs["y"]), outputs["fwd_out"], "ema forward")
    # built from its args alone: DiT-S/8 at 64 px is not this tiny model, so the strict compare names the keys
    with pytest.raises(CheckpointError, match=r"does not match DiT-S/8 at 64×64 with 10 classes: .*missing"):
        dit_from_checkpoint(path)


def test_named_model_from_train_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = named_dit("DiT-S/8", 64, num_classes=10, depth=1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "ema": model.state_dict(), "args": argparse.Namespace(
        model="DiT-S/8", image_size=64, num_classes=10)}, path)
    loaded = dit_from_checkpoint(path, depth=1)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert loaded.null_class == 10 and not loaded.training


def test_mismatched_files_are_refused_in_one_line(small, tmp_path):
    _, config, _, _, sd = small
    cases = {
        "no_pos_embed.pt": ({k: v for k, v in sd.items() if k != "pos_embed"}, r"1 missing: pos_embed \[1, 16, 64\]"),
        "extra.pt": ({**sd, "head.weight": torch.zeros(2)}, r"1 unexpected: head.weight"),
        "wide.pt": ({**sd, "x_embedder.proj.bias": torch.zeros(65)},
                    r"x_embedder.proj.bias ckpt \[65\] vs model \[64\]"),
        "ddp.pt": ({f"module.{k}": v for k, v in sd.items()}, r"DDP keys \('module.' prefix"),
        "model_only.pt": ({"model": sd, "opt": {}}, "without 'ema' weights"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=message) as info:
            load_dit_state(DiT(**config), tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="wget https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"):
        read_dit_checkpoint(tmp_path / "DiT-XL-2-256x256.pt")
    # a released file name with other weights: compared on the meta device, refused before any allocation
    torch.save(sd, tmp_path / "DiT-XL-2-256x256.pt")
    with pytest.raises(CheckpointError, match="does not match DiT-XL/2 at 256×256"):
        dit_from_checkpoint(tmp_path / "DiT-XL-2-256x256.pt")
