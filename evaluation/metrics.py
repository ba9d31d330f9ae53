"""Evaluation metrics from features: Inception Score, FID, sFID, precision and recall (numpy/scipy only).

The pipeline is features → statistics → metrics, as in the OpenAI evaluator (guided-diffusion
``evaluations/evaluator.py`` at 22e0df8; shared spec evaluator.md). Each stage is a pure function here:

* ``inception_score(softmax)``: Salimans et al. 2016, IS = exp(E_x KL(p(y|x) ‖ p(y))), averaged over consecutive
  splits of 5000 rows (spec §6), in the dtype of the input (float32 from the networks, as the reference).
* ``fid_statistics`` → ``FIDStatistics.frechet_distance``: Heusel et al. 2017 (evaluation/statistics.py, spec §7);
  sFID (Nash et al. 2021) is the same distance on the spatial features.
* ``manifold_radii`` / ``manifold_membership`` / ``precision_recall``: Kynkäänniemi et al. 2019, improved precision
  and recall with k = 3 nearest-neighbour balls on squared Euclidean distances (spec §8).
* ``evaluate_features(ref, sample)`` runs all five on dicts of features (or stored statistics).

Nothing here imports torch or TensorFlow, so the math is testable on synthetic activations.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from evaluation.statistics import FIDStatistics

IS_SPLIT_SIZE = 5000      # rows per Inception Score split in the OpenAI evaluator (changes the value: spec §6)
NHOOD_SIZE = 3            # k of the k-NN balls (ManifoldEstimator nhood_sizes=(3,))
# Distance blocks of row × col points. Everything is float32, so block sizes never change a result (the reference's
# float16 path decided its float32 fallback per block; ours has no such decision). 5000 × 5000 float32 is 100 MB
# per block, which keeps 50k samples × 10k references well inside CPU memory.
ROW_BATCH_SIZE = 5000
COL_BATCH_SIZE = 5000
METRICS = ("inception_score", "fid", "sfid", "precision", "recall")
STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


# ---------------------------------------------------------------------------------------------------------------------
# Inception Score


def inception_split_sizes(n: int, split_size: int = IS_SPLIT_SIZE) -> list[int]:
    """Row counts of the IS splits: consecutive chunks of ``split_size``, the last one possibly shorter."""
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    return [min(split_size, n - start) for start in range(0, n, split_size)]


def inception_score(softmax: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Inception Score (Salimans et al. 2016, §4): per split C, s_C = exp(mean_i KL(p_i ‖ mean_C p)),
    IS = plain mean of the s_C (no std), as in the OpenAI evaluator (after improved-gan's inception_score/model.py).

    softmax: [N, K] class probabilities in file order. The splits are consecutive rows (not shuffled, not equal
    parts): 12,000 rows give 5000 + 5000 + 2000, weighted equally. The arithmetic stays in the input dtype, in the
    reference's order (mean over rows, log, per-row sum, mean, exp), so float32 input reproduces the reference bit
    for bit. One deliberate difference: a probability of exactly 0 contributes 0 (0·log 0 = 0, the limit), where
    the reference computes 0·(−inf) = NaN and returns an IS of NaN (spec §6); without zeros both agree exactly.
    """
    p = np.asarray(softmax)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"need softmax rows [N >= 1, K], got shape {p.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start:start + split_size]
        p_y = np.mean(part, axis=0, keepdims=True)          # marginal class distribution of the split
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(p_y))
        kl = np.where(part > 0, kl, 0)                      # 0·log 0 = 0 (p_y = 0 implies part = 0 in that column)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------------------------------
# Fréchet statistics


def fid_statistics(batch: Mapping[str, np.ndarray], which: str) -> FIDStatistics:
    """Statistics of the ``pool`` or ``spatial`` features of one batch.

    As in the reference (spec §1 step 3-4), a batch that carries ``mu`` uses its stored statistics for both kinds
    (``mu``/``sigma`` for pool, ``mu_s``/``sigma_s`` for spatial; all four must be there); otherwise they come from
    the features: mu the mean in the feature dtype, sigma the float64 covariance with N − 1 (``FIDStatistics``).
    """
    if which not in STAT_KEYS:
        raise ValueError(f"which must be one of {sorted(STAT_KEYS)}, got {which!r}")
    mu_key, sigma_key = STAT_KEYS[which]
    if "mu" in batch:
        missing = [k for keys in STAT_KEYS.values() for k in keys if k not in batch]
        if missing:
            raise ValueError(f"stored statistics are incomplete: 'mu' is present but {missing} are missing")
        return FIDStatistics(np.asarray(batch[mu_key]), np.asarray(batch[sigma_key]))
    if which not in batch:
        raise ValueError(f"need '{which}' features or stored statistics ({mu_key}, {sigma_key}); got keys "
                         f"{sorted(batch)}")
    return FIDStatistics.from_features(batch[which])


# ---------------------------------------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds)


def squared_norms(x: np.ndarray) -> np.ndarray:
    """Row-wise ‖x‖² in float32 (computed once per set, so every block sees the same norms)."""
    x = np.asarray(x, dtype=np.float32)
    return np.einsum("ij,ij->i", x, x) if x.size else np.zeros(len(x), np.float32)


def squared_distances(u: np.ndarray, v: np.ndarray, u_norms: np.ndarray | None = None,
                      v_norms: np.ndarray | None = None) -> np.ndarray:
    """Pairwise squared Euclidean distances [len(u), len(v)] as the reference's DistanceBlock computes them:
    ‖u‖² − 2 u·v + ‖v‖², clamped at 0, in float32 (its float32 branch; its float16 first try is not copied, as the
    spec §8/§9 recommends: it adds rounding noise of a few units that differs between TF versions)."""
    u = np.asarray(u, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    u_norms = squared_norms(u) if u_norms is None else u_norms
    v_norms = squared_norms(v) if v_norms is None else v_norms
    d = u_norms[:, None] - 2 * (u @ v.T)
    d += v_norms[None, :]
    return np.maximum(d, 0, out=d)


def manifold_radii(features: np.ndarray, k: int = NHOOD_SIZE, row_batch_size: int = ROW_BATCH_SIZE,
                   col_batch_size: int = COL_BATCH_SIZE) -> np.ndarray:
    """Radius² of each point's k-NN ball (the ball of Kynkäänniemi et al. 2019, Eq. 1): the (k+1)-th smallest squared
    distance to its own set, counting the point itself at ≈0, i.e. the k-th nearest neighbour
    (reference: ``np.partition(row, [0..k])[k]``).

    Rows are processed ``row_batch_size`` at a time against column blocks of ``col_batch_size``; only the k+1
    smallest values per row are carried from block to block, so memory is one block, not a full row of N
    distances (the (k+1)-th smallest of a union is the same value whatever the blocking).
    """
    x = np.asarray(features, dtype=np.float32)
    n = len(x)
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {n}")
    norms = squared_norms(x)
    radii = np.empty(n, dtype=np.float32)
    for r0 in range(0, n, row_batch_size):
        r1 = min(r0 + row_batch_size, n)
        best = np.empty((r1 - r0, 0), dtype=np.float32)   # the k+1 smallest distances seen so far, per row
        for c0 in range(0, n, col_batch_size):
            c1 = min(c0 + col_batch_size, n)
            d = squared_distances(x[r0:r1], x[c0:c1], norms[r0:r1], norms[c0:c1])
            cand = np.concatenate([best, d], axis=1)
            m = min(k + 1, cand.shape[1])
            best = np.partition(cand, m - 1, axis=1)[:, :m] if cand.shape[1] > m else cand
        radii[r0:r1] = np.partition(best, k, axis=1)[:, k]
    return radii


def manifold_membership(ref: np.ndarray, sample: np.ndarray, ref_radii: np.ndarray, sample_radii: np.ndarray,
                        row_batch_size: int = ROW_BATCH_SIZE,
                        col_batch_size: int = COL_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Per-point statuses f(φ, Φ) of Kynkäänniemi et al. 2019, Eq. 1 (the reference's ``evaluate_pr``): sample j
    is inside the reference manifold if d(ref_i, sample_j) ≤ radius_ref_i for some i; reference i is inside the
    sample manifold if d(ref_i, sample_j) ≤ radius_sample_j for some j. Ties count as inside.

    Returns (precision_status [len(sample)] bool, recall_status [len(ref)] bool).
    """
    ref = np.asarray(ref, dtype=np.float32)
    sample = np.asarray(sample, dtype=np.float32)
    ref_norms, sample_norms = squared_norms(ref), squared_norms(sample)
    in_ref = np.zeros(len(sample), dtype=bool)
    in_sample = np.zeros(len(ref), dtype=bool)
    for r0 in range(0, len(ref), row_batch_size):
        r1 = min(r0 + row_batch_size, len(ref))
        for c0 in range(0, len(sample), col_batch_size):
            c1 = min(c0 + col_batch_size, len(sample))
            d = squared_distances(ref[r0:r1], sample[c0:c1], ref_norms[r0:r1], sample_norms[c0:c1])
            in_ref[c0:c1] |= (d <= ref_radii[r0:r1, None]).any(axis=0)
            in_sample[r0:r1] |= (d <= sample_radii[None, c0:c1]).any(axis=1)
    return in_ref, in_sample


def precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = NHOOD_SIZE, row_batch_size: int = ROW_BATCH_SIZE,
                     col_batch_size: int = COL_BATCH_SIZE) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 2) of pool features.

    Precision = fraction of samples inside the reference manifold (union of k-NN balls of the reference points),
    recall = fraction of reference points inside the sample manifold. Both are float64 means of booleans.
    """
    blocks = dict(row_batch_size=row_batch_size, col_batch_size=col_batch_size)
    ref_radii = manifold_radii(ref, k, **blocks)
    sample_radii = manifold_radii(sample, k, **blocks)
    in_ref, in_sample = manifold_membership(ref, sample, ref_radii, sample_radii, **blocks)
    return float(np.mean(in_ref)), float(np.mean(in_sample))


# ---------------------------------------------------------------------------------------------------------------------
# All metrics


def evaluate_features(ref: Mapping[str, np.ndarray], sample: Mapping[str, np.ndarray], *,
                      metrics: Sequence[str] = METRICS, split_size: int = IS_SPLIT_SIZE, k: int = NHOOD_SIZE,
                      row_batch_size: int = ROW_BATCH_SIZE, col_batch_size: int = COL_BATCH_SIZE) -> dict[str, float]:
    """The OpenAI evaluator's five numbers from features (its ``main()`` after the activations).

    ref / sample: dicts with ``pool`` [N, D], ``spatial`` [N, D_s] and ``softmax`` [N, K] arrays; either may carry
    stored statistics ``mu, sigma, mu_s, sigma_s`` instead of (or besides) features, which then take precedence
    for FID/sFID (the reference's rule). Inception Score uses the sample softmax only; FID/sFID are
    ``d(sample, ref)`` with the sample first (spec §7); precision/recall need the pool features of both sets (the
    reference images, not whole-dataset statistics). A requested metric whose inputs are missing is a ValueError
    naming them; pass ``metrics=`` to ask for fewer (e.g. no precision/recall for a statistics-only reference).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    needs = {"inception_score": [("sample", sample, "softmax")],
             "precision": [("reference", ref, "pool"), ("sample", sample, "pool")]}
    needs["recall"] = needs["precision"]
    for m in metrics:
        missing = [f"{role} '{key}'" for role, d, key in needs.get(m, []) if key not in d]
        if missing:
            raise ValueError(f"{m} needs {' and '.join(missing)} features, which are absent")

    out: dict[str, float] = {}
    if "inception_score" in metrics:
        out["inception_score"] = inception_score(sample["softmax"], split_size)
    for name, which in (("fid", "pool"), ("sfid", "spatial")):
        if name in metrics:
            out[name] = fid_statistics(sample, which).frechet_distance(fid_statistics(ref, which))
    if "precision" in metrics or "recall" in metrics:
        precision, recall = precision_recall(ref["pool"], sample["pool"], k, row_batch_size, col_batch_size)
        out.update({m: v for m, v in (("precision", precision), ("recall", recall)) if m in metrics})
    return {m: out[m] for m in METRICS if m in out}
