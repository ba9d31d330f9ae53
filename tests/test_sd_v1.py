"""Stable Diffusion v1 parity with ../shared/fixtures/sd_v1 (made with the original QNCD / CompVis code): the full
model's state-dict manifest, the tokenizer token for token, and the tiny SD-structured model's text embeddings, UNet
ε and 5-step DDIM / PLMS runs with guidance 7.5; plus the checkpoint-loading pitfalls of the fixture README."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, SHARED, require_shared

SD = SHARED / "fixtures" / "sd_v1"
TINY_TEXT = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 77}


@pytest.fixture(scope="module")
def sd_dir():
    return require_shared(SD)


def tiny_config(sd_dir):
    """The fixture's config with the tiny text tower's sizes (the original replaced from_pretrained by them)."""
    cfg = OmegaConf.load(sd_dir / "small" / "config.yaml")
    cfg.model.params.cond_stage_config.params.text_config = TINY_TEXT
    return cfg


@pytest.fixture(scope="module")
def tiny(sd_dir):
    from ldm.util import instantiate_from_config, load_state_dict_checked
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config(sd_dir).model).eval()
    sd = torch.load(sd_dir / "small" / "model.pt", map_location="cpu", weights_only=True)
    mismatch = load_state_dict_checked(model, sd, strict=False)
    assert not mismatch.unexpected and all(k.startswith("first_stage_model.") for k, _ in mismatch.missing)
    return model


@pytest.fixture(scope="module")
def refs(sd_dir):
    load = lambda name: torch.load(sd_dir / "small" / name, map_location="cpu", weights_only=True)  # noqa: E731
    prompts = json.loads((sd_dir / "small" / "prompts.json").read_text())
    return load("inputs.pt"), load("outputs.pt"), prompts


def test_full_v1_state_dict_manifest(sd_dir):
    """configs/stable-diffusion/v1-inference.yaml builds (meta device) exactly the 1143 keys, shapes, dtypes and
    order of the original, so released sd-v1-4 / v1-5 checkpoints load strictly."""
    from ldm.util import instantiate_from_config, load_config
    manifest = json.loads((sd_dir / "sd_v1_manifest.json").read_text())
    with torch.device("meta"):
        model = instantiate_from_config(load_config(REPO / "configs/stable-diffusion/v1-inference.yaml").model)
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert ours == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["total_parameters"]


def test_tokenizer_cases(sd_dir):
    from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer
    cases = json.loads((sd_dir / "tokenizer_cases.json").read_text())
    tok = CLIPTokenizer()
    assert (tok.sot_id, tok.eot_id, tok.pad_id) == (49406, 49407, 49407)
    for case in cases["cases"]:
        assert tok(case["prompt"])[0].tolist() == case["input_ids"], case["prompt"]


def test_tiny_tokenizer_is_the_truncated_vocabulary(sd_dir, refs):
    from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer
    tok = CLIPTokenizer(vocab_size=1000)
    assert tok.encoder == json.loads((sd_dir / "small/tiny_tokenizer/vocab.json").read_text())
    _, out, prompts = refs
    assert torch.equal(tok(prompts["prompts"]), out["tiny_input_ids"])
    assert torch.equal(tok([prompts["uncond_prompt"]] * 2), out["tiny_input_ids_uncond"])


def test_tiny_text_embeddings_and_eps(tiny, refs):
    x, out, prompts = refs
    with torch.no_grad():
        c = tiny.get_learned_conditioning(prompts["prompts"])
        uc = tiny.get_learned_conditioning([prompts["uncond_prompt"]] * 2)
        torch.testing.assert_close(c, out["c"], atol=1e-5, rtol=0)
        torch.testing.assert_close(uc, out["uc"], atol=1e-5, rtol=0)
        torch.testing.assert_close(tiny.apply_model(x["x_t"], x["t"], c), out["eps_cond"], atol=1e-5, rtol=0)
        torch.testing.assert_close(tiny.apply_model(x["x_t"], x["t"], uc), out["eps_uncond"], atol=1e-5, rtol=0)
        e_u, e_c = tiny.apply_model(torch.cat([x["x_t"]] * 2), torch.cat([x["t"]] * 2), torch.cat([uc, c])).chunk(2)
        torch.testing.assert_close(e_u + 7.5 * (e_c - e_u), out["eps_cfg7.5_batched"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tiny.alphas_cumprod, out["schedule_alphas_cumprod"], atol=0, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_tiny_five_step_runs(tiny, refs, sampler):
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.plms import PLMSSampler
    x, out, prompts = refs
    cls = DDIMSampler if sampler == "ddim" else PLMSSampler
    with torch.no_grad():
        c = tiny.get_learned_conditioning(prompts["prompts"])
        uc = tiny.get_learned_conditioning([prompts["uncond_prompt"]] * 2)
        samples, _ = cls(tiny).sample(S=5, conditioning=c, batch_size=2, shape=[4, 8, 8], verbose=False,
                                      unconditional_guidance_scale=7.5, unconditional_conditioning=uc, eta=0.0,
                                      x_T=x["x_T"])
    ref = out["ddim5_cfg7.5_eta0_samples" if sampler == "ddim" else "plms5_cfg7.5_samples"]
    torch.testing.assert_close(samples, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
