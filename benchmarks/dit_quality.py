"""Quality of the embedded Fashion DiT, measured as the class LDM's (benchmarks/fashion_model_quality.py): the
committed Fashion classifier's agreement with the conditioning class, and FID / sFID of the samples against the test
set next to the held-out real floor, for DiT's DDPM (learned variance) and DDIM samplers.

    python benchmarks/dit_quality.py                       # 1,000 samples, 50 respaced steps, cfg 1.5, DDPM and DDIM
    python benchmarks/dit_quality.py --ldm --json out.json # also the class LDM at the same steps, scale and count

Samples are class-balanced (class i mod 10) in batches whose seeds come from (--seed, batch) exactly as
``quant_scripts/sample_dit.py --num-fid-samples`` makes them (``evaluation.generation.Plan``): with the same
--batch_size both give the same images. Guidance as DiT's sample_ddp.py (scale > 1: [z; z] with [y; null] through
``forward_with_cfg``). FID uses the classifier's 128-d pool features (sFID its spatial ones): compare with the floor,
not with Inception FIDs.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.fashion_model_quality import classifier_view, fid_pair  # noqa: E402
from evaluation.fashion_classifier import compute_features, load_fashion_classifier  # noqa: E402
from evaluation.fashion_reference import DEFAULT_OUT, fashion_uint8  # noqa: E402
from evaluation.generation import Plan  # noqa: E402
from evaluation.images import to_uint8  # noqa: E402
from ldm.data.fashion import HELDOUT, load_fashion_mnist  # noqa: E402
from ldm.dit_sample import load_ldm_first_stage, sample_dit_latents  # noqa: E402
from ldm.fileio import write_json_atomic  # noqa: E402
from ldm.models.diffusion.respace import RespacedSchedule  # noqa: E402
from ldm.models.dit_checkpoint import load_dit_state  # noqa: E402
from ldm.modules.dit import build_dit  # noqa: E402
from ldm.util import ArgumentParser, at_least, load_config, parse_device  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "dit" / "fashion-dit.yaml"
LDM_DIR = REPO / "models" / "ldm" / "fashion-ldm-vq-4"


def dit_samples(model, stage, plan: Plan, schedule: RespacedSchedule, sampler: str, eta: float,
                cfg_scale: float) -> np.ndarray:
    """uint8 [N, 32, 32, 3] of the plan, batch b's noise from a CPU generator seeded with the plan's batch seed."""
    device = next(model.parameters()).device
    out = []
    for b in range(plan.num_batches):
        batch = plan.batch(b)
        z = sample_dit_latents(model, torch.as_tensor(batch.labels, device=device), schedule, method=sampler,
                               eta=eta, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(batch.seed))
        out.append(to_uint8(stage.decode(z).clamp(-1, 1)))
    return np.concatenate(out)


def ldm_samples(plan: Plan, steps: int, scale: float, seed: int, device: torch.device) -> np.ndarray:
    """The class LDM at the same count, steps and guidance scale (its own DDIM at η 0, one seeded generator)."""
    from ldm.models.diffusion.settings import SamplingSettings
    from ldm.sample import decode_latents, sample_latents
    from ldm.util import load_model_from_config
    model = load_model_from_config(load_config(LDM_DIR / "config.yaml"), LDM_DIR / "model.ckpt", device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    z = sample_latents(model, plan.labels.tolist(), settings=SamplingSettings(steps, 0.0, scale),
                       batch_size=plan.batch_size, generator=gen, progress=False)
    return to_uint8(decode_latents(model, z, batch_size=plan.batch_size))


def measure(name: str, images: np.ndarray, labels: np.ndarray, seconds: float, classifier, ref, device) -> dict:
    feats = compute_features(classifier, images, device=device)
    row = {"sample_class_accuracy": float((feats["logits"].argmax(1) == labels).mean()),
           "sampling_seconds": seconds, "classifier": classifier_view(feats["logits"])}
    row["sample_fid"], row["sample_sfid"] = fid_pair(feats, ref)
    print(f"{name}: classifier agrees with the class on {100 * row['sample_class_accuracy']:.2f}%; FID "
          f"{row['sample_fid']:.3f}, sFID {row['sample_sfid']:.3f}; confident share "
          f"{row['classifier']['confident_share']:.3f}; {seconds:.0f} s", flush=True)
    return row


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every count, η and the guidance scale checked by the parser (one line, before the DiT loads)."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(CONFIG), help="the DiT's yaml (model, diffusion, first_stage)")
    p.add_argument("--ckpt", default=None, help="default: the config's checkpoint")
    p.add_argument("--n", type=at_least(10), default=1000, help="samples (a multiple of 10: balanced classes)")
    p.add_argument("--steps", type=at_least(1), default=50, help="respaced steps (DiT's create_diffusion(str(N)))")
    p.add_argument("--samplers", nargs="+", choices=("ddpm", "ddim"), default=["ddpm", "ddim"])
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--batch_size", type=at_least(1), default=250)
    p.add_argument("--ldm", action="store_true", help="also the class LDM (DDIM, same steps and scale)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.n % 10:
        p.error(f"argument --n: must be a multiple of 10 (balanced classes), got {args.n}")
    if not 0 <= args.eta <= 1:   # (NaN too)
        p.error(f"argument --eta: must be in [0, 1] (DDIM η), got {args.eta}")
    if not args.cfg_scale >= 1:
        p.error(f"argument --cfg-scale: must be >= 1 (1 = no guidance), got {args.cfg_scale}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = parse_device(args.device)
    config = load_config(args.config)
    ckpt = Path(args.ckpt) if args.ckpt else REPO / config.checkpoint
    model = load_dit_state(build_dit(OmegaConf.to_container(config.model)), ckpt).to(device)
    stage = load_ldm_first_stage(REPO / config.first_stage.ldm_folder, device)
    classifier = load_fashion_classifier()
    ref = np.load(DEFAULT_OUT)
    training = ckpt.with_name("training.json")
    result = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "device": str(device)},
              "settings": {**vars(args), "ckpt": str(ckpt)},
              "training": json.loads(training.read_text()) if training.is_file() else None}
    train_images, _ = load_fashion_mnist("train")
    held = compute_features(classifier, fashion_uint8(train_images[-HELDOUT:]), device=device)
    result["heldout_real_fid"], result["heldout_real_sfid"] = fid_pair(held, ref)
    print(f"floor: {HELDOUT} held-out real images vs test: FID {result['heldout_real_fid']:.3f}, sFID "
          f"{result['heldout_real_sfid']:.3f}")

    plan = Plan(args.n, args.batch_size, args.seed, model.num_classes)
    schedule = RespacedSchedule.make(str(args.steps), int(config.diffusion.num_timesteps))
    result["samples"] = {}
    for sampler in args.samplers:
        t0 = time.time()
        images = dit_samples(model, stage, plan, schedule, sampler, args.eta, args.cfg_scale)
        name = f"DiT {sampler.upper()} {len(schedule)}{f' eta {args.eta:g}' if sampler == 'ddim' else ''}"
        result["samples"][sampler] = measure(f"{name}, cfg {args.cfg_scale:g}, {args.n} samples", images,
                                             plan.labels, time.time() - t0, classifier, ref, device)
    if args.ldm:
        t0 = time.time()
        images = ldm_samples(plan, args.steps, args.cfg_scale, args.seed, device)
        result["samples"]["ldm_ddim"] = measure(f"class LDM DDIM {args.steps}, scale {args.cfg_scale:g}", images,
                                                plan.labels, time.time() - t0, classifier, ref, device)
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
