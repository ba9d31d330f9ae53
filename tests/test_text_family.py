"""Text-to-image models (SD v1 structure) on a tiny random model: the checkpoint-loading pitfalls of released SD
files, txt2img (FP and QNCD's README command end to end), PLMS calibration, step 7 over a prompt list, and the one-line
errors on bad prompt files, checkpoints and tokenizer files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ldm.models.diffusion.settings import SamplingSettings
from omegaconf import OmegaConf
from PIL import Image

import tiny_models
from conftest import REPO, error_line, load_script, run_main

TXT2IMG = REPO / "quant_scripts" / "txt2img.py"
CLIP = "cond_stage_model.transformer.text_model."


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return tiny_models.write_text_model(tmp_path_factory.mktemp("text"),
                                        ["a photo of a bag", "", "  a photo of a coat  ", "a red dress"])


@pytest.fixture
def txt2img(capsys):
    module = load_script(TXT2IMG, "txt2img_script")
    return lambda *args: run_main(module.main, args, capsys)


def load(cfg_path, sd: dict, tmp_path: Path, extra: dict | None = None):
    from ldm.util import load_config, load_model_from_config
    path = tmp_path / "variant.ckpt"
    torch.save({"state_dict": sd, **(extra or {})}, path)
    return load_model_from_config(load_config(cfg_path), path)


def embed(model, prompts=("a photo of a bag", "")):
    with torch.no_grad():
        return model.get_learned_conditioning(list(prompts))


# ---- loading pitfalls (fixture README "loading pitfalls") ------------------------------------------------------


def test_position_ids_absent_or_damaged_become_arange(text_model, tmp_path, capsys):
    cfg_path, ckpt_path, _, model = text_model
    sd = torch.load(ckpt_path, weights_only=True)["state_dict"]
    key = CLIP + "embeddings.position_ids"
    absent = {k: v for k, v in sd.items() if k != key}          # transformers >= 4.31 saves it non-persistently
    m = load(cfg_path, absent, tmp_path)
    assert torch.equal(m.state_dict()[key], torch.arange(77)[None])
    damaged = dict(sd, **{key: torch.arange(77)[None].float() + 0.3})   # merged files: float, corrupted copies
    m = load(cfg_path, damaged, tmp_path)
    assert "not arange(77)" in capsys.readouterr().err
    assert torch.equal(m.state_dict()[key], torch.arange(77)[None])
    torch.testing.assert_close(embed(m), embed(model), atol=0, rtol=0)


def test_flattened_clip_layout_is_renamed_not_dropped(text_model, tmp_path, capsys):
    """transformers >= 5.6 (and NovelAI-derived files) drop `text_model.`; the original strict=False load then
    silently kept a random text encoder."""
    cfg_path, ckpt_path, _, model = text_model
    sd = torch.load(ckpt_path, weights_only=True)["state_dict"]
    flat = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd.items()
            if not k.endswith("position_ids")}
    m = load(cfg_path, flat, tmp_path)
    assert "flattened CLIPTextModel layout" in capsys.readouterr().err
    torch.testing.assert_close(embed(m), embed(model), atol=0, rtol=0)


def test_ema_shadows_with_use_ema_false_use_the_live_weights(text_model, tmp_path, capsys):
    cfg_path, ckpt_path, _, model = text_model
    sd = torch.load(ckpt_path, weights_only=True)["state_dict"]
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7, dtype=torch.int32)}
    ema.update({"model_ema." + k.removeprefix("model.").replace(".", ""): torch.zeros_like(v)
                for k, v in sd.items() if k.startswith("model.diffusion_model.")})
    m = load(cfg_path, {**sd, **ema}, tmp_path)
    assert "ignoring the checkpoint's" in capsys.readouterr().err
    for k, v in m.state_dict().items():
        if k.startswith("model.diffusion_model."):
            assert torch.equal(v, sd[k])


def test_lightning_callbacks_load_weights_only(text_model, tmp_path):
    """SD .ckpt files key `callbacks` by Lightning's ModelCheckpoint class (diffusers#8874): loaded weights-only
    through an allow-list, not a blanket opt-out."""
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
    cfg_path, ckpt_path, _, model = text_model
    sd = torch.load(ckpt_path, weights_only=True)["state_dict"]
    m = load(cfg_path, sd, tmp_path, {"callbacks": {ModelCheckpoint: {"best_model_score": None}}, "global_step": 3})
    torch.testing.assert_close(embed(m), embed(model), atol=0, rtol=0)


def test_missing_text_encoder_keys_stop_with_one_line(text_model, tmp_path, txt2img):
    cfg_path, ckpt_path, prompts, _ = text_model
    sd = torch.load(ckpt_path, weights_only=True)["state_dict"]
    bad = tmp_path / "no_text.ckpt"
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}}, bad)
    line = error_line(txt2img("--config", cfg_path, "--ckpt", bad, "--from_file", prompts, "--outdir",
                              tmp_path / "o", "-l", tmp_path / "runs", "--ddim_steps", 2))
    assert "missing" in line and "cond_stage_model.transformer.text_model" in line


def test_tokenizer_vocabulary_checked(tmp_path):
    from ldm.modules.encoders.clip_tokenizer import BPE_FILE, CLIPTokenizer
    from ldm.util import ConfigError
    wrong = tmp_path / "bpe.txt.gz"
    data = bytearray(BPE_FILE.read_bytes())
    data[1000] ^= 0xFF   # one byte changed
    wrong.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="SHA-256"):
        CLIPTokenizer(bpe_file=wrong)
    with pytest.raises(ConfigError, match="does not exist"):
        CLIPTokenizer(bpe_file=tmp_path / "absent.txt.gz")


def test_wrong_tokenizer_file_in_a_config_is_one_line(text_model, tmp_path, txt2img):
    cfg_path, ckpt_path, prompts, _ = text_model
    cfg = OmegaConf.load(cfg_path)
    wrong = tmp_path / "bpe.txt.gz"
    wrong.write_bytes(b"not the vocabulary")
    cfg.model.params.cond_stage_config.params.tokenizer_file = str(wrong)
    bad_cfg = tmp_path / "bad.yaml"
    OmegaConf.save(cfg, bad_cfg)
    line = error_line(txt2img("--config", bad_cfg, "--ckpt", ckpt_path, "--from_file", prompts, "--outdir",
                              tmp_path / "o", "-l", tmp_path / "runs"))
    assert "SHA-256" in line and "bpe_simple_vocab_16e6" in line


# ---- prompt files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty", "missing", "binary", "directory"])
def test_bad_prompt_file_is_one_line(text_model, tmp_path, txt2img, kind):
    cfg_path, ckpt_path, _, _ = text_model
    path = tmp_path / "prompts.txt"
    if kind == "empty":
        path.write_text("\n  \n")
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
    elif kind == "directory":
        path.mkdir()
    proc = txt2img("--config", cfg_path, "--ckpt", ckpt_path, "--from_file", path, "--outdir", tmp_path / "o",
                   "-l", tmp_path / "runs")
    line = error_line(proc)
    assert "prompt file" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()


def test_load_prompts_strips_and_skips_blank_lines(text_model):
    from pipeline.families.stable_diffusion import load_prompts
    assert load_prompts(text_model[2]) == ("a photo of a bag", "a photo of a coat", "a red dress")


# ---- txt2img --------------------------------------------------------------------------------------------------------


def test_txt2img_fp_writes_pngs_and_a_grid_deterministically(text_model, tmp_path, txt2img):
    cfg_path, ckpt_path, prompts, _ = text_model
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        proc = txt2img("--config", cfg_path, "--ckpt", ckpt_path, "--from_file", prompts, "--n_samples", 2,
                       "--n_iter", 2, "--ddim_steps", 4, "--plms", "--scale", 7.5, "--outdir", out, "-l",
                       tmp_path / "runs", "--seed", 3)
        assert proc.returncode == 0, proc.stderr
        files = sorted((out / "samples").glob("*.png"))
        assert [f.name for f in files] == [f"{i:05}.png" for i in range(6)]   # 3 prompts x 2 passes
        assert Image.open(files[1]).text["prompt"] == "a photo of a coat"
        assert (out / "grid-0000.png").is_file()
        outs.append([np.asarray(Image.open(f)) for f in files])
    assert all(np.array_equal(a, b) for a, b in zip(*outs))
    # --prompt fills a batch with one prompt; the sample folder keeps numbering, the grid count goes on
    proc = txt2img("--config", cfg_path, "--ckpt", ckpt_path, "--prompt", "a photo of a bag", "--n_samples", 3,
                   "--ddim_steps", 5, "--outdir", tmp_path / "a", "-l", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "a" / "samples").glob("*.png"))) == 9 and (tmp_path / "a" / "grid-0001.png").exists()


def test_txt2img_size_flags_checked(text_model, tmp_path, txt2img):
    cfg_path, ckpt_path, prompts, _ = text_model
    line = error_line(txt2img("--config", cfg_path, "--ckpt", ckpt_path, "--from_file", prompts, "--H", 512,
                              "--W", 512, "--outdir", tmp_path / "o", "-l", tmp_path / "runs"))
    assert "drop the size flags" in line


def test_qncd_readme_command_end_to_end(text_model, tmp_path, txt2img):
    """Every flag of QNCD's SD command (counts scaled down), then what each one did, read from the artifacts."""
    from pipeline.artifacts import load_artifact
    cfg_path, ckpt_path, prompts, _ = text_model
    runs = tmp_path / "runs"
    proc = txt2img("--config", cfg_path, "--ckpt", ckpt_path, "--plms", "--cond", "--weight_bit", 8, "--quant_mode",
                   "qncd", "--quant_act", "--act_bit", 8, "--cali_st", 4, "--cali_batch_size", 1, "--cali_n", 4,
                   "--no_grad_ckpt", "--ptq", "--scale_split_static", "--sample_reverse", "--reverse_interval", 10,
                   "--running_stat", "--sm_abit", 16, "--from_file", prompts, "--n_samples", 2, "--ddim_steps", 8,
                   "--scale", 7.5, "--outdir", tmp_path / "out", "-l", runs)
    assert proc.returncode == 0, proc.stderr
    run = runs / "custom" / "scale7.5_eta0_steps8_plms"
    cal = load_artifact(run / "calibration.pt", "calibration", {})
    assert cal["meta"]["plms"] and cal["meta"]["cali_st"] == 4
    assert sorted(set(cal["t"].tolist())) == [126, 376, 626, 876]    # steps 0, 2, 4, 6 of 8 (0: t 876)
    assert len(cal["t"]) == 2 * 4 * 4 and cal["c"].shape[1:] == (77, 16)   # cali_n x cali_st x (prompt, "")
    # QNCD's released SD path: per-channel W8 without reconstruction, transformer blocks in FP (so --sm_abit has
    # nothing to quantize, as there), no step-size learning, EMA ranges at batch --cali_batch_size, smoothing
    q = load_artifact(run / "w8a8" / "quant_w8a8.pt", "quant", {})["meta"]
    assert (q["w_bits"], q["a_bits"], q["sm_abit"], q["smoothing"], q["running_stat"]) == (8, 8, None, "code", "all")
    assert (q["policy"], q["channel_wise"], q["weight_iters"], q["act_iters"], q["rs_batch_size"]) == \
        ("qncd-sd", True, 0, 0, 1)
    assert "qncd" in proc.stdout and len(list((tmp_path / "out" / "samples").glob("*.png"))) == 3
    # the same model as a packed file (smoothing factors included), sampled from the file alone with int8 kernels
    export = load_script(REPO / "quant_scripts" / "export_packed.py", "export_packed_text")
    export.main(["--config", str(cfg_path), "--ckpt", str(ckpt_path), "--prompts", str(prompts), "--plms",
                 "--steps", "8", "--scale", "7.5", "--w_bits", "8", "--a_bits", "8", "--outdir", str(runs)])
    packed = run / "w8a8" / "packed_w8a8.pt"
    assert load_artifact(packed, "packed", {})["smoothing"] is not None
    proc = txt2img("--config", cfg_path, "--ckpt", ckpt_path, "--plms", "--ptq", "--quant_act", "--packed", packed,
                   "--execution", "integer", "--from_file", prompts, "--n_samples", 2, "--ddim_steps", 8,
                   "--scale", 7.5, "--outdir", tmp_path / "out2", "-l", runs)
    assert proc.returncode == 0, proc.stderr
    assert "integer execution:" in proc.stdout and len(list((tmp_path / "out2" / "samples").glob("*.png"))) == 3
    proc = txt2img("--config", cfg_path, "--ckpt", ckpt_path, "--packed", packed, "--outdir", tmp_path / "out3")
    assert proc.returncode == 2 and "add --ptq" in error_line(proc)
    # compiled fake-quant kernels: the fake-quant samples bit for bit (PLMS, smoothing, per-channel W8A8)
    from quant.quantizer import CompileUnavailable, check_compiled_fake_quant
    try:
        check_compiled_fake_quant(torch.device("cpu"))
    except CompileUnavailable as e:
        pytest.skip(f"the rest needs compiled kernels: {e}")
    images = {}
    for execution in ("fake", "compiled"):
        proc = txt2img("--config", cfg_path, "--ckpt", ckpt_path, "--plms", "--ptq", "--quant_act", "--packed", packed,
                       "--execution", execution, "--from_file", prompts, "--n_samples", 2, "--ddim_steps", 8,
                       "--scale", 7.5, "--outdir", tmp_path / execution, "-l", runs)
        assert proc.returncode == 0, proc.stderr
        images[execution] = [np.asarray(Image.open(f)) for f in sorted((tmp_path / execution / "samples").glob("*.png"))]
    assert len(images["fake"]) == 3 and all(np.array_equal(a, b) for a, b in zip(images["fake"], images["compiled"],
                                                                                strict=True))


# ---- calibration along PLMS trajectories (known answer) ------------------------------------------------------------


def test_plms_calibration_records_the_step_inputs(text_model):
    """Each kept input is the x_t the PLMS loop feeds the model at that step (not the first step's Euler look-ahead),
    for both guidance branches, with the branch's text embedding."""
    from ldm.models.diffusion.plms import PLMSSampler
    from ldm.sample import sample_latents
    from pipeline.families.stable_diffusion import TextToImageLDM
    from quant.calibration import TimestepDistribution, collect_calibration_set
    model = text_model[3]
    family = TextToImageLDM().with_prompts(["a photo of a bag", "a red dress"], "test")
    conditioner = family.conditioner(model, 7.5)
    labels = [0, 1]
    seen = []
    sample_latents(model, labels, settings=SamplingSettings(5, 0.0, 7.5, plms=True), batch_size=2, progress=False,
                   generator=torch.Generator().manual_seed(0), conditioner=conditioner,
                   shape=(4, 8, 8), model_fn=lambda x, t, c: (seen.append((int(t[0]), x.clone())),
                                                              model.apply_model(x, t, c))[1])
    data = collect_calibration_set(model, labels, n=2 * 2 * 5, settings=SamplingSettings(5, 0.0, 7.5, plms=True),
                                   seed=0, batch_size=2,
                                   distribution=TimestepDistribution.UNIFORM, progress=False,
                                   conditioner=conditioner)
    step_inputs = [x for k, (t, x) in enumerate(seen) if k != 1]   # call 1 is the Euler look-ahead
    c, uc = conditioner(labels)
    for i, x in enumerate(step_inputs):
        rows = slice(4 * i, 4 * i + 4)
        torch.testing.assert_close(data["x"][rows], x, atol=0, rtol=0)
        torch.testing.assert_close(data["c"][rows], torch.cat([uc, c]), atol=0, rtol=0)


# ---- step 7 over a prompt list -----------------------------------------------------------------------------------


def test_evaluation_samples_label_prompt_indices(text_model, tmp_path, capsys):
    import json
    cfg_path, ckpt_path, prompts, _ = text_model
    gen = load_script(REPO / "quant_scripts" / "generate_evaluation_samples_dist.py", "gen_text")
    proc = run_main(gen.main, ["--config", cfg_path, "--ckpt", ckpt_path, "--prompts", prompts, "--steps", 5,
                               "--eta", 0, "--scale", 7.5, "--n_samples", 6, "--batch_size", 3, "--sampler", "fp32",
                               "--outdir", tmp_path], capsys)
    assert proc.returncode == 0, proc.stderr
    (npz,) = tmp_path.glob("**/samples.npz")
    with np.load(npz) as f:
        assert f["arr_1"].tolist() == [0, 1, 2, 0, 1, 2] and f["arr_0"].shape == (6, 32, 32, 3)
    manifest = json.loads((npz.parent / "manifest.json").read_text())
    from pipeline.families.stable_diffusion import load_prompts, prompts_fingerprint
    assert manifest["prompts"] == prompts_fingerprint(load_prompts(prompts))


def test_prompts_flag_refused_for_a_class_model(tiny_checkpoints, tmp_path, capsys):
    cfg, ckpt = tiny_checkpoints["cond"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a bag\n")
    gen = load_script(REPO / "quant_scripts" / "generate_evaluation_samples_dist.py", "gen_class_prompts")
    line = error_line(run_main(gen.main, ["--config", cfg, "--ckpt", ckpt, "--prompts", prompts, "--steps", 5,
                                          "--n_samples", 4, "--outdir", tmp_path], capsys))
    assert "--prompts applies to text-to-image models" in line


def test_txt2img_refuses_a_class_model(tiny_checkpoints, tmp_path, txt2img):
    cfg, ckpt = tiny_checkpoints["cond"]
    line = error_line(txt2img("--config", cfg, "--ckpt", ckpt, "--prompt", "a bag", "--outdir", tmp_path / "o"))
    assert "txt2img needs a text-to-image model" in line


def test_safetensors_without_the_package_is_one_line(text_model, tmp_path, txt2img):
    try:
        import safetensors  # noqa: F401
        pytest.skip("safetensors is installed: the file would be read")
    except ImportError:
        pass
    cfg_path, _, prompts, _ = text_model
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    line = error_line(txt2img("--config", cfg_path, "--ckpt", f, "--from_file", prompts, "--outdir", tmp_path / "o"))
    assert "pip install safetensors" in line


def test_txt2img_defaults_to_the_embedded_text_model(tmp_path, txt2img):
    proc = txt2img("--prompt", "a photo of a bag", "--n_samples", 2, "--ddim_steps", 5, "--outdir", tmp_path / "o",
                   "-l", tmp_path / "runs", "--no_progress")
    assert proc.returncode == 0, proc.stderr
    assert "[fashion-txt2img]" in proc.stdout and len(list((tmp_path / "o" / "samples").glob("*.png"))) == 2
