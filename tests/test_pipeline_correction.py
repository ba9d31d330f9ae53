"""Pipeline steps 4-6 on a tiny random LDM, through the scripts' main(argv): noise statistics (with resume after a
kill), Gaussian and PTQD fits, corrected sampling with every variant, and the one-line errors on mismatches."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models
from conftest import REPO, error_line, load_script, run_main
from integer_checks import assert_integer_is_fake_quant
from ldm.models.diffusion.settings import SamplingSettings
from correction.gaussian import GaussianFit, Granularity
from pipeline.artifacts import ArtifactMismatch, file_fingerprint
from pipeline.families import family_for
from pipeline.layout import QuantTag, RunLayout
from pipeline.sampler_spec import LISTED as VARIANTS
from pipeline.sampler_spec import SamplerSpec, UnknownSampler
from pipeline.sampling import build_variant

STEPS = 5
RUN = f"scale3_eta0_steps{STEPS}"


@pytest.fixture(scope="module")
def scripts():
    names = ("collect_imagenet_calibration_set", "quantize_weight", "quantize_weight_activation",
             "collect_timestep_aware_statistics", "gaussian_modeling", "sample_quantized_ldm_imagenet",
             "generate_evaluation_samples_dist", "export_packed")
    return {n: load_script(REPO / "quant_scripts" / f"{n}.py") for n in names}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, scripts):
    """Steps 1-5 on a tiny model, once for the module: returns (common flags, run dir, model)."""
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and immune to a loaded machine
    tmp = tmp_path_factory.mktemp("pipe")
    model = tiny_models.build(tiny_models.config(tiny_models.CLASS_COND))
    cfg_path, ckpt = tiny_models.write(tiny_models.config(tiny_models.CLASS_COND), model, tmp / "m")
    common = ["--config", str(cfg_path), "--ckpt", str(ckpt), "--steps", str(STEPS), "--outdir", str(tmp / "out")]
    scripts["collect_imagenet_calibration_set"].main(
        common + ["--n", "32", "--n_holdout", "8", "--calibration_trajectories_per_class", "2"])
    scripts["quantize_weight"].main(common + ["--weight_iters", "2"])
    scripts["quantize_weight_activation"].main(common + ["--act_iters", "2", "--act_init_samples", "8"])
    scripts["collect_timestep_aware_statistics"].main(common + ["--n", "12", "--batch_size", "3", "--no_progress"])
    scripts["gaussian_modeling"].main(common)
    return common, tmp / "out" / "custom" / RUN, model, tmp


def run_one_line(main, argv, capsys):
    """main(argv) under run_cli: the one stderr line it printed (exit status 2)."""
    return error_line(run_main(main, argv, capsys))


def test_artifacts_carry_their_meta(pipe):
    common, run, model, _ = pipe
    d = run / "w4a8"
    stats = torch.load(d / "noise_stats.pt", weights_only=True)
    m = stats["meta"]
    qfp = file_fingerprint(d / "quant_w4a8.pt")
    assert m["format"] == "noise_stats" and (m["steps"], m["eta"], m["scale"]) == (STEPS, 0.0, 3.0)
    assert (m["w_bits"], m["a_bits"], m["n"], m["seed"], m["quant"]) == (4, 8, 12, 0, qfp)
    assert m["timesteps"] == [1, 201, 401, 601, 801] and m["ckpt"] == file_fingerprint(common[3])
    assert stats["state"]["samples"].tolist() == [12] * STEPS
    assert not (d / "noise_stats.partial.pt").exists() and not (d / "noise_stats_spill").exists()
    for g in ("tensor", "channel"):
        obj = torch.load(d / f"gaussian_{g}.pt", weights_only=True)
        assert obj["meta"]["format"] == "gaussian" and obj["meta"]["granularity"] == g
        assert (obj["meta"]["quant"], obj["meta"]["timesteps"], obj["meta"]["outlier_k"]) == (qfp, m["timesteps"], 4.)
        fit = GaussianFit.from_dict(obj["fit"])
        assert fit.granularity is Granularity(g) and fit.channels == (1 if g == "tensor" else 3)
        assert bool((fit.sigma_y > 0).all()) and bool((fit.rho.abs() < 1).all())
    ptqd = torch.load(d / "ptqd.pt", weights_only=True)
    assert ptqd["meta"]["format"] == "ptqd" and ptqd["meta"]["noise_stats"] == file_fingerprint(d / "noise_stats.pt")
    assert Image.open(d / "noise_stats.png").size[0] > 1000


def test_statistics_resume_after_a_kill(pipe, scripts, monkeypatch, capsys):
    common, run, _, tmp = pipe
    out2 = tmp / "out2"
    (out2 / "custom" / RUN / "w4a8").mkdir(parents=True)
    shutil.copy(run / "w4a8" / "quant_w4a8.pt", out2 / "custom" / RUN / "w4a8")
    mod = scripts["collect_timestep_aware_statistics"]
    from pipeline.steps import noise_statistics as step
    real = step.collect_noise_statistics

    def killed_after_3_batches(*a, on_batch, **kw):
        def ob(stats, done):
            on_batch(stats, done)
            if done == 9:  # a checkpoint at 6 (every 2 batches); batch 3's spilled rows are past it
                raise KeyboardInterrupt
        return real(*a, on_batch=ob, **kw)

    argv = common[:-1] + [str(out2), "--n", "12", "--batch_size", "3", "--no_progress", "--save_every", "2"]
    monkeypatch.setattr(step, "collect_noise_statistics", killed_after_3_batches)
    with pytest.raises(KeyboardInterrupt):
        mod.main(argv)
    d2 = out2 / "custom" / RUN / "w4a8"
    assert (d2 / "noise_stats.partial.pt").exists() and not (d2 / "noise_stats.pt").exists()
    assert (d2 / "noise_stats_spill" / "t0001.f32").stat().st_size == 9 * 2 * 3 * 8 * 8 * 4
    monkeypatch.setattr(step, "collect_noise_statistics", real)
    capsys.readouterr()
    mod.main(argv)
    out = capsys.readouterr().out
    assert "resuming from" in out and "6 of 12 trajectories done" in out
    a = torch.load(run / "w4a8" / "noise_stats.pt", weights_only=True)
    b = torch.load(d2 / "noise_stats.pt", weights_only=True)
    for key in ("n", "s1", "s2", "samples"):
        assert torch.equal(a["state"][key], b["state"][key]), key
    for g in ("tensor", "channel"):
        for key in ("n", "s1", "s2"):
            assert torch.equal(a["filtered"][g][key], b["filtered"][g][key]), (g, key)
    mod.main(argv)  # up to date: skipped
    assert "skipping" in capsys.readouterr().out
    # a refit with another k needs the spilled values: kept on request
    mod.main(argv + ["--force", "--keep_spill"])
    assert (d2 / "noise_stats_spill" / "t0001.f32").stat().st_size == 12 * 2 * 3 * 8 * 8 * 4
    scripts["gaussian_modeling"].main(common[:-1] + [str(out2), "--outlier_k", "2"])
    k2 = torch.load(d2 / "gaussian_tensor.pt", weights_only=True)
    k4 = torch.load(run / "w4a8" / "gaussian_tensor.pt", weights_only=True)
    assert k2["meta"]["outlier_k"] == 2.0 and bool((k2["fit"]["count"] < k4["fit"]["count"]).all())


def test_every_variant_builds_and_samples(pipe, scripts):
    common, run, model, _ = pipe
    from ldm.sample import sample_latents
    from ldm.util import load_config
    expect = {"model": common[1], "ckpt": file_fingerprint(common[3]), "steps": STEPS, "eta": 0.0, "scale": 3.0}
    family = family_for(load_config(common[1]))
    layout, tag = RunLayout(run.parent.parent, "custom", STEPS, 0.0, 3.0), QuantTag(4, 8)
    assert layout.run_dir == run

    def build(name):
        return build_variant(SamplerSpec.parse(name), family, model, layout, tag, expect)

    outs = {}
    for name in VARIANTS:
        v = build(name)
        assert v.quantized == (name != "fp32") and (v.fit is None) == (name in ("fp32", "none", "qncd"))
        g = torch.Generator().manual_seed(0)
        outs[name] = sample_latents(model, [0, 1, 2], settings=SamplingSettings(STEPS, 0.0, 3.0), generator=g,
                                    model_fn=v.model_fn, correction=v.correction_for(torch.Generator().manual_seed(1)),
                                    progress=False)
        assert torch.isfinite(outs[name]).all(), name
    assert not torch.equal(outs["fp32"], outs["none"])
    from correction.qncd import QNCDProbe
    probes = QNCDProbe().extra_calls(STEPS)  # R = 10: a short chain may have no probe step at all
    for name in VARIANTS[2:]:
        changed = not torch.equal(outs[name], outs["none"])
        probe_only = name == "qncd" or name.startswith("cprobe")   # (these act at probe steps only)
        assert changed == (probes > 0 or not probe_only), name
    with pytest.raises(Exception, match="Generator"):
        build("sd2-tensor").correction_for(None)
    # the script: one sampler, deterministic; and the comparison grid
    sample = scripts["sample_quantized_ldm_imagenet"].main
    argv = common + ["--sampler", "sd2-channel", "--classes", "0", "1", "--n_samples_per_class", "2", "--no_progress"]
    sample(argv)
    png = run / "w4a8" / "samples" / f"sd2-channel_w4a8_steps{STEPS}_eta0_scale3_seed42.png"
    first = png.read_bytes()
    sample(argv)
    assert png.read_bytes() == first
    sample(common + ["--compare", "--classes", "0", "1", "2", "--no_progress"])
    grid = Image.open(next((run / "w4a8" / "samples").glob("compare_*.png")))
    assert grid.size[1] == 4 * 34 + 2 and grid.text["sampler"] == "fp32 | none | ptqd | dd2-channel"
    assert grid.size[0] == 8 + 7 * len("dd2-channel") + 3 * 34 + 2   # --compare: one sample per class
    # QNCD's flags: --sample_reverse puts the probe on top of --sampler, --reverse_interval sets its period, and
    # both are in the output's name (a probe every 2 steps of the short chain changes the samples)
    v = build("qncd-r2+sd2-channel")
    probe = v.correction_for(torch.Generator().manual_seed(1))
    assert probe.interval == 2 and probe.extra_calls(STEPS) > 0 and v.fit is not None
    sample(argv + ["--sample_reverse", "--reverse_interval", "2"])
    reversed_png = run / "w4a8" / "samples" / f"qncd-r2+sd2-channel_w4a8_steps{STEPS}_eta0_scale3_seed42.png"
    assert reversed_png.read_bytes() != first


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "fp32", "--sample_reverse"], "adds QNCD's probe to a quantized sampler; 'fp32' is not one"),
    (["--sampler", "qncd", "--sample_reverse"], "'qncd' is not one"),
    (["--sampler", "dd2-channel", "--reverse_interval", "5"], "add --sample_reverse"),
    (["--sampler", "none", "--sample_reverse", "--reverse_interval", "0"], "--reverse_interval must be >= 1"),
    (["--sampler", "qncd+bogus"], "unknown sampler 'qncd+bogus'"),
])
def test_qncd_sampling_flags_are_checked_before_anything_loads(scripts, capsys, argv, message):
    line = run_one_line(scripts["generate_evaluation_samples_dist"].main, ["--n_samples", "10"] + argv, capsys)
    assert message in line


def test_qncd_sampler_names():
    from pipeline.sampler_spec import FitKind
    parse = SamplerSpec.parse
    assert [str(parse("none").with_probe()), str(parse("dd2-channel").with_probe()),
            str(parse("ptqd").with_probe(5))] == ["qncd", "qncd+dd2-channel", "qncd-r5+ptqd"]
    assert parse("qncd-r5+ptqd").fit is FitKind.PTQD and parse("qncd").fit is None
    assert "R = 5" in parse("qncd-r5").description
    for bad in ("qncd+none", "qncd+fp32", "qncd-r0", "qncd+qncd", "qncdx", "qncd-r10"):
        with pytest.raises(UnknownSampler, match="unknown sampler"):
            parse(bad)


def test_mismatches_are_one_line_errors(pipe, scripts, capsys):
    common, run, _, tmp = pipe
    sample, fit = scripts["sample_quantized_ldm_imagenet"].main, scripts["gaussian_modeling"].main
    stats = scripts["collect_timestep_aware_statistics"].main
    flags = ["--no_progress", "--classes", "0"]
    # another step count: nothing there, and the message points at the setting that has artifacts
    line = run_one_line(sample, common[:4] + ["--steps", "7", "--outdir", common[-1]] + flags, capsys)
    assert "not found" in line and f"exists for other settings: sample with --steps {STEPS} --eta 0 --scale 3" in line
    # artifacts of the 5-step run copied under a 7-step run directory: the meta names both values
    shutil.copytree(run / "w4a8", run.parent / "scale3_eta0_steps7" / "w4a8")
    line = run_one_line(sample, common[:4] + ["--steps", "7", "--outdir", common[-1]] + flags, capsys)
    assert "steps=5" in line and "steps=7" in line
    # bits that were never quantized
    line = run_one_line(sample, common + ["--w_bits", "8"] + flags, capsys)
    assert "W8A8 quantized model not found" in line and "quantize_weight_activation.py --w_bits 8" in line
    line = run_one_line(stats, common + ["--a_bits", "6", "--n", "4"], capsys)
    assert "W4A6 quantized model not found" in line
    # a missing fit names the step that makes it; statistics missing name step 4
    other = tmp / "out3" / "custom" / RUN / "w4a8"
    other.mkdir(parents=True)
    shutil.copy(run / "w4a8" / "quant_w4a8.pt", other)
    out3 = common[:-1] + [str(tmp / "out3")]
    line = run_one_line(sample, out3 + ["--sampler", "ptqd"] + flags, capsys)
    assert "ptqd artifact not found" in line and "gaussian_modeling.py" in line
    line = run_one_line(fit, out3, capsys)
    assert "noise_stats artifact not found" in line and "collect_timestep_aware_statistics.py" in line
    # the uncorrected variant needs only the quantized model
    sample(out3 + ["--sampler", "none"] + flags)
    # a fit asked for with a filter the stored statistics cannot give (no spill kept)
    line = run_one_line(fit, common + ["--outlier_k", "3"], capsys)
    assert "--keep_spill" in line
    with pytest.raises(ArtifactMismatch, match="another quant_w4a8.pt"):  # statistics of a replaced quantized model
        q = other / "quant_w4a8.pt"
        shutil.copy(run / "w4a8" / "noise_stats.pt", other)
        obj = torch.load(q, weights_only=True)
        obj["meta"]["sqnr_db"] = -1.0
        torch.save(obj, q)
        fit(out3)


# ---- the packed export: the quantized UNet from one file, fake-quant or integer kernels -------------------------

@torch.no_grad()
def test_packed_file_alone_rebuilds_the_quantized_unet(pipe, scripts, capsys):
    """export_packed writes the file; a model loaded WITHOUT the checkpoint's UNet weights, filled from it, gives
    the fake-quant model's ε exactly, and with integer kernels within float rounding."""
    from ldm.util import load_config
    from pipeline.packed import Execution, apply_execution, load_packed_model
    from pipeline.quantize import load_quant_model
    common, run, _, _ = pipe
    scripts["export_packed"].main(common)
    path = run / "w4a8" / "packed_w4a8.pt"
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["format"] == "packed" and meta["quant"] == file_fingerprint(run / "w4a8" / "quant_w4a8.pt")
    assert (meta["w_bits"], meta["a_bits"], meta["policy"]) == (4, 8, "d2dpm")
    assert path.stat().st_size < meta["fp32_unet_bytes"] / 4         # W4 codes, the FP32 rest (tiny: norms weigh)
    scripts["export_packed"].main(common)   # current: skipped
    assert "skipping" in capsys.readouterr().out
    cfg = load_config(common[1])
    family = family_for(cfg)
    expect = {"model": common[1], "ckpt": file_fingerprint(common[3]), "steps": STEPS, "eta": 0.0, "scale": 3.0,
              "w_bits": 4, "a_bits": 8, "sm_abit": None}
    full = family.load(cfg, common[3], device=torch.device("cpu"))
    ref_qm, _ = load_quant_model(family.unet(full), run / "w4a8" / "quant_w4a8.pt", expect, family=family)
    bare = family.load(cfg, common[3], device=torch.device("cpu"), without_unet=True)
    name, w = next(iter(family.unet(full).state_dict().items()))
    assert not torch.equal(family.unet(bare).state_dict()[name], w)   # the UNet did not come from the checkpoint
    qm, _ = load_packed_model(family.unet(bare), path, expect, family=family)
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 801])
    c = full.get_learned_conditioning({"class_label": torch.tensor([0, 3])})
    ref = ref_qm(x, t, context=c)
    assert torch.equal(qm(x, t, context=c), ref)
    report = apply_execution(qm, Execution.INTEGER, quiet=True)
    assert sum(v == "onednn" for v in report.values()) > len(report) // 2
    # the integer model is the fake-quant model's function on any CPU: per layer within float rounding, end to end
    # up to activation codes flipped at rounding ties (tests/integer_checks.py)
    assert_integer_is_fake_quant(qm.model, ref_qm.model, lambda unet: unet(x, t, context=c))


def test_packed_sampling_and_refusals(pipe, scripts, capsys, tmp_path):
    common, run, _, _ = pipe
    scripts["export_packed"].main(common)
    path = run / "w4a8" / "packed_w4a8.pt"
    sample = scripts["sample_quantized_ldm_imagenet"].main
    argv = common + ["--sampler", "dd2-channel", "--classes", "0", "1", "--no_progress"]
    sample(argv)
    sample(argv + ["--packed", str(path)])
    sample(argv + ["--packed", str(path), "--execution", "integer"])
    sample(common + ["--sampler", "fp32", "--classes", "0", "1", "--no_progress"])
    out = capsys.readouterr().out
    assert "integer execution:" in out and "onednn" in out
    grids = run / "w4a8" / "samples"
    images = [np.asarray(Image.open(grids / f"{name}_w4a8{s}_steps{STEPS}_eta0_scale3_seed42.png"), dtype=np.int16)
              for name, s in (("dd2-channel", ""), ("dd2-channel", "-packed"), ("dd2-channel", "-packed-int"),
                              ("fp32", ""))]
    assert np.array_equal(images[0], images[1])                       # the same model, bit for bit
    # integer sums: codes at rounding ties may flip; far less change than quantization itself makes
    assert np.abs(images[2] - images[0]).mean() < 0.25 * np.abs(images[3] - images[0]).mean()
    # refused with one line: another model's file, a file whose layers do not fit its policy, FP beside --packed
    other = tmp_path / "other.pt"
    obj = torch.load(path, weights_only=True)
    torch.save({**obj, "meta": {**obj["meta"], "ckpt": "sha256:0"}}, other)
    line = run_one_line(sample, argv + ["--packed", str(other)], capsys)
    assert "ckpt" in line and "export_packed.py" in line
    torch.save({**obj, "meta": {**obj["meta"], "policy": "all"}}, other)
    line = run_one_line(sample, argv + ["--packed", str(other)], capsys)
    assert "does not fit" in line
    line = run_one_line(sample, common + ["--compare", "--packed", str(path)], capsys)
    assert "--packed" in line and "FP32" in line
    assert "no such file" in run_one_line(sample, argv + ["--packed", str(tmp_path / "nope.pt")], capsys)


def test_compiled_execution_samples_the_fake_quant_grid(pipe, scripts, compiled_kernels):
    """``--execution compiled``: the D² grid of the fake-quant model, bit for bit, under its own name."""
    common, run, _, _ = pipe
    sample = scripts["sample_quantized_ldm_imagenet"].main
    argv = common + ["--sampler", "dd2-channel", "--classes", "0", "1", "--no_progress", "--seed", "3"]
    sample(argv)
    sample(argv + ["--execution", "compiled"])
    fake, compiled = (np.asarray(Image.open(run / "w4a8" / "samples" /
                                            f"dd2-channel_w4a8{s}_steps{STEPS}_eta0_scale3_seed3.png"))
                      for s in ("", "-compiled"))
    assert np.array_equal(fake, compiled) and fake.std() > 0


def test_compiled_execution_refusals(pipe, scripts, capsys, monkeypatch):
    """``--execution compiled`` refuses an FP32 sampler (nothing would run compiled) and, where torch.compile cannot
    build the kernel (no C++ compiler), says so in one line naming the fix, before any sample is written."""
    import quant.quantizer as quantizer
    common, run, _, _ = pipe
    sample = scripts["sample_quantized_ldm_imagenet"].main
    line = run_one_line(sample, common + ["--sampler", "fp32", "--execution", "compiled"], capsys)
    assert line.startswith("error: --execution compiled") and "pick a quantized --sampler" in line

    def broken(*args):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\n...")
    monkeypatch.setattr(quantizer, "_compiled_kernel", lambda: broken)
    before = sorted((run / "w4a8").rglob("*"))
    line = run_one_line(sample, common + ["--sampler", "dd2-channel", "--classes", "0", "--no_progress",
                                          "--seed", "7", "--execution", "compiled"], capsys)
    assert "--execution compiled: torch.compile could not build" in line and "--execution fake" in line
    assert sorted((run / "w4a8").rglob("*")) == before
