"""Full-size dress rehearsal: the cin256-v2 pipeline, steps 1-7, through the real scripts, with measured time and
memory per stage and their projection to the paper's counts.

    python benchmarks/cin256_rehearsal.py --device cpu            # this laptop-class CPU: tens of minutes
    python benchmarks/cin256_rehearsal.py --device cuda --json rehearsal.json

What it does. cin256-v2 (configs/latent-diffusion/cin256-v2.yaml: 400.9 M-parameter UNet on 3×64×64 latents,
VQ-f4 first stage, ClassEmbedder) is built with seeded random weights and written as a weights-only CompVis
checkpoint in a work folder. Then every pipeline script runs on it with ``--preset cin256 --ckpt <that file>``, so
the preset's policy, units, caches and sampler settings are the ones measured, at reduced counts: a few
calibration trajectories and inputs, a few reconstruction iterations per unit, a few statistics and evaluation
samples. Each stage runs in its own process, which records its wall time, the model-load time, its peak host
memory (ru_maxrss) and, on CUDA, its peak GPU memory (torch.cuda.max_memory_allocated). Steps 2-3 also record,
per unit, the cache-filling time, the optimisation time and the cache bytes (``<artifact>.timing.json``).

The projection to the paper's counts (1,000 calibration trajectories, 1,024 calibration inputs, 10,000 / 5,000
iterations per unit at batch 8 / 16, activation ranges from 32 inputs, 1,024 × 20 statistics samples, 50,000
evaluation samples; batch 16) scales each measured part by the count it grows with: trajectories linearly,
cache passes with the calibration inputs, optimisation with the iterations (and the mini-batch size when the
rehearsal's is smaller), and memory by the caches' bytes and the per-sample activation bytes measured by a forward
probe at two batch sizes. Step 7 makes two batches of ``--eval_batch`` (16 on CUDA, the real batch): the model load
and its fixed costs count once, the second batch's time (between its shard writes) 3,125 times; scaling the whole
run by the sample count would count the per-run overhead once per 4 samples. Memory grows where it lives: the
reconstruction caches in host memory, the forwards' activations on the compute device (on CUDA the probe measures
GPU bytes), so a GPU run projects both its host and its GPU peak. Every number comes from this run; the goals
printed beside them are issue 15's: steps 1-3 in at most 4 GPU-hours, every stage within 24 GB, W4A8 sampling at
most 1.3× FP32 (benchmarks/fake_quant_overhead.py measures that ratio).

The evaluator needs TensorFlow and the OpenAI Inception graph for 256×256 images; without them its stage is
reported as not run (it is an optional extra).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldm.util import ArgumentParser, at_least  # noqa: E402
from stage_probe import GiB, fmt_s, run_stage  # noqa: E402

CONFIG = "configs/latent-diffusion/cin256-v2.yaml"
# the paper's counts (D²-DPM on cin256-v2) and the preset's batch
PAPER = {"trajectories": 1000, "calibration": 1024, "holdout": 128, "weight_iters": 10_000, "weight_batch": 8,
         "act_iters": 5_000, "act_batch": 16, "act_init": 32, "stats": 1024, "eval": 50_000, "batch": 16}
GOALS = {"calibration_hours": 4.0, "memory_gib": 24.0, "sampling_ratio": 1.3}


# ---- one stage in its own process -----------------------------------------------------------------------------------

def current_rss() -> int:
    """Resident bytes now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def forward_probe_main(record: Path, device: str, what: str, batch: int, config: str = CONFIG) -> int:
    """Extra peak memory and time of one no-grad UNet forward or one VQ-f4 decode at ``batch``, in a fresh process
    (a process's peak RSS never goes down, so each measurement gets its own); for the UNet also the bytes of every
    quantizable layer's input (what step 3's range initialisation holds per sample)."""
    import torch

    from ldm.util import instantiate_from_config, load_config
    dev = torch.device(device)
    cfg = load_config(REPO / config).model.params
    torch.manual_seed(0)
    net = instantiate_from_config(cfg.unet_config if what == "unet" else cfg.first_stage_config).eval().to(dev)
    layer_inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, a: layer_inputs.append(a[0].numel() * 4))
             for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = current_rss()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if what == "unet":
            net(x, torch.full((batch,), 500, device=dev),
                context=torch.randn(batch, 1, cfg.unet_config.params.context_dim, device=dev))
        else:
            net.decode(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        extra = torch.cuda.max_memory_allocated(dev) - before
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    for h in hooks:
        h.remove()
    record.write_text(json.dumps({"what": what, "batch": batch, "seconds": time.perf_counter() - t0,
                                  "extra_peak_bytes": max(extra, 0),
                                  "layer_input_bytes": sum(layer_inputs) if what == "unet" else None}))
    return 0


def forward_probe(args, work: Path, log) -> dict:
    """Per-sample activation bytes of the UNet forward and of the decoder: slopes between two batch sizes."""
    out = {}
    for what in ("unet", "decode"):
        rows = []
        for b in (2, 4):
            rec = work / "records" / f"forward_{what}_b{b}.json"
            if not rec.is_file():
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_forward_probe", str(rec),
                                "--probe_what", what, "--probe_batch", str(b), "--device", args.device,
                                "--config", args.config],
                               cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
            rows.append(json.loads(rec.read_text()))
        slope = max(0.0, (rows[1]["extra_peak_bytes"] - rows[0]["extra_peak_bytes"]) / 2)
        out[what] = {"rows": rows, "bytes_per_sample": slope,
                     "seconds_per_sample": rows[1]["seconds"] / rows[1]["batch"]}
    out["layer_input_bytes_per_sample"] = out["unet"]["rows"][1]["layer_input_bytes"] / 4
    return out


# ---- the rehearsal --------------------------------------------------------------------------------------------------

def write_checkpoint(path: Path, seed: int, config: str = CONFIG) -> dict:
    """cin256-v2 with seeded random weights as a weights-only CompVis checkpoint. CompVis initialises the output
    convs of the UNet, its ResBlocks and transformers to zero (a fresh model predicts ε = 0 exactly, and its SQNR
    is undefined); those get PyTorch's default random init too."""
    import torch

    from ldm.fileio import save_atomic
    from ldm.util import instantiate_from_config, load_config
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = instantiate_from_config(load_config(REPO / config).model)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            m.reset_parameters()
    sd = model.state_dict()
    save_atomic({"state_dict": sd, "global_step": 0}, path)
    n_unet = sum(p.numel() for p in model.model.diffusion_model.parameters())
    del model, sd
    return {"seconds": time.perf_counter() - t0, "bytes": path.stat().st_size, "unet_parameters": n_unet}


def file_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def read_timing(artifact: Path) -> dict:
    from pipeline.artifacts import timing_path
    return json.loads(timing_path(artifact).read_text())


def stages(args, work: Path) -> list[tuple[str, str, list[str]]]:
    common = ["--preset", "cin256", "--config", args.config, "--ckpt", str(work / "model.ckpt"), "--outdir",
              str(work / "outputs"), "--device", args.device]
    bits = ["--w_bits", "4"]
    wa = [*bits, "--a_bits", "8"]
    classes = [str(c) for c in range(args.classes)]
    cache = ["--cache_dtype", args.cache_dtype] if args.cache_dtype else []
    # one FP pass serves the units whose caches fit the budget: scaled by the rows, it groups them as at the paper's
    # counts, so the cache passes project linearly
    cache += ["--fp_capture_mb", f"{1024 * args.n_calibration / PAPER['calibration']:g}"]
    out = [
        ("1 calibration", "quant_scripts/collect_imagenet_calibration_set.py",
         [*common, "--calibration_classes", *classes, "--calibration_trajectories_per_class", "1",
          "--n", str(args.n_calibration), "--n_holdout", str(args.n_holdout)]),
        ("2 weights (BRECQ/AdaRound)", "quant_scripts/quantize_weight.py",
         [*common, *bits, "--weight_iters", str(args.iters), *cache]),
        ("3 activations", "quant_scripts/quantize_weight_activation.py",
         [*common, *wa, "--act_iters", str(args.iters), "--act_init_samples", str(args.act_init), *cache]),
        ("4 noise statistics", "quant_scripts/collect_timestep_aware_statistics.py",
         [*common, *wa, "--n", str(args.samples), "--no_progress"]),
        ("5 Gaussian fits", "quant_scripts/gaussian_modeling.py", [*common, *wa]),
        ("6 grid (dd2-channel)", "quant_scripts/sample_quantized_ldm_imagenet.py",
         [*common, *wa, "--sampler", "dd2-channel", "--classes", "0", "--n_samples_per_class", "1", "--no_progress"]),
    ]
    for sampler in ("fp32", "dd2-channel"):   # two batches: the second one's time is the per-batch time
        out.append((f"7 samples ({sampler})", "quant_scripts/generate_evaluation_samples_dist.py",
                    [*common, *wa, "--sampler", sampler, "--n_samples", str(2 * args.eval_batch), "--batch_size",
                     str(args.eval_batch), "--classes", *eval_classes(args)]))
    return out


def eval_classes(args) -> list[str]:
    """Step 7's classes: the calibrated ones, as many as divide its two batches evenly (the plan is balanced)."""
    return [str(c) for c in range(math.gcd(args.classes, 2 * args.eval_batch))]


def eval_dir(work: Path, args, tag, sampler: str) -> Path:
    from pipeline.layout import RunLayout
    layout = RunLayout(work / "outputs", "cin256", 20, 0.0, 3.0)
    return layout.eval_samples(tag, sampler, 2 * args.eval_batch, 0, tuple(int(c) for c in eval_classes(args)))


def batch_seconds(sample_dir: Path) -> float | None:
    """Step 7's steady-state time per batch: between the writes of its first and second shard (the second batch
    alone: sampling and decoding at the real batch, no start-up, no model load, no merge)."""
    from evaluation.generation import shard_path
    first, second = shard_path(sample_dir, 0), shard_path(sample_dir, 1)
    if not (first.is_file() and second.is_file()):
        return None
    return max(second.stat().st_mtime - first.stat().st_mtime, 0.0)


def project(args, work: Path, recs: dict, fwd: dict) -> list[dict]:
    """Each stage at the paper's counts: time, peak host memory and, on a GPU, peak GPU memory (see the module
    docstring for the rules). Memory grows where it lives: the reconstruction caches in host memory (RowCache keeps
    its rows there), the activations of the forwards on the compute device, which is where the forward probe
    measured its per-row bytes (GPU bytes on CUDA, host bytes on a CPU)."""
    from pipeline.layout import FP32, QuantTag, RunLayout
    layout = RunLayout(work / "outputs", "cin256", 20, 0.0, 3.0)
    from pipeline.cli import load_preset
    cache_batch = load_preset("cin256").get("cache_batch_size", 128)   # rows per cache-filling forward
    per_sample_act = fwd["unet"]["bytes_per_sample"]       # one more row in a no-grad UNet forward
    per_image_dec = fwd["decode"]["bytes_per_sample"]       # one more image in a VQ-f4 decode
    layer_in = fwd["layer_input_bytes_per_sample"]
    guided = 2 * PAPER["batch"]                              # rows the UNet sees per batch with guidance
    on_gpu = args.device.startswith("cuda")
    out = []

    def row(name, rec, seconds, why, host_grow=0.0, device_grow=0.0):
        gpu = rec.get("peak_gpu_bytes")
        out.append({"stage": name, "measured_s": rec["wall_s"], "measured_peak_bytes": rec["peak_host_bytes"],
                    "measured_peak_gpu_bytes": gpu, "projected_s": seconds,
                    "projected_peak_bytes": rec["peak_host_bytes"] + host_grow + (0 if on_gpu else device_grow),
                    "projected_peak_gpu_bytes": None if gpu is None else gpu + (device_grow if on_gpu else 0),
                    "rule": why})

    for name, rec in recs.items():
        load, compute = rec["load_s"], rec["wall_s"] - rec["load_s"]
        step = name.split()[0]
        if step == "1":   # UNet forwards ∝ trajectories; the batch grows from 2K to 32 rows
            f = PAPER["trajectories"] / args.classes
            row(name, rec, load + compute * f, f"forwards x{f:g}",
                device_grow=per_sample_act * max(0, guided - 2 * args.classes))
        elif step in ("2", "3"):
            seconds, cache_grow, act_grow, init_grow, why = project_reconstruction(
                step, read_timing(layout.quant(QuantTag(4) if step == "2" else QuantTag(4, 8))), rec,
                per_sample_act, layer_in, cache_batch)
            if on_gpu:   # caches on the host; forwards and range inputs on the GPU
                row(name, rec, seconds, why, host_grow=cache_grow, device_grow=max(act_grow, init_grow))
            else:        # all in host memory: the caches and a cache-filling forward together, or the ranges
                row(name, rec, seconds, why, host_grow=max(cache_grow + act_grow, init_grow))
        elif step == "4":
            f = PAPER["stats"] / args.samples
            row(name, rec, load + compute * f, f"trajectories x{f:g}",   # (FP and quantized forwards in turn)
                device_grow=per_sample_act * max(0, guided - 2 * args.samples))
        elif step == "7":
            sampler = name.split("(")[1].rstrip(")")
            seconds, why = project_sampling(args, rec, batch_seconds(
                eval_dir(work, args, FP32 if sampler == "fp32" else QuantTag(4, 8), sampler)))
            grow = max(per_sample_act * max(0, guided - 2 * args.eval_batch),           # sampling, then decoding
                       per_image_dec * max(0, PAPER["batch"] - args.eval_batch))
            row(name, rec, seconds, why, device_grow=grow)
        else:
            row(name, rec, rec["wall_s"], "as measured")
    return out


def project_reconstruction(step: str, t: dict, rec: dict, per_sample_act: float, layer_in: float,
                           cache_batch: int) -> tuple[float, float, float, float, str]:
    """Steps 2-3 at the paper's counts from their per-unit timings: (seconds, cache bytes added, activation bytes
    added by a cache-filling forward, bytes added by the range initialisation (step 3), rule)."""
    load = rec["load_s"]
    units = t["units"]
    iters, rows_used = units[0]["iters"], units[0]["rows"]
    want_iters, want_batch = ((PAPER["weight_iters"], PAPER["weight_batch"]) if step == "2" else
                              (PAPER["act_iters"], PAPER["act_batch"]))
    used_batch = min(want_batch, rows_used)   # the rehearsal's mini-batch (capped by its rows)
    cap = sum(u["capture_s"] for u in units)
    opt = sum(u["optimise_s"] for u in units)
    init = t.get("init_weights_s", 0.0) + t.get("calibrate_activations_s", 0.0) * (
        PAPER["act_init"] / t.get("act_init_samples", 1) if step == "3" else 0)
    sqnr = t["sqnr_s"] * PAPER["holdout"] / t["held_out"]
    other = rec["wall_s"] - load - cap - opt - t.get("init_weights_s", 0.0) - \
        t.get("calibrate_activations_s", 0.0) - t["sqnr_s"]
    seconds = (load + init + sqnr + max(other, 0.0) + cap * PAPER["calibration"] / rows_used
               + opt * (want_iters / iters) * (want_batch / used_batch))
    cache_grow = max(u["cache_bytes"] for u in units) * (PAPER["calibration"] / rows_used - 1)
    act_grow = per_sample_act * max(0, min(cache_batch, PAPER["calibration"]) - rows_used)
    used_init = t.get("act_init_samples", 0)   # ranges: every layer's input of 32 rows, in batches
    init_grow = (layer_in * (PAPER["act_init"] - used_init) + per_sample_act * max(
        0, min(cache_batch, PAPER["act_init"]) - used_init)) if step == "3" else 0
    why = (f"{len(units)} units; caches x{PAPER['calibration'] / rows_used:g}, iterations x{want_iters / iters:g}"
           + (f" (batch {used_batch} -> {want_batch})" if used_batch < want_batch else ""))
    return seconds, cache_grow, act_grow, init_grow, why


def project_sampling(args, rec: dict, per_batch: float | None) -> tuple[float, str]:
    """Step 7 at 50,000 samples in batches of 16 (guided: 32 UNet rows): the model load and the run's fixed costs
    once, plus the steady-state time of one batch (the second of the two it made) per batch. A batch smaller than
    16 (CPU runs) is scaled to 16 by its rows. Without shard times: the old linear rule (it counts the fixed costs
    once per sample-count multiple, so it overestimates)."""
    load, compute = rec["load_s"], rec["wall_s"] - rec["load_s"]
    n_batches = math.ceil(PAPER["eval"] / PAPER["batch"])
    if per_batch is None:
        f = PAPER["eval"] / (2 * args.eval_batch)
        return load + compute * f, f"samples x{f:g} (no shard times)"
    fixed = max(compute - 2 * per_batch, 0.0)
    scaled = per_batch * PAPER["batch"] / args.eval_batch
    return (load + fixed + scaled * n_batches,
            f"{n_batches} batches x {scaled:.2f} s (batch of {args.eval_batch}"
            + (f", x{PAPER['batch'] / args.eval_batch:g} rows" if args.eval_batch != PAPER["batch"] else "")
            + f") + {fixed:.1f} s fixed")


def artifact_sizes(work: Path) -> list[tuple[str, int]]:
    root = work / "outputs"
    sizes = [("model.ckpt", file_bytes(work / "model.ckpt"))]
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".pt", ".npz", ".png") and "shards" not in p.parts:
            sizes.append((str(p.relative_to(root)), p.stat().st_size))
    return sizes


def unit_table(work: Path) -> list[dict]:
    from pipeline.layout import QuantTag, RunLayout
    layout = RunLayout(work / "outputs", "cin256", 20, 0.0, 3.0)
    table = []
    for phase, tag in (("weight", QuantTag(4)), ("activation", QuantTag(4, 8))):
        units = read_timing(layout.quant(tag))["units"]
        kinds = sorted({u["kind"] for u in units})
        for kind in kinds:
            us = [u for u in units if u["kind"] == kind]
            table.append({"phase": phase, "kind": kind, "units": len(us),
                          "s_per_iter": sum(u["optimise_s"] for u in us) / sum(u["iters"] for u in us),
                          "capture_s_per_row": sum(u["capture_s"] for u in us) / sum(u["rows"] for u in us),
                          "max_cache_bytes": max(u["cache_bytes"] for u in us), "rows": us[0]["rows"]})
    return table


def evaluator_stage(work: Path, args, log) -> dict | None:
    """The evaluator on the two sample batches (FP32 as the reference), when TensorFlow and the graph are here."""
    from evaluator import INCEPTION_GRAPH
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return None
    if not Path(INCEPTION_GRAPH).is_file():
        return None
    from pipeline.layout import FP32, QuantTag
    fp = eval_dir(work, args, FP32, "fp32") / "samples.npz"
    q = eval_dir(work, args, QuantTag(4, 8), "dd2-channel") / "samples.npz"
    return run_stage("evaluator", "evaluator.py", [str(fp), str(q), "--device", args.device], work, log)


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every count checked by the parser (one line, before the checkpoint is written)."""
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (every script gets it)")
    ap.add_argument("--workdir", default=None, help="keep the checkpoint and artifacts here (default: a temporary "
                                                    "folder, removed at the end)")
    ap.add_argument("--classes", type=at_least(1), default=2, help="calibration trajectories (one per class 0..K-1)")
    ap.add_argument("--n_calibration", type=at_least(1), default=8, help="calibration inputs kept (paper: 1,024)")
    ap.add_argument("--n_holdout", type=at_least(0), default=2, help="held-out inputs for the SQNRs (paper set: 128)")
    ap.add_argument("--iters", type=at_least(1), default=4, help="reconstruction iterations per unit, both phases")
    ap.add_argument("--act_init", type=at_least(1), default=4, help="inputs for the activation ranges (preset: 32)")
    ap.add_argument("--samples", type=at_least(1), default=2, help="statistics samples")
    ap.add_argument("--eval_batch", type=at_least(1), default=None,
                    help="step 7's batch: it makes two, and the second one's time projects 50,000 samples (default: "
                         "16, the preset's, on CUDA; 1 on a CPU, scaled to 16 rows)")
    ap.add_argument("--config", default=CONFIG, help="the model (default cin256-v2; a smaller CompVis class-"
                                                     "conditional config makes a quick smoke run)")
    ap.add_argument("--cache_dtype", default=None, choices=("float32", "float16", "bfloat16"),
                    help="override the preset's reconstruction cache dtype")
    ap.add_argument("--seed", type=at_least(0), default=0, help="the random weights")
    ap.add_argument("--json", default=None, help="also write every record and projection here")
    ap.add_argument("--fresh", action="store_true", help="with --workdir: measure every stage again (default: "
                                                          "stages with a record there are reused)")
    ap.add_argument("--_forward_probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe_what", default="unet", help=argparse.SUPPRESS)
    ap.add_argument("--probe_batch", type=at_least(1), default=2, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.samples > args.classes:
        ap.error(f"argument --samples: must be <= --classes (one sample per calibrated class), got {args.samples} "
                 f"> {args.classes}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._forward_probe:
        return forward_probe_main(Path(args._forward_probe), args.device, args.probe_what, args.probe_batch,
                                  args.config)
    if args.eval_batch is None:
        args.eval_batch = PAPER["batch"] if args.device.startswith("cuda") else 1

    started = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cin256_rehearsal_"))
    if args.fresh:
        shutil.rmtree(work / "records", ignore_errors=True)
    (work / "records").mkdir(parents=True, exist_ok=True)
    log_path = work / "rehearsal.log"
    print(f"cin256 rehearsal in {work} on {args.device}; script output in {log_path}")
    try:
        with open(log_path, "a") as log:
            ckpt, made_rec = work / "model.ckpt", work / "records" / "checkpoint.json"
            if not (ckpt.is_file() and made_rec.is_file()):
                made_rec.write_text(json.dumps(write_checkpoint(ckpt, args.seed, args.config)))
            made = json.loads(made_rec.read_text())
            print(f"checkpoint: {made['bytes'] / GiB:.2f} GiB in {made['seconds']:.1f} s")
            fwd = forward_probe(args, work, log)
            recs = {name: run_stage(name, script, argv_, work, log) for name, script, argv_ in stages(args, work)}
            ev = evaluator_stage(work, args, log)
        report = summarise(args, work, recs, fwd, made, ev, time.perf_counter() - started)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def summarise(args, work: Path, recs: dict, fwd: dict, made: dict, ev: dict | None, total_s: float) -> dict:
    import torch
    proj = project(args, work, recs, fwd)
    units = unit_table(work)
    sizes = artifact_sizes(work)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "device": args.device,
               "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    print(f"\n## cin256-v2 rehearsal ({machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
          f"device {args.device}{', ' + machine['gpu'] if machine['gpu'] else ''}); wall {total_s / 60:.1f} min")
    print(f"counts: {args.classes} calibration trajectories, {args.n_calibration} + {args.n_holdout} calibration "
          f"inputs, {args.iters} iterations per unit, {args.act_init} range inputs, {args.samples} statistics "
          f"samples, step 7 in two batches of {args.eval_batch}; 20 DDIM steps, eta 0, scale 3 (the preset)")
    print_projection(proj)
    calib = sum(r["projected_s"] for r in proj if r["stage"][0] in "123")
    peak = max(r["projected_peak_bytes"] for r in proj)
    gpu_peaks = [r["projected_peak_gpu_bytes"] for r in proj if r["projected_peak_gpu_bytes"] is not None]
    gpu_peak = max(gpu_peaks) if gpu_peaks else None
    sampling = sum(r["projected_s"] for r in proj if r["stage"].startswith("7") and "fp32" not in r["stage"])
    print(f"\nprojected steps 1-3 (W4A8 calibration at the paper's counts): {calib / 3600:.1f} h on {args.device} "
          f"(goal: <= {GOALS['calibration_hours']:g} GPU-hours{'' if gpu_peak is not None else '; a CPU figure'})")
    print(f"projected step 7 (50,000 W4A8 D-D² samples): {sampling / 3600:.1f} h on {args.device}")
    fits = lambda b: "fits" if b <= GOALS["memory_gib"] * 1e9 else "DOES NOT fit"  # noqa: E731
    print(f"projected largest peak memory of a stage: {peak / GiB:.1f} GiB host (goal: fits "
          f"{GOALS['memory_gib']:g} GB) -> {fits(peak)}")
    if gpu_peak is not None:
        print(f"projected largest GPU peak of a stage: {gpu_peak / GiB:.1f} GiB (goal: fits "
              f"{GOALS['memory_gib']:g} GB) -> {fits(gpu_peak)}")
    print(f"\n{'phase':10s} {'unit kind':22s} {'units':>5s} {'s/iter':>8s} {'capture s/row':>13s} "
          f"{'cache MiB (rows)':>17s}")
    for u in units:
        print(f"{u['phase']:10s} {u['kind']:22s} {u['units']:5d} {u['s_per_iter']:8.3f} "
              f"{u['capture_s_per_row']:13.3f} {u['max_cache_bytes'] / 2**20:11.1f} ({u['rows']})")
    print("\nartifacts:")
    for name, b in sizes:
        print(f"  {b / 2**20:10.1f} MiB  {name}")
    print(f"\nforward probe (batch 2 and 4): UNet {fwd['unet']['seconds_per_sample']:.2f} s and "
          f"{fwd['unet']['bytes_per_sample'] / 2**20:.0f} MiB per row, VQ-f4 decode "
          f"{fwd['decode']['seconds_per_sample']:.2f} s and {fwd['decode']['bytes_per_sample'] / 2**20:.0f} MiB per "
          f"image; quantizable-layer inputs {fwd['layer_input_bytes_per_sample'] / 2**20:.0f} MiB per sample")
    print("evaluator: " + ("ran" if ev else "not run (needs TensorFlow and the OpenAI Inception graph for 256x256)"))
    return {"machine": machine, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "paper_counts": PAPER, "goals": GOALS, "checkpoint": made, "forward_probe": fwd, "stages": recs,
            "projection": proj, "units": units, "artifacts": sizes, "evaluator": ev, "total_s": total_s,
            "projected_calibration_s": calib, "projected_sampling_s": sampling, "projected_peak_bytes": peak,
            "projected_peak_gpu_bytes": gpu_peak}


def print_projection(proj: list[dict]) -> None:
    """The per-stage table; GPU columns when any stage used the GPU (a stage that never touched CUDA, e.g. the
    Gaussian fits, has no GPU peak and shows '-')."""
    gpu = any(r["measured_peak_gpu_bytes"] is not None for r in proj)

    def gib(b):
        return f"{b / GiB:7.2f}" if b is not None else f"{'-':>7s}"

    print(f"\n{'stage':28s} {'measured':>10s} {'peak GiB':>9s}{' GPU GiB' if gpu else ''} | {'projected':>11s} "
          f"{'peak GiB':>9s}{' GPU GiB' if gpu else ''}  rule")
    for r in proj:
        g = f" {gib(r['measured_peak_gpu_bytes'])}" if gpu else ""
        pg = f" {gib(r['projected_peak_gpu_bytes'])}" if gpu else ""
        print(f"{r['stage']:28s} {fmt_s(r['measured_s']):>10s} {r['measured_peak_bytes'] / GiB:9.2f}{g} | "
              f"{fmt_s(r['projected_s']):>11s} {r['projected_peak_bytes'] / GiB:9.2f}{pg}  {r['rule']}")



if __name__ == "__main__":
    sys.exit(main())
