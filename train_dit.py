"""Train the embedded DiT (Peebles & Xie 2023) on the Fashion-MNIST latents of the embedded LDM's VQ-f4 first stage.

    python train_dit.py                     # configs/dit/fashion-dit.yaml; resumes logs/fashion-dit/last.pt
    python train_dit.py --max_minutes 20    # stop (and export) after 20 minutes

DiT's train.py objective (``create_diffusion(timestep_respacing="")``: 1000 linear-β steps, learned variance, MSE
loss type): Improved DDPM's hybrid loss L_simple + L_vlb (``ldm.models.diffusion.dit_training``), t uniform in
[0, 1000), label dropout to the null class with the model's ``class_dropout_prob`` (train mode), AdamW, an EMA of
the weights started equal to the model. Deviations for a 20-minute CPU run, each in the config: a larger learning
rate with a linear warm-up, EMA decay 0.999, gradient clipping. The data are the first 55,000 training images
(the held-out 5,000 and the test set are never seen), encoded once by the first stage (and their horizontal flips,
DiT's RandomHorizontalFlip), cached in LOGDIR. Each step's batch, timesteps, noise and label dropout come from
generators seeded by (seed, step), so a resumed run reaches the same weights as an uninterrupted one.

The export is DiT's train.py checkpoint layout {"model", "ema", "args"} (no optimizer state: the file is
committed; the resumable state with it stays in LOGDIR), loaded by ``ldm.models.dit_checkpoint.load_dit_state``,
with the config and a training.json record beside it.
"""
from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ldm.data.fashion import FashionMNIST
from ldm.dit_sample import load_ldm_first_stage
from ldm.fileio import save_atomic, write_json_atomic
from ldm.models.diffusion.dit_training import TrainingTables, hybrid_loss, q_sample
from ldm.modules.dit import build_dit
from ldm.util import UserFacingError, load_checkpoint_file, load_config, run_cli

REPO = Path(__file__).resolve().parent


def training_latents(config, cache: Path, data_root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [M, C, h, w], labels [M]) of the 55,000 training images (and their flips with training.flip), from
    the cache when it was made with the same first stage and flip setting."""
    folder = REPO / config.first_stage.ldm_folder
    stage = load_ldm_first_stage(folder)
    flip = bool(config.training.flip)
    key = {"first_stage": str(config.first_stage.ldm_folder), "scale_factor": stage.scale_factor, "flip": flip}
    if cache.is_file():
        cached = load_checkpoint_file(cache)
        if cached.get("key") == key:
            return cached["latents"], cached["labels"]
    data = FashionMNIST("train", data_root)
    images = data.images.permute(0, 3, 1, 2).contiguous()
    views = [images, images.flip(-1)] if flip else [images]
    latents = torch.cat([torch.cat([stage.encode(v[i:i + 500]) for i in range(0, len(v), 500)]) for v in views])
    labels = data.labels.long().repeat(len(views))
    save_atomic({"key": key, "latents": latents, "labels": labels}, cache)
    return latents, labels


def step_batch(latents: torch.Tensor, labels: torch.Tensor, step: int, seed: int, batch: int, num_timesteps: int):
    """The batch of one step, from a generator seeded by (seed, step) alone: resuming changes nothing."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(len(latents), (batch,), generator=g)
    t = torch.randint(num_timesteps, (batch,), generator=g)
    noise = torch.randn(latents[idx].shape, generator=g)
    return latents[idx], labels[idx], t, noise


def export(model, ema: dict, step: int, log: list, config_path: Path, config, out: Path, images: int) -> None:
    tr = config.training
    args = argparse.Namespace(model=config_path.stem, image_size=int(config.image_size),
                              num_classes=int(config.model.params.num_classes), global_batch_size=int(tr.batch_size),
                              global_seed=int(tr.seed), vae=str(config.first_stage.ldm_folder), steps=step,
                              config=str(config_path))
    save_atomic({"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                 "ema": {k: v.clone() for k, v in ema.items()}, "args": args}, out)
    shutil.copyfile(config_path, out.with_name("config.yaml"))
    write_json_atomic(out.with_name("training.json"), {
        "config": str(config_path), "steps": step, "target_steps": int(tr.steps), "batch_size": int(tr.batch_size),
        "seed": int(tr.seed), "ema_decay": float(tr.ema_decay), "lr": float(tr.lr), "warmup": int(tr.warmup),
        "parameters": sum(v.numel() for v in ema.values()), "latents": images,
        "final_loss_mean_last_500": float(np.mean([r[0] for r in log[-500:]])),
        "final_mse_mean_last_500": float(np.mean([r[1] for r in log[-500:]])),
        "final_vb_mean_last_500": float(np.mean([r[2] for r in log[-500:]])),
        "loss_every_100": [float(np.mean([r[0] for r in log[i:i + 100]])) for i in range(0, len(log), 100)],
        "threads": torch.get_num_threads()})


def initial_state(config, state_path: Path, fresh: bool):
    """(model, EMA weights, AdamW, step, loss log): DiT's initialisation under training.seed with the EMA equal to
    the model, or the saved state at ``state_path`` unless ``fresh``."""
    torch.manual_seed(int(config.training.seed))
    model = build_dit(OmegaConf.to_container(config.model))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optim = torch.optim.AdamW(model.parameters(), lr=float(config.training.lr),
                              weight_decay=float(config.training.weight_decay))
    if not state_path.is_file() or fresh:
        return model, ema, optim, 0, []
    state = load_checkpoint_file(state_path)
    model.load_state_dict(state["model"], strict=True)
    optim.load_state_dict(state["optim"])
    print(f"resuming {state_path} at step {int(state['step'])}")
    return model, state["ema"], optim, int(state["step"]), [tuple(r) for r in state["log"]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/dit/fashion-dit.yaml")
    p.add_argument("--logdir", default="logs", help="training state: LOGDIR/<config name>/last.pt")
    p.add_argument("--out", default=None, help="exported checkpoint (default: the config's checkpoint)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing last.pt and start over")
    p.add_argument("--steps", type=int, default=None, help="override training.steps")
    p.add_argument("--max_minutes", type=float, default=None, help="stop after this long (state saved; rerun resumes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--data_root", default=None, help="Fashion-MNIST IDX folder (default: the usual lookup)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    config_path = Path(args.config)
    config = load_config(config_path)
    for section in ("training", "first_stage", "diffusion"):
        if section not in config:
            raise UserFacingError(f"{config_path} has no '{section}' section; pass a DiT training config such as "
                                  f"configs/dit/fashion-dit.yaml")
    tr = config.training
    steps, seed, batch = int(args.steps or tr.steps), int(tr.seed), int(tr.batch_size)
    name = config_path.stem
    state_path = Path(args.logdir) / name / "last.pt"
    out = Path(args.out) if args.out else REPO / config.checkpoint

    model, ema, optim, step, log = initial_state(config, state_path, args.fresh)
    tables = TrainingTables.make(int(config.diffusion.num_timesteps))
    t0 = time.time()
    latents, labels = training_latents(config, Path(args.logdir) / name / "latents.pt", args.data_root)
    print(f"{len(latents)} latents {tuple(latents.shape[1:])} (std {latents.std():.3f}) in {time.time() - t0:.0f} s")
    rate, warmup, lr = float(tr.ema_decay), int(tr.warmup), float(tr.lr)

    def save_state():
        save_atomic({"model": model.state_dict(), "ema": ema, "optim": optim.state_dict(), "step": step,
                     "log": log}, state_path)

    start = time.time()
    model.train()
    while step < steps:
        x0, y, t, noise = step_batch(latents, labels, step, seed, batch, len(tables))
        torch.manual_seed(seed * 1_000_003 + step)  # the label dropout's draw
        for group in optim.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        x_t = q_sample(tables, x0, t, noise)
        terms = hybrid_loss(model(x_t, t, y), tables, x0, x_t, t, noise)
        loss = terms["loss"].mean()
        if not math.isfinite(loss.item()):
            raise UserFacingError(f"the loss became {loss.item()} at step {step}; lower training.lr and rerun with "
                                  f"--fresh")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(tr.grad_clip))
        optim.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(rate).add_(v.detach(), alpha=1 - rate)
        step += 1
        log.append((loss.item(), terms["mse"].mean().item(), terms["vb"].mean().item()))
        if step % 100 == 0:
            recent = np.mean(log[-100:], axis=0)
            print(f"step {step}/{steps}: loss {recent[0]:.4f} (mse {recent[1]:.4f}, vb {recent[2]:.4f}), "
                  f"{(time.time() - start) / 60:.1f} min", flush=True)
        if step % int(tr.snapshot_every) == 0 or step == steps:
            save_state()
        if args.max_minutes is not None and time.time() - start > 60 * args.max_minutes:
            save_state()
            break
    export(model, ema, step, log, config_path, config, out, len(latents))
    print(f"exported {out} (EMA after {step} steps; {'complete' if step >= steps else 'rerun to continue'})")


if __name__ == "__main__":
    run_cli(main)
