"""Text-to-image evaluation: the CLIP model (evaluation.clip_model) in both checkpoint layouts against an OpenAI-style
forward written out here, the CLIP score (evaluation.clip_score) on known features and end to end through its CLI,
and reference batches from an image folder (evaluation.reference_folder). Tiny random stand-in networks: no download,
no ../shared."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import error_line, run_main
from evaluation import clip_score as cs
from evaluation import reference_folder as rf
from evaluation.clip_model import MEAN, STD, load_clip, preprocess
from evaluation.npz_io import open_batch
from ldm.fileio import file_sha256
from ldm.util import CheckpointError

VISION = dict(width=128, layers=2, patch=8, image=32, mlp=256)      # 2 heads: width // 64, as OpenAI infers
TEXT = dict(width=128, layers=2, vocab=1000, context=77, mlp=256)
EMBED = 48
PROMPTS = ["a red car parked on a street", "two cats on a sofa", "a bowl of fruit on a wooden table"]


# ---- tiny stand-in checkpoints, written from the documented layouts (not from the model class) -------------------

def transformers_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def r(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    def ln(name, d):
        sd[name + ".weight"], sd[name + ".bias"] = 1 + r(d, std=0.1), r(d)

    def lin(name, n_in, n_out, bias=True):
        sd[name + ".weight"] = r(n_out, n_in, std=n_in ** -0.5)
        if bias:
            sd[name + ".bias"] = r(n_out)

    def layers(tower, d, mlp, n):
        for i in range(n):
            p = f"{tower}.encoder.layers.{i}."
            for proj in ("k", "v", "q", "out"):
                lin(f"{p}self_attn.{proj}_proj", d, d)
            ln(p + "layer_norm1", d)
            lin(p + "mlp.fc1", d, mlp)
            lin(p + "mlp.fc2", mlp, d)
            ln(p + "layer_norm2", d)

    tw, vw, patch = TEXT["width"], VISION["width"], VISION["patch"]
    n_pos = (VISION["image"] // patch) ** 2 + 1
    sd["text_model.embeddings.token_embedding.weight"] = r(TEXT["vocab"], tw, std=0.5)
    sd["text_model.embeddings.position_embedding.weight"] = r(TEXT["context"], tw, std=0.1)
    sd["text_model.embeddings.position_ids"] = torch.arange(TEXT["context"])[None]
    layers("text_model", tw, TEXT["mlp"], TEXT["layers"])
    ln("text_model.final_layer_norm", tw)
    sd["vision_model.embeddings.class_embedding"] = r(vw, std=0.5)
    sd["vision_model.embeddings.patch_embedding.weight"] = r(vw, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
    sd["vision_model.embeddings.position_embedding.weight"] = r(n_pos, vw, std=0.1)
    sd["vision_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    ln("vision_model.pre_layrnorm", vw)
    layers("vision_model", vw, VISION["mlp"], VISION["layers"])
    ln("vision_model.post_layernorm", vw)
    lin("visual_projection", vw, EMBED, bias=False)
    lin("text_projection", tw, EMBED, bias=False)
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    return sd


def transformers_config(act: str = "quick_gelu") -> dict:
    return {"architectures": ["CLIPModel"], "projection_dim": EMBED,
            "text_config": {"vocab_size": TEXT["vocab"], "hidden_size": TEXT["width"],
                            "intermediate_size": TEXT["mlp"], "num_hidden_layers": TEXT["layers"],
                            "num_attention_heads": TEXT["width"] // 64, "max_position_embeddings": TEXT["context"],
                            "hidden_act": act},
            "vision_config": {"hidden_size": VISION["width"], "intermediate_size": VISION["mlp"],
                              "num_hidden_layers": VISION["layers"], "num_attention_heads": VISION["width"] // 64,
                              "image_size": VISION["image"], "patch_size": VISION["patch"], "hidden_act": act}}


def as_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights in open_clip's names: q/k/v concatenated into in_proj, projections as x @ P."""
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.proj": sd["visual_projection.weight"].t().contiguous(),
           "text_projection": sd["text_projection.weight"].t().contiguous(), "logit_scale": sd["logit_scale"]}
    for ours, theirs in (("text_model.final_layer_norm", "ln_final"), ("vision_model.pre_layrnorm", "visual.ln_pre"),
                         ("vision_model.post_layernorm", "visual.ln_post")):
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = sd[f"{ours}.{kind}"]
    for tower, blocks, n in (("text_model", "transformer", TEXT["layers"]),
                             ("vision_model", "visual.transformer", VISION["layers"])):
        for i in range(n):
            h, o = f"{tower}.encoder.layers.{i}.", f"{blocks}.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{o}attn.in_proj_{kind}"] = torch.cat([sd[f"{h}self_attn.{x}_proj.{kind}"] for x in "qkv"])
                for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    out[f"{o}{b}.{kind}"] = sd[f"{h}{a}.{kind}"]
    return out


# ---- OpenAI CLIP's forward (openai/CLIP model.py) over the open_clip state dict, with nn.MultiheadAttention's math --

def _ln(sd, name, x):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"])


def _blocks(sd, prefix, x, heads, causal, act):
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf")).triu_(1) if causal else None
    i = 0
    while f"{prefix}.resblocks.{i}.ln_1.weight" in sd:
        p = f"{prefix}.resblocks.{i}."
        h = _ln(sd, p + "ln_1", x).transpose(0, 1)          # [N, B, D] as nn.MultiheadAttention takes it
        a, _ = F.multi_head_attention_forward(
            h, h, h, x.shape[-1], heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None,
            False, 0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False,
            need_weights=False, attn_mask=mask)
        x = x + a.transpose(0, 1)
        h = F.linear(_ln(sd, p + "ln_2", x), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else F.gelu(h)
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    return x


def openai_image(sd, pixels, act="quick_gelu"):
    w = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1])
    x = x.reshape(len(x), x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([sd["visual.class_embedding"] + torch.zeros(len(x), 1, x.shape[-1]), x], dim=1)
    x = _ln(sd, "visual.ln_pre", x + sd["visual.positional_embedding"])
    x = _blocks(sd, "visual.transformer", x, w.shape[0] // 64, False, act)
    return _ln(sd, "visual.ln_post", x[:, 0]) @ sd["visual.proj"]


def openai_text(sd, tokens, act="quick_gelu"):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    x = _ln(sd, "ln_final", _blocks(sd, "transformer", x, x.shape[-1] // 64, True, act))
    return x[torch.arange(len(x)), tokens.argmax(-1)] @ sd["text_projection"]


def pad_with_zero(tokens: torch.Tensor, eot: int) -> torch.Tensor:
    """openai clip.tokenize's padding: 0 after <|endoftext|> (ours pads with <|endoftext|>)."""
    out = tokens.clone()
    for row in out:
        first = int((row == eot).nonzero()[0])
        row[first + 1:] = 0
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"transformers": folder with config.json + pytorch_model.bin, "open_clip": one .pt} of the same weights."""
    d = tmp_path_factory.mktemp("clip")
    sd = transformers_state_dict()
    hf = d / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(transformers_config()))
    torch.save(sd, hf / "pytorch_model.bin")
    torch.save(as_open_clip(sd), d / "open_clip.pt")
    return {"transformers": hf, "open_clip": d / "open_clip.pt", "sd": sd}


def images(n: int, h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# ---- the model -----------------------------------------------------------------------------------------------------

def test_both_layouts_give_the_same_features_as_openai_forward(checkpoints):
    hf, oc = load_clip(checkpoints["transformers"]), load_clip(checkpoints["open_clip"])
    assert (hf.layout, oc.layout) == ("transformers", "open_clip")
    x = images(3)
    torch.testing.assert_close(hf.image_features(x), oc.image_features(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(hf.text_features(PROMPTS), oc.text_features(PROMPTS), atol=1e-5, rtol=0)
    # against OpenAI's forward (nn.MultiheadAttention math, pad id 0): the conversion and the pad-id claim
    ref_sd = as_open_clip(checkpoints["sd"])
    torch.testing.assert_close(hf.image_features(x), openai_image(ref_sd, preprocess(x, VISION["image"])),
                               atol=1e-5, rtol=1e-5)
    tokens = hf.tokenizer(PROMPTS)
    assert tokens.max() == hf.tokenizer.eot_id == TEXT["vocab"] - 1
    torch.testing.assert_close(hf.text_features(PROMPTS), openai_text(ref_sd, pad_with_zero(tokens, 999)),
                               atol=1e-5, rtol=1e-5)


def test_gelu_open_clip_matches_the_reference_and_differs_from_quick_gelu(checkpoints):
    gelu = load_clip(checkpoints["open_clip"], activation="gelu")
    quick = load_clip(checkpoints["open_clip"])
    ref_sd = as_open_clip(checkpoints["sd"])
    tokens = gelu.tokenizer(PROMPTS)
    torch.testing.assert_close(gelu.text_features(PROMPTS), openai_text(ref_sd, tokens, "gelu"), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(gelu.text_features(PROMPTS), quick.text_features(PROMPTS), atol=1e-4)


def test_preprocess_known_answers():
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    flat = np.full((2, 40, 56, 3), 200, np.uint8)                      # resized: a constant stays constant
    torch.testing.assert_close(preprocess(flat, 32), ((200 / 255 - mean) / std).expand(2, 3, 32, 32))
    x = images(1, 32, 48)                                               # short side already 32: a pure center crop
    crop = torch.from_numpy(x[:, :, 8:40]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(preprocess(x, 32), (crop - mean) / std)
    # CLIP resizes with PIL: ours agrees within one 8-bit level, on few pixels (PIL's fixed-point rounding)
    big = images(1, 64, 80, seed=3)
    pil = np.asarray(Image.fromarray(big[0]).resize((40, 32), Image.BICUBIC))[:, 4:36].astype(np.float64)
    diff = np.abs((preprocess(big, 32) * std + mean)[0].permute(1, 2, 0).numpy() * 255 - pil)
    assert diff.max() <= 1.0 + 1e-3 and diff.mean() < 0.01


@pytest.mark.parametrize("layout, key", [("transformers", "vision_model.encoder.layers.1.mlp.fc2.bias"),
                                         ("open_clip", "visual.transformer.resblocks.1.attn.in_proj_bias")])
def test_strict_load_names_the_missing_and_unexpected_key(checkpoints, tmp_path, layout, key):
    sd = checkpoints["sd"] if layout == "transformers" else as_open_clip(checkpoints["sd"])
    sd = {k: v for k, v in sd.items() if k != key}
    sd["extra.weight"] = torch.zeros(2)
    if layout == "transformers":
        (tmp_path / "config.json").write_text(json.dumps(transformers_config()))
    torch.save(sd, tmp_path / "model.bin")
    with pytest.raises(CheckpointError) as e:
        load_clip(tmp_path / "model.bin")
    message = str(e.value)
    assert "\n" not in message and f"1 missing: {key}" in message and "1 unexpected: extra.weight" in message


def test_folder_forms_load_the_same_model(checkpoints, tmp_path):
    """A sharded transformers folder (index.json) and an open_clip hub folder (open_clip_pytorch_model.bin)."""
    sd, x = checkpoints["sd"], images(2)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(transformers_config()))
    keys = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in halves.items():
        torch.save({k: sd[k] for k in part}, sharded / name)
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    hub = tmp_path / "hub"
    hub.mkdir()
    torch.save(as_open_clip(sd), hub / "open_clip_pytorch_model.bin")
    want = load_clip(checkpoints["transformers"]).image_features(x)
    for folder, layout in ((sharded, "transformers"), (hub, "open_clip")):
        clip = load_clip(folder)
        assert clip.layout == layout and len(clip.weights) == (2 if folder == sharded else 1)
        torch.testing.assert_close(clip.image_features(x), want, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_archive_needs_trust(checkpoints, tmp_path):
    """OpenAI's released files are TorchScript: refused with one line, read (state dict only) with trust."""
    root = nn.Module()
    for key, value in as_open_clip(checkpoints["sd"]).items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(name, nn.Parameter(value.clone()))
    root.register_buffer("input_resolution", torch.tensor(VISION["image"]))   # as OpenAI's files carry
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(root).save(str(path))
    with pytest.raises(CheckpointError, match="TorchScript.*--trust_checkpoint"):
        load_clip(path)
    x = images(2)
    torch.testing.assert_close(load_clip(path, trust=True).image_features(x),
                               load_clip(checkpoints["open_clip"]).image_features(x), atol=0, rtol=0)


# ---- the score -----------------------------------------------------------------------------------------------------

def test_score_formula_known_answers():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]])
    txt = np.array([[5.0, 0.0], [1.0, 0.0], [4.0, 3.0], [-1.0, -1.0]])
    # cos = 1, 0, 24/25, −1 (clipped at 0); scale 100 (torchmetrics' CLIPScore)
    np.testing.assert_allclose(cs.scores_from_features(img, txt), [100.0, 0.0, 96.0, 0.0], atol=1e-12)
    summary = cs.summarize(np.array([10.0, 20.0, 30.0, 40.0]), cs.Bootstrap(resamples=500, seed=1))
    assert summary["mean"] == 25.0 and 10.0 <= summary["ci"][0] < 25.0 < summary["ci"][1] <= 40.0
    assert summary == cs.summarize(np.array([10.0, 20.0, 30.0, 40.0]), cs.Bootstrap(resamples=500, seed=1))


def write_samples(path, n=6, labels=None):
    x = images(n, 32, 32, seed=5)
    np.savez(path, x, np.array(labels if labels is not None else [i % 3 for i in range(n)], dtype=np.int64))
    return x


@pytest.mark.parametrize("layout", ["transformers", "open_clip"])
def test_cli_end_to_end(checkpoints, tmp_path, capsys, layout):
    samples, prompts, out = tmp_path / "samples.npz", tmp_path / "prompts.txt", tmp_path / "eval" / "clip.json"
    x = write_samples(samples)
    prompts.write_text(f"{PROMPTS[0]}\n\n   {PROMPTS[1]}  \n{PROMPTS[2]}\n")   # blank line skipped, stripped
    proc = run_main(cs.main, [samples, "--prompts", prompts, "--clip", checkpoints[layout], "--json", out,
                              "--batch_size", 4, "--resamples", 200, "--device", "cpu"], capsys)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    clip, sample_prompts = load_clip(checkpoints[layout]), [PROMPTS[i % 3] for i in range(6)]
    direct = cs.clip_score(x, sample_prompts, clip, batch_size=4)       # the CLI's batches: the same float32 sums
    np.testing.assert_allclose(record["per_sample"]["clip_score"], direct, atol=1e-9)
    np.testing.assert_allclose(cs.clip_score(x, sample_prompts, clip, batch_size=1), direct, atol=1e-4)
    score = record["metrics"]["clip_score"]
    assert score["mean"] == pytest.approx(float(np.mean(direct)), abs=1e-12)
    assert score["ci"][0] <= score["mean"] <= score["ci"][1]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"CLIP score: {score['mean']}" and lines[1] == f"CLIP score 95% CI: {score['ci'][0]} " \
                                                                      f"{score['ci'][1]}"
    weights = checkpoints[layout] / "pytorch_model.bin" if layout == "transformers" else checkpoints[layout]
    assert record["clip_model"]["layout"] == layout and record["clip_model"]["sha256"] == file_sha256(weights)
    assert record["samples"] == {"path": str(samples), "sha256": file_sha256(samples)}
    assert record["prompts"]["count"] == 3 and record["prompts"]["sha256"] == file_sha256(prompts)
    assert record["n"] == 6 and record["convention"]["name"] == "torchmetrics CLIPScore"
    assert record["bootstrap"]["resamples"] == 200


def test_cli_bad_inputs_stop_with_one_line(checkpoints, tmp_path, capsys):
    samples, prompts = tmp_path / "samples.npz", tmp_path / "prompts.txt"
    write_samples(samples)
    prompts.write_text("\n".join(PROMPTS))

    def run(*args):
        return error_line(run_main(cs.main, [*args, "--device", "cpu"], capsys))

    missing = tmp_path / "no_such_clip"
    line = run(samples, "--prompts", prompts, "--clip", missing)
    assert line == (f"error: CLIP model path {missing} does not exist; pass a local open_clip / transformers CLIP "
                    f"checkpoint (nothing is downloaded)")
    write_samples(tmp_path / "bad_labels.npz", labels=[0, 1, 2, 3, 0, 1])
    line = run(tmp_path / "bad_labels.npz", "--prompts", prompts, "--clip", checkpoints["open_clip"])
    assert "label 3 of sample 3" in line and "outside 0..2" in line
    (tmp_path / "empty.txt").write_text("\n   \n")
    assert "holds no prompt" in run(samples, "--prompts", tmp_path / "empty.txt", "--clip", checkpoints["open_clip"])
    assert "not found" in run(tmp_path / "none.npz", "--prompts", prompts, "--clip", checkpoints["open_clip"])
    broken = {k: v for k, v in as_open_clip(checkpoints["sd"]).items() if k != "ln_final.bias"}
    torch.save(broken, tmp_path / "broken.pt")
    assert "1 missing: ln_final.bias" in run(samples, "--prompts", prompts, "--clip", tmp_path / "broken.pt")


# ---- reference batches from a folder -------------------------------------------------------------------------------

def write_folder(d):
    d.mkdir()
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "b.JPG", quality=95)
    Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8)).save(d / "c.png")          # gray
    Image.fromarray(rng.integers(0, 256, (33, 33, 4), dtype=np.uint8)).save(d / "d.png")       # RGBA
    wide = np.zeros((16, 32, 3), np.uint8)
    wide[:, 8:24] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(wide).save(d / "e.png")
    (d / "notes.txt").write_text("not an image")
    (d / "sub").mkdir()
    Image.fromarray(wide).save(d / "sub" / "f.png")                                                # not searched
    return wide[:, 8:24]


def test_reference_folder_writes_an_evaluator_batch(tmp_path, capsys):
    center = write_folder(tmp_path / "imgs")
    out, again = tmp_path / "ref.npz", tmp_path / "ref2.npz"
    proc = run_main(rf.main, [tmp_path / "imgs", out, "--size", 16], capsys)
    assert proc.returncode == 0 and proc.stdout.startswith(f"wrote {out}: 5 images 16×16"), proc.stderr
    batch = open_batch(out, "reference")                      # the evaluator's own validation
    assert batch.shape == (5, 16, 16, 3) and batch.dtype == np.uint8
    arr = batch.read_images()
    np.testing.assert_array_equal(arr[4], center)              # e.png: square crop at its size is the center itself
    assert (arr[2] == arr[2][..., :1]).all()                   # gray repeated to RGB
    assert run_main(rf.main, [tmp_path / "imgs", again, "--size", 16], capsys).returncode == 0
    assert out.read_bytes() == again.read_bytes()              # deterministic to the byte
    with np.load(out) as f:
        np.testing.assert_array_equal(f["arr_0"], arr)
    run_main(rf.main, [tmp_path / "imgs", tmp_path / "four.npz", "--size", 16, "--limit", 4], capsys)
    np.testing.assert_array_equal(open_batch(tmp_path / "four.npz", "reference").read_images(), arr[:4])


def test_reference_folder_bad_inputs(tmp_path, capsys):
    write_folder(tmp_path / "imgs")
    png = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png, format="PNG")
    (tmp_path / "imgs" / "broken.png").write_bytes(png.getvalue()[:60])      # truncated
    out = tmp_path / "ref.npz"
    line = error_line(run_main(rf.main, [tmp_path / "imgs", out], capsys))
    assert "broken.png cannot be read" in line and not out.exists()
    assert not list(tmp_path.glob(".ref.npz.tmp*"))                          # the temporary was removed
    (tmp_path / "empty").mkdir()
    assert "holds no" in error_line(run_main(rf.main, [tmp_path / "empty", out], capsys))
    assert "does not exist" in error_line(run_main(rf.main, [tmp_path / "missing", out], capsys))
