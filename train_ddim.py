"""Train the pixel-space DDPM UNet (ermongroup/ddim ``Model``) on Fashion-MNIST 32×32: the embedded pixel default.

    python train_ddim.py --config configs/fashion-ddim.yml            # resumes from logs/fashion-ddim/last.pt
    python train_ddim.py --config configs/fashion-ddim.yml --max_minutes 60   # stop (and export) after an hour

The objective is Ho et al. (2020), Algorithm 1 / Eq. (14) as ermongroup's ``noise_estimation_loss`` writes it:
x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε with t drawn antithetically (t and T − 1 − t in one batch), loss = Σ_pixels (ε −
ε_θ(x_t, t))², averaged over the batch; Adam with gradient clipping and an exponential moving average of the weights
(``model.ema_rate``), a linear learning-rate warm-up (``optim.warmup`` steps). Each step's batch, timesteps, noise,
flips and dropout come from a generator seeded by (``training.seed``, step), so an interrupted run resumes to the
same weights as an uninterrupted one. The result is the EMA state_dict saved plainly, the released CIFAR-10
checkpoint's format (``--out``, default ``models/ddim/<config name>/model.ckpt``) with the config beside it.
"""
from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from ldm.data.fashion import FashionMNIST
from ldm.fileio import save_atomic, write_json_atomic
from ldm.models.diffusion.generalized import get_beta_schedule
from ldm.modules.diffusionmodules.ddim_unet import Model
from ldm.util import UserFacingError, load_checkpoint_file, run_cli

REPO = Path(__file__).resolve().parent


def load_yml(path: Path) -> dict:
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserFacingError(f"cannot read the config {path}: {' '.join(str(e).split())}") from None
    for section in ("data", "model", "diffusion", "training", "optim"):
        if not isinstance(cfg, dict) or section not in cfg:
            raise UserFacingError(f"{path} has no '{section}' section; pass a DDIM config such as "
                                  f"configs/fashion-ddim.yml")
    if cfg["data"].get("dataset") != "FashionMNIST":
        raise UserFacingError(f"{path}: data.dataset {cfg['data'].get('dataset')!r} cannot be trained here (only "
                              f"FashionMNIST is available offline); CIFAR-10 users load the released checkpoint")
    return cfg


def training_images(cfg: dict, root: str | None) -> torch.Tensor:
    """[N, C, 32, 32] float in [-1, 1]: the first 55,000 Fashion-MNIST training images (the held-out 5,000 and
    the test set are never seen), the grayscale channel repeated to ``data.channels``."""
    images = FashionMNIST("train", root).images.permute(0, 3, 1, 2).contiguous()
    return images.expand(-1, int(cfg["data"]["channels"]), -1, -1).contiguous()


def step_batch(images: torch.Tensor, step: int, seed: int, batch: int, num_timesteps: int, flip: bool):
    """The batch of one step, from a generator seeded by (seed, step) alone: resuming changes nothing."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x0 = images[torch.randint(len(images), (batch,), generator=g)]
    if flip:
        flips = torch.rand(batch, generator=g) < 0.5
        x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
    t = torch.randint(num_timesteps, (batch // 2 + 1,), generator=g)
    t = torch.cat([t, num_timesteps - t - 1])[:batch]  # antithetic, as ermongroup's Diffusion.train
    noise = torch.randn(x0.shape, generator=g)
    return x0, t, noise


def loss_fn(model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
            alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.index_select(0, t).view(-1, 1, 1, 1)
    x = x0 * a.sqrt() + noise * (1.0 - a).sqrt()
    return (noise - model(x, t.float())).square().sum(dim=(1, 2, 3)).mean(dim=0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/fashion-ddim.yml")
    p.add_argument("--logdir", default="logs", help="training state: LOGDIR/<config name>/last.pt")
    p.add_argument("--out", default=None,
                   help="exported EMA state_dict (default models/ddim/<config name>/model.ckpt)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing last.pt and start over")
    p.add_argument("--n_iters", type=int, default=None, help="override training.n_iters")
    p.add_argument("--max_minutes", type=float, default=None, help="stop after this long (state saved; rerun resumes)")
    p.add_argument("--data_root", default=None, help="Fashion-MNIST IDX folder (default: the usual lookup)")
    args = p.parse_args(argv)

    cfg_path = Path(args.config)
    cfg = load_yml(cfg_path)
    name = cfg_path.stem
    tr, opt_cfg = cfg["training"], cfg["optim"]
    n_iters = int(args.n_iters or tr["n_iters"])
    seed, batch = int(tr.get("seed", 0)), int(tr["batch_size"])
    state_path = Path(args.logdir) / name / "last.pt"
    out = Path(args.out) if args.out else REPO / "models" / "ddim" / name / "model.ckpt"

    torch.manual_seed(seed)
    model = Model(cfg)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optim = torch.optim.Adam(model.parameters(), lr=float(opt_cfg["lr"]), betas=(float(opt_cfg["beta1"]), 0.999),
                             eps=float(opt_cfg["eps"]), weight_decay=float(opt_cfg["weight_decay"]),
                             amsgrad=bool(opt_cfg["amsgrad"]))
    step, log = 0, []
    if state_path.is_file() and not args.fresh:
        state = load_checkpoint_file(state_path, accept=(dict,))
        model.load_state_dict(state["model"])
        ema = state["ema"]
        optim.load_state_dict(state["optim"])
        step, log = int(state["step"]), list(state["log"])
        print(f"resuming {state_path} at step {step}")

    diff = cfg["diffusion"]
    betas = torch.from_numpy(get_beta_schedule(diff["beta_schedule"], diff["beta_start"], diff["beta_end"],
                                               diff["num_diffusion_timesteps"])).float()
    alphas_cumprod = (1 - betas).cumprod(dim=0)
    images = training_images(cfg, args.data_root)
    rate, warmup, lr = float(cfg["model"]["ema_rate"]), int(opt_cfg.get("warmup", 0)), float(opt_cfg["lr"])

    def save_state():
        save_atomic({"model": model.state_dict(), "ema": ema, "optim": optim.state_dict(), "step": step,
                     "log": log, "config": name}, state_path)

    start = time.time()
    model.train()
    bar = tqdm(total=n_iters, initial=step, desc=f"train {name}", dynamic_ncols=True)
    while step < n_iters:
        x0, t, noise = step_batch(images, step, seed, batch, len(betas), bool(cfg["data"].get("random_flip")))
        torch.manual_seed(seed * 1_000_003 + step)  # dropout
        for group in optim.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        loss = loss_fn(model, x0, t, noise, alphas_cumprod)
        if not math.isfinite(loss.item()):
            raise UserFacingError(f"the loss became {loss.item()} at step {step}; lower optim.lr and rerun with "
                                  f"--fresh")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(opt_cfg["grad_clip"]))
        optim.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(rate).add_(v.detach(), alpha=1 - rate) if v.is_floating_point() else ema[k].copy_(v)
        step += 1
        log.append(float(loss.item()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(log[-100:]):.2f}")
        if step % int(tr["snapshot_freq"]) == 0 or step == n_iters:
            save_state()
        if args.max_minutes is not None and time.time() - start > 60 * args.max_minutes:
            save_state()
            break
    bar.close()

    save_atomic({k: v.detach().cpu().contiguous() for k, v in ema.items()}, out)
    shutil.copyfile(cfg_path, out.with_name("config.yml"))
    write_json_atomic(out.with_name("training.json"), {
        "config": str(cfg_path), "steps": step, "n_iters": n_iters, "batch_size": batch, "seed": seed,
        "ema_rate": rate, "lr": lr, "warmup": warmup, "final_loss_mean_last_500": float(np.mean(log[-500:])),
        "parameters": sum(v.numel() for v in ema.values()), "images": len(images),
        "loss_every_50": [float(np.mean(log[i:i + 50])) for i in range(0, len(log), 50)]})
    print(f"exported {out} (EMA after {step} steps; {'complete' if step >= n_iters else 'rerun to continue'})")


if __name__ == "__main__":
    run_cli(main)
