"""The cin256-v2 config builds exactly the CompVis state_dict (keys, shapes, dtypes), checked on the meta device."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import LDM_REF, REPO, require_shared
from ldm.util import instantiate_from_config, load_config


@pytest.fixture(scope="module")
def cin256_meta():
    cfg = load_config(REPO / "configs" / "latent-diffusion" / "cin256-v2.yaml")
    with torch.device("meta"):
        return instantiate_from_config(cfg.model)


def test_cin256_config_matches_fixture_config():
    from omegaconf import OmegaConf
    ref = OmegaConf.load(require_shared(LDM_REF / "cin256-v2.yaml")).model
    ours = load_config(REPO / "configs" / "latent-diffusion" / "cin256-v2.yaml").model
    assert OmegaConf.to_container(ours) == OmegaConf.to_container(ref)


def test_cin256_state_dict_matches_manifest(cin256_meta):
    manifest = json.loads(require_shared(LDM_REF / "cin256_v2_manifest.json").read_text())
    sd = cin256_meta.state_dict()
    ours = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()}
    ref = {e["key"]: (e["shape"], e["dtype"]) for e in manifest["keys"]}
    missing = sorted(set(ref) - set(ours))
    extra = sorted(set(ours) - set(ref))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    wrong = [(k, ours[k], ref[k]) for k in ref if ours[k] != ref[k]]
    assert not wrong, f"shape/dtype mismatches: {wrong[:5]}"
    assert list(ours) == list(ref), "key order differs from CompVis"
    assert len(sd) == manifest["num_state_dict_keys"] == 906
    assert sum(v.numel() for v in sd.values()) == manifest["total_state_dict_elements"]


def test_cin256_parameter_counts(cin256_meta):
    manifest = json.loads(require_shared(LDM_REF / "cin256_v2_manifest.json").read_text())
    counts = {name: sum(p.numel() for p in cin256_meta.get_submodule(name).parameters())
              for name in manifest["parameters_per_submodule"]}
    assert counts == manifest["parameters_per_submodule"]
    assert cin256_meta.cond_stage_model.n_classes - 1 == 1000  # the null class used for guidance


def test_cin256_block_structure(cin256_meta):
    """Each UNet block holds the CompVis layer types and produces the manifest's output shape (shape propagation
    on the meta device, so no real compute)."""
    manifest = json.loads(require_shared(LDM_REF / "cin256_v2_manifest.json").read_text())
    unet = cin256_meta.model.diffusion_model
    shapes = {}
    names = [b["block"] for b in manifest["unet_block_structure"]]
    hooks = [unet.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: shapes.__setitem__(n, list(o.shape[1:]))) for n in names]
    with torch.device("meta"):
        unet(torch.empty(1, 3, 64, 64), torch.zeros(1, dtype=torch.long), context=torch.empty(1, 1, 512))
    for h in hooks:
        h.remove()
    for block in manifest["unet_block_structure"]:
        assert shapes[block["block"]] == block["output_shape_CHW"], block["block"]
        types = [type(layer).__name__ for layer in unet.get_submodule(block["block"])]
        assert types == [layer["type"] for layer in block["layers"]], block["block"]
