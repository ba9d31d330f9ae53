"""FP or quantized sampling of a DiT (Peebles & Xie 2023) with the command line of DiT's sample.py / sample_ddp.py:
a PNG grid, or with --num-fid-samples the evaluator's npz.

    python quant_scripts/sample_dit.py                                   # the embedded Fashion DiT, one row per class
    python quant_scripts/sample_dit.py --num-fid-samples 1000 --cfg-scale 1.5 --sampler ddim
    python quant_scripts/sample_dit.py --model DiT-XL/2 --image-size 256 --ckpt DiT-XL-2-256x256.pt \\
        --vae-dir stabilityai/sd-vae-ft-ema --num-sampling-steps 250 --cfg-scale 4
    python quant_scripts/sample_dit.py --correction dd2-channel --w_bits 4 --a_bits 8 --num-fid-samples 1000
    python quant_scripts/sample_dit.py --model DiT-XL/2 --image-size 256 --ckpt DiT-XL-2-256x256.pt \\
        --correction dd2-channel --w_bits 4 --a_bits 8 --num-sampling-steps 50 --cfg-scale 1.5 --num-fid-samples 10000

Without --ckpt (and --config) the model is the embedded Fashion DiT (configs/dit/fashion-dit.yaml, decoded by the
embedded LDM's VQ-f4 first stage). --ckpt takes a released file (DiT-XL-2-256x256.pt, -512x512.pt) or a train.py
checkpoint of a named size; --config a DiT yaml with a ``first_stage`` (an LDM export's VQ) or ``vae`` section.
The chain is DiT's ``create_diffusion(str(--num-sampling-steps))``: --sampler ddpm (the default; learned variance)
or ddim (η = --eta). Guidance when --cfg-scale > 1, as sample_ddp.py: the batch [z; z] with labels [y; null]
through ``forward_with_cfg``. The latent noise comes from a CPU generator seeded per batch, so a grid is the same
on any device; on CPU the grid's stream is DiT sample.py's (torch.manual_seed(seed), then randn per step).

--correction (default fp32: the FP model above) names a quantized sampler of the pipeline (``pipeline.sampler_spec``:
none, ptqd, dd2-channel, sd2-channel, qncd, qncd+dd2-channel, ...). The quantized DiT (--w_bits, --a_bits; --packed,
--execution) and its fit are the artifacts steps 1-5 wrote under --outdir for the pipeline's model: the embedded
DiT's preset ``fashion-dit`` (configs/dit/ptq-fashion-dit.yaml), DiT-XL/2's configs/dit/ptq-DiT-XL-2-<size>.yaml, or
a pipeline --config (model.target ldm.models.dit_diffusion.DiTDiffusion) with its --ckpt. It samples as the
pipeline does (``pipeline.generate``): DDIM over DiT's respaced steps (--num-sampling-steps S, η = --eta, scale
--cfg-scale; unset ones take the preset's), guidance by ``cfg_eps`` on every ε channel (DiT's forward_with_cfg
guides channels 0-2; docs/DIT.md), x_T and the DDIM noise from the seed on the model's device, so the artifacts'
steps, η and scale are checked against the chain that runs. --sampler ddpm is refused there: the fits are of DDIM
chains. A paired comparison with FP under the same loop is step 7's fp32 sampler
(quant_scripts/generate_evaluation_samples_dist.py --preset fashion-dit).

--num-fid-samples N writes SAMPLE_DIR/<run name>/samples.npz: ``arr_0`` uint8 [N, H, W, 3] (gray repeated to RGB)
and ``arr_1`` labels, class i mod C for sample i, in batches of --per-proc-batch-size with seeds from (--seed,
batch) (``evaluation.generation``: one shard per batch, resumable, a manifest of the settings; a quantized run's
name ends in -<correction>-w{b}a{b}). One process; the original's torchrun ranks are not needed for the batches'
numbers.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from correction.qncd import probe_steps
from evaluation.generation import (Batch, Plan, merge_shards, pending_batches, prepare_dir, shard_path,
                                   write_shard)
from evaluation.images import make_grid, save_png, to_uint8
from ldm.dit_sample import load_ldm_first_stage, sample_dit_latents
from ldm.fileio import check_output_file, file_fingerprint
from ldm.models.diffusers_vae import load_diffusers_vae
from ldm.models.dit_checkpoint import dit_from_checkpoint, load_dit_state
from ldm.models.diffusion.respace import RespacedSchedule
from ldm.modules.dit import DiT, build_dit
from ldm.precision import Precision
from ldm.util import ArgumentParser, UserFacingError, at_least, load_config, parse_device, run_cli
from pipeline.artifacts import ArtifactMismatch
from pipeline.basics import resolve
from pipeline.cli import add_bits_args, add_execution_args, check_bits, flag_names, quant_tag
from pipeline.families.base import config_target
from pipeline.families.dit import DIT_TARGET, first_stage_source
from pipeline.generate import sample_batch
from pipeline.layout import QuantTag
from pipeline.packed import Execution
from pipeline.run import ModelSource, Preset, Run, SamplerChoice
from pipeline.sampler_spec import LISTED, SamplerSpec
from pipeline.sampling import Variant, build_variant, check_present
from pipeline.settings import SamplingSettings
from pipeline.steps.sample_grid import GridSettings, sample_variant

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "dit" / "fashion-dit.yaml"
DIT_EXAMPLE_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]   # DiT sample.py's eight ImageNet classes
PRETRAINED = "pretrained_models"                                 # where DiT's download.py keeps released files
EMBEDDED_PRESET = "fashion-dit"                                  # the embedded DiT's pipeline preset
PTQ_CONFIG = "configs/dit/ptq-DiT-XL-2-{size}.yaml"              # the released DiT-XL/2's pipeline configs
W_BITS, A_BITS = 4, 8
# the pipeline's flag names in its messages -> this script's
RENAMED = {"--sampler": "--correction", "--steps": "--num-sampling-steps", "--scale": "--cfg-scale"}


@dataclass
class LoadedDiT:
    """A DiT ready to sample: the model, its latents' decoder to images in [−1, 1], and what they came from."""

    model: DiT
    decode: Callable[[torch.Tensor], torch.Tensor]
    num_timesteps: int
    ckpt: Path
    first_stage: str


@dataclass(frozen=True)
class Quantized:
    """A quantized --correction's typed run: the pipeline ``Run`` (model, DDIM settings, --outdir), the sampler
    (spec, --execution, --packed) and the quantized model's bits."""

    run: Run
    sampler: SamplerChoice
    tag: QuantTag

    @property
    def suffix(self) -> str:
        """What the run name adds: -<correction>-w{b}a{b}[-packed][-int]."""
        return f"-{self.sampler.name}-{self.tag}{self.sampler.suffix}"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a named size (DiT-XL/2 ... DiT-S/8) for --ckpt; default: the "
                                                 "embedded Fashion DiT's config")
    p.add_argument("--image-size", type=int, default=None, help="256 or 512 for the released models")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's (1000 released)")
    p.add_argument("--ckpt", default=None, help="a released DiT file or a train.py checkpoint (default: the "
                                                "embedded Fashion DiT)")
    p.add_argument("--config", default=None, help="a DiT yaml (model, diffusion, first_stage or vae sections; with a "
                                                  "quantized --correction: the pipeline config steps 1-5 ran on)")
    p.add_argument("--vae", choices=("ema", "mse"), default=None, help="sd-vae-ft-{ema,mse} (released DiTs; "
                                                                       "default ema)")
    p.add_argument("--vae-dir", default=None, help="local diffusers folder of the VAE (default: "
                                                   "stabilityai/sd-vae-ft-<--vae> under the working directory)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=None,
                   help="the loop (default: ddpm, DiT's, for the FP model; ddim with a quantized --correction)")
    p.add_argument("--eta", type=float, default=None, help="DDIM η (default 0, or the preset's)")
    p.add_argument("--num-sampling-steps", type=at_least(1), default=None,
                   help="respaced steps (default: the config's timestep_respacing; 250 for a released DiT; the "
                        "preset's with a quantized --correction of the embedded DiT)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance scale, 1 = none (default 4.0 for a grid as sample.py, 1.5 with --num-fid-samples "
                        "as sample_ddp.py; the preset's with a quantized --correction of the embedded DiT)")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="grid labels (default: sample.py's eight for 1000 classes, else each class twice)")
    p.add_argument("--nrow", type=at_least(1), default=None,
                   help="grid columns (default: 4 for 1000 classes, else the class count; at most the label count)")
    p.add_argument("--out", default="sample.png", help="the grid PNG")
    p.add_argument("--num-fid-samples", type=at_least(1), default=None,
                   help="write the evaluator's npz of this many samples instead of a grid")
    p.add_argument("--per-proc-batch-size", type=at_least(1), default=32)
    p.add_argument("--sample-dir", default="samples", help="--num-fid-samples: SAMPLE_DIR/<run name>/samples.npz")
    p.add_argument("--force", action="store_true", help="discard shards made with other settings")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--correction", default="fp32",
                   help=f"fp32 (the FP model) or a quantized sampler of the pipeline: {', '.join(LISTED)}, or "
                        f"qncd[-rR]+<base>")
    add_bits_args(p, W_BITS, A_BITS)
    add_execution_args(p)
    p.add_argument("--outdir", default="outputs", help="the pipeline's output root, where steps 1-5 wrote the "
                                                       "quantized model and its fits")
    args = p.parse_args(argv)
    if args.eta is not None and not 0 <= args.eta <= 1:
        p.error(f"--eta must be in [0, 1], got {args.eta}")
    if args.cfg_scale is not None and args.cfg_scale < 1:
        p.error(f"--cfg-scale must be >= 1 (1 = no guidance), got {args.cfg_scale}")
    return args


def fp_defaults(args: argparse.Namespace) -> None:
    """The FP model's defaults (DiT's): DDPM, η 0, cfg 4.0 for a grid and 1.5 for the npz, the ema VAE."""
    args.sampler = args.sampler or "ddpm"
    if args.eta and args.sampler == "ddpm":
        raise UserFacingError("--eta applies to --sampler ddim; the DDPM step's variance is the model's")
    args.eta = args.eta or 0.0
    if args.cfg_scale is None:
        args.cfg_scale = 1.5 if args.num_fid_samples else 4.0
    args.vae = args.vae or "ema"


def released_ckpt(args: argparse.Namespace) -> Path:
    """DiT sample.py's default checkpoint for --model DiT-XL/2 --image-size N (it downloads; we only look)."""
    if args.model != "DiT-XL/2" or args.image_size not in (256, 512):
        raise UserFacingError(f"no released checkpoint for {args.model} at {args.image_size}; pass --ckpt (only "
                              f"DiT-XL/2 at 256 or 512 is released)")
    return Path(PRETRAINED) / f"DiT-XL-2-{args.image_size}x{args.image_size}.pt"


def load(args: argparse.Namespace, device: torch.device) -> tuple[LoadedDiT, str]:
    """(the model and its decoder, the default respacing) from --config/--ckpt/--model."""
    config = None
    if args.config or (args.ckpt is None and args.model is None):
        config = load_config(args.config or DEFAULT_CONFIG)
    if config is not None:
        model = build_dit(OmegaConf.to_container(config.model))
        ckpt = Path(args.ckpt) if args.ckpt else REPO / config.checkpoint if "checkpoint" in config else None
        if ckpt is None:
            raise UserFacingError(f"{args.config} names no checkpoint; pass --ckpt")
        load_dit_state(model, ckpt)
        diffusion = config.get("diffusion", {})
        steps, timesteps = str(diffusion.get("timestep_respacing", "250")), int(diffusion.get("num_timesteps", 1000))
    else:
        ckpt = Path(args.ckpt) if args.ckpt else released_ckpt(args)
        model = dit_from_checkpoint(ckpt, args.model, args.image_size, args.num_classes)
        steps, timesteps = "250", 1000
    model = model.to(device).eval()
    if config is not None and "first_stage" in config:
        stage = load_ldm_first_stage(REPO / config.first_stage.ldm_folder, device)
        decode, source = stage.decode, f"VQ first stage of {config.first_stage.ldm_folder}"
    else:
        vae = load_diffusers_vae(args.vae_dir or f"stabilityai/sd-vae-ft-{args.vae}", device)
        decode, source = vae.decode, f"{vae.folder} (scale {vae.scale_factor:g})"
    check_labels(args, model.num_classes)
    return LoadedDiT(model, decode, timesteps, ckpt, source), steps


def check_labels(args: argparse.Namespace, num_classes: int) -> None:
    if args.class_labels and (max(args.class_labels) >= num_classes or min(args.class_labels) < 0):
        raise UserFacingError(f"--class-labels must be in 0..{num_classes - 1} for this model")


def grid_labels(args: argparse.Namespace, num_classes: int) -> tuple[list[int], int]:
    """(the grid's labels, its row length)."""
    labels = args.class_labels or (DIT_EXAMPLE_LABELS if num_classes == 1000 else list(range(num_classes)) * 2)
    return labels, args.nrow or min(len(labels), 4 if num_classes == 1000 else num_classes)


@torch.no_grad()
def sample_images(dit: LoadedDiT, labels: np.ndarray, schedule: RespacedSchedule, args: argparse.Namespace,
                  seed: int) -> np.ndarray:
    """uint8 [n, H, W, 3] for ``labels``, the latents' noise from a CPU generator seeded with ``seed``."""
    device = next(dit.model.parameters()).device
    z = sample_dit_latents(dit.model, torch.as_tensor(labels, dtype=torch.long, device=device), schedule,
                           method=args.sampler, eta=args.eta, cfg_scale=args.cfg_scale,
                           generator=torch.Generator().manual_seed(seed))
    return to_uint8(dit.decode(z).clamp(-1, 1))


def run_name(args: argparse.Namespace, model: str, ckpt: Path, size: int, vae: str, steps: int,
             suffix: str = "") -> str:
    """DiT sample_ddp.py's folder name (model, checkpoint, size, vae, cfg, seed) plus the sampler and steps (and a
    quantized run's correction and bits)."""
    return (f"{model.replace('/', '-')}-{ckpt.stem}-latent-{size}-vae-{vae}-"
            f"{args.sampler}{steps}{f'-eta{args.eta:g}' if args.sampler == 'ddim' else ''}-cfg-{args.cfg_scale:g}-"
            f"seed-{args.seed}{suffix}")


def fid_samples(args: argparse.Namespace, directory: Path, settings: dict, num_classes: int,
                make: Callable[[Batch], np.ndarray]) -> Path:
    """The evaluator's npz of --num-fid-samples class-balanced samples in ``directory`` (one shard per batch made by
    ``make``, then the merge); ``settings`` is the folder's manifest."""
    plan = Plan(args.num_fid_samples, args.per_proc_batch_size, args.seed, num_classes)
    prepare_dir(directory, {**settings, "seed": args.seed, "n": plan.n, "batch_size": plan.batch_size,
                            "label_rule": "class = index mod classes"}, force=args.force)
    pending = pending_batches(directory, plan)
    t0 = time.time()
    for done, b in enumerate(pending, 1):
        batch = plan.batch(b)
        write_shard(shard_path(directory, b), make(batch), batch.labels, batch.indices)
        print(f"batch {b + 1}/{plan.num_batches} ({done}/{len(pending)} this run, {time.time() - t0:.0f} s)",
              flush=True)
    return merge_shards(directory, plan)


def sample_fp(args: argparse.Namespace) -> None:
    """The FP model through DiT's own loop (DDPM or DDIM, forward_with_cfg): a grid or the npz."""
    fp_defaults(args)
    if not args.num_fid_samples:
        check_output_file(args.out, (args.ckpt, args.config), flag="--out")
    device = parse_device(args.device)
    torch.manual_seed(args.seed)
    dit, default_steps = load(args, device)
    if not args.num_fid_samples:   # (the default checkpoint too, known once loaded; nothing is written yet)
        check_output_file(args.out, (dit.ckpt,), flag="--out")
    steps = str(args.num_sampling_steps) if args.num_sampling_steps else default_steps
    schedule = RespacedSchedule.make(steps, dit.num_timesteps)
    what = (f"{args.sampler.upper()} {len(schedule)} steps{f' (eta {args.eta:g})' if args.sampler == 'ddim' else ''}"
            f", cfg {args.cfg_scale:g}, seed {args.seed}")
    if args.num_fid_samples:
        model = args.model or Path(args.config or DEFAULT_CONFIG).stem
        vae = args.vae if "VQ" not in dit.first_stage else "vq"
        directory = Path(args.sample_dir) / run_name(args, model, dit.ckpt, dit.model.input_size, vae, len(schedule))
        settings = {"ckpt": str(dit.ckpt), "ckpt_fingerprint": file_fingerprint(dit.ckpt),
                    "first_stage": dit.first_stage, "sampler": args.sampler, "eta": args.eta,
                    "steps": len(schedule), "cfg_scale": args.cfg_scale}
        out = fid_samples(args, directory, settings, dit.model.num_classes,
                          lambda batch: sample_images(dit, batch.labels, schedule, args, batch.seed))
        print(f"wrote {out}: {args.num_fid_samples} samples ({what}) from {dit.ckpt}")
        return
    labels, nrow = grid_labels(args, dit.model.num_classes)
    images = sample_images(dit, np.asarray(labels), schedule, args, args.seed)
    save_png(make_grid(images, nrow), args.out, text={"ckpt": str(dit.ckpt), "sampling": what,
                                                      "labels": " ".join(map(str, labels))})
    print(f"wrote {args.out}: {len(labels)} samples ({what}) from {dit.ckpt}, decoded by {dit.first_stage}")


# ---- a quantized --correction: the pipeline's model, artifacts and loop ---------------------------------------------

def pipeline_source(args: argparse.Namespace) -> tuple[ModelSource, dict[str, Any]]:
    """The model steps 1-5 ran on (the embedded DiT's preset, DiT-XL/2's pipeline config, or a pipeline --config
    with its --ckpt) and the preset's sampling defaults ({} for a custom model)."""
    if args.config is None and args.ckpt is None and args.model is None:
        preset = Preset.load(EMBEDDED_PRESET)
        return preset.source(), preset.values
    if args.config is None:
        if args.model != "DiT-XL/2" or args.image_size not in (256, 512):
            raise UserFacingError("a quantized --correction samples the model steps 1-5 ran on: pass its pipeline "
                                  "--config (configs/dit/ptq-*.yaml) and --ckpt, or --model DiT-XL/2 --image-size "
                                  "256|512")
        config = PTQ_CONFIG.format(size=args.image_size)
    else:
        config = args.config
        target = config_target(load_config(resolve(config)))
        if target != DIT_TARGET:
            raise UserFacingError(f"--config {config} is not a pipeline DiT config (model.target {target}); a "
                                  f"quantized --correction needs the one steps 1-5 ran on (model.target "
                                  f"{DIT_TARGET}, e.g. configs/dit/ptq-fashion-dit.yaml)")
        if args.ckpt is None:
            raise UserFacingError(f"--config {config} with a quantized --correction needs --ckpt (the checkpoint "
                                  f"steps 1-5 ran on)")
    return ModelSource(str(config), str(args.ckpt or released_ckpt(args))), {}


def quantized_of(args: argparse.Namespace, spec: SamplerSpec) -> Quantized:
    """The typed run of a quantized --correction, every flag checked; nothing loaded or written. Fills the
    pipeline's defaults into args (DDIM; steps, η and scale from the preset where unset)."""
    if args.sampler == "ddpm":
        raise UserFacingError(f"--sampler ddpm with --correction {spec}: the pipeline's quantized DiT and its fits "
                              f"are calibrated and fitted on DDIM chains (their meta: steps, eta, scale of DDIM), "
                              f"not on DiT's learned-variance DDPM loop; pass --sampler ddim (the default with a "
                              f"quantized --correction), or --correction fp32 for DDPM")
    given = [f for f, v in (("--vae", args.vae), ("--vae-dir", args.vae_dir), ("--num-classes", args.num_classes))
             if v is not None]
    if given:
        raise UserFacingError(f"{given[0]} does nothing with a quantized --correction: the pipeline config names the "
                              f"first stage and the classes (its model.params); drop {given[0]}")
    source, preset = pipeline_source(args)
    args.sampler = "ddim"
    args.num_sampling_steps = args.num_sampling_steps or preset.get("steps", 250)
    args.eta = args.eta if args.eta is not None else preset.get("eta", 0.0)
    if args.cfg_scale is None:
        args.cfg_scale = preset.get("scale", 1.5 if args.num_fid_samples else 4.0)
    with flag_names(RENAMED):
        sampling = SamplingSettings(args.num_sampling_steps, args.eta, args.cfg_scale)
        run = Run(source, sampling, Path(args.outdir), args.device, args.force).check()
        check_bits(args)
        sampler = SamplerChoice(spec, Execution(args.execution), args.packed).check()
    if spec.probe is not None and not probe_steps(sampling.steps, spec.probe):
        raise UserFacingError(f"--correction {spec}: QNCD's probe every {spec.probe} steps never runs in "
                              f"{sampling.steps} steps; pick a shorter period (qncd-rN) or more steps")
    return Quantized(run, sampler, quant_tag(args))


def check_artifacts(q: Quantized) -> None:
    """One line naming the first missing artifact, the step that makes it and the pipeline flags of this run."""
    try:
        with flag_names(RENAMED):
            check_present([q.sampler.spec], q.run.layout, q.tag, packed=q.sampler.packed is not None)
    except ArtifactMismatch as e:
        model = (f"--preset {q.run.preset}" if q.run.preset != "custom" else
                 f"--config {q.run.model.config} --ckpt {q.run.model.ckpt}")
        raise UserFacingError(f"{e} (steps 1-5 of this run: {model} {q.run.sampling.flags()} --outdir "
                              f"{q.run.outdir})") from None


def load_variant(q: Quantized) -> tuple[Any, Any, Variant]:
    """(family, model, variant): the FP model (without the DiT's weights with --packed) and the quantized DiT and
    fit, every meta checked against the run."""
    device = q.run.torch_device()
    with flag_names(RENAMED):
        family, model = q.run.load(device, without_unet=q.sampler.packed is not None)
        variant = build_variant(q.sampler.spec, family, model, q.run.layout, q.tag, q.run.meta(), q.sampler.packed,
                                q.sampler.execution)
        variant.check_sampling(q.run.sampling)
    return family, model, variant


def sample_quantized(args: argparse.Namespace, spec: SamplerSpec) -> None:
    """A quantized --correction through the pipeline's loop (``pipeline.generate``): a grid or the npz."""
    q = quantized_of(args, spec)
    run, settings = q.run, q.run.sampling
    num_classes = run.family.num_classes(run.model.config_yaml)
    check_labels(args, num_classes)
    if args.num_fid_samples:
        Plan(args.num_fid_samples, args.per_proc_batch_size, args.seed, num_classes)   # (its one-line checks)
    else:
        check_output_file(args.out, (run.model.ckpt, run.model.config, args.packed), flag="--out")
    check_artifacts(q)
    family, model, variant = load_variant(q)
    what = (f"DDIM {settings.steps} steps (eta {settings.eta:g}), cfg {settings.scale:g}, seed {args.seed}, "
            f"{q.sampler.name} {str(q.tag).upper()}")
    if args.num_fid_samples:
        kind, folder = first_stage_source(run.model.config_yaml.model.params)
        vae = "vq" if kind == "ldm" else Path(folder).name.removeprefix("sd-vae-ft-")
        name = args.model or (run.preset if run.preset != "custom" else Path(run.model.config).stem)
        directory = Path(args.sample_dir) / run_name(args, name, Path(run.model.ckpt), model.dit.input_size, vae,
                                                     settings.steps, q.suffix)
        manifest = {**run.meta(), "first_stage": f"{kind} {folder}", "sampler": "ddim", "cfg_scale": settings.scale,
                    "correction": q.sampler.name, "bits": str(q.tag), "artifacts": variant.fingerprints(),
                    "execution": q.sampler.execution.value, "guidance": "cfg_eps on every eps channel"}
        with family.ema_scope(model):
            out = fid_samples(args, directory, manifest, num_classes, lambda batch: sample_batch(
                family, model, batch, settings, model_fn=variant.model_fn, correction_for=variant.correction_for))
        print(f"wrote {out}: {args.num_fid_samples} samples ({what}) from {run.model.ckpt}")
        return
    labels, nrow = grid_labels(args, num_classes)
    grid = GridSettings(seed=args.seed, batch_size=len(labels), progress=False)
    images = to_uint8(sample_variant(run, family, model, variant, labels, grid, Precision.FP32,
                                     model.betas.device))
    artifacts = " ".join(f"{k}={v}" for k, v in variant.fingerprints().items())
    save_png(make_grid(images, nrow), args.out, text={"ckpt": run.model.ckpt, "sampling": what,
                                                      "labels": " ".join(map(str, labels)), "artifacts": artifacts})
    print(f"wrote {args.out}: {len(labels)} samples ({what}) from {run.model.ckpt}")


def main(argv=None) -> None:
    args = parse_args(argv)
    spec = SamplerSpec.parse(args.correction)
    if spec.quantized:
        sample_quantized(args, spec)
        return
    if args.packed is not None or args.execution != Execution.FAKE.value:   # they would do nothing: refused
        flag = "--packed" if args.packed is not None else f"--execution {args.execution}"
        raise UserFacingError(f"{flag} applies to a quantized model, and --correction fp32 samples the FP DiT; pick "
                              f"a quantized --correction (e.g. dd2-channel) or drop {flag}")
    sample_fp(args)


if __name__ == "__main__":
    run_cli(main)
