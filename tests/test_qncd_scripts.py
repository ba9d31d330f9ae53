"""QNCD's two command lines (quant_scripts/txt2img.py, quant_scripts/sample_diffusion_ddim.py) compose the pipeline
from typed objects: their flags become a Run, CalibrationSettings, QuantConfig, ... once, the steps are called with
them (no argument lists for other scripts), and ``--cali_ckpt`` is adopted by the one pipeline function."""
from __future__ import annotations

import ast

import pytest

import tiny_models
from conftest import REPO, error_line, load_script, run_main
from ldm.util import UserFacingError
from pipeline.artifacts import ArtifactMismatch, load_artifact, save_artifact
from pipeline.quantize import QUANT_KIND, adopt_quant_artifact
from quant.quantizer import PerChannel

SCRIPTS = ("txt2img", "sample_diffusion_ddim")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return tiny_models.write_text_model(tmp_path_factory.mktemp("text"),
                                        ["a photo of a bag", "a photo of a coat", "a red dress"])[:3]


@pytest.fixture(scope="module")
def txt2img():
    return load_script(REPO / "quant_scripts" / "txt2img.py", "qncd_scripts_txt2img")


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_scripts_import_no_other_script(name):
    tree = ast.parse((REPO / "quant_scripts" / f"{name}.py").read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if m.split(".")[0] == "quant_scripts"], modules


# ---- adopt_quant_artifact: --cali_ckpt of both scripts -------------------------------------------------------------

RUN = {"model": "m.yaml", "ckpt": "c", "steps": 4, "eta": 0.0, "scale": 1.0}


def test_adopt_checks_bits_then_meta_before_copying(tmp_path, capsys):
    src, dest = tmp_path / "made" / "quant_w8a8.pt", tmp_path / "run" / "w8a8" / "quant_w8a8.pt"
    save_artifact(src, QUANT_KIND, {**RUN, "w_bits": 8, "a_bits": 8, "sm_abit": None}, {"quant_state": {}})
    expect = {**RUN, "w_bits": 8, "a_bits": 8, "sm_abit": None}
    with pytest.raises(UserFacingError, match=r"^--cali_ckpt .*quant_w8a8.pt is W8A8, but W4A8 is asked for$"):
        adopt_quant_artifact(src, dest, {**expect, "w_bits": 4}, (4, 8), "W4A8 is asked for")
    with pytest.raises(ArtifactMismatch, match="steps"):
        adopt_quant_artifact(src, dest, {**expect, "steps": 5}, (8, 8), "W8A8 is asked for")
    assert not dest.parent.exists()
    assert adopt_quant_artifact(src, dest, expect, (8, 8), "W8A8 is asked for") == dest
    assert dest.read_bytes() == src.read_bytes() and "--cali_ckpt: using" in capsys.readouterr().out
    assert adopt_quant_artifact(dest, dest, expect, (8, 8), "-") == dest   # already in place: nothing copied
    assert capsys.readouterr().out == "" and [p.name for p in dest.parent.iterdir()] == [dest.name]


# ---- txt2img: the flags as typed objects ---------------------------------------------------------------------------


def test_txt2img_flags_become_the_step_settings(text_model, txt2img):
    cfg, ckpt, prompts = text_model
    args = txt2img.parse_args(["--config", str(cfg), "--ckpt", str(ckpt), "--from_file", str(prompts), "--ptq",
                               "--quant_act", "--cali_n", "4", "--cali_st", "4", "--scale_split_static"])
    preset = txt2img.Preset.load(txt2img.PRESET)
    source, settings = txt2img.model_of(args, preset), txt2img.sampling_of(args, preset)
    assert (source.preset, source.config, source.prompts) == ("custom", str(cfg), str(prompts))
    assert (settings.steps, settings.scale, settings.plms) == (txt2img.CUSTOM_STEPS, txt2img.CUSTOM_SCALE, False)
    cal = txt2img.calibration_of(args, n_prompts=3, steps=8, batch_size=250)
    # 4 latents x 4 steps x (prompt, "") kept, 1/8 more held out, from 5 trajectories over the 3 prompts
    assert (cal.n, cal.n_holdout, cal.trajectories_per_condition, cal.classes, cal.cali_st) == (32, 8, 2, (0, 1, 2), 4)
    config = txt2img.quant_config_of(args)
    assert (config.w_bits, config.a_bits, config.policy, config.smoothing, config.sm_abit) == \
        (8, 8, "qncd-sd", "code", None)
    assert isinstance(config.granularity, PerChannel)
    # --sm_abit reaches the model only where attention is quantized, and is checked there
    args = txt2img.parse_args(["--ptq", "--quant_act", "--policy", "all", "--sm_abit", "20"])
    with pytest.raises(UserFacingError, match="--sm_abit must be in 2..16, got 20"):
        txt2img.quant_config_of(args)


def test_txt2img_cali_ckpt_is_checked_then_used(text_model, txt2img, tmp_path, capsys):
    cfg, ckpt, prompts = text_model
    common = ["--config", cfg, "--ckpt", ckpt, "--from_file", prompts, "--n_samples", 3, "--ddim_steps", 4,
              "--skip_grid", "--no_progress", "--ptq", "--quant_act", "--cali_n", 2, "--cali_st", 2]
    proc = run_main(txt2img.main, common + ["--outdir", tmp_path / "a", "-l", tmp_path / "made"], capsys)
    assert proc.returncode == 0, proc.stderr
    made = tmp_path / "made" / "custom" / "scale7.5_eta0_steps4" / "w8a8" / "quant_w8a8.pt"
    line = error_line(run_main(txt2img.main, common + ["--act_bit", 6, "--cali_ckpt", made, "--outdir",
                                                       tmp_path / "b", "-l", tmp_path / "runs"], capsys))
    assert "is W8A8, but W8A6 is asked for (--weight_bit, --quant_act --act_bit)" in line, line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "b").exists()
    proc = run_main(txt2img.main, common + ["--cali_ckpt", made, "--outdir", tmp_path / "b", "-l", tmp_path / "runs"],
                    capsys)
    assert proc.returncode == 0, proc.stderr
    used = tmp_path / "runs" / "custom" / "scale7.5_eta0_steps4" / "w8a8" / "quant_w8a8.pt"
    assert used.read_bytes() == made.read_bytes()
    assert not (used.parent.parent / "calibration.pt").exists()   # steps 1-3 skipped
    assert load_artifact(used, QUANT_KIND, {})["meta"]["policy"] == "qncd-sd"
    assert len(list((tmp_path / "b" / "samples").glob("*.png"))) == 3
