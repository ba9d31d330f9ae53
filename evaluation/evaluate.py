"""One sample batch against a reference batch: the evaluator's record (Inception Score, FID, sFID, precision,
recall, and the classifier accuracy where the features are the Fashion classifier's), as evaluator.py prints and
writes it; ``evaluate`` is what the script and the demo call.

The metrics and printed lines are guided-diffusion's evaluations/evaluator.py's (spec evaluator.md): the five
"<Metric>: <value>" lines on stdout, progress and notes on stderr. Every refusal (one line) comes before any feature
is computed.
"""
from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evaluation.features import (INCEPTION_GRAPH, check_compatible, check_image_size, choose_network,
                                 compute_activations, load_network)
from evaluation.metrics import IS_SPLIT_SIZE, NHOOD_SIZE, evaluate_features, inception_split_sizes
from evaluation.npz_io import ImageBatch, check_pair, degenerate_warning, open_batch, verify_pixels
from ldm.fileio import check_output_file, file_sha256, write_atomic, write_json_atomic
from ldm.util import UserFacingError, parse_device

RECORD_FORMAT, RECORD_VERSION = "ldm-ptq-evaluation", 1
LABELS = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"), ("precision", "Precision"),
          ("recall", "Recall"))


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _warn(warnings: list[str], warning: str | None) -> None:
    if warning:
        warnings.append(warning)
        print(f"warning: {warning}", file=sys.stderr)


def _versions() -> dict:
    import scipy
    import torch
    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "torch": torch.__version__}


def cached_activations(network, batch, batch_size: int | None, cache_dir: Path, kind: str) -> dict:
    """The batch's activations from ``cache_dir`` when a file for (batch SHA-256, network) is there, else computed
    and stored (atomically). The network's name carries its own weights' SHA-256."""
    key = hashlib.sha256(f"{file_sha256(batch.path)}|{network.name}".encode()).hexdigest()[:24]
    path = cache_dir / f"activations_{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    acts = compute_activations(network, batch, batch_size, desc=f"reference ({kind})")
    check_output_file(path, flag="--cache_dir file")   # (its folder writable, or creatable)
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


def _activation_sets(network, kind: str, ref: ImageBatch, sample: ImageBatch, batch_size: int | None,
                     cache_dir: Path | None) -> dict[str, dict]:
    """{"reference": acts, "sample": acts}; a batch with stored statistics uses them for FID/sFID (spec §1)."""
    sets = {}
    for role, batch in (("reference", ref), ("sample", sample)):
        print(f"computing {role} batch activations...")
        if role == "reference" and cache_dir is not None:
            sets[role] = cached_activations(network, batch, batch_size, cache_dir, kind)
        else:
            sets[role] = compute_activations(network, batch, batch_size, desc=f"{role} ({kind})")
        if batch.stats is not None:
            sets[role].update(batch.stats)
            if role == "sample":
                _note("the sample batch stores mu/sigma/mu_s/sigma_s; FID/sFID use them, not its images")
    return sets


def _metrics(sets: dict[str, dict], n: int) -> tuple[dict, list[int]]:
    """The five metrics (printed as the reference evaluator prints them) and the Inception Score's splits."""
    print("Computing evaluations...")
    splits = inception_split_sizes(n, IS_SPLIT_SIZE)
    if n < IS_SPLIT_SIZE:
        _note(f"{n} samples < the IS split size {IS_SPLIT_SIZE}: the Inception Score is one split of "
              f"{n} (as the OpenAI evaluator computes it) and is not comparable with 50k-sample numbers")
    elif splits[-1] != IS_SPLIT_SIZE:
        _note(f"the last IS split has {splits[-1]} samples (splits {splits}), averaged with equal weight as the "
              f"OpenAI evaluator does; use a multiple of {IS_SPLIT_SIZE} samples for comparable numbers")
    try:
        metrics = evaluate_features(sets["reference"], sets["sample"])
    except ValueError as e:  # e.g. "Imaginary component": covariances too ill-conditioned for the Fréchet distance
        raise UserFacingError(f"metric computation failed: {' '.join(str(e).split())}") from None
    for key, label in LABELS:
        print(f"{label}: {metrics[key]}")  # = print(label + ":", value): shortest round-trip repr as the reference
    return metrics, splits


def evaluate(ref_batch: str | Path, sample_batch: str | Path, json_path: Path | None = None, features: str = "auto",
             inception_graph: str | Path = INCEPTION_GRAPH, batch_size: int | None = None,
             cache_dir: Path | None = None, device: str = "auto",
             pick_device: Callable[[str], Any] = parse_device) -> dict:
    """The evaluation record of ``sample_batch`` against ``ref_batch`` (written atomically to ``json_path``, whose
    folder the caller has checked): features from ``features`` (auto: the network the reference names),
    ``batch_size`` images per forward pass, the reference's activations kept in ``cache_dir``. ``pick_device``
    turns ``device`` into the Fashion classifier's torch device (the pipeline's adds exact CUDA numerics);
    TensorFlow places the Inception graph itself."""
    # headers first (cheap refusals), then one full read of each file, all before the network is loaded
    ref = open_batch(ref_batch, "reference", verify=False)
    sample = open_batch(sample_batch, "sample", verify=False)
    check_pair(ref, sample)
    kind = choose_network(features, ref)
    warnings: list[str] = []
    for batch in (ref, sample):
        check_image_size(kind, batch)
        _warn(warnings, degenerate_warning(batch, verify_pixels(batch)))
    where = pick_device(device) if kind == "fashion" else device
    network = load_network(kind, inception_graph=inception_graph, device=where)
    for batch in (ref, sample):
        check_compatible(batch, network)
    sets = _activation_sets(network, kind, ref, sample, batch_size, cache_dir)
    metrics, splits = _metrics(sets, sample.n)
    accuracy, warning = (class_accuracy(sets["sample"]["softmax"], sample.path) if kind == "fashion"
                         else (None, None))
    _warn(warnings, warning)
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
                           "image_size": list(ref.image_size), "device": str(where)},
              "environment": _versions(), "warnings": warnings}
    if json_path is not None:
        write_json_atomic(json_path, record)
        print(f"wrote {json_path}", file=sys.stderr)
    return record
