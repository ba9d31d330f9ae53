"""Quality of the embedded defaults, measured: classifier accuracy, conditional accuracy and FID of FP32 samples.

    python benchmarks/fashion_model_quality.py                      # 5,000 samples (accuracy on all of them)
    python benchmarks/fashion_model_quality.py --n 1000 --json out.json
    python benchmarks/fashion_model_quality.py --model pixel        # the pixel DDPM (unconditional, 20 quad steps)
    python benchmarks/fashion_model_quality.py --model text --n 500 # the text default: prompt-class agreement

``--model pixel`` measures the unconditional pixel default (models/ddim/fashion-ddim) instead. With no conditioning
class to agree with, its independent check is what the classifier makes of the samples, next to the same numbers
for real held-out images: the share it classifies with confidence ≥ 0.9 (recognisable garments), the class
histogram (mode coverage: the smallest and largest class share), and the Inception-style score of its logits.

Measures, with the committed classifier as the feature network (pool features for FID, spatial for sFID):
1. classifier accuracy on the 10,000 Fashion-MNIST test images;
2. FP32 samples (DDIM, balanced classes, one seed): the fraction the classifier assigns to the conditioning class,
   and their FID/sFID against the test set (the reference batch statistics);
3. the floor: FID/sFID of the 5,000 held-out real training images against the test set.
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

from evaluation.fashion_classifier import compute_features, load_fashion_classifier  # noqa: E402
from evaluation.fashion_reference import DEFAULT_OUT, fashion_uint8  # noqa: E402
from evaluation.images import to_uint8  # noqa: E402
from evaluation.metrics import inception_score  # noqa: E402
from evaluation.statistics import FIDStatistics  # noqa: E402
from ldm.data.fashion import HELDOUT, load_fashion_mnist  # noqa: E402
from ldm.models.diffusion.settings import SamplingSettings  # noqa: E402
from ldm.sample import decode_latents, sample_latents  # noqa: E402
from ldm.util import ArgumentParser, at_least, load_config, load_model_from_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "ldm" / "fashion-ldm-vq-4"
PIXEL_DIR = REPO / "models" / "ddim" / "fashion-ddim"
TEXT_DIR = REPO / "models" / "ldm" / "fashion-txt2img"


def fid_pair(feats: dict, ref: np.lib.npyio.NpzFile) -> tuple[float, float]:
    ref_pool = FIDStatistics(ref["mu"], ref["sigma"])
    ref_spatial = FIDStatistics(ref["mu_s"], ref["sigma_s"])
    return (FIDStatistics.from_features(feats["pool"]).frechet_distance(ref_pool),
            FIDStatistics.from_features(feats["spatial"]).frechet_distance(ref_spatial))


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every count, η and the guidance scale checked by the parser (one line, before any model loads)."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ldm", choices=("ldm", "pixel", "text"),
                   help="ldm: the class-conditional LDM; pixel: the unconditional pixel DDPM; text: the text-to-image "
                        "LDM, prompted with --template per class")
    p.add_argument("--model_dir", default=None, help="ldm / text: another export (model.ckpt + config.yaml), e.g. "
                                                      "a training checkpoint exported midway")
    p.add_argument("--template", default="a photo of a {}", help="text: the prompt template ({} = class noun)")
    p.add_argument("--n", type=at_least(10), default=5000, help="FP32 samples (balanced over the 10 classes)")
    p.add_argument("--steps", type=at_least(1), default=None,
                   help="DDIM steps (default 20; pixel: on the quad grid, as its preset)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale (ldm and text)")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--batch_size", type=at_least(1), default=250)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.n % 10:
        p.error(f"argument --n: must be a multiple of 10 (balanced classes), got {args.n}")
    if not 0 <= args.eta <= 1:   # (NaN too)
        p.error(f"argument --eta: must be in [0, 1] (DDIM η), got {args.eta}")
    if not args.scale >= 0:
        p.error(f"argument --scale: must be a number >= 0 (1 = no guidance), got {args.scale}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)

    device = torch.device(args.device)
    classifier = load_fashion_classifier()
    ref = np.load(DEFAULT_OUT)
    result = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "device": str(device)},
              "settings": vars(args)}

    test_feats = compute_features(classifier, ref["arr_0"], device=device)
    result["classifier_test_accuracy"] = float((test_feats["logits"].argmax(1) == ref["arr_1"]).mean())
    print(f"classifier accuracy on the {len(ref['arr_1'])} test images: "
          f"{100 * result['classifier_test_accuracy']:.2f}%")

    train_images, _ = load_fashion_mnist("train")
    held = compute_features(classifier, fashion_uint8(train_images[-HELDOUT:]), device=device)
    result["heldout_real_fid"], result["heldout_real_sfid"] = fid_pair(held, ref)
    print(f"held-out real ({HELDOUT} training images) vs test: FID {result['heldout_real_fid']:.3f}, "
          f"sFID {result['heldout_real_sfid']:.3f}")

    result["heldout_real_classifier"] = classifier_view(held["logits"])
    if args.model == "pixel":
        pixel_quality(args, classifier, ref, device, result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    args.steps = args.steps or 20
    model_dir = Path(args.model_dir) if args.model_dir else TEXT_DIR if args.model == "text" else MODEL_DIR
    model = load_model_from_config(load_config(model_dir / "config.yaml"), model_dir / "model.ckpt", device=device)
    labels = np.repeat(np.arange(10), args.n // 10)
    conditioner, what = None, "the conditioning class"
    if args.model == "text":   # condition i = the prompt of class i; agreement = the classifier reads that class
        from ldm.data.fashion import class_prompt
        from pipeline.families.stable_diffusion import TextToImageLDM
        prompts = [class_prompt(i, args.template) for i in range(10)]
        conditioner = TextToImageLDM().with_prompts(prompts, "class prompts").conditioner(model, args.scale)
        what = f"the prompt's class (prompts '{args.template}')"
        result["prompts"] = prompts
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    z = sample_latents(model, labels.tolist(), settings=SamplingSettings(args.steps, args.eta, args.scale),
                       batch_size=args.batch_size, generator=gen, conditioner=conditioner)
    images = to_uint8(decode_latents(model, z, batch_size=args.batch_size))
    result["sampling_seconds"] = time.time() - t0
    feats = compute_features(classifier, images, device=device)
    result["sample_class_accuracy"] = float((feats["logits"].argmax(1) == labels).mean())
    result["sample_fid"], result["sample_sfid"] = fid_pair(feats, ref)
    print(f"{args.n} FP32 samples ({args.steps} DDIM steps, eta {args.eta}, scale {args.scale}, seed {args.seed}; "
          f"{result['sampling_seconds']:.0f} s on {device}): classifier agrees with {what} on "
          f"{100 * result['sample_class_accuracy']:.2f}%; FID {result['sample_fid']:.3f}, "
          f"sFID {result['sample_sfid']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def classifier_view(logits: np.ndarray) -> dict:
    """What the classifier makes of a set of images: confident share, class histogram, Inception-style score."""
    prob = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()
    share = np.bincount(prob.argmax(1), minlength=prob.shape[1]) / len(prob)
    return {"confident_share": float((prob.max(1) >= 0.9).mean()), "class_share_min": float(share.min()),
            "class_share_max": float(share.max()), "class_share": share.round(4).tolist(),
            "inception_score": float(inception_score(prob))}


def pixel_quality(args, classifier, ref, device, result: dict) -> None:
    from pipeline.families import family_for
    from pipeline.generate import sample_images
    config = load_config(PIXEL_DIR / "config.yml")
    family = family_for(config)
    model = family.load(config, PIXEL_DIR / "model.ckpt", device=device)
    settings = SamplingSettings(args.steps or 20, args.eta, 1.0, "quad")
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    images = to_uint8(sample_images(family, model, None, settings=settings, n=args.n, batch_size=args.batch_size,
                                    generator=gen))
    result["sampling_seconds"] = time.time() - t0
    feats = compute_features(classifier, images, device=device)
    result["sample_fid"], result["sample_sfid"] = fid_pair(feats, ref)
    result["sample_classifier"] = view = classifier_view(feats["logits"])
    real = result["heldout_real_classifier"]
    print(f"{args.n} FP32 samples ({settings.steps} DDIM steps on the quad grid, eta {args.eta}, seed {args.seed}; "
          f"{result['sampling_seconds']:.0f} s on {device}): FID {result['sample_fid']:.3f}, sFID "
          f"{result['sample_sfid']:.3f}")
    for key, what in (("confident_share", "classified with confidence >= 0.9"),
                      ("class_share_min", "smallest class share"), ("class_share_max", "largest class share"),
                      ("inception_score", "Inception-style score (classifier logits)")):
        print(f"  {what}: samples {view[key]:.3f}, held-out real {real[key]:.3f}")


if __name__ == "__main__":
    main()
