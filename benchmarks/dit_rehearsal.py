"""Full-size dress rehearsal for DiT-XL/2 (256×256): the pipeline's steps 1-7 through the real scripts on a
random-weight DiT, with measured time and memory per stage and their projection to the usual DiT PTQ protocol.

    python benchmarks/dit_rehearsal.py --device cuda --json dit.json           # the real model, 28 blocks
    python benchmarks/dit_rehearsal.py --device cpu --depth 2 --json dit.json  # a 2-core CPU: 2 of the 28 blocks
    python benchmarks/dit_rehearsal.py --device cpu --tiny                     # a tiny DiT: a smoke run (seconds/stage)

What it does (as benchmarks/cin256_rehearsal.py for cin256-v2). DiT-XL/2 at 256×256 (configs/dit/ptq-DiT-XL-2-256.yaml:
675 M parameters, 4×32×32 latents, patch 2 = 256 tokens, width 1152, 16 heads, 1000 classes) is built with seeded random
weights and written as a released-style plain state dict (DiT-XL-2-256x256.pt's layout). DiT zero-initialises the adaLN
modulation and output Linears (a fresh DiT predicts ε = 0 exactly and has no SQNR): those get PyTorch's default random
init. The first stage is a random-weight sd-vae-ft-ema: a diffusers folder (the hub's config.json, weights as
diffusion_pytorch_model.bin under diffusers' key names) that the family loads as it loads the real one (CompVis
AutoencoderKL f8, 83.7 M parameters, strict), so step 6's and 7's decodes run at their real size and nothing is
downloaded. The config is the shipped one with only the VAE folder (and ``--depth``) changed. Then every pipeline script
runs with ``--config <it> --ckpt <it>`` at few steps and small counts, each stage in its own process
(benchmarks/stage_probe.py: wall time, model-load time, peak host memory, on CUDA peak GPU memory; steps 2-3 also per
unit the cache-filling time, the optimisation time and the cache bytes).

``--depth N`` keeps N of DiT-XL/2's 28 identical blocks (everything else at its real size). It exists because the real
model does not fit this CPU's time: one no-grad forward row takes 1.8-3.8 s on 2 shared threads and step 2's
weight-range search 24 s per block (11 min for the model) before any reconstruction. With N < 28 the projection adds
the depth: forward-bound stages by adding, for every row they forwarded, the forward time of the missing blocks (the
per-row time of the real 28-block model minus the rehearsal model's, both measured by the forward probe),
reconstruction by unit (each block's optimisation times 28/N; a block's cache pass runs the prefix before it, so the
28 blocks' cache passes by the mean prefix forward of 28 over N blocks, from the same probe), weight-proportional
parts (range search, artifact writes) by the ratio of quantized weight elements, the model load by a probe loading the
real 28-block checkpoint, and memory by the weight bytes of the missing blocks times the weight copies a stage holds
(``WEIGHT_COPIES``). On a GPU run N = 28 (the default): nothing is extrapolated in depth.

The protocol projected to (``PROTOCOLS``; ``--protocol`` picks the printed one, the JSON has both): PTQ4DiT (Wu et al.
2024) on DiT-XL/2 256×256: sampling with 250 steps (and 50, its fastest setting), guidance scale 1.5, a calibration
set of 25 timesteps × 32 samples = 800 inputs (32 guided trajectories, ``--cali_st 25``), 10,000 evaluation samples
(FID-10K, as PTQ4DiT and Q-DiT report) in batches of 16 (Q-DiT's). The reconstruction is this pipeline's
BRECQ/AdaRound, which neither DiT paper uses (PTQ4DiT calibrates with its own salience balancing, Q-DiT with GPTQ and
a granularity search), so its counts are the pipeline's paper's (D²-DPM): 10,000 / 5,000 iterations per unit at batch
8 / 16, activation ranges from 32 inputs, 128 held-out inputs, 1,024 noise-statistics trajectories over every step.
The rehearsal samples with the pipeline's DDIM at few steps (``--steps``, η 0); PTQ4DiT samples with DDPM, whose cost
per step is the same forward, so every forward-bound part scales with the step count.

Scaling rules, each part by the count it grows with (as cin256_rehearsal.py): step 1 by trajectories × steps; steps 2-3
cache passes by calibration inputs, optimisation by iterations (and mini-batch), SQNRs by held-out inputs, activation
ranges by their inputs; step 4 by trajectories × steps; step 5 by the timesteps fitted; step 6 (one grid image) and
step 7 by steps for sampling while decoding stays per image (the VAE decode probe splits the two); step 7 from its
second batch's time (``--eval_batch``, 16 on CUDA; 1 on a CPU, scaled to 16 rows) × 625 batches, load and fixed costs
once. Memory: the reconstruction caches and, on CUDA, activations on the device, by the forward probe's per-row bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
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

from cin256_rehearsal import batch_seconds, current_rss, file_bytes, print_projection, read_timing  # noqa: E402
from ldm.util import ArgumentParser, at_least  # noqa: E402
from stage_probe import GiB, fmt_s, run_stage  # noqa: E402

BASE_CONFIG = "configs/dit/ptq-DiT-XL-2-256.yaml"
# sd-vae-ft-ema's config.json as the hub has it (no scaling_factor: diffusers' default 0.18215 applies, as DiT's)
SD_VAE_FT_EMA = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
                 "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
                 "up_block_types": ["UpDecoderBlock2D"] * 4}
# --tiny: a DiT far below DiT-S/2 (4 blocks of width 64 on 4×8×8 latents) and a 2-level KL-f2 VAE: a smoke run
TINY_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=2, mlp_ratio=4.0,
                class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
TINY_VAE = {**SD_VAE_FT_EMA, "block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "sample_size": 16}
PROTOCOLS = {
    "ptq4dit-250": {"steps": 250, "scale": 1.5, "trajectories": 32, "calibration": 800, "holdout": 128,
                    "weight_iters": 10_000, "weight_batch": 8, "act_iters": 5_000, "act_batch": 16, "act_init": 32,
                    "stats": 1024, "eval": 10_000, "batch": 16},
    "ptq4dit-50": {"steps": 50, "scale": 1.5, "trajectories": 32, "calibration": 800, "holdout": 128,
                   "weight_iters": 10_000, "weight_batch": 8, "act_iters": 5_000, "act_batch": 16, "act_init": 32,
                   "stats": 1024, "eval": 10_000, "batch": 16}}
GOALS = {"memory_gib": 24.0}
# DiT weights each stage holds (for the memory of the blocks a --depth run leaves out): steps 1 and 7 (FP32) the model;
# steps 2-3 the model's own DiT quantized in place plus each layer's cached fake-quantized weight and a bool round-up
# mask (1/4 of a float32); steps 4, 6 and 7 (quantized) the FP model and a quantized copy with its cached weights
WEIGHT_COPIES = {"1": 1.0, "2": 2.25, "3": 2.25, "4": 3.0, "5": 0.0, "6": 3.0, "7 fp32": 1.0, "7": 3.0}
SAMPLING = {"eta": 0.0, "scale": 1.5}


# ---- the model and its first stage -----------------------------------------------------------------------------------

def model_spec(tiny: bool) -> tuple[dict, dict]:
    """(DiT constructor arguments at full depth, the VAE's diffusers config) of the rehearsed model."""
    if tiny:
        return dict(TINY_DIT), dict(TINY_VAE)
    from omegaconf import OmegaConf

    from ldm.modules.dit import dit_config
    shipped = dict(OmegaConf.to_container(OmegaConf.load(REPO / BASE_CONFIG).model.params.dit_config.params))
    assert shipped == dit_config("DiT-XL/2", 256), f"{BASE_CONFIG} is no longer DiT-XL/2 at 256"
    return shipped, dict(SD_VAE_FT_EMA)


def random_dit(dit_args: dict, seed: int):
    """A DiT with seeded random weights; the Linears DiT initialises to zero (adaLN modulation, output) get PyTorch's
    default init, so ε is not identically zero."""
    import torch

    from ldm.modules.dit import DiT
    torch.manual_seed(seed)
    dit = DiT(**dit_args)
    for m in dit.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not m.weight.any():
            m.reset_parameters()
    return dit


def dit_counts(dit_args: dict) -> dict:
    """Parameters and quantizable weight elements (Linear/Conv weights) of a DiT, counted on the meta device."""
    import torch

    from ldm.modules.dit import DiT
    with torch.device("meta"):
        dit = DiT(**dit_args)
    weights = sum(m.weight.numel() for m in dit.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    return {"parameters": sum(p.numel() for p in dit.parameters()), "weight_elements": weights}


def diffusers_key(key: str, levels: int) -> str:
    """The diffusers name of a CompVis AutoencoderKL key: ldm.models.diffusers_vae.compvis_key inverted."""
    found = re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample)(?:\.(\d+))?\.(.+)$", key)
    if found:
        side, _, level, kind, j, rest = found.groups()
        level = int(level) if side == "encoder" else levels - 1 - int(level)
        part = "down_blocks" if side == "encoder" else "up_blocks"
        if kind == "block":
            return f"{side}.{part}.{level}.resnets.{j}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
        return f"{side}.{part}.{level}.{'downsamplers' if kind == 'downsample' else 'upsamplers'}.0.{rest}"
    found = re.match(r"^(encoder|decoder)\.mid\.block_(\d+)\.(.+)$", key)
    if found:
        side, j, rest = found.groups()
        return f"{side}.mid_block.resnets.{int(j) - 1}.{rest}"
    found = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.+)$", key)
    if found:
        side, name, leaf = found.groups()
        name = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[name]
        return f"{side}.mid_block.attentions.0.{name}.{leaf}"
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def write_vae(folder: Path, vae_config: dict, seed: int) -> dict:
    """A random-weight AutoencoderKL as a diffusers folder (config.json + diffusion_pytorch_model.bin); the renaming is
    checked against the loader's own rules before anything is written."""
    import torch

    from ldm.fileio import save_atomic, write_text_atomic
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.diffusers_vae import compvis_ddconfig, to_compvis_state
    t0 = time.perf_counter()
    ddconfig, embed_dim = compvis_ddconfig(vae_config)
    torch.manual_seed(seed + 1)
    sd = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=embed_dim).state_dict()
    levels = len(ddconfig["ch_mult"])
    out = {diffusers_key(k, levels): (v[:, :, 0, 0] if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", k) else v)
           for k, v in sd.items()}
    back = to_compvis_state(out, levels)
    if {k: v.shape for k, v in back.items()} != {k: v.shape for k, v in sd.items()}:
        raise RuntimeError("the diffusers renaming does not invert ldm.models.diffusers_vae.compvis_key")
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "config.json", json.dumps(vae_config, indent=1))
    save_atomic({k: v.contiguous() for k, v in out.items()}, folder / "diffusion_pytorch_model.bin")
    return {"seconds": time.perf_counter() - t0, "parameters": sum(v.numel() for v in sd.values()),
            "bytes": (folder / "diffusion_pytorch_model.bin").stat().st_size}


def write_config(path: Path, dit_args: dict, vae_folder: Path) -> None:
    """The shipped PTQ config's layout (configs/dit/ptq-DiT-XL-2-256.yaml) with this DiT and the random VAE folder."""
    from omegaconf import OmegaConf
    config = OmegaConf.load(REPO / BASE_CONFIG)
    config.model.params.dit_config.params = dit_args
    config.model.params.first_stage = {"vae": str(vae_folder)}
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, path)


def write_checkpoint(path: Path, dit_args: dict, seed: int) -> dict:
    """The random DiT as a released-style plain state dict (weights only)."""
    from ldm.fileio import save_atomic
    t0 = time.perf_counter()
    dit = random_dit(dit_args, seed)
    save_atomic(dit.state_dict(), path)
    n = sum(p.numel() for p in dit.parameters())
    del dit
    return {"seconds": time.perf_counter() - t0, "bytes": path.stat().st_size, "parameters": n}


# ---- probes, each in a fresh process (a process's peak RSS never goes down) ------------------------------------------

def forward_probe_main(record: Path, device: str, what: str, batch: int, depth: int, tiny: bool) -> int:
    """Time and extra peak memory of one no-grad DiT forward of ``batch`` rows at ``depth`` blocks (with the bytes of
    every quantized layer's input: what step 3's range initialisation holds per row), or of one VAE decode."""
    import torch

    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.diffusers_vae import compvis_ddconfig
    dev = torch.device(device)
    dit_args, vae_config = model_spec(tiny)
    if what == "dit":
        net = random_dit({**dit_args, "depth": depth}, 0).eval().to(dev)
    else:
        ddconfig, embed_dim = compvis_ddconfig(vae_config)
        net = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"},
                            embed_dim=embed_dim).eval().to(dev)
    layer_inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, a: layer_inputs.append(a[0].numel() * 4))
             for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    s = dit_args["input_size"]
    x = torch.randn(batch, dit_args["in_channels"], s, s, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = current_rss()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if what == "dit":
            net(x, torch.full((batch,), 500, device=dev), torch.zeros(batch, dtype=torch.long, device=dev))
        else:
            net.decode(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        extra = torch.cuda.max_memory_allocated(dev) - before
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    for h in hooks:
        h.remove()
    record.write_text(json.dumps({"what": what, "batch": batch, "depth": depth, "seconds": time.perf_counter() - t0,
                                  "extra_peak_bytes": max(extra, 0),
                                  "layer_input_bytes": sum(layer_inputs) if what == "dit" else None}))
    return 0


def load_probe_main(record: Path, config: Path, ckpt: Path, device: str) -> int:
    """The family's load of a checkpoint (strict, weights-only, with the VAE): seconds and resident bytes added."""
    import torch

    from ldm.util import load_config
    from pipeline.families import family_for
    cfg = load_config(config)
    before, t0 = current_rss(), time.perf_counter()
    family_for(cfg).load(cfg, ckpt, device=torch.device(device))
    record.write_text(json.dumps({"seconds": time.perf_counter() - t0, "rss_added_bytes": current_rss() - before}))
    return 0


def probe(args, rec: Path, log, *flags: str) -> dict:
    if not rec.is_file():
        subprocess.run([sys.executable, str(Path(__file__).resolve()), *flags, "--device", args.device,
                        *(["--tiny"] if args.tiny else [])], cwd=REPO, check=True, stdout=log,
                       stderr=subprocess.STDOUT)
    return json.loads(rec.read_text())


def forward_probe(args, work: Path, log) -> dict:
    """Per-row time and activation bytes of the DiT at the rehearsal's depth and at full depth (batches b and 2b: the
    slope), the VAE decode per image, and the quantized layers' input bytes per row at full depth."""
    out = {}
    depths = {"dit": args.depth, "dit_full": args.full_depth}
    for what, batches in (("dit", (2, 4)), ("dit_full", (1, 2)), ("decode", (1, 2))):
        if what == "dit_full" and args.depth == args.full_depth:
            out[what] = out["dit"]
            continue
        rows = [probe(args, work / "records" / f"forward_{what}_b{b}.json", log, "--_forward_probe",
                      str(work / "records" / f"forward_{what}_b{b}.json"), "--probe_what",
                      "decode" if what == "decode" else "dit", "--probe_batch", str(b), "--probe_depth",
                      str(depths.get(what, args.depth))) for b in batches]
        db = rows[1]["batch"] - rows[0]["batch"]
        out[what] = {"rows": rows, "bytes_per_sample": max(0.0, (rows[1]["extra_peak_bytes"] -
                                                                 rows[0]["extra_peak_bytes"]) / db),
                     "seconds_per_sample": rows[1]["seconds"] / rows[1]["batch"]}
    full = out["dit_full"]["rows"][-1]
    out["layer_input_bytes_per_sample"] = full["layer_input_bytes"] / full["batch"]
    return out


# ---- the stages ------------------------------------------------------------------------------------------------------

def eval_classes(args) -> list[str]:
    """Step 7's classes: the calibrated ones, as many as divide its two batches evenly (the plan is balanced)."""
    return [str(c) for c in range(math.gcd(args.classes, 2 * args.eval_batch))]


def layout(work: Path, args):
    from pipeline.layout import RunLayout
    return RunLayout(work / "outputs", "custom", args.steps, SAMPLING["eta"], SAMPLING["scale"])


def stages(args, work: Path) -> list[tuple[str, str, list[str]]]:
    common = ["--config", str(work / "ptq-dit.yaml"), "--ckpt", str(work / "model.pt"), "--outdir",
              str(work / "outputs"), "--device", args.device, "--steps", str(args.steps), "--eta",
              str(SAMPLING["eta"]), "--scale", str(SAMPLING["scale"])]
    bits = ["--w_bits", "4"]
    wa = [*bits, "--a_bits", "8"]
    classes = [str(c) for c in range(args.classes)]
    # one FP pass serves the units whose caches fit the budget: scaled by the rows, it groups them as at the
    # protocol's counts (800 inputs in both), so the cache passes project linearly
    fp = ["--fp_capture_mb", f"{1024 * args.n_calibration / PROTOCOLS['ptq4dit-250']['calibration']:g}"]
    out = [
        ("1 calibration", "quant_scripts/collect_imagenet_calibration_set.py",
         [*common, "--batch_size", "16", "--calibration_classes", *classes, "--calibration_trajectories_per_class",
          "1", "--n", str(args.n_calibration), "--n_holdout", str(args.n_holdout)]),
        ("2 weights (BRECQ/AdaRound)", "quant_scripts/quantize_weight.py",
         [*common, *bits, "--weight_iters", str(args.iters), *fp]),
        ("3 activations", "quant_scripts/quantize_weight_activation.py",
         [*common, *wa, "--act_iters", str(args.iters), "--act_init_samples", str(args.act_init), *fp]),
        ("4 noise statistics", "quant_scripts/collect_timestep_aware_statistics.py",
         [*common, *wa, "--batch_size", "16", "--n", str(args.samples), "--no_progress"]),
        ("5 Gaussian fits", "quant_scripts/gaussian_modeling.py", [*common, *wa]),
        ("6 grid (dd2-channel)", "quant_scripts/sample_quantized_ldm_imagenet.py",
         [*common, *wa, "--sampler", "dd2-channel", "--classes", "0", "--n_samples_per_class", "1", "--no_progress"]),
    ]
    for sampler in ("fp32", "dd2-channel"):   # two batches: the second one's time is the per-batch time
        out.append((f"7 samples ({sampler})", "quant_scripts/generate_evaluation_samples_dist.py",
                    [*common, *wa, "--sampler", sampler, "--n_samples", str(2 * args.eval_batch), "--batch_size",
                     str(args.eval_batch), "--classes", *eval_classes(args)]))
    return out


# ---- the projection --------------------------------------------------------------------------------------------------

def depth_factors(args, fwd: dict, counts: dict) -> dict:
    """How a --depth run's parts grow to the full depth: the per-row forward time ratio, the mean block-prefix ratio
    of the cache passes, the weight-element ratio and the weight bytes of the blocks left out (all 1 / 0 at full
    depth)."""
    d, full = args.depth, args.full_depth
    f_d, f_full = fwd["dit"]["seconds_per_sample"], fwd["dit_full"]["seconds_per_sample"]
    if d == full:
        return {"forward": 1.0, "prefix": 1.0, "weights": 1.0, "blocks": 1.0, "missing_bytes": 0.0}
    per_block = max(f_full - f_d, 0.0) / (full - d)   # one block of one row
    rest = max(f_d - d * per_block, 0.0)               # the embeddings and the final layer
    mean_prefix = lambda n: rest + (n + 1) / 2 * per_block  # noqa: E731  (block k's cache pass runs k + 1 blocks)
    return {"forward": f_full / f_d, "prefix": mean_prefix(full) / mean_prefix(d),
            "weights": counts["full"]["weight_elements"] / counts["rehearsal"]["weight_elements"],
            "blocks": full / d,
            "missing_bytes": 4.0 * (counts["full"]["parameters"] - counts["rehearsal"]["parameters"])}


def project(args, work: Path, recs: dict, fwd: dict, counts: dict, load_full: dict | None, protocol: dict
            ) -> list[dict]:
    """Each stage at ``protocol``'s counts and the full depth: time, peak host memory and, on a GPU, peak GPU memory
    (rules in the module docstring)."""
    from pipeline.layout import FP32, QuantTag
    lay = layout(work, args)
    dep = depth_factors(args, fwd, counts)
    steps = protocol["steps"] / args.steps
    per_row_act = fwd["dit_full"]["bytes_per_sample"]
    per_image_dec, dec_s = fwd["decode"]["bytes_per_sample"], fwd["decode"]["seconds_per_sample"]
    guided = 2 * protocol["batch"]
    on_gpu = args.device.startswith("cuda")
    # the forward time of the blocks a --depth run leaves out, per row: added to each forward-bound stage's measured
    # time for the rows it ran (additive, so its overheads and decodes are not scaled by depth)
    missing = (fwd["dit_full"]["seconds_per_sample"] - fwd["dit"]["seconds_per_sample"]
               if args.depth < args.full_depth else 0.0)
    out = []

    def row(name, rec, seconds, why, host_grow=0.0, device_grow=0.0, copies=0.0):
        gpu = rec.get("peak_gpu_bytes")
        weights = dep["missing_bytes"] * copies
        out.append({"stage": name, "measured_s": rec["wall_s"], "measured_peak_bytes": rec["peak_host_bytes"],
                    "measured_peak_gpu_bytes": gpu, "projected_s": seconds,
                    "projected_peak_bytes": rec["peak_host_bytes"] + host_grow + (
                        min(weights, dep["missing_bytes"]) if on_gpu else device_grow + weights),
                    "projected_peak_gpu_bytes": None if gpu is None else gpu + (
                        device_grow + weights if on_gpu else 0),
                    "rule": why + (f"; depth {args.depth} -> {args.full_depth}" if dep["blocks"] != 1 else "")})

    for name, rec in recs.items():
        load = load_full["seconds"] if load_full and rec["load_s"] > 0 else rec["load_s"]
        compute = rec["wall_s"] - rec["load_s"]
        step = name.split()[0]
        copies = WEIGHT_COPIES["7 fp32" if name.endswith("(fp32)") else step]
        if step == "1":
            f = protocol["trajectories"] / args.classes * steps
            full = compute + 2 * args.classes * args.steps * missing
            row(name, rec, load + full * f, f"trajectories x steps x{f:g}", copies=copies,
                device_grow=per_row_act * max(0, min(guided, 2 * protocol["trajectories"]) - 2 * args.classes))
        elif step in ("2", "3"):
            tag = QuantTag(4) if step == "2" else QuantTag(4, 8)
            seconds, cache_grow, act_grow, init_grow, why = project_reconstruction(
                step, read_timing(lay.quant(tag)), rec, load, fwd, dep, protocol)
            if on_gpu:
                row(name, rec, seconds, why, host_grow=cache_grow, device_grow=max(act_grow, init_grow),
                    copies=copies)
            else:
                row(name, rec, seconds, why, host_grow=max(cache_grow + act_grow, init_grow), copies=copies)
        elif step == "4":
            f = protocol["stats"] / args.samples * steps
            full = compute + 2 * 2 * args.samples * args.steps * missing   # FP and quantized forwards
            row(name, rec, load + full * f, f"trajectories x steps x{f:g}", copies=copies,
                device_grow=per_row_act * max(0, guided - 2 * args.samples))
        elif step == "5":
            row(name, rec, rec["wall_s"] + compute * (steps - 1), f"timesteps x{steps:g}")
        elif step == "6":   # one image: its sampling by steps and depth, its decode as measured by the probe
            sampling = max(compute - dec_s, 0.0) + 2 * args.steps * missing
            row(name, rec, load + sampling * steps + dec_s, f"1 image: sampling x{steps:g}, decode as probed",
                copies=copies)
        else:
            sampler = name.split("(")[1].rstrip(")")
            per_batch = batch_seconds(lay.eval_samples(FP32 if sampler == "fp32" else QuantTag(4, 8), sampler,
                                                       2 * args.eval_batch, 0,
                                                       tuple(int(c) for c in eval_classes(args))))
            if per_batch is not None:
                per_batch += 2 * args.eval_batch * args.steps * missing
            deeper = {**rec, "wall_s": rec["wall_s"] + 2 * 2 * args.eval_batch * args.steps * missing}
            seconds, why = project_sampling(args, deeper, load, per_batch, dec_s, steps, protocol)
            grow = max(per_row_act * max(0, guided - 2 * args.eval_batch),
                       per_image_dec * max(0, protocol["batch"] - args.eval_batch))
            row(name, rec, seconds, why, device_grow=grow, copies=copies)
    return out


def project_reconstruction(step: str, t: dict, rec: dict, load: float, fwd: dict, dep: dict, protocol: dict
                           ) -> tuple[float, float, float, float, str]:
    """Steps 2-3 at the protocol's counts and full depth from their per-unit timings: (seconds, cache bytes added,
    activation bytes added by a cache-filling forward, bytes added by the range initialisation (step 3), rule)."""
    units = t["units"]
    iters, rows_used = units[0]["iters"], units[0]["rows"]
    want_iters, want_batch = ((protocol["weight_iters"], protocol["weight_batch"]) if step == "2" else
                              (protocol["act_iters"], protocol["act_batch"]))
    used_batch = min(want_batch, rows_used)
    blocks = [u for u in units if re.search(r"\.blocks\.\d+$", u["unit"])]
    after = [u for u in units if "final_layer" in u["unit"]]
    before = [u for u in units if u not in blocks and u not in after]
    cap = (sum(u["capture_s"] for u in before) + sum(u["capture_s"] for u in blocks) * dep["blocks"] * dep["prefix"]
           + sum(u["capture_s"] for u in after) * dep["forward"])
    opt = sum(u["optimise_s"] for u in before + after) + sum(u["optimise_s"] for u in blocks) * dep["blocks"]
    init_w, init_a = t.get("init_weights_s", 0.0), t.get("calibrate_activations_s", 0.0)
    used_init = t.get("act_init_samples", 0)
    init = init_w * dep["weights"] + (init_a * dep["forward"] * protocol["act_init"] / max(used_init, 1)
                                      if step == "3" else 0.0)
    sqnr = t["sqnr_s"] * dep["forward"] * protocol["holdout"] / t["held_out"]
    other = max(rec["wall_s"] - rec["load_s"] - sum(u["capture_s"] + u["optimise_s"] for u in units) - init_w
                - init_a - t["sqnr_s"], 0.0) * dep["weights"]
    seconds = (load + init + sqnr + other + cap * protocol["calibration"] / rows_used
               + opt * (want_iters / iters) * (want_batch / used_batch))
    cache_grow = max(u["cache_bytes"] for u in units) * (protocol["calibration"] / rows_used - 1)
    from pipeline.quantize import CACHE_BATCH_SIZE
    act_grow = fwd["dit_full"]["bytes_per_sample"] * max(0, min(CACHE_BATCH_SIZE, protocol["calibration"]) - rows_used)
    init_grow = (fwd["layer_input_bytes_per_sample"] * (protocol["act_init"] - used_init)
                 + fwd["dit_full"]["bytes_per_sample"] * max(0, min(CACHE_BATCH_SIZE, protocol["act_init"]) - used_init)
                 ) if step == "3" else 0.0
    n_units = len(before) + len(after) + round(len(blocks) * dep["blocks"])
    why = (f"{n_units} units; caches x{protocol['calibration'] / rows_used:g}, iterations x{want_iters / iters:g}"
           + (f" (batch {used_batch} -> {want_batch})" if used_batch < want_batch else ""))
    return seconds, cache_grow, act_grow, init_grow, why


def project_sampling(args, rec: dict, load: float, per_batch: float | None, dec_s: float, sampling_factor: float,
                     protocol: dict) -> tuple[float, str]:
    """Step 7: the protocol's samples in batches of 16 (guided: 32 rows): load and fixed costs once, the second
    batch's time per batch with its sampling part scaled by steps (and depth) and rows, its decode part (the probe's
    time per image) by images. Without shard times: the whole run scaled by samples."""
    compute = rec["wall_s"] - rec["load_s"]
    n_batches = math.ceil(protocol["eval"] / protocol["batch"])
    rows = protocol["batch"] / args.eval_batch
    if per_batch is None:
        f = protocol["eval"] / (2 * args.eval_batch) * sampling_factor
        return load + compute * f, f"samples x steps x{f:g} (no shard times)"
    fixed = max(compute - 2 * per_batch, 0.0)
    decode = min(dec_s * args.eval_batch, per_batch)
    scaled = (per_batch - decode) * sampling_factor * rows + dec_s * protocol["batch"]
    return (load + fixed + scaled * n_batches,
            f"{n_batches} batches x {scaled:.2f} s (batch {args.eval_batch}: sampling x{sampling_factor * rows:g}, "
            f"decode x{rows:g}) + {fixed:.1f} s fixed")


# ---- the run ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every count checked by the parser (one line, before the model is written)."""
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (every script gets it)")
    ap.add_argument("--workdir", default=None, help="keep the model and artifacts here (default: a temporary folder, "
                                                    "removed at the end)")
    ap.add_argument("--tiny", action="store_true", help="a tiny DiT and VAE at the smallest counts (a smoke run)")
    ap.add_argument("--depth", type=at_least(1), default=None,
                    help="blocks kept (default: all 28 of DiT-XL/2; fewer on a CPU, the rest projected)")
    ap.add_argument("--steps", type=at_least(1), default=5,
                    help="sampling steps of the rehearsal (projected to the protocol's)")
    ap.add_argument("--classes", type=at_least(1), default=2, help="calibration trajectories (one per class 0..K-1)")
    ap.add_argument("--n_calibration", type=at_least(1), default=8, help="calibration inputs kept (protocol: 800)")
    ap.add_argument("--n_holdout", type=at_least(0), default=2, help="held-out inputs for the SQNRs (protocol: 128)")
    ap.add_argument("--iters", type=at_least(1), default=1, help="reconstruction iterations per unit, both phases")
    ap.add_argument("--act_init", type=at_least(1), default=2, help="inputs for the activation ranges (protocol: 32)")
    ap.add_argument("--samples", type=at_least(1), default=2, help="noise-statistics trajectories")
    ap.add_argument("--eval_batch", type=at_least(1), default=None,
                    help="step 7's batch: it makes two, the second one's time projects the protocol's samples "
                         "(default: 16 on CUDA, 1 on a CPU, scaled to 16 rows)")
    ap.add_argument("--protocol", default="ptq4dit-250", choices=sorted(PROTOCOLS), help="the table printed")
    ap.add_argument("--seed", type=at_least(0), default=0, help="the random weights")
    ap.add_argument("--json", default=None, help="also write every record and projection here")
    ap.add_argument("--fresh", action="store_true", help="with --workdir: measure every stage again")
    ap.add_argument("--_forward_probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_load_probe", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe_what", default="dit", help=argparse.SUPPRESS)
    ap.add_argument("--probe_batch", type=at_least(1), default=2, help=argparse.SUPPRESS)
    ap.add_argument("--probe_depth", type=at_least(1), default=1, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._forward_probe:
        return forward_probe_main(Path(args._forward_probe), args.device, args.probe_what, args.probe_batch,
                                  args.probe_depth, args.tiny)
    if args._load_probe:
        return load_probe_main(Path(args._load_probe[0]), Path(args._load_probe[1]), Path(args._load_probe[2]),
                               args.device)
    dit_args, vae_config = model_spec(args.tiny)
    args.full_depth = dit_args["depth"]
    args.depth = args.full_depth if args.depth is None else args.depth
    if args.eval_batch is None:
        args.eval_batch = PROTOCOLS[args.protocol]["batch"] if args.device.startswith("cuda") else 1
    if args.depth > args.full_depth:
        raise SystemExit(f"error: --depth {args.depth}: the model has {args.full_depth} blocks")
    if args.samples > args.classes:
        raise SystemExit("error: --samples must be <= --classes (one sample per calibrated class)")
    if args.n_calibration + args.n_holdout > 2 * args.classes * args.steps:
        raise SystemExit(f"error: --n_calibration + --n_holdout must be <= {2 * args.classes * args.steps} (2 guided "
                         f"branches x --classes x --steps inputs are recorded)")

    started = time.perf_counter()
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="dit_rehearsal_"))
    if args.fresh:
        shutil.rmtree(work / "records", ignore_errors=True)
    (work / "records").mkdir(parents=True, exist_ok=True)
    log_path = work / "rehearsal.log"
    name = "tiny DiT" if args.tiny else "DiT-XL/2 256x256"
    print(f"{name} rehearsal ({args.depth} of {args.full_depth} blocks) in {work} on {args.device}; script output in "
          f"{log_path}")
    try:
        with open(log_path, "a") as log:
            made = prepare(args, work, dit_args, vae_config)
            print(f"DiT checkpoint: {made['dit']['bytes'] / GiB:.2f} GiB ({made['dit']['parameters'] / 1e6:.1f} M "
                  f"parameters), VAE {made['vae']['parameters'] / 1e6:.1f} M parameters")
            counts = {"rehearsal": dit_counts({**dit_args, "depth": args.depth}), "full": dit_counts(dit_args)}
            fwd = forward_probe(args, work, log)
            load_full = full_load_probe(args, work, log, dit_args)
            recs = {n: run_stage(n, script, argv_, work, log) for n, script, argv_ in stages(args, work)}
        report = summarise(args, work, recs, fwd, counts, load_full, made, time.perf_counter() - started)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def prepare(args, work: Path, dit_args: dict, vae_config: dict) -> dict:
    """The rehearsal's checkpoint, VAE folder and config (reused from an earlier run in the same --workdir)."""
    rec = work / "records" / "model.json"
    if not (rec.is_file() and (work / "model.pt").is_file()):
        vae = write_vae(work / "vae", vae_config, args.seed)
        dit = write_checkpoint(work / "model.pt", {**dit_args, "depth": args.depth}, args.seed)
        write_config(work / "ptq-dit.yaml", {**dit_args, "depth": args.depth}, work / "vae")
        rec.write_text(json.dumps({"dit": dit, "vae": vae}))
    return json.loads(rec.read_text())


def full_load_probe(args, work: Path, log, dit_args: dict) -> dict | None:
    """With --depth below the model's: the family's load of the full-depth checkpoint (written, loaded in a fresh
    process, removed), the load time every projected stage counts once."""
    if args.depth == args.full_depth:
        return None
    rec = work / "records" / "load_full.json"
    if not rec.is_file():
        ckpt, config = work / "full" / "model.pt", work / "full" / "ptq-dit.yaml"
        ckpt.parent.mkdir(exist_ok=True)
        made = write_checkpoint(ckpt, dit_args, args.seed)
        write_config(config, dit_args, work / "vae")
        try:
            probe(args, rec, log, "--_load_probe", str(rec), str(config), str(ckpt))
        finally:
            shutil.rmtree(ckpt.parent, ignore_errors=True)
        rec.write_text(json.dumps({**json.loads(rec.read_text()), "checkpoint_bytes": made["bytes"],
                                   "write_s": made["seconds"]}))
    return json.loads(rec.read_text())


def unit_table(work: Path, args) -> list[dict]:
    from pipeline.layout import QuantTag
    lay = layout(work, args)
    table = []
    for phase, tag in (("weight", QuantTag(4)), ("activation", QuantTag(4, 8))):
        units = read_timing(lay.quant(tag))["units"]
        for kind in sorted({u["kind"] for u in units}):
            us = [u for u in units if u["kind"] == kind]
            table.append({"phase": phase, "kind": kind, "units": len(us),
                          "s_per_iter": sum(u["optimise_s"] for u in us) / sum(u["iters"] for u in us),
                          "capture_s_per_row": sum(u["capture_s"] for u in us) / sum(u["rows"] for u in us),
                          "max_cache_bytes": max(u["cache_bytes"] for u in us), "rows": us[0]["rows"]})
    return table


def totals(proj: list[dict]) -> dict:
    gpu = [r["projected_peak_gpu_bytes"] for r in proj if r["projected_peak_gpu_bytes"] is not None]
    return {"calibration_s": sum(r["projected_s"] for r in proj if r["stage"][0] in "123"),
            "sampling_s": sum(r["projected_s"] for r in proj
                              if r["stage"].startswith("7") and "fp32" not in r["stage"]),
            "peak_bytes": max(r["projected_peak_bytes"] for r in proj), "peak_gpu_bytes": max(gpu) if gpu else None}


def summarise(args, work: Path, recs: dict, fwd: dict, counts: dict, load_full: dict | None, made: dict,
              total_s: float) -> dict:
    import torch
    projections = {p: project(args, work, recs, fwd, counts, load_full, PROTOCOLS[p]) for p in PROTOCOLS}
    sums = {p: totals(v) for p, v in projections.items()}
    proj, main_sum = projections[args.protocol], sums[args.protocol]
    units = unit_table(work, args)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    p = PROTOCOLS[args.protocol]
    print(f"\n## {'tiny DiT' if args.tiny else 'DiT-XL/2 256x256'} rehearsal ({machine['processor']}, "
          f"{machine['cpus']} CPUs, torch {machine['torch']}, device {args.device}"
          f"{', ' + machine['gpu'] if machine['gpu'] else ''}); wall {total_s / 60:.1f} min")
    print(f"measured: {args.depth} of {args.full_depth} blocks, {args.steps} DDIM steps, eta {SAMPLING['eta']:g}, "
          f"scale {SAMPLING['scale']:g}; {args.classes} calibration trajectories, {args.n_calibration} + "
          f"{args.n_holdout} calibration inputs, {args.iters} iterations per unit, {args.act_init} range inputs, "
          f"{args.samples} statistics trajectories, step 7 in two batches of {args.eval_batch}")
    print(f"projected to {args.protocol}: {args.full_depth} blocks, {p['steps']} steps, {p['trajectories']} "
          f"calibration trajectories, {p['calibration']} + {p['holdout']} inputs, {p['weight_iters']} / "
          f"{p['act_iters']} iterations at batch {p['weight_batch']} / {p['act_batch']}, {p['act_init']} range "
          f"inputs, {p['stats']} statistics trajectories, {p['eval']} samples in batches of {p['batch']}")
    print_projection(proj)
    fits = lambda b: "fits" if b <= GOALS["memory_gib"] * 1e9 else "DOES NOT fit"  # noqa: E731
    for name, s in sums.items():
        print(f"{name}: steps 1-3 {s['calibration_s'] / 3600:.1f} h, step 7 ({PROTOCOLS[name]['eval']:,} W4A8 D-D² "
              f"samples) {s['sampling_s'] / 3600:.1f} h on {args.device}; largest stage peak "
              f"{s['peak_bytes'] / GiB:.1f} GiB host -> {fits(s['peak_bytes'])} {GOALS['memory_gib']:g} GB"
              + (f", GPU {s['peak_gpu_bytes'] / GiB:.1f} GiB" if s["peak_gpu_bytes"] is not None else ""))
    print(f"\n{'phase':10s} {'unit kind':22s} {'units':>5s} {'s/iter':>8s} {'capture s/row':>13s} "
          f"{'cache MiB (rows)':>17s}")
    for u in units:
        print(f"{u['phase']:10s} {u['kind']:22s} {u['units']:5d} {u['s_per_iter']:8.3f} "
              f"{u['capture_s_per_row']:13.3f} {u['max_cache_bytes'] / 2**20:11.1f} ({u['rows']})")
    print(f"\nforward probe: DiT at {args.depth} blocks {fwd['dit']['seconds_per_sample']:.3f} s per row; at "
          f"{args.full_depth} blocks {fwd['dit_full']['seconds_per_sample']:.3f} s and "
          f"{fwd['dit_full']['bytes_per_sample'] / 2**20:.0f} MiB per row; VAE decode "
          f"{fwd['decode']['seconds_per_sample']:.2f} s and {fwd['decode']['bytes_per_sample'] / 2**20:.0f} MiB per "
          f"image; quantized-layer inputs {fwd['layer_input_bytes_per_sample'] / 2**20:.0f} MiB per row")
    if load_full:
        print(f"full-depth checkpoint: {load_full['checkpoint_bytes'] / GiB:.2f} GiB, family load "
              f"{load_full['seconds']:.1f} s (+{load_full['rss_added_bytes'] / GiB:.2f} GiB resident)")
    return {"machine": machine, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "protocols": PROTOCOLS, "weight_copies": WEIGHT_COPIES, "made": made, "counts": counts,
            "forward_probe": fwd, "load_full": load_full, "stages": recs, "projection": proj,
            "projections": projections, "totals": sums, "units": units, "total_s": total_s,
            "projected_calibration_s": main_sum["calibration_s"], "projected_sampling_s": main_sum["sampling_s"],
            "projected_peak_bytes": main_sum["peak_bytes"], "projected_peak_gpu_bytes": main_sum["peak_gpu_bytes"]}


if __name__ == "__main__":
    sys.exit(main())
