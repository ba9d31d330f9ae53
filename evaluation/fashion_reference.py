"""Build the Fashion-MNIST reference batch in the OpenAI layout (spec evaluator.md §3).

    python -m evaluation.fashion_reference            # -> models/eval/fashion_test_reference.npz

``arr_0``: the 10,000 test images, uint8 NHWC [10000, 32, 32, 3] (padded to 32 px, gray repeated to RGB);
``arr_1``: their labels; ``mu``/``sigma`` and ``mu_s``/``sigma_s``: statistics of the classifier's pool and spatial
features over the same images; ``feature_network``: which classifier produced them (its checkpoint's SHA-256).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from evaluation.fashion_classifier import DEFAULT_DIR, compute_features, load_fashion_classifier
from evaluation.statistics import FIDStatistics
from ldm.data.fashion import load_fashion_mnist, pad_to_32
from ldm.fileio import file_sha256, write_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "models" / "eval" / "fashion_test_reference.npz"


def fashion_uint8(images_28: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> uint8 NHWC [N, 32, 32, 3]."""
    return np.repeat(pad_to_32(images_28)[..., None], 3, axis=3)




def build_reference(out: Path, classifier_dir: Path = DEFAULT_DIR, data_dir: str | None = None) -> dict:
    images, labels = load_fashion_mnist("test", data_dir)
    arr = fashion_uint8(images)
    feats = compute_features(load_fashion_classifier(classifier_dir), arr)
    pool, spatial = FIDStatistics.from_features(feats["pool"]), FIDStatistics.from_features(feats["spatial"])
    payload = {"arr_0": arr, "arr_1": labels, "mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu,
               "sigma_s": spatial.sigma,
               "feature_network": np.array(f"fashion-classifier sha256:{file_sha256(classifier_dir / 'model.ckpt')}")}
    write_atomic(out, lambda tmp: np.savez_compressed(tmp, **payload), keep_suffix=True)
    return {"n": len(arr), "accuracy": float((feats["logits"].argmax(1) == labels).mean())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--classifier", default=str(DEFAULT_DIR))
    p.add_argument("--data_dir", default=None)
    args = p.parse_args(argv)
    info = build_reference(Path(args.out), Path(args.classifier), args.data_dir)
    print(f"wrote {args.out}: {info['n']} test images; classifier accuracy on them {100 * info['accuracy']:.2f}%")


if __name__ == "__main__":
    main()
