"""The parts of benchmarks/gpu_check.py, each run in its own process (``gpu_check.py --_part NAME``) and returning
its rows: the repository's own scripts at small counts, their outputs checked and their key numbers read back.
Kept apart from the driver so each part is a plain function a test can call."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent

# |SQNR(device) − SQNR(CPU)| allowed for each of W4 nearest, W4 AdaRound, W4A8 (dB): the runs share seeds and
# inputs, so only float summation order differs (hundredths of a dB); a device bug costs whole dB
SQNR_TOLERANCE_DB = 0.5
# the counts of the device run (small: seconds per step on a GPU) and of --tiny (the CPU smoke run)
COUNTS = {"small": dict(n_cal=64, n_holdout=16, traj=2, weight_iters=20, act_iters=10, act_init=32, stats=32, eval=40),
          # (0 iterations: steps 2-3 set ranges and measure SQNRs but skip the reconstruction loop, the part that
          # costs minutes on a CPU; the device run and the rehearsal run it)
          "tiny": dict(n_cal=8, n_holdout=2, traj=1, weight_iters=0, act_iters=0, act_init=2, stats=2, eval=10)}
SQNR_KEYS = ("w4_nearest", "w4_adaround", "w4a8")


@dataclass
class Row:
    path: str
    ok: bool
    seconds: float
    key: str
    detail: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.path:34s} {'ok' if self.ok else 'FAIL':4s} {self.seconds:8.1f}  {self.key}"

    def asdict(self) -> dict:
        return asdict(self)


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


# ---- the embedded defaults through steps 1-7 ---------------------------------------------------------------------

def counts(args) -> dict:
    return COUNTS["tiny" if args.tiny else "small"]


def preset_layout(preset_name: str, outdir: Path):
    from pipeline.cli import load_preset
    from pipeline.layout import RunLayout
    p = load_preset(preset_name)
    return p, RunLayout(outdir, preset_name, p["steps"], float(p["eta"]), float(p["scale"]), p.get("skip_type"))


def pipeline_stages(preset_name: str, device: str, outdir: Path, c: dict, upto: int = 7) -> list[tuple]:
    """(name, script, argv) of steps 1-``upto`` on one embedded default, as quant_scripts/demo.py orders them."""
    preset, layout = preset_layout(preset_name, outdir)
    common = ["--preset", preset_name, "--outdir", str(outdir), "--device", device]
    wa = ["--w_bits", "4", "--a_bits", "8"]
    conditional = "classes" in preset
    traj = c["traj"] if conditional else -(-5 * (c["n_cal"] + c["n_holdout"]) // (4 * preset["steps"]))
    grid = ["--classes", "0", "1", "--n_samples_per_class", "1"] if conditional else ["--n_samples", "2"]
    stages = [
        ("1 calibration", "collect_imagenet_calibration_set",
         common + ["--n", str(c["n_cal"]), "--n_holdout", str(c["n_holdout"]),
                   "--calibration_trajectories_per_class", str(traj)]),
        ("2 W4 weights", "quantize_weight", common + ["--w_bits", "4", "--weight_iters", str(c["weight_iters"])]),
        ("3 W4A8 activations", "quantize_weight_activation",
         common + wa + ["--act_iters", str(c["act_iters"]), "--act_init_samples", str(c["act_init"])]),
        ("4 noise statistics", "collect_timestep_aware_statistics",
         common + wa + ["--n", str(c["stats"]), "--no_progress"]),
        ("5 Gaussian fits", "gaussian_modeling", common + wa),
        ("6 grid (dd2-channel)", "sample_quantized_ldm_imagenet",
         common + wa + ["--sampler", "dd2-channel", "--no_progress", *grid]),
    ]
    for sampler in ("fp32", "dd2-channel", "none"):
        stages.append((f"7 samples ({sampler})", "generate_evaluation_samples_dist",
                       common + wa + ["--sampler", sampler, "--n_samples", str(c["eval"]), "--seed", "0"]))
    return [s for s in stages if int(s[0].split()[0]) <= upto]


def run_stages(stages: list[tuple]) -> tuple[dict, str | None]:
    """Each stage's script in this process (one import of torch for all); ({name: seconds}, the first error)."""
    import importlib
    seconds = {}
    for name, name_script, argv in stages:
        print(f"=== {name}: {name_script} {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(f"quant_scripts.{name_script}").main(argv)
        except BaseException as e:   # (SystemExit too: argparse errors)
            traceback.print_exc()
            return seconds, f"{name}: {one_line(e)}"
        seconds[name] = time.perf_counter() - t0
    return seconds, None


def read_sqnr(layout) -> dict:
    """The ε SQNRs steps 2-3 recorded in their artifacts' meta (dB on the held-out inputs)."""
    from pipeline.artifacts import load_artifact
    from pipeline.layout import QuantTag
    w4 = load_artifact(layout.quant(QuantTag(4)), "quant")["meta"]
    w4a8 = load_artifact(layout.quant(QuantTag(4, 8)), "quant")["meta"]
    return {"w4_nearest": w4["sqnr_nearest_db"], "w4_adaround": w4["sqnr_adaround_db"], "w4a8": w4a8["sqnr_db"]}


def part_pipeline(args) -> list[Row]:
    """Steps 1-7 of one embedded default on the device, then packed export, --packed and --execution integer."""
    c, preset = counts(args), args.preset
    outdir = args.workdir / "runs" / args.device.replace(":", "")
    t0 = time.perf_counter()
    seconds, error = run_stages(pipeline_stages(preset, args.device, outdir, c))
    name = f"pipeline {preset}"
    if error:
        return [Row(name, False, time.perf_counter() - t0, error, {"stages_s": seconds}),
                Row(f"packed+integer {preset}", False, 0.0, "not run: the pipeline failed")]
    _, layout = preset_layout(preset, outdir)
    sqnr = read_sqnr(layout)
    rows = [Row(name, True, time.perf_counter() - t0, f"W4A8 SQNR {sqnr['w4a8']:.2f} dB (W4 AdaRound "
                f"{sqnr['w4_adaround']:.2f} dB)", {"stages_s": seconds, "sqnr": sqnr, "counts": c})]
    return rows + [packed_integer(args, preset, outdir, c)]


def packed_integer(args, preset: str, outdir: Path, c: dict) -> Row:
    """Export W4A8 packed; step 7 from the file alone (same samples bit for bit) and with int8 kernels (within a
    quarter of the quantization error: tests/test_pipeline_correction.py's rule)."""
    import numpy as np

    from pipeline.layout import FP32, QuantTag
    t0 = time.perf_counter()
    _, layout = preset_layout(preset, outdir)
    packed = outdir / f"packed_{preset}_w4a8.pt"
    common = ["--preset", preset, "--outdir", str(outdir), "--device", args.device, "--w_bits", "4", "--a_bits", "8"]
    sample = common + ["--sampler", "none", "--n_samples", str(c["eval"]), "--seed", "0"]
    seconds, error = run_stages([
        ("export packed", "export_packed", common + ["--out", str(packed)]),
        ("7 --packed", "generate_evaluation_samples_dist", sample + ["--packed", str(packed)]),
        ("7 --execution integer", "generate_evaluation_samples_dist", sample + ["--execution", "integer"])])
    name = f"packed+integer {preset}"
    if error:
        return Row(name, False, time.perf_counter() - t0, error, {"stages_s": seconds})

    def images(tag, sampler, variant=""):
        d = layout.eval_samples(tag, sampler, c["eval"], 0, None, variant)
        return np.load(d / "samples.npz")["arr_0"].astype(np.int16)

    fake, fp = images(QuantTag(4, 8), "none"), images(FP32, "fp32")
    from_file, integer = images(QuantTag(4, 8), "none", "-packed"), images(QuantTag(4, 8), "none", "-int")
    int_err, q_err = float(np.abs(integer - fake).mean()), float(np.abs(fp - fake).mean())
    same = bool(np.array_equal(from_file, fake))
    ok = same and int_err < 0.25 * q_err
    key = (f"packed {'==' if same else '!='} fake; |int - fake| {int_err:.3f} vs |fp - fake| {q_err:.3f} "
           f"({int_err / max(q_err, 1e-12):.2f}, limit 0.25)")
    return Row(name, ok, time.perf_counter() - t0, key, {"stages_s": seconds, "packed_bytes": packed.stat().st_size,
                                                         "mean_abs_int_vs_fake": int_err,
                                                         "mean_abs_fp_vs_fake": q_err, "packed_equal": same})


def part_cpu(args) -> list[Row]:
    """Steps 1-3 of one embedded default on the CPU, the same counts and seeds as the device run: its SQNRs."""
    c, preset = counts(args), args.preset
    outdir = args.workdir / "runs" / "cpu-rerun"
    t0 = time.perf_counter()
    seconds, error = run_stages(pipeline_stages(preset, "cpu", outdir, c, upto=3))
    name = f"sqnr vs cpu {preset}"
    if error:
        return [Row(name, False, time.perf_counter() - t0, f"CPU run: {error}", {"stages_s": seconds})]
    sqnr = read_sqnr(preset_layout(preset, outdir)[1])
    return [Row(name, True, time.perf_counter() - t0, "", {"stages_s": seconds, "sqnr": sqnr})]


def compare_sqnr(name: str, device_rows: list[Row], preset: str, cpu_rows: list[Row]) -> Row:
    """The device's SQNRs (its pipeline row) against the CPU run's, each within SQNR_TOLERANCE_DB."""
    dev = next((r for r in device_rows if r.path == f"pipeline {preset}"), None)
    cpu = cpu_rows[0] if cpu_rows else None
    seconds = cpu.seconds if cpu else 0.0
    if cpu is None or "sqnr" not in cpu.detail:
        return Row(name, False, seconds, cpu.key if cpu else "no CPU run", cpu.detail if cpu else {})
    if dev is None or "sqnr" not in dev.detail:
        return Row(name, False, seconds, "no device SQNRs (its pipeline row failed)", cpu.detail)
    diff = {k: dev.detail["sqnr"][k] - cpu.detail["sqnr"][k] for k in SQNR_KEYS}
    worst = max(diff, key=lambda k: abs(diff[k]))
    ok = all(math.isfinite(d) and abs(d) <= SQNR_TOLERANCE_DB for d in diff.values())
    return Row(name, ok, seconds, f"max |dSQNR| {abs(diff[worst]):.3f} dB ({worst}; tolerance "
                                  f"{SQNR_TOLERANCE_DB} dB)",
               {"device": dev.detail["sqnr"], "cpu": cpu.detail["sqnr"], "difference_db": diff,
                "tolerance_db": SQNR_TOLERANCE_DB})


# ---- the other CLIs and benchmarks, as subprocesses ----------------------------------------------------------------

def run_cli(argv: list[str], timeout: float | None = None) -> None:
    """A repository script in a subprocess (its output into this part's log); a non-zero exit raises with its last
    line."""
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    sys.stdout.write(proc.stdout[-20000:] + proc.stderr[-20000:])
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        raise RuntimeError(f"{argv[0]} exit {proc.returncode}: {lines[-1] if lines else 'no output'}")


def part_fidelity(args) -> list[Row]:
    """The paired fidelity CLI on one pipeline's (--preset: the first of gpu_check's --presets) FP32 and W4A8 D-D²
    samples."""
    from pipeline.layout import FP32, QuantTag
    c = counts(args)
    _, layout = preset_layout(args.preset or "fashion", args.workdir / "runs" / args.device.replace(":", ""))
    fp = layout.eval_samples(FP32, "fp32", c["eval"], 0) / "samples.npz"
    q = layout.eval_samples(QuantTag(4, 8), "dd2-channel", c["eval"], 0) / "samples.npz"
    out = args.workdir / "fidelity.json"
    t0 = time.perf_counter()
    run_cli(["-m", "evaluation.fidelity", str(fp), str(q), "--json", str(out), "--bootstrap", "200",
             "--device", args.device])
    rec = json.loads(out.read_text())
    m = rec["metrics"]
    psnr = m["psnr"]["mean"]
    return [Row("fidelity cli", math.isfinite(psnr), time.perf_counter() - t0,
                f"W4A8 D-D² PSNR to FP {psnr:.2f} dB (n {rec['n']})", {k: m[k] for k in m if k != "per_sample"})]


def tiny_config(args) -> Path:
    """The tests' tiny class-conditional LDM (tests/tiny_models.py), as a config file, for --tiny."""
    sys.path.insert(0, str(REPO / "tests"))
    import tiny_models
    from omegaconf import OmegaConf
    path = args.workdir / "tiny_class_cond.yaml"
    OmegaConf.save(tiny_models.config(tiny_models.CLASS_COND), path)
    return path


SMALL_REHEARSAL = ["--classes", "2", "--samples", "2", "--n_calibration", "16", "--n_holdout", "2", "--iters", "4",
                   "--act_init", "4", "--eval_batch", "16"]


def rehearsal_row(args, name: str, title: str, script: str, small: list[str], protocol: str, samples: str,
                  keys: tuple[str, ...]) -> list[Row]:
    """One full-size rehearsal (benchmarks/<script>) at small counts, in its own work folder; its row: steps 1-3 and
    step 7 projected to ``protocol`` (``samples`` evaluation samples), peak host and GPU memory."""
    out = args.workdir / f"{name}_rehearsal.json"
    t0 = time.perf_counter()
    run_cli([str(BENCH / script), "--device", args.device, "--workdir", str(args.workdir / name), "--json", str(out),
             *small])
    rec = json.loads(out.read_text())
    gpu = rec.get("projected_peak_gpu_bytes")
    key = (f"{protocol}steps 1-3 {rec['projected_calibration_s'] / 3600:.2f} h, step 7 ({samples}) "
           f"{rec['projected_sampling_s'] / 3600:.2f} h, peak host {rec['projected_peak_bytes'] / 2**30:.1f} GiB"
           + (f", GPU {gpu / 2**30:.1f} GiB" if gpu is not None else ""))
    return [Row(title, True, time.perf_counter() - t0, key,
                {k: rec[k] for k in ("projected_calibration_s", "projected_sampling_s", "projected_peak_bytes",
                                     "projected_peak_gpu_bytes", "projection", *keys, "args")})]


def part_cin256(args) -> list[Row]:
    """The cin256-v2 rehearsal at small counts: steps 1-3 and step 7 projected to the paper's counts, GPU peak."""
    small = (["--classes", "2", "--samples", "2", "--n_calibration", "4", "--n_holdout", "2", "--iters", "1",
              "--act_init", "2", "--eval_batch", "2", "--config", str(tiny_config(args))] if args.tiny else
             SMALL_REHEARSAL)
    return rehearsal_row(args, "cin256", "cin256 rehearsal", "cin256_rehearsal.py", small, "", "50k", ())


def part_dit(args) -> list[Row]:
    """The DiT-XL/2 256×256 rehearsal (benchmarks/dit_rehearsal.py) at small counts, all 28 blocks on the device
    (--tiny: its tiny DiT): steps 1-3 and step 7 projected to PTQ4DiT's 250-step protocol, GPU peak."""
    small = ["--tiny", "--eval_batch", "1"] if args.tiny else SMALL_REHEARSAL
    return rehearsal_row(args, "dit", "DiT-XL/2 rehearsal", "dit_rehearsal.py", small, "PTQ4DiT-250: ", "10k", ("totals",))


def part_fake_quant(args) -> list[Row]:
    """W4A8 fake-quant / FP32 guided sampling time, the passes and the compiled kernels
    (benchmarks/fake_quant_overhead.py --compiled)."""
    out = args.workdir / "fake_quant.json"
    small = (["--config", str(tiny_config(args)), "--batch", "2", "--steps", "2", "--repeats", "1"] if args.tiny
             else ["--batch", "16", "--steps", "20", "--repeats", "3"])
    t0 = time.perf_counter()
    run_cli([str(BENCH / "fake_quant_overhead.py"), "--device", args.device, "--compiled", "--json", str(out), *small])
    rec = json.loads(out.read_text())
    compiled = (f"; compiled kernels {rec['ratio_compiled_median']:.2f}x, samples "
                f"{'identical' if rec['compiled_identical'] else 'DIFFERENT'}" if rec.get("compiled_error") is None
                else f"; compiled kernels: {rec['compiled_error'][:80]}")
    return [Row("fake-quant ratio", rec.get("compiled_identical", True) is not False, time.perf_counter() - t0,
                f"W4A8 / FP32 sampling {rec['ratio_median']:.2f}x{compiled} (goal 1.10x; batch {rec['batch']}, "
                f"{rec['steps']} steps)",
                {k: rec.get(k) for k in ("ratio_median", "ratio_min", "times_s", "batch", "ratio_compiled_median",
                                         "compiled_identical", "compiled_error")})]


def part_fq_kernel(args) -> list[Row]:
    """The activation fake-quant against a copy of its input, every kernel (benchmarks/fake_quant_kernel.py)."""
    out = args.workdir / "fake_quant_kernel.json"
    small = ["--batch", "2", "--repeats", "2", "--scale_down", "8"] if args.tiny else ["--batch", "32"]
    t0 = time.perf_counter()
    run_cli([str(BENCH / "fake_quant_kernel.py"), "--device", args.device, "--json", str(out), *small])
    rec = json.loads(out.read_text())
    worst = rec["worst_ratio_to_copy"]
    exact = all(r["codes_vs_passes"].get("compiled", {"differ": 0})["differ"] == 0 for r in rec["results"])
    key = (", ".join(f"{k} {v:.2f}x" for k, v in worst.items()) + " a copy (worst shape; goal 1.5x)"
           + ("" if rec["compiled_error"] is None else f"; compiled: {rec['compiled_error'][:80]}"))
    return [Row("fake-quant kernel", exact, time.perf_counter() - t0, key, rec)]


def part_integer(args) -> list[Row]:
    """Integer W8A8 against FP32 / TF32 / bf16 / fake W8A8: layers and the whole UNet
    (benchmarks/integer_execution.py --parts device)."""
    out = args.workdir / "integer.json"
    small = (["--config", str(tiny_config(args)), "--batch", "2", "--repeats", "2"] if args.tiny
             else ["--batch", "32", "--repeats", "10"])
    t0 = time.perf_counter()
    run_cli([str(BENCH / "integer_execution.py"), "--parts", "device", "--device", args.device, "--json", str(out),
             *small])
    rec = json.loads(out.read_text())["device"]
    bad = [r["name"] for r in rec["layers"] if not r["ok"]] + ([] if rec["unet"]["ok"] else ["unet"])
    layer = rec["layers"][0]
    unet = rec["unet"]
    key = (f"{layer['kind']} {layer['weight']}: int {layer['ratio_vs_fp32']['int W8A8']:.2f}x FP32 time; UNet int "
           f"{unet['ratio_vs_fp32']['int W8A8']:.2f}x, fake {unet['ratio_vs_fp32']['fake W8A8']:.2f}x"
           + (f"; wrong: {', '.join(bad)}" if bad else ""))
    return [Row("integer W8A8", not bad, time.perf_counter() - t0, key, rec)]


def guarded(fn):
    """A part as the driver runs it: an exception becomes its FAIL row (with the one-line error)."""
    def run(args) -> list[Row]:
        t0 = time.perf_counter()
        try:
            return fn(args)
        except Exception as e:   # noqa: BLE001 (a part's failure is data: its row)
            traceback.print_exc()
            name = {"part_fidelity": "fidelity cli", "part_cin256": "cin256 rehearsal",
                    "part_dit": "DiT-XL/2 rehearsal",
                    "part_fake_quant": "fake-quant ratio", "part_fq_kernel": "fake-quant kernel",
                    "part_integer": "integer W8A8"}.get(
                fn.__name__, f"{fn.__name__.removeprefix('part_')} {getattr(args, 'preset', '')}".strip())
            return [Row(name, False, time.perf_counter() - t0, one_line(e))]
    return run


PARTS = {"pipeline": guarded(part_pipeline), "cpu": guarded(part_cpu), "fidelity": guarded(part_fidelity),
         "cin256": guarded(part_cin256), "dit": guarded(part_dit),
         "fake_quant": guarded(part_fake_quant), "fq_kernel": guarded(part_fq_kernel),
         "integer": guarded(part_integer)}
