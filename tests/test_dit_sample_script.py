"""quant_scripts/sample_dit.py (DiT's sample.py / sample_ddp.py command line) and ldm.dit_sample: the original's
sampling protocol on the tiny fixture DiT (../shared/fixtures/dit/small, recorded with torch.manual_seed(0)), the grid
and the evaluator's npz, and the embedded Fashion DiT with its VQ-f4 decoder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, SHARED, load_script, require_shared, run_main
from ldm.dit_sample import load_ldm_first_stage, sample_dit_latents
from ldm.models.diffusion.respace import RespacedSchedule
from ldm.modules.dit import DiT

DIT = SHARED / "fixtures" / "dit" / "small"
EMBEDDED = REPO / "models" / "dit" / "fashion" / "model.pt"


@pytest.fixture(scope="module")
def script():
    return load_script(REPO / "quant_scripts" / "sample_dit.py")


@pytest.fixture(scope="module")
def tiny():
    folder = require_shared(DIT)
    model = DiT(**json.loads((folder / "config.json").read_text())).eval()
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True), strict=True)
    return model, torch.load(folder / "outputs.pt", weights_only=True)


@pytest.fixture
def tiny_config(tmp_path):
    """A DiT yaml for the fixture model (no first_stage section: the decoder is --vae-dir's diffusers VAE)."""
    folder = require_shared(DIT)
    path = tmp_path / "tiny-dit.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"target": "ldm.modules.dit.DiT", "params": json.loads((folder / "config.json").read_text())},
        "checkpoint": str(folder / "model.pt"), "diffusion": {"num_timesteps": 1000, "timestep_respacing": "4"}}))
    return path


@pytest.mark.parametrize("run,method", [("ddpm", "ddpm"), ("ddim_eta0.0", "ddim"), ("ddim_eta1.0", "ddim")])
def test_sampling_protocol_reproduces_dit_sample_py(tiny, run, method, one_thread):
    """The recorded runs: torch.manual_seed(0), z = randn(2, 4, 8, 8), [z; z] with labels [3, 7, null, null], cfg
    1.5, 10 respaced steps, randn_like every step; a CPU generator seeded 0 draws the same stream."""
    model, outputs = tiny
    eta = 1.0 if run.endswith("1.0") else 0.0
    out = sample_dit_latents(model, torch.tensor([3, 7]), RespacedSchedule.make("10"), method=method, eta=eta,
                             cfg_scale=1.5, generator=torch.Generator().manual_seed(0))
    ref = outputs[f"{run}_samples"]
    err = (out.double() - ref.double()).abs().max().item()
    assert out.shape == ref.shape and err <= 1e-4 * ref.abs().max().item(), err
    # a different seed gives different samples
    other = sample_dit_latents(model, torch.tensor([3, 7]), RespacedSchedule.make("10"), method=method, eta=eta,
                               cfg_scale=1.5, generator=torch.Generator().manual_seed(1))
    assert (other - out).abs().max() > 1e-2


def test_grid_and_fid_npz_on_the_tiny_model(script, tiny_config, tmp_path, capsys, one_thread):
    vae = DIT / "vae"
    grid = tmp_path / "grid.png"
    r = run_main(script.main, ["--config", tiny_config, "--vae-dir", vae, "--out", grid, "--class-labels", 1, 2, 3,
                               "--nrow", 3, "--cfg-scale", 4], capsys)
    assert r.returncode == 0, r.stderr
    with Image.open(grid) as im:
        h = im.height - 4                       # one row of three, padding 2
        assert im.width == 3 * (h + 2) + 2 and h == 64
    # the evaluator's npz: class i mod 10, uint8 RGB; a rerun resumes (nothing to make) and keeps the bytes
    args = ["--config", tiny_config, "--vae-dir", vae, "--num-fid-samples", 20, "--per-proc-batch-size", 8,
            "--sample-dir", tmp_path / "samples", "--sampler", "ddim", "--eta", 0.5, "--seed", 3]
    r = run_main(script.main, args, capsys)
    assert r.returncode == 0, r.stderr
    npz = next((tmp_path / "samples").glob("*/samples.npz"))
    assert "ddim4-eta0.5-cfg-1.5-seed-3" in npz.parent.name
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (20, 64, 64, 3)
    assert labels.tolist() == [i % 10 for i in range(20)]
    assert len({images[i].tobytes() for i in range(20)}) == 20
    first = npz.read_bytes()
    r = run_main(script.main, args, capsys)
    assert r.returncode == 0 and "batch" not in r.stdout and npz.read_bytes() == first
    # other settings in the same folder are refused in one line, not mixed in
    manifest = npz.parent / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"eta": 0.5', '"eta": 0.25'))
    r = run_main(script.main, args, capsys)
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,message", [
    (["--cfg-scale", "0.5"], "--cfg-scale must be >= 1"),
    (["--eta", "0.3"], "--eta applies to --sampler ddim"),
    (["--num-sampling-steps", "0"], "--num-sampling-steps"),
    (["--class-labels", "10"], "--class-labels must be in 0..9"),
    (["--num-sampling-steps", "1001"], "cannot take 1001"),
    (["--model", "DiT-B/4", "--image-size", "256"], "pass --ckpt"),
])
def test_bad_flags_are_one_line(script, tiny_config, flags, message, capsys, tmp_path):
    base = ["--config", tiny_config, "--vae-dir", DIT / "vae", "--out", tmp_path / "g.png"]
    if "--model" in flags:
        base = ["--out", tmp_path / "g.png"]
    r = run_main(script.main, base + flags, capsys)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "g.png").exists()


def test_embedded_fashion_dit_is_the_default(script, tmp_path, capsys, one_thread):
    if not EMBEDDED.is_file():
        pytest.skip(f"{EMBEDDED} not trained yet (python train_dit.py)")
    grid = tmp_path / "fashion.png"
    r = run_main(script.main, ["--num-sampling-steps", 3, "--class-labels", 0, 9, "--out", grid], capsys)
    assert r.returncode == 0, r.stderr
    assert "fashion-ldm-vq-4" in r.stdout
    with Image.open(grid) as im:
        assert im.size == (2 * 34 + 2, 36)      # two 32×32 images, padding 2
        pixels = np.asarray(im)
    assert pixels.std() > 10                    # decoded garments, not a flat image


def test_vq_first_stage_round_trips_fashion_images():
    """Encode then decode 16 test images (the committed reference batch): LDM's scale and the VQ's reconstruction
    (mean error 0.07 of the [-1, 1] range; an image against another's reconstruction: 0.40)."""
    stage = load_ldm_first_stage(REPO / "models" / "ldm" / "fashion-ldm-vq-4")
    assert stage.scale_factor == pytest.approx(0.8736, abs=1e-4)
    with np.load(REPO / "models" / "eval" / "fashion_test_reference.npz") as f:
        x = torch.from_numpy(f["arr_0"][:16, :, :, 0]).float().div(127.5).sub(1)[:, None]
    z = stage.encode(x)
    assert z.shape == (16, 3, 8, 8) and 0.5 < float(z.std()) < 2.0     # scaled to about unit variance
    back = stage.decode(z).clamp(-1, 1)
    assert back.shape == x.shape
    assert float((back - x).abs().mean()) < 0.1 < 0.3 < float((back.roll(1, 0) - x).abs().mean())


# ---- a quantized --correction: the pipeline's DiT, artifacts and DDIM loop ------------------------------------------

def one_line(proc) -> str:
    """The single 'error: ...' stderr line of a refusal (exit status 2)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pipeline_outdir(tmp_path_factory):
    """Steps 1-5 of the embedded fashion-dit preset (its 20 DDIM steps, η 0, scale 1.5) with tiny counts, W4A8,
    through the typed steps; returns the pipeline's output root."""
    if not EMBEDDED.is_file():
        pytest.skip(f"{EMBEDDED} not trained yet (python train_dit.py)")
    from pipeline.layout import QuantTag
    from pipeline.run import Preset
    from pipeline.steps import calibrate, fit_noise, noise_statistics, quantize_activations, quantize_weights
    from quant.api import QuantConfig
    torch.set_num_threads(1)   # (tiny tensors; conftest restores the count after the test that first asks for this)
    outdir = tmp_path_factory.mktemp("dit-pipeline")
    run = Preset.load("fashion-dit").run(outdir, device="cpu")
    config, tag = QuantConfig(4, 8), QuantTag(4, 8)
    calibrate.run(run, calibrate.CalibrationSettings(n=32, n_holdout=8, trajectories_per_condition=1, batch_size=20))
    quantize_weights.run(run, config, quantize_weights.WeightSettings(iters=2))
    quantize_activations.run(run, config, quantize_activations.ActivationSettings(iters=2, init_samples=8))
    noise_statistics.run(run, noise_statistics.StatisticsSettings(n=10, batch_size=10, progress=False), tag)
    fit_noise.run(run, tag)
    return outdir


def test_a_quantized_correction_samples_the_pipelines_dit(script, pipeline_outdir, tmp_path, capsys, one_thread):
    """--correction loads step 3's W4A8 DiT and step 5's fit from --outdir (the preset's steps, η and scale where the
    flags are unset) and samples them with the pipeline's DDIM loop: a grid and the evaluator's npz, D-D² differing
    from the uncorrected model's from the same seed."""
    grids = {}
    for correction in ("dd2-channel", "none"):
        grids[correction] = tmp_path / f"{correction}.png"
        r = run_main(script.main, ["--correction", correction, "--w_bits", 4, "--a_bits", 8, "--outdir",
                                   pipeline_outdir, "--class-labels", 0, 3, 7, "--out", grids[correction]], capsys)
        assert r.returncode == 0, r.stderr
        assert f"DDIM 20 steps (eta 0), cfg 1.5, seed 0, {correction} W4A8" in r.stdout
    with Image.open(grids["dd2-channel"]) as im:
        pixels = np.asarray(im)
        assert im.size == (3 * 34 + 2, 36) and "quant=" in im.text["artifacts"] and "fit=" in im.text["artifacts"]
    with Image.open(grids["none"]) as im:
        assert "fit=" not in im.text["artifacts"]
        assert np.abs(pixels.astype(int) - np.asarray(im).astype(int)).max() > 0
    args = ["--correction", "dd2-channel", "--outdir", pipeline_outdir, "--num-fid-samples", 10,
            "--per-proc-batch-size", 5, "--sample-dir", tmp_path / "samples"]
    r = run_main(script.main, args, capsys)
    assert r.returncode == 0, r.stderr
    npz = next((tmp_path / "samples").glob("*/samples.npz"))
    assert npz.parent.name.endswith("ddim20-eta0-cfg-1.5-seed-0-dd2-channel-w4a8")
    manifest = json.loads((npz.parent / "manifest.json").read_text())
    assert manifest["correction"] == "dd2-channel" and manifest["bits"] == "w4a8" and manifest["steps"] == 20
    with np.load(npz) as f:
        assert f["arr_0"].shape == (10, 32, 32, 3) and f["arr_1"].tolist() == list(range(10))
        assert f["arr_0"].std() > 10


def test_other_settings_than_the_artifacts_are_one_line(script, pipeline_outdir, tmp_path, capsys):
    """Artifacts of 20 steps do not drive a 10-step chain: the line names the settings they exist for in this
    script's flags, and the pipeline's flags to make them for these."""
    line = one_line(run_main(script.main, ["--correction", "dd2-channel", "--outdir", pipeline_outdir,
                                           "--num-sampling-steps", 10, "--out", tmp_path / "g.png"], capsys))
    assert "--num-sampling-steps 20 --eta 0 --cfg-scale 1.5" in line
    assert "--preset fashion-dit --steps 10 --eta 0 --scale 1.5" in line
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("flags,message", [
    (["--correction", "dd2-channel", "--sampler", "ddpm"], "pass --sampler ddim"),
    (["--correction", "dd2-channel"], "quantize_weight_activation.py --w_bits 4 --a_bits 8"),
    (["--correction", "ptqd", "--w_bits", 8], "W8A8 quantized model not found"),
    (["--correction", "dd3-channel"], "unknown sampler 'dd3-channel'"),
    (["--correction", "none", "--vae-dir", "somewhere"], "--vae-dir does nothing with a quantized --correction"),
    (["--correction", "none", "--num-sampling-steps", 1001], "--num-sampling-steps 1001"),
    (["--correction", "qncd-r30", "--num-sampling-steps", 10], "never runs in 10 steps"),
    (["--execution", "integer"], "--correction fp32 samples the FP DiT"),
    (["--correction", "none", "--model", "DiT-B/4"], "pipeline --config"),
])
def test_quantized_flags_are_refused_in_one_line_before_anything_is_written(script, flags, message, tmp_path,
                                                                            capsys):
    """Checked from the flags and the yaml alone (no model loaded): the DDPM loop with a DDIM fit, a missing
    artifact (naming the step that makes it and the pipeline's flags of the run), options that would do nothing."""
    outdir = tmp_path / "outputs"
    line = one_line(run_main(script.main, flags + ["--outdir", outdir, "--out", tmp_path / "g.png"], capsys))
    assert message in line
    if "not found" in message or "quantize_weight" in message:
        assert "--preset fashion-dit --steps 20 --eta 0 --scale 1.5" in line
    assert not (tmp_path / "g.png").exists() and not outdir.exists()


def test_a_sampling_config_is_not_a_pipeline_config(script, tiny_config, tmp_path, capsys):
    line = one_line(run_main(script.main, ["--config", tiny_config, "--correction", "none", "--outdir", tmp_path,
                                           "--out", tmp_path / "g.png"], capsys))
    assert "not a pipeline DiT config" in line and "ldm.models.dit_diffusion.DiTDiffusion" in line
