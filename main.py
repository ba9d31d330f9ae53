"""Train a model from a CompVis-style config with PyTorch Lightning, resume after an interruption, and export it.

    python main.py --base configs/autoencoder/fashion-vq-f4.yaml             # 1. the VQ-f4 first stage
    python main.py --base configs/latent-diffusion/fashion-ldm-vq-4.yaml     # 2. the class-conditional LDM
    python main.py --base configs/eval/fashion-classifier.yaml               # 3. the evaluation classifier

The config holds ``model`` (target/params, ``base_learning_rate`` used as is, not scaled by batch size), ``data``
(a data module with train/val loaders), ``lightning.trainer`` (Trainer arguments such as ``max_steps``),
``lightning.checkpoint_every_n_steps`` and ``export`` (where the finished model goes). Training state is kept in
``logs/<config name>/checkpoints/last.ckpt``; rerunning the same command resumes from it (``--fresh`` starts over).
At the end the model is exported as a CompVis checkpoint ``{"state_dict", "global_step"}`` (EMA weights folded in)
next to a config that loads it without the training-only entries.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.fileio import save_atomic, write_atomic
from ldm.util import UserFacingError, instantiate_from_config, load_config

REPO = Path(__file__).resolve().parent


def export_model(model: torch.nn.Module, config, out_path: Path, global_step: int) -> None:
    """CompVis-format export: EMA weights (if any) become the weights; the saved config drops training entries."""
    sd = model.state_dict()
    cfg = copy.deepcopy(config.model)
    if getattr(model, "use_ema", False):
        ema = model.model_ema
        prefix = "model." if hasattr(model, "first_stage_model") else ""
        for name, s_name in ema.m_name2s_name.items():
            sd[prefix + name] = getattr(ema, s_name).detach().clone()
        sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
        cfg.params.use_ema = False
    for sub in ("first_stage_config", "cond_stage_config"):  # weights are inside the exported state_dict
        if sub in cfg.params and not isinstance(cfg.params[sub], str):
            cfg.params[sub].params.pop("ckpt_path", None)
    cfg.params.pop("ckpt_path", None)
    save_atomic({"state_dict": {k: v.detach().cpu().contiguous() for k, v in sd.items()},
                 "global_step": int(global_step)}, out_path)
    cfg_path = out_path.with_name("config.yaml")
    write_atomic(cfg_path, lambda tmp: OmegaConf.save(OmegaConf.create({"model": cfg}), tmp))
    print(f"exported {out_path} ({sum(v.numel() for v in sd.values()) / 1e6:.2f} M values) and {cfg_path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="training config (yaml)")
    p.add_argument("--logdir", default="logs", help="training state goes to LOGDIR/<config name>/")
    p.add_argument("--fresh", action="store_true", help="ignore an existing last.ckpt and start over")
    p.add_argument("--max_steps", type=int, default=None, help="override lightning.trainer.max_steps")
    p.add_argument("--data_dir", default=None, help="Fashion-MNIST directory (else FASHION_MNIST_DIR, Debian path)")
    p.add_argument("--download", action="store_true", help="allow downloading Fashion-MNIST")
    p.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    p.add_argument("--export", default=None, help="override export.path")
    p.add_argument("--seed", type=int, default=23)
    args = p.parse_args(argv)

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
    from pytorch_lightning.loggers import CSVLogger

    config = load_config(args.base)
    name = Path(args.base).stem
    logdir = Path(args.logdir) / name
    ckpt_dir = logdir / "checkpoints"
    if args.fresh and logdir.exists():
        shutil.rmtree(logdir)
    last = ckpt_dir / "last.ckpt"
    resume = str(last) if last.exists() else None
    pl.seed_everything(args.seed, workers=True)

    model = instantiate_from_config(config.model)
    model.learning_rate = float(config.model.base_learning_rate)
    data_cfg = copy.deepcopy(config.data)
    if args.data_dir is not None:
        data_cfg.params.root = args.data_dir
    if args.download:
        data_cfg.params.download = True
    data = instantiate_from_config(data_cfg)

    lcfg = config.get("lightning", {})
    trainer_kw = dict(OmegaConf.to_container(lcfg.get("trainer", {}), resolve=True))
    if args.max_steps is not None:
        trainer_kw["max_steps"] = args.max_steps
    every = int(lcfg.get("checkpoint_every_n_steps", 500))
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, default_root_dir=str(logdir), logger=CSVLogger(str(logdir)),
        callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=every, save_last=True, save_top_k=0),
                   TQDMProgressBar(refresh_rate=20)],
        **trainer_kw)
    print(f"training {name}: {trainer_kw.get('max_steps')} steps, checkpoint every {every} steps in {ckpt_dir}"
          + (f", resuming from {resume}" if resume else ""))
    t0 = time.time()
    trainer.fit(model, train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader(),
                ckpt_path=resume, weights_only=True)
    print(f"training {name} took {time.time() - t0:.0f} s this run (global step {trainer.global_step})")
    trainer.save_checkpoint(str(last), weights_only=False)  # full state (optimizer, loops) for resuming
    out = args.export or config.get("export", {}).get("path")
    if out:
        export_model(model.cpu(), config, REPO / out if not Path(out).is_absolute() else Path(out),
                     trainer.global_step)


if __name__ == "__main__":
    try:
        main()
    except UserFacingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
