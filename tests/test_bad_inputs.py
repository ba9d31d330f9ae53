"""Issue 32: bad or edge inputs a new user tries. Each mechanism once: output paths checked before work (never an
input, a directory or an artifact of another kind), settings validated by meaning with the flag the user typed,
every flag checked before anything is written, numbering that cannot race, options that would do nothing refused,
and artifacts verified against the checksum of their tensors."""
from __future__ import annotations

import functools
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
from conftest import REPO, error_line, load_script, run_main

SCRIPTS = REPO / "quant_scripts"


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return tiny_models.write_text_model(tmp_path_factory.mktemp("text"),
                                        ["a photo of a bag", "a photo of a coat", "a red dress"])[:3]


def script(name: str, capsys):
    module = load_script(SCRIPTS / f"{name}.py", f"bad_inputs_{name}")
    return lambda *argv: run_main(module.main, argv, capsys)


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png")) if folder.exists() else []


# ---- 1. output paths ---------------------------------------------------------------------------------------------


def fashion_quant_path(outdir: Path) -> Path:
    from pipeline import cli
    ns = load_script(SCRIPTS / "export_packed.py", "bad_inputs_export_ns").parse_args(["--outdir", str(outdir)])
    cli.apply_preset(ns, "fashion")
    return cli.run_of(ns).layout.quant(cli.tag_of(ns))


def test_export_packed_never_writes_over_its_input_or_a_directory(tmp_path, capsys):
    from pipeline.artifacts import save_artifact
    qpath = fashion_quant_path(tmp_path)
    save_artifact(qpath, "quant", {"w_bits": 4}, {"quant_state": {"x": torch.ones(3)}})
    before = qpath.read_bytes()
    export = script("export_packed", capsys)
    line = error_line(export("--outdir", tmp_path, "--out", qpath))
    assert "--out" in line and "is also an input" in line, line
    assert qpath.read_bytes() == before
    line = error_line(export("--outdir", tmp_path, "--out", tmp_path))
    assert "is a directory" in line, line


def test_an_artifact_of_another_kind_is_refused_not_redone(tmp_path):
    from ldm.util import UserFacingError
    from pipeline.artifacts import check_output_path, is_current, save_artifact
    path = tmp_path / "quant.pt"
    save_artifact(path, "quant", {}, {"x": torch.zeros(2)})
    with pytest.raises(UserFacingError, match="is a 'quant' artifact.*not overwritten"):
        is_current(path, "packed", {})
    (tmp_path / "image.png").write_bytes(b"\x89PNG not ours")
    with pytest.raises(UserFacingError, match="not a pipeline artifact"):
        check_output_path(tmp_path / "image.png", "packed", flag="--out")
    assert is_current(tmp_path / "new.pt", "packed", {}) is False   # absent: the step makes it


# ---- 2. settings by meaning, named as typed ----------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["--ddim_eta", "5"], "--ddim_eta must be in [0, 1]"),
    (["--ddim_eta", "1.0001"], "--ddim_eta must be in [0, 1]"),
    (["--ddim_steps", "0"], "--ddim_steps must be >= 1"),
    (["--n_samples", "0"], "--n_samples must be >= 1"),
    (["--n_iter", "0"], "--n_iter must be >= 1"),
    (["--n_rows", "-1"], "--n_rows must be >= 0"),
    (["--eval", "0"], "--eval must be >= 1"),
    (["--eval", "4"], "--eval 4: 4 samples cannot be split evenly"),   # 4 samples over 3 prompts: step 7's plan, before any PNG
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--H", "0"], "--H must be >= 1"),
    (["--ptq", "--cali_st", "0"], "--cali_st must be >= 1"),
    (["--ptq", "--cali_st", "9", "--ddim_steps", "5"], "--cali_st 9 must be at most the 5 sampling steps"),
    (["--ptq", "--quant_act", "--sample_reverse", "--reverse_interval", "100", "--ddim_steps", "5"],
     "--reverse_interval 100"),
])
def test_txt2img_refuses_before_writing_anything(text_model, tmp_path, capsys, argv, fragment):
    cfg, ckpt, prompts = text_model
    proc = script("txt2img", capsys)("--config", cfg, "--ckpt", ckpt, "--from_file", prompts, "--outdir",
                                     tmp_path / "img", "-l", tmp_path / "runs", *argv)
    line = error_line(proc)
    assert fragment in line, line
    assert not (tmp_path / "img").exists() and not (tmp_path / "runs").exists()


def test_txt2img_boundary_values_pass_the_checks(text_model):
    """The lower bounds themselves are accepted (0 rows: one row of --n_samples; 0 AdaRound iterations: none)."""
    txt2img = load_script(SCRIPTS / "txt2img.py", "bad_inputs_txt2img_bounds")
    args = txt2img.parse_args(["--n_samples", "1", "--n_iter", "1", "--n_rows", "0", "--seed", "0", "--eval", "1",
                               "--ptq", "--quant_act", "--cali_iters", "0", "--cali_iters_a", "0", "--cali_st", "1",
                               "--ddim_eta", "1"])
    txt2img.check_flags(args)


# the numeric flags of the step CLIs: (script, flag, refused, accepted at the boundary, fragment of the refusal)
NUMERIC = [
    ("generate_evaluation_samples_dist", "--eta", "1.5", "1", "--eta must be in [0, 1]"),
    ("generate_evaluation_samples_dist", "--eta", "-0.1", "0", "--eta must be in [0, 1]"),
    ("generate_evaluation_samples_dist", "--steps", "0", "1", "--steps must be >= 1"),
    ("generate_evaluation_samples_dist", "--steps", "600", "500", "--steps 600"),
    ("generate_evaluation_samples_dist", "--scale", "-1", "0", "--scale must be >= 0"),
    ("generate_evaluation_samples_dist", "--n_samples", "0", "10", "--n_samples must be >= 1"),
    ("generate_evaluation_samples_dist", "--batch_size", "0", "1", "--batch_size must be >= 1"),
    ("generate_evaluation_samples_dist", "--seed", "-1", "0", "--seed must be >= 0"),
    ("generate_evaluation_samples_dist", "--decode_batch_size", "0", "1", "--decode_batch_size must be >= 1"),
]


@pytest.mark.parametrize("name, flag, bad, ok, fragment", NUMERIC)
def test_numeric_flags_refuse_out_of_range_and_accept_the_boundary(name, flag, bad, ok, fragment, tmp_path,
                                                                   capsys):
    run = script(name, capsys)
    line = error_line(run(flag, bad, "--dry_run", "--outdir", tmp_path))
    assert fragment in line, line
    proc = run(flag, ok, "--dry_run", "--outdir", tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_pixel_ddpm_grids_take_every_step_count_up_to_T():
    from ldm.util import UserFacingError, load_config
    from pipeline.families import family_for
    pixel = load_config(REPO / "configs" / "fashion-ddim.yml")
    fam = family_for(pixel)
    for steps, grid in ((3, None), (600, "uniform"), (1000, None), (501, "quad"), (1000, "uniform-corrected")):
        fam.check_steps(pixel, steps, grid)
    with pytest.raises(UserFacingError, match="--steps 1001: .*pass --steps 1..1000"):
        fam.check_steps(pixel, 1001, None)
    ldm = load_config(REPO / "models" / "ldm" / "fashion-ldm-vq-4" / "config.yaml")
    with pytest.raises(UserFacingError, match="--steps 600: .*CompVis '\\+1' offset"):
        family_for(ldm).check_steps(ldm, 600, None)


@pytest.mark.parametrize("argv, fragment", [
    (["--timesteps", "1000", "--max_images", "0"], "--max_images must be >= 1"),   # 1000 steps pass
    (["--timesteps", "3", "--skip_type", "uniform", "--eta", "2"], "--eta must be in [0, 1]"),
    (["--timesteps", "0"], "--timesteps must be >= 1"),
    (["--timesteps", "1001"], "--timesteps 1001"),
    (["--timesteps", "5", "--ptq", "--sample_reverse", "100"], "--sample_reverse 100: QNCD's probe"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--ptq", "--cali_n", "0"], "--cali_n must be >= 1"),
])
def test_sample_diffusion_ddim_names_its_own_flags(tmp_path, capsys, argv, fragment):
    line = error_line(script("sample_diffusion_ddim", capsys)("--preset", "fashion-ddim", "-l", tmp_path, *argv))
    assert fragment in line, line
    assert not any(tmp_path.iterdir())


def test_a_foreign_cali_ckpt_is_refused_before_it_is_copied(tmp_path, capsys):
    from pipeline.artifacts import save_artifact
    foreign = tmp_path / "foreign" / "quant_w8a8.pt"
    save_artifact(foreign, "quant", {"model": "another.yml", "w_bits": 8, "a_bits": 8}, {"quant_state": {}})
    line = error_line(script("sample_diffusion_ddim", capsys)("--preset", "fashion-ddim", "-l", tmp_path / "runs",
                                                               "--timesteps", "10", "--ptq", "--cali_ckpt", foreign))
    assert "model='another.yml'" in line, line
    assert not (tmp_path / "runs").exists()


# ---- 3. numbering that cannot race -------------------------------------------------------------------------------


def test_numbered_pngs_never_overwrite_a_concurrent_run(tmp_path):
    from evaluation.images import save_png_numbered
    image = np.zeros((4, 4, 3), np.uint8)
    written: list[Path] = []

    def run(value: int) -> None:
        for _ in range(12):   # each run counted the folder before the other wrote: both start at 0
            written.append(save_png_numbered(image + value, tmp_path, "{:05}.png".format, 0))
    threads = [threading.Thread(target=run, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(written)) == 24 and len(list(tmp_path.glob("*.png"))) == 24
    assert not list(tmp_path.glob(".*"))   # no temporaries left


# ---- 5. options that would do nothing ----------------------------------------------------------------------------


def test_integer_execution_of_the_fp_model_is_refused(tmp_path, capsys):
    line = error_line(script("sample_quantized_ldm_imagenet", capsys)("--sampler", "fp32", "--execution", "integer",
                                                                       "--outdir", tmp_path))
    assert "--execution integer" in line and "--sampler fp32" in line, line
    assert not any(tmp_path.iterdir())


# ---- 4. integrity of what is loaded ------------------------------------------------------------------------------


def test_a_damaged_tensor_is_caught_on_load(tmp_path):
    from pipeline.artifacts import ArtifactMismatch, load_artifact, save_artifact
    weights = torch.arange(4096, dtype=torch.float32) + 0.5
    path = save_artifact(tmp_path / "packed_w4a8.pt", "packed", {"w_bits": 4}, {"layers": {"w": weights}})
    assert load_artifact(path, "packed")["meta"] == {"format": "packed", "version": 1, "w_bits": 4}
    data = bytearray(path.read_bytes())
    at = bytes(data).index(weights[1000:1016].numpy().tobytes())
    data[at:at + 64] = bytes(255 - b for b in data[at:at + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatch, match="packed_w4a8.pt is damaged"):
        load_artifact(path, "packed")


@pytest.mark.parametrize("script,argv,flag", [("benchmarks/unet_forward.py", ["--batch", "0"], "--batch"),
                                              ("benchmarks/correction_overhead.py", ["--n", "0"], "--n"),
                                              ("benchmarks/unet_forward.py", ["--repeats", "x"], "--repeats")])
def test_benchmark_counts_are_refused_in_one_line(script, argv, flag):
    """Issue 32: `--n 0` / `--batch 0` ended in tracebacks deep inside the runs; now the parser refuses them."""
    proc = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and f"argument {flag}:" in lines[0], proc.stderr[-2000:]


# the numeric flags of steps 0-6 and the packed export, checked where the typed objects are built (each script's
# typed(args): the preset applied, every flag turned into its settings object, nothing loaded): (script, flag,
# refused, accepted at the boundary, fragment of the refusal)
TYPED_NUMERIC = [
    *[(s, flag, bad, ok, fragment) for s in ("sample_fp32_imagenet", "collect_imagenet_calibration_set",
                                             "quantize_weight", "collect_timestep_aware_statistics",
                                             "gaussian_modeling", "sample_quantized_ldm_imagenet", "export_packed")
      for flag, bad, ok, fragment in (("--steps", "0", "1", "--steps must be >= 1"),
                                      ("--steps", "600", "500", "--steps 600"),
                                      ("--eta", "1.5", "1", "--eta must be in [0, 1]"),
                                      ("--eta", "-0.1", "0", "--eta must be in [0, 1]"),
                                      ("--scale", "-1", "0", "--scale must be >= 0"),
                                      ("--batch_size", "0", "1", "--batch_size must be >= 1"))],
    ("sample_fp32_imagenet", "--seed", "-1", "0", "--seed must be >= 0"),
    ("sample_fp32_imagenet", "--n_samples_per_class", "0", "1", "--n_samples_per_class must be >= 1"),
    ("sample_fp32_imagenet", "--n_samples", "0", "1", "--n_samples must be >= 1"),
    ("collect_imagenet_calibration_set", "--n", "0", "1", "--n and --calibration_trajectories_per_class"),
    ("collect_imagenet_calibration_set", "--n_holdout", "-1", "0", "--n_holdout >= 0"),
    ("collect_imagenet_calibration_set", "--calibration_trajectories_per_class", "0", "1",
     "--calibration_trajectories_per_class must be >= 1"),
    ("collect_imagenet_calibration_set", "--seed", "-1", "0", "--seed must be >= 0"),
    ("quantize_weight", "--weight_iters", "-1", "0", "--weight_iters must be >= 0"),
    ("quantize_weight", "--recon_batch_size", "0", "1", "--recon_batch_size must be >= 1"),
    ("quantize_weight", "--round_weight", "-0.5", "0", "--round_weight must be >= 0"),
    ("quantize_weight", "--cache_batch_size", "0", "1", "--cache_batch_size must be >= 1"),
    ("quantize_weight", "--fp_capture_mb", "-1", "0", "--fp_capture_mb must be >= 0"),
    ("quantize_weight_activation", "--fp_capture_mb", "nan", "0", "--fp_capture_mb must be a finite number"),
    ("quantize_weight", "--keep_activations_mb", "-0.5", "0", "--keep_activations_mb must be >= 0"),
    ("quantize_weight_activation", "--act_iters", "-1", "0", "--act_iters must be >= 0"),
    ("quantize_weight_activation", "--act_init_samples", "0", "1", "--act_init_samples must be >= 1"),
    ("quantize_weight_activation", "--recon_batch_size", "0", "1", "--recon_batch_size must be >= 1"),
    ("quantize_weight_activation", "--rs_batch_size", "0", "1", "--rs_batch_size must be >= 1"),
    ("quantize_weight_activation", "--lr", "0", "1e-12", "--lr must be >= 1e-12"),
    ("quantize_weight_activation", "--p", "nan", "1e-12", "--p must be a finite number"),
    ("quantize_weight_activation", "--sm_abit", "1", "2", "--sm_abit must be in 2..16"),
    ("quantize_weight_activation", "--sm_abit", "17", "16", "--sm_abit must be in 2..16"),
    ("collect_timestep_aware_statistics", "--n", "0", "1", "--n must be >= 1"),
    ("collect_timestep_aware_statistics", "--save_every", "0", "1", "--save_every must be >= 1"),
    ("collect_timestep_aware_statistics", "--outlier_k", "-1", "0", "--outlier_k must be >= 0"),
    ("gaussian_modeling", "--outlier_k", "-1", "0", "--outlier_k must be >= 0"),
    ("sample_quantized_ldm_imagenet", "--n_samples_per_class", "0", "1", "--n_samples_per_class must be >= 1"),
    ("sample_quantized_ldm_imagenet", "--seed", "-1", "0", "--seed must be >= 0"),
]


@pytest.mark.parametrize("name, flag, bad, ok, fragment", TYPED_NUMERIC)
def test_step_numeric_flags_are_refused_where_the_typed_objects_are_built(name, flag, bad, ok, fragment, tmp_path):
    from ldm.util import UserFacingError
    mod = load_script(SCRIPTS / f"{name}.py", f"typed_{name}")
    with pytest.raises(UserFacingError) as e:
        mod.typed(mod.parse_args([flag, bad, "--outdir", str(tmp_path)]))
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
    mod.typed(mod.parse_args([flag, ok, "--outdir", str(tmp_path)]))   # the boundary passes every check


@pytest.mark.parametrize("argv, fragment", [(["--batch_size", "0"], "--batch_size must be >= 1")])
def test_evaluator_numeric_flags(argv, fragment, tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    proc = subprocess.run([sys.executable, str(REPO / "evaluator.py"), str(ref), str(ref), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and fragment in error_line(proc), proc.stderr


# ---- the benchmarks' numeric flags -------------------------------------------------------------------------------
# Every count / size / step flag of benchmarks/*.py, checked by that benchmark's parse_args (ldm.util.at_least or a
# range check after parsing: one line, exit 2, before any model is built): (benchmark, flag, refused, accepted at the
# boundary (with any other flag it needs), fragment of the refusal).
BENCH_NUMERIC = [
    *[("unet_forward", f, bad, ok, frag) for f, bad, ok, frag in (
        ("--batch", "0", "1", "must be >= 1"), ("--repeats", "0", "1", "must be >= 1"),
        ("--warmup", "-1", "0", "must be >= 0"), ("--repeats", "x", "1", "expected an integer"))],
    *[("correction_overhead", f, bad, ok, frag) for f, bad, ok, frag in (
        ("--n", "0", "1", "must be >= 1"), ("--repeats", "0", "1", "must be >= 1"),
        ("--warmup", "-1", "0", "must be >= 0"), ("--threads", "0", "1", "must be >= 1"),
        ("--seed", "-1", "0", "must be >= 0"))],
    ("correction_eps_error", "--n", "0", "1", "must be >= 1"),
    ("correction_eps_error", "--seed", "-1", "0", "must be >= 0"),
    ("activation_reconstruction", "--act_iters", "-1", "0", "must be >= 0"),
    ("activation_reconstruction", "--act_init_samples", "0", "1", "must be >= 1"),
    ("activation_reconstruction", "--w_bits", "5", "3", "invalid choice"),
    ("activation_reconstruction", "--a_bits", "5", "4", "invalid choice"),
    *[(name, f, "0", "1", "must be >= 1") for name, flags in (
        ("cifar10_rehearsal", ("--trajectories", "--n_calibration", "--iters", "--samples")),
        ("cin256_rehearsal", ("--n_calibration", "--iters", "--act_init", "--samples",
                              "--eval_batch")),
        ("dit_rehearsal", ("--depth", "--steps", "--classes", "--n_calibration", "--iters",
                           "--act_init", "--samples", "--eval_batch")),
        ("dit_quality", ("--steps", "--batch_size")),
        ("fake_quant_overhead", ("--batch", "--steps", "--repeats")),
        ("fake_quant_kernel", ("--batch", "--repeats", "--scale_down")),
        ("fashion_model_quality", ("--steps", "--batch_size")),
        ("integer_execution", ("--batch", "--top", "--repeats")),
        ("precision_fidelity", ("--bootstrap",)),
        ("qncd_probe_fp", ("--n", "--intervals")),
        ("qncd_probe_variant", ("--n_eval", "--n_cal", "--traj", "--act_init", "--stats")),
        ("quantization_stages", ("--n", "--iters", "--units"))) for f in flags],
    *[(name, "--seed", "-1", "0", "must be >= 0") for name in (
        "cifar10_rehearsal", "cin256_rehearsal", "dit_rehearsal", "dit_quality", "fashion_model_quality",
        "precision_fidelity", "qncd_probe_fp", "qncd_probe_variant")],
    *[("qncd_probe_variant", f, "-1", "0", "must be >= 0") for f in ("--weight_iters", "--act_iters", "--fp_check")],
    *[(name, "--n_holdout", "-1", "0", "must be >= 0") for name in (   # (0: no held-out rows, as step 1 allows)
        "cifar10_rehearsal", "cin256_rehearsal", "dit_rehearsal", "qncd_probe_variant")],
    ("cin256_rehearsal", "--classes", "0", "1 --samples 1", "must be >= 1"),   # (the boundary with a sample each)
    ("cin256_rehearsal", "--samples", "3", "2", "must be <= --classes"),
    ("dit_quality", "--n", "5", "10", "must be >= 10"),
    ("dit_quality", "--n", "15", "20", "a multiple of 10"),
    ("dit_quality", "--eta", "1.5", "1", "must be in [0, 1]"),
    ("dit_quality", "--eta", "-0.1", "0", "must be in [0, 1]"),
    ("dit_quality", "--eta", "nan", "0.5", "must be in [0, 1]"),
    ("dit_quality", "--cfg-scale", "0.5", "1", "must be >= 1"),
    ("fake_quant_overhead", "--scale", "-1", "0", "must be a number >= 0"),
    ("fashion_model_quality", "--n", "0", "10", "must be >= 10"),
    ("fashion_model_quality", "--n", "15", "20", "a multiple of 10"),
    ("fashion_model_quality", "--eta", "3", "1", "must be in [0, 1]"),
    ("fashion_model_quality", "--eta", "-0.1", "0", "must be in [0, 1]"),
    ("fashion_model_quality", "--scale", "nan", "0", "must be a number >= 0"),
    ("gpu_check", "--budget", "0", "0.5", "must be a number of seconds > 0"),
    ("precision_fidelity", "--n", "0", "10", "must be >= 10"),
    ("precision_fidelity", "--n", "15", "20", "a multiple of 10"),
    ("precision_fidelity", "--fid_bootstrap", "-1", "0", "must be >= 0"),
    ("quantization_stages", "--w_bits", "5", "3", "invalid choice"),
    ("quantization_stages", "--a_bits", "5", "4", "invalid choice"),
]


@functools.lru_cache(maxsize=None)
def benchmark(name: str):
    """benchmarks/<name>.py as a module (its folder on sys.path, as when it runs: gpu_check imports its parts)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    return load_script(REPO / "benchmarks" / f"{name}.py", f"bad_inputs_bench_{name}")


@pytest.mark.parametrize("name, flag, bad, ok, fragment", BENCH_NUMERIC)
def test_benchmark_numeric_flags_are_refused_by_their_parser(name, flag, bad, ok, fragment, capsys):
    """Issue 32: a benchmark given 0 samples or a negative batch stops in one line naming the flag, before any
    work; the boundary value passes the parser."""
    parse = benchmark(name).parse_args
    with pytest.raises(SystemExit) as e:
        parse([flag, bad])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and f"argument {flag}: " in lines[0] and fragment in lines[0], lines
    parse([flag, *ok.split()])


# the sampling flags the benchmarks share with the step scripts (pipeline.cli.add_sampling_args), checked where the
# run is built (cli.run_of, the first thing each main does after the preset): (benchmark, its preset, flag, refused,
# accepted at the boundary, fragment)
BENCH_SAMPLING = [
    *[(name, preset, f, bad, ok, frag) for name, preset in (("correction_eps_error", "fashion"),
                                                            ("precision_fidelity", "fashion"),
                                                            ("qncd_probe_fp", "fashion-txt2img"))
      for f, bad, ok, frag in (("--steps", "0", "1", "--steps must be >= 1"),
                               ("--eta", "-0.1", "0", "--eta must be in [0, 1]"),
                               ("--scale", "-1", "0", "--scale must be >= 0"),
                               ("--batch_size", "0", "1", "--batch_size must be >= 1"))],
    ("correction_eps_error", "fashion", "--eta", "1.5", "1", "--eta must be in [0, 1]"),
    ("precision_fidelity", "fashion", "--steps", "600", "500", "--steps 600"),
]


@pytest.mark.parametrize("name, preset, flag, bad, ok, fragment", BENCH_SAMPLING)
def test_benchmark_sampling_flags_are_refused_where_the_run_is_built(name, preset, flag, bad, ok, fragment):
    from ldm.util import UserFacingError
    from pipeline import cli
    parse = benchmark(name).parse_args
    args = parse([flag, bad])
    cli.apply_preset(args, preset)
    with pytest.raises(UserFacingError) as e:
        cli.run_of(args)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
    args = parse([flag, ok])
    cli.apply_preset(args, preset)
    cli.run_of(args)


# ---- the survey's case list (benchmarks/bad_input_survey.py) ------------------------------------------------------
# the cases issue 32 names, each by the id it has in benchmarks/bad_input_cases.py
ISSUE_CASES = (
    "i-export-out-over-quant", "i-fidelity-json-over-samples", "i-txt2img-concurrent-samples", "i-txt2img-eta5", "i-txt2img-n_samples0", "i-ddim-sample_reverse100-5steps",
    "i-step6-fp32-integer", "i-step6-packed-damaged", "i-fidelity-swapped", "i-txt2img-n_rows-1",
    "i-export-out-directory", "i-fidelity-json-readonly", "i-bench-correction_overhead-n0",
    "i-bench-unet_forward-batch0", "i-txt2img-eval0", "i-txt2img-eval3", "i-ddim-foreign-cali_ckpt",
    "i-ddim-timesteps3", "i-ddim-timesteps600-uniform", "i-ddim-timesteps1000", "i-ddim-timesteps501",
    "i-txt2img-ddim_steps-named", "i-ddim-timesteps-named", "i-ddim-sample_reverse-named", "i-ddim-cali_n-named",
    "i-txt2img-seed-1", "i-ddim-seed-1")
SETUP_OPS = {"packed", "dir", "readonly", "text", "copy", "corrupt", "truncate", "npz"}
PLACEHOLDERS = {"tmp", "out", "run", "fp", "q", "ptqd", "quant", "packed"}


def test_the_survey_case_list_is_whole():
    """At least 150 cases, unique ids, every case the issue names present, every kind, expectation, setup operation
    and placeholder one the survey knows, every script one of this tree; cheap to check (nothing runs)."""
    import re
    cases_module = load_script(REPO / "benchmarks" / "bad_input_cases.py", "bad_inputs_survey_cases")
    cases = cases_module.CASES
    ids = [c.id for c in cases]
    assert len(cases) >= 150 and len(set(ids)) == len(ids)
    assert set(ISSUE_CASES) <= set(ids) and {c.id for c in cases if c.issue} == set(ISSUE_CASES)
    for c in cases:
        assert c.kind in cases_module.KINDS and c.expect in cases_module.EXPECTS, c
        assert {op.split(":")[0] for op in c.setup} <= SETUP_OPS, c
        fields = " ".join((*c.argv, *c.setup, *c.watch, *c.produces, *c.also))
        assert set(re.findall(r"\{(\w+)\}", fields)) <= PLACEHOLDERS, c
        script = REPO / (c.script.replace(".", "/") + ".py" if c.argv[0] == "-m" else c.script)
        assert script.is_file(), c
        assert c.expect != "say" or c.mentions, c   # an option that does nothing must be named


def test_an_npz_is_not_taken_for_an_unreadable_torch_artifact(tmp_path, capsys):
    """An .npz is a zip too: the packed export refuses to write over a samples file (it took it for a damaged torch
    file, "the step's to redo", and replaced the samples)."""
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    before = samples.read_bytes()
    from ldm.util import UserFacingError
    from pipeline.artifacts import artifact_kind, check_output_path
    assert artifact_kind(samples) is None
    with pytest.raises(UserFacingError, match="is not a pipeline artifact"):
        check_output_path(samples, "packed", flag="--out")
    assert samples.read_bytes() == before


def test_reconstruction_memory_flags_reach_the_step_settings(tmp_path):
    """--fp_capture_mb and --keep_activations_mb become the settings steps 2 and 3 build their ReconConfig from
    (defaults: ReconConfig's)."""
    from quant.reconstruction import ReconConfig
    for name in ("quantize_weight", "quantize_weight_activation"):
        mod = load_script(SCRIPTS / f"{name}.py", f"memory_{name}")
        default = mod.typed(mod.parse_args(["--outdir", str(tmp_path)]))
        given = mod.typed(mod.parse_args(["--outdir", str(tmp_path), "--fp_capture_mb", "0.5",
                                          "--keep_activations_mb", "0"]))
        cache = lambda typed: next(t.cache for t in typed if hasattr(t, "cache"))   # noqa: E731
        assert (cache(default).fp_capture_bytes, cache(default).recompute_above) == \
            (ReconConfig.fp_capture_bytes, ReconConfig.recompute_above)
        assert (cache(given).fp_capture_bytes, cache(given).recompute_above) == (2**19, 0)
