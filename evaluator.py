"""Evaluate a sample batch against a reference batch: Inception Score, FID, sFID, precision and recall.

    python evaluator.py models/eval/fashion_test_reference.npz samples.npz --json result.json
    python evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz --inception_graph classify_image_graph_def.pb

The metrics and printed lines of guided-diffusion's evaluations/evaluator.py (spec evaluator.md): the five
"<Metric>: <value>" lines on stdout, progress on stderr. Features come from the network the reference batch names
(--features auto: the embedded Fashion classifier for the Fashion reference, else the OpenAI Inception graph, which
needs TensorFlow). With --json, a record of the metrics, sample count, both files' SHA-256 and the feature network
is written atomically. Bad input stops with one line on stderr and exit status 2, before any feature is computed.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

from evaluation.features import (INCEPTION_GRAPH, check_compatible, check_image_size, choose_network,
                                 compute_activations, load_network)
from evaluation.metrics import IS_SPLIT_SIZE, NHOOD_SIZE, evaluate_features, inception_split_sizes
from evaluation.npz_io import check_pair, degenerate_warning, open_batch, verify_pixels
from ldm.fileio import file_sha256, write_atomic, write_json_atomic
from ldm.util import UserFacingError
from pipeline.cli import ArgumentParser, ensure_writable_dir, pick_device, run_cli

RECORD_FORMAT, RECORD_VERSION = "ldm-ptq-evaluation", 1
LABELS = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"), ("precision", "Precision"),
          ("recall", "Recall"))


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ref_batch", help="reference batch .npz (arr_0 uint8 NHWC; optional mu/sigma/mu_s/sigma_s)")
    p.add_argument("sample_batch", help="sample batch .npz (arr_0 uint8 NHWC, e.g. from the pipeline's step 7)")
    p.add_argument("--json", default=None, help="also write the result record here (atomically)")
    p.add_argument("--features", default="auto", choices=("auto", "fashion", "inception"),
                   help="feature network; auto = the one the reference batch names, else inception")
    p.add_argument("--inception_graph", default=INCEPTION_GRAPH,
                   help="path of the OpenAI Inception GraphDef (classify_image_graph_def.pb) for --features inception")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per forward pass (default: 500 for fashion, 64 for inception; no effect on results)")
    p.add_argument("--cache_dir", default=None,
                   help="keep the reference batch's activations here (keyed by the file's and the network's SHA-256) "
                        "and reuse them: evaluating many sample batches against one reference computes it once")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present), cpu, cuda, cuda:1, ...; for inception, cpu hides the GPUs from "
                        "TensorFlow and anything else lets TF place the graph")
    return p.parse_args(argv)


def _check_json_target(path: str | None) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise UserFacingError(f"--json {out} is a directory; give a file name")
    ensure_writable_dir(out.parent if str(out.parent) else Path("."), flag="--json path")
    return out


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _versions() -> dict:
    import scipy
    import torch
    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "torch": torch.__version__}


def cached_activations(network, batch, batch_size: int | None, cache_dir: Path, kind: str) -> dict:
    """The batch's activations from ``cache_dir`` when a file for (batch SHA-256, network) is there, else computed
    and stored (atomically). The network's name carries its own weights' SHA-256."""
    import hashlib
    key = hashlib.sha256(f"{file_sha256(batch.path)}|{network.name}".encode()).hexdigest()[:24]
    path = cache_dir / f"activations_{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    acts = compute_activations(network, batch, batch_size, desc=f"reference ({kind})")
    ensure_writable_dir(cache_dir, flag="--cache_dir")
    write_atomic(path, lambda tmp: np.savez(tmp, **acts), keep_suffix=True)
    return acts


def class_accuracy(softmax: np.ndarray, sample_path: Path) -> tuple[float | None, str | None]:
    """(fraction of samples whose classifier argmax is the label in the sample file's arr_1, None) ; (None, None)
    without labels; (None, warning) when arr_1 does not hold one integer label per sample."""
    with np.load(sample_path) as f:
        if "arr_1" not in f.files:
            return None, None
        labels = np.asarray(f["arr_1"]).reshape(-1)
    if labels.shape[0] != softmax.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        return None, (f"arr_1 of {sample_path} holds {labels.shape[0]} {labels.dtype} values for "
                      f"{softmax.shape[0]} samples, not one integer label each: no classifier accuracy")
    if (labels < 0).all():   # step 7 labels the samples of an unconditional model -1: nothing to agree with
        return None, None
    return float(np.mean(np.argmax(softmax, axis=1) == labels)), None


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserFacingError(f"--batch_size must be >= 1, got {args.batch_size}")
    json_path = _check_json_target(args.json)
    # headers first (cheap refusals), then one full read of each file, all before the network is loaded
    ref = open_batch(args.ref_batch, "reference", verify=False)
    sample = open_batch(args.sample_batch, "sample", verify=False)
    check_pair(ref, sample)
    kind = choose_network(args.features, ref)
    warnings = []
    for batch in (ref, sample):
        check_image_size(kind, batch)
        warning = degenerate_warning(batch, verify_pixels(batch))
        if warning:
            warnings.append(warning)
            print(f"warning: {warning}", file=sys.stderr)
    # torch resolves the device of the Fashion classifier; TensorFlow places the Inception graph itself
    device = pick_device(args.device) if kind == "fashion" else args.device

    network = load_network(kind, inception_graph=args.inception_graph, device=device)
    for batch in (ref, sample):
        check_compatible(batch, network)

    sets = {}
    for role, batch in (("reference", ref), ("sample", sample)):
        print(f"computing {role} batch activations...")
        if role == "reference" and args.cache_dir is not None:
            sets[role] = cached_activations(network, batch, args.batch_size, Path(args.cache_dir), kind)
        else:
            sets[role] = compute_activations(network, batch, args.batch_size, desc=f"{role} ({kind})")
        if batch.stats is not None:
            # the reference's rule: a batch with stored statistics uses them for FID/sFID (spec §1)
            sets[role].update(batch.stats)
            if role == "sample":
                _note("the sample batch stores mu/sigma/mu_s/sigma_s; FID/sFID use them, not its images")

    print("Computing evaluations...")
    splits = inception_split_sizes(sample.n, IS_SPLIT_SIZE)
    if sample.n < IS_SPLIT_SIZE:
        _note(f"{sample.n} samples < the IS split size {IS_SPLIT_SIZE}: the Inception Score is one split of "
              f"{sample.n} (as the OpenAI evaluator computes it) and is not comparable with 50k-sample numbers")
    elif splits[-1] != IS_SPLIT_SIZE:
        _note(f"the last IS split has {splits[-1]} samples (splits {splits}), averaged with equal weight as the "
              f"OpenAI evaluator does; use a multiple of {IS_SPLIT_SIZE} samples for comparable numbers")
    try:
        metrics = evaluate_features(sets["reference"], sets["sample"])
    except ValueError as e:  # e.g. "Imaginary component": covariances too ill-conditioned for the Fréchet distance
        raise UserFacingError(f"metric computation failed: {' '.join(str(e).split())}") from None
    for key, label in LABELS:
        print(f"{label}: {metrics[key]}")  # = print(label + ":", value): shortest round-trip repr as the reference
    accuracy, warning = (class_accuracy(sets["sample"]["softmax"], sample.path) if kind == "fashion"
                         else (None, None))
    if warning:
        warnings.append(warning)
        print(f"warning: {warning}", file=sys.stderr)
    if accuracy is not None:
        # not an OpenAI-evaluator line: how often the classifier agrees with the class each sample was drawn for
        print(f"Classifier accuracy: {accuracy}", file=sys.stderr)
        metrics = {**metrics, "classifier_accuracy": accuracy}

    record = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "metrics": metrics,
              "n_samples": sample.n, "n_reference": ref.n, "feature_network": network.name, "features": kind,
              "reference": {"path": str(ref.path), "sha256": file_sha256(ref.path),
                            "statistics": "stored" if ref.stats is not None else "computed from arr_0"},
              "sample": {"path": str(sample.path), "sha256": file_sha256(sample.path),
                         "statistics": "stored" if sample.stats is not None else "computed from arr_0"},
              "settings": {"inception_score_split_size": IS_SPLIT_SIZE, "inception_score_splits": splits,
                           "nearest_neighbours": NHOOD_SIZE, "distances": "squared euclidean, float32",
                           "image_size": list(ref.image_size), "device": str(device)},
              "environment": _versions(), "warnings": warnings}
    if json_path is not None:
        write_json_atomic(json_path, record)
        print(f"wrote {json_path}", file=sys.stderr)
    return record


if __name__ == "__main__":
    run_cli(main)
