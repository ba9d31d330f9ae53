"""FP sampling of a DiT (Peebles & Xie 2023) with the command line of DiT's sample.py / sample_ddp.py: a PNG grid,
or with --num-fid-samples the evaluator's npz.

    python quant_scripts/sample_dit.py                                   # the embedded Fashion DiT, one row per class
    python quant_scripts/sample_dit.py --num-fid-samples 1000 --cfg-scale 1.5 --sampler ddim
    python quant_scripts/sample_dit.py --model DiT-XL/2 --image-size 256 --ckpt DiT-XL-2-256x256.pt \\
        --vae-dir stabilityai/sd-vae-ft-ema --num-sampling-steps 250 --cfg-scale 4

Without --ckpt (and --config) the model is the embedded Fashion DiT (configs/dit/fashion-dit.yaml, decoded by the
embedded LDM's VQ-f4 first stage). --ckpt takes a released file (DiT-XL-2-256x256.pt, -512x512.pt) or a train.py
checkpoint of a named size; --config a DiT yaml with a ``first_stage`` (an LDM export's VQ) or ``vae`` section.
The chain is DiT's ``create_diffusion(str(--num-sampling-steps))``: --sampler ddpm (the default; learned variance)
or ddim (η = --eta). Guidance when --cfg-scale > 1, as sample_ddp.py: the batch [z; z] with labels [y; null]
through ``forward_with_cfg``. The latent noise comes from a CPU generator seeded per batch, so a grid is the same
on any device; on CPU the grid's stream is DiT sample.py's (torch.manual_seed(seed), then randn per step).

--num-fid-samples N writes SAMPLE_DIR/<run name>/samples.npz: ``arr_0`` uint8 [N, H, W, 3] (gray repeated to RGB)
and ``arr_1`` labels, class i mod C for sample i, in batches of --per-proc-batch-size with seeds from (--seed,
batch) (``evaluation.generation``: one shard per batch, resumable, a manifest of the settings). One process; the
original's torchrun ranks are not needed for the batches' numbers.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from evaluation.generation import (Plan, merge_shards, pending_batches, prepare_dir, shard_path,  # noqa: E402
                                   write_shard)
from evaluation.images import make_grid, save_png, to_uint8  # noqa: E402
from ldm.dit_sample import load_ldm_first_stage, sample_dit_latents  # noqa: E402
from ldm.fileio import file_fingerprint  # noqa: E402
from ldm.models.diffusers_vae import load_diffusers_vae  # noqa: E402
from ldm.models.dit_checkpoint import dit_from_checkpoint, load_dit_state  # noqa: E402
from ldm.models.diffusion.respace import RespacedSchedule  # noqa: E402
from ldm.modules.dit import DiT, build_dit  # noqa: E402
from ldm.util import UserFacingError, at_least, load_config, parse_device, run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "dit" / "fashion-dit.yaml"
DIT_EXAMPLE_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]   # DiT sample.py's eight ImageNet classes
PRETRAINED = "pretrained_models"                                 # where DiT's download.py keeps released files


@dataclass
class LoadedDiT:
    """A DiT ready to sample: the model, its latents' decoder to images in [−1, 1], and what they came from."""

    model: DiT
    decode: Callable[[torch.Tensor], torch.Tensor]
    num_timesteps: int
    ckpt: Path
    first_stage: str


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="a named size (DiT-XL/2 ... DiT-S/8) for --ckpt; default: the "
                                                 "embedded Fashion DiT's config")
    p.add_argument("--image-size", type=int, default=None, help="256 or 512 for the released models")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's (1000 released)")
    p.add_argument("--ckpt", default=None, help="a released DiT file or a train.py checkpoint (default: the "
                                                "embedded Fashion DiT)")
    p.add_argument("--config", default=None, help="a DiT yaml (model, diffusion, first_stage or vae sections)")
    p.add_argument("--vae", choices=("ema", "mse"), default="ema", help="sd-vae-ft-{ema,mse} (released DiTs)")
    p.add_argument("--vae-dir", default=None, help="local diffusers folder of the VAE (default: "
                                                   "stabilityai/sd-vae-ft-<--vae> under the working directory)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η")
    p.add_argument("--num-sampling-steps", type=at_least(1), default=None,
                   help="respaced steps (default: the config's timestep_respacing; 250 for a released DiT)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance scale, 1 = none (default 4.0 for a grid as sample.py, 1.5 with --num-fid-samples "
                        "as sample_ddp.py)")
    p.add_argument("--seed", type=int, default=0)
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
    args = p.parse_args(argv)
    if args.eta < 0 or args.eta > 1:
        p.error(f"--eta must be in [0, 1], got {args.eta}")
    if args.eta and args.sampler == "ddpm":
        p.error("--eta applies to --sampler ddim; the DDPM step's variance is the model's")
    if args.cfg_scale is None:
        args.cfg_scale = 1.5 if args.num_fid_samples else 4.0
    if args.cfg_scale < 1:
        p.error(f"--cfg-scale must be >= 1 (1 = no guidance), got {args.cfg_scale}")
    return args


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
    if args.class_labels and max(args.class_labels) >= model.num_classes or min(args.class_labels or [0]) < 0:
        raise UserFacingError(f"--class-labels must be in 0..{model.num_classes - 1} for this model")
    return LoadedDiT(model, decode, timesteps, ckpt, source), steps


@torch.no_grad()
def sample_images(dit: LoadedDiT, labels: np.ndarray, schedule: RespacedSchedule, args: argparse.Namespace,
                  seed: int) -> np.ndarray:
    """uint8 [n, H, W, 3] for ``labels``, the latents' noise from a CPU generator seeded with ``seed``."""
    device = next(dit.model.parameters()).device
    z = sample_dit_latents(dit.model, torch.as_tensor(labels, dtype=torch.long, device=device), schedule,
                           method=args.sampler, eta=args.eta, cfg_scale=args.cfg_scale,
                           generator=torch.Generator().manual_seed(seed))
    return to_uint8(dit.decode(z).clamp(-1, 1))


def run_name(args: argparse.Namespace, dit: LoadedDiT, steps: int) -> str:
    """DiT sample_ddp.py's folder name (model, checkpoint, size, vae, cfg, seed) plus the sampler and steps."""
    model = (args.model or Path(args.config or DEFAULT_CONFIG).stem).replace("/", "-")
    size = dit.model.input_size
    return (f"{model}-{dit.ckpt.stem}-latent-{size}-vae-{args.vae if 'VQ' not in dit.first_stage else 'vq'}-"
            f"{args.sampler}{steps}{f'-eta{args.eta:g}' if args.sampler == 'ddim' else ''}-cfg-{args.cfg_scale:g}-"
            f"seed-{args.seed}")


def fid_samples(args: argparse.Namespace, dit: LoadedDiT, schedule: RespacedSchedule) -> Path:
    """The evaluator's npz of --num-fid-samples class-balanced samples (one shard per batch, then the merge)."""
    plan = Plan(args.num_fid_samples, args.per_proc_batch_size, args.seed, dit.model.num_classes)
    directory = Path(args.sample_dir) / run_name(args, dit, len(schedule))
    prepare_dir(directory, {"ckpt": str(dit.ckpt), "ckpt_fingerprint": file_fingerprint(dit.ckpt),
                            "first_stage": dit.first_stage, "sampler": args.sampler, "eta": args.eta,
                            "steps": len(schedule), "cfg_scale": args.cfg_scale, "seed": args.seed,
                            "n": plan.n, "batch_size": plan.batch_size, "label_rule": "class = index mod classes"},
                force=args.force)
    pending = pending_batches(directory, plan)
    t0 = time.time()
    for done, b in enumerate(pending, 1):
        batch = plan.batch(b)
        write_shard(shard_path(directory, b), sample_images(dit, batch.labels, schedule, args, batch.seed),
                    batch.labels, batch.indices)
        print(f"batch {b + 1}/{plan.num_batches} ({done}/{len(pending)} this run, {time.time() - t0:.0f} s)",
              flush=True)
    return merge_shards(directory, plan)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = parse_device(args.device)
    torch.manual_seed(args.seed)
    dit, default_steps = load(args, device)
    steps = str(args.num_sampling_steps) if args.num_sampling_steps else default_steps
    schedule = RespacedSchedule.make(steps, dit.num_timesteps)
    what = (f"{args.sampler.upper()} {len(schedule)} steps{f' (eta {args.eta:g})' if args.sampler == 'ddim' else ''}"
            f", cfg {args.cfg_scale:g}, seed {args.seed}")
    if args.num_fid_samples:
        out = fid_samples(args, dit, schedule)
        print(f"wrote {out}: {args.num_fid_samples} samples ({what}) from {dit.ckpt}")
        return
    classes = dit.model.num_classes
    labels = args.class_labels or (DIT_EXAMPLE_LABELS if classes == 1000 else list(range(classes)) * 2)
    images = sample_images(dit, np.asarray(labels), schedule, args, args.seed)
    nrow = args.nrow or min(len(labels), 4 if classes == 1000 else classes)
    save_png(make_grid(images, nrow), args.out, text={"ckpt": str(dit.ckpt), "sampling": what,
                                                      "labels": " ".join(map(str, labels))})
    print(f"wrote {args.out}: {len(labels)} samples ({what}) from {dit.ckpt}, decoded by {dit.first_stage}")


if __name__ == "__main__":
    run_cli(main)
