"""Paired fidelity to the full-precision model: how close each quantized sample is to the FP sample made from the
same x_T and sampler noise (as SVDQuant and DMQ report it: PSNR, SSIM, a learned-feature distance), with bootstrap
intervals over samples, and the paired difference of two variants against the same FP file.

Per sample i (features -> statistics -> metric, each a function of its own):
    psnr_i   = 10 log10(255² / MSE_i) on the uint8 images; identical images get the uint8 ceiling
               10 log10(255² · H·W·C) (the PSNR of one value off by one LSB), so means stay finite
    ssim_i   = mean SSIM (Wang et al. 2004: Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, L 255, population
               covariances) over the valid region where the window fits, then over channels
    fdist_i  = ‖f(x_i) − f(x̂_i)‖₂ in the evaluation network's pool features (the LPIPS analogue here)
and over the batch fid_to_fp = FID of the samples against the FP samples as the reference.
A paired difference (variant A − variant B, both against the same FP samples) has far less variance than a
difference of two FIDs: the same seeds make the same images up to the quantization error.

Intervals (``Bootstrap``; scipy.stats.bootstrap, resampling samples with replacement, one seeded set of draws shared by
every metric, by both variants and by their difference, so paired quantities stay paired):
    per-sample means      percentile interval. A mean is unbiased and near normal at these N: the percentile
                          interval covers at its level (96 % for a skewed case in tests/test_fidelity.py) and is the
                          same interval, draw for draw, as before the basic one was introduced for FID.
    FID to FP, Δ FID      basic (reverse-percentile) interval [2θ̂ − q₉₇.₅, 2θ̂ − q₂.₅] of the draws θ*, reported with
                          the bootstrap bias-corrected estimate θ̃ = 2θ̂ − mean(θ*), clipped at 0 for an FID (θ ≥ 0).
    Why: FID is biased upward at finite N, and a resample with replacement holds ~63 % distinct samples, so every
    draw is biased again by about as much: at the demo's N the draws all lie above θ̂ and the percentile interval
    misses its own estimate (issue 33: "0.001 [0.002, 0.003]") and the true value (coverage 0 % where the bias
    dominates, at most 93 %, on synthetic features with a known FID). The basic interval takes θ* − θ̂ as the law of θ̂ − θ, which corrects that shift
    (coverage 92-100 % on the same cases); BCa is undefined there (z0 = Φ⁻¹(share of θ* below θ̂) = −∞ when no draw
    is below), and disjoint splits or seeds estimate the FID of a smaller N, a different, more biased quantity.
    The interval is for the population FID between the two models' feature distributions; the plain N-sample FID
    (the evaluator's number, "mean" in the record) can lie above it by its bias, and the output says so.
Every interval is checked to contain the estimate it is printed with (``check_interval``; why not, where not).

    python -m evaluation.fidelity FP.npz SAMPLES.npz [--vs OTHER.npz] [--json OUT.json]

(``paired_fidelity`` is what this command line and the demo call.)
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.stats
import torch

from evaluation.features import NETWORKS, compute_activations, load_network
from evaluation.generation import MANIFEST
from evaluation.npz_io import ImageBatch, open_batch
from evaluation.statistics import FIDStatistics
from ldm.fileio import check_output_file, file_sha256, write_json_atomic
from ldm.util import ArgumentParser, UserFacingError, run_cli

PER_SAMPLE = ("psnr", "ssim", "feature_distance")
HIGHER_IS_CLOSER = {"psnr": True, "ssim": True, "feature_distance": False, "fid_to_fp": False}
# what may differ between two sample sets of one plan (step 7's manifest.json): the sampler, its artifacts, how
# the quantized UNet is executed (fake-quant or integer kernels) and the arithmetic of the sampling run (--precision:
# tf32 / bf16 against exact fp32, the same seeds)
PLAN_FREE_KEYS = ("sampler", "bits", "artifacts", "execution", "precision")


class FidelityError(UserFacingError):
    pass


# ---- per-sample metrics (pure) ------------------------------------------------------------------------------------

def psnr_ceiling(shape: Sequence[int]) -> float:
    """The largest finite PSNR between two uint8 images of ``shape`` (H, W, C): one value off by one."""
    return 10 * math.log10(255.0 ** 2 * float(np.prod(shape)))


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 [N] PSNR in dB between uint8 [N, H, W, C] batches (data range 255); identical pairs get the
    ceiling ``psnr_ceiling``."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    out = np.full(len(a), psnr_ceiling(a.shape[1:]))
    hit = mse > 0
    out[hit] = 10 * np.log10(255.0 ** 2 / mse[hit])
    return out


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """float64 [size, size] Gaussian weights summing to 1 (MATLAB's fspecial('gaussian', size, sigma))."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g)
    return w / w.sum()


def ssim(a: np.ndarray, b: np.ndarray, window: np.ndarray | None = None, k1: float = 0.01, k2: float = 0.03,
         data_range: float = 255.0) -> np.ndarray:
    """float64 [N] SSIM (Wang et al. 2004, Eq. 13) between uint8 [N, H, W, C] batches: weighted local means,
    population variances and covariance under ``window`` (default ``gaussian_window()``), the SSIM map over the
    valid region (no padding), averaged over it and then over channels."""
    w = gaussian_window() if window is None else window
    if a.shape[1] < w.shape[0] or a.shape[2] < w.shape[1]:
        raise ValueError(f"images of {a.shape[1]}×{a.shape[2]} are smaller than the {w.shape[0]}×{w.shape[1]} window")
    x = torch.from_numpy(a.astype(np.float64)).permute(0, 3, 1, 2)   # [N, C, H, W]
    y = torch.from_numpy(b.astype(np.float64)).permute(0, 3, 1, 2)
    c = x.shape[1]
    kernel = torch.from_numpy(w)[None, None].repeat(c, 1, 1, 1)        # depthwise: one window per channel

    def filt(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(z, kernel, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x ** 2
    var_y = filt(y * y) - mu_y ** 2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1).numpy()


def feature_distance(fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """float64 [N] Euclidean distance between paired feature vectors [N, D]."""
    return np.linalg.norm(fa.astype(np.float64) - fb.astype(np.float64), axis=1)


def fid(reference: np.ndarray, features: np.ndarray) -> float:
    """FID of ``features`` against ``reference`` (pool features [N, D]), as the evaluator computes it (sqrtm)."""
    return float(FIDStatistics.from_features(reference).frechet_distance(FIDStatistics.from_features(features)))


def fid_by_eigenvalues(reference: np.ndarray, features: np.ndarray) -> float:
    """The same Fréchet distance with tr √(Σ₁Σ₂) = Σ √λ_i(Σ₁Σ₂) (the eigenvalues of a product of two PSD matrices
    are real and ≥ 0): ~20× faster than sqrtm, for the bootstrap's hundreds of draws; equal to ``fid`` within float64
    round-off (tests/test_fidelity.py)."""
    a, b = reference.astype(np.float64), features.astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    lam = np.linalg.eigvals(s1 @ s2).real
    diff = a.mean(axis=0) - b.mean(axis=0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


# ---- intervals -------------------------------------------------------------------------------------------------

def check_interval(d: dict, why: str | None = None) -> dict:
    """Every reported interval must contain the estimate it qualifies (``d["estimate"]``, else ``d["mean"]``):
    sets ``d["contains_estimate"]`` and, when it does not, ``d["why_not"]`` (``why`` or a generic reason), which
    ``report_lines`` and the demo report print next to the interval. Returns ``d``."""
    if d.get("ci") is None:
        return d
    est, (lo, hi) = d.get("estimate", d["mean"]), d["ci"]
    d["contains_estimate"] = bool(lo <= est <= hi)
    if not d["contains_estimate"]:
        d["why_not"] = why or (f"the bootstrap distribution is too skewed or too discrete at this N for its central "
                               f"interval to hold the estimate {est:.6g}; read the interval with care")
    else:
        d.pop("why_not", None)
    return d


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap over samples with ``scipy.stats.bootstrap``: ``resamples`` draws of N indices with replacement from
    ``seed``; the same draws for every metric and every variant (so paired quantities stay paired: a draw of
    ``default_rng(seed)`` is the same N indices for the FP samples and each variant).

    * per-sample means (PSNR, SSIM, feature distance and their paired differences): the percentile interval. The
      mean is unbiased and close to normal at these N, so the percentile interval is valid (coverage test in
      tests/test_fidelity.py) and contains its mean;
    * whole-batch statistics (FID to FP and its paired difference; ``fid_resamples`` draws, each a Fréchet distance):
      the basic (reverse-percentile) interval [2θ̂ − q_hi, 2θ̂ − q_lo] with the bootstrap bias-corrected estimate
      θ̃ = 2θ̂ − mean(θ*) — see ``Bootstrap.statistic``."""

    resamples: int = 1000
    fid_resamples: int = 200
    seed: int = 0
    level: float = 0.95

    METHOD = ("per-sample means: percentile; FID to FP and its paired difference: basic (reverse percentile) "
              "around the bootstrap bias-corrected estimate 2θ̂ − mean(θ*), clipped at 0 for FID; resampling samples "
              "with replacement, the same draws for every metric and variant (scipy.stats.bootstrap)")

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def indices(self, n: int, resamples: int | None = None) -> np.ndarray:
        """The draws ``scipy.stats.bootstrap`` makes from ``rng()``: [resamples, n] indices with replacement."""
        return self.rng().integers(0, n, size=(resamples or self.resamples, n))

    def mean(self, values: np.ndarray) -> dict:
        """{"mean", "ci", "contains_estimate"} of a per-sample metric: percentile interval of the mean."""
        values = np.asarray(values, dtype=np.float64)
        res = scipy.stats.bootstrap((values,), np.mean, n_resamples=self.resamples, confidence_level=self.level,
                                    method="percentile", vectorized=True, rng=self.rng())
        lo, hi = res.confidence_interval
        return check_interval({"mean": float(values.mean()), "ci": [float(lo), float(hi)]})

    def statistic(self, fn: Callable[[np.ndarray], float], n: int, lower: float | None = None) -> dict | None:
        """Interval of a whole-batch statistic ``fn(indices)`` (e.g. FID to FP): None with ``fid_resamples`` 0, else
        {"estimate", "ci", "bias", "plain"}.

        A resample with replacement holds duplicates (about 63 % distinct samples), and the FID of a smaller
        effective sample is larger, so the draws θ* sit above θ̂ = fn(all) by about the bias θ̂ itself has over the
        population value θ; at the demo's N every draw can lie above θ̂, and the percentile interval then excludes
        its own estimate. The basic interval [2θ̂ − q_hi, 2θ̂ − q_lo] treats θ* − θ̂ as the law of θ̂ − θ, so it
        corrects that shift: it is an interval for θ, centred near the bias-corrected estimate 2θ̂ − mean(θ*) it is
        reported with (BCa needs a finite z0 = Φ⁻¹(P(θ* < θ̂)), which is infinite exactly when every draw lies above
        θ̂). ``lower``: the statistic's floor (0 for an FID): interval and estimate are clipped to it, which keeps
        the coverage (θ ≥ lower)."""
        if self.fid_resamples < 1:
            return None

        def stat(idx: np.ndarray, axis: int = -1) -> np.ndarray | float:
            idx = np.asarray(idx)
            return fn(idx) if idx.ndim == 1 else np.array([fn(row) for row in idx.reshape(-1, n)]).reshape(
                idx.shape[:-1])

        res = scipy.stats.bootstrap((np.arange(n),), stat, n_resamples=self.fid_resamples,
                                    confidence_level=self.level, method="basic", vectorized=True, rng=self.rng())
        draws = np.asarray(res.bootstrap_distribution, dtype=np.float64)
        plain = float(fn(np.arange(n)))
        estimate = 2 * plain - float(draws.mean())
        lo, hi = (float(v) for v in res.confidence_interval)
        if lower is not None:
            estimate, lo, hi = max(estimate, lower), max(lo, lower), max(hi, lower)
        return {"estimate": estimate, "ci": [lo, hi], "bias": float(draws.mean()) - plain, "plain": plain}


def whole_batch(plain: float, fn: Callable[[np.ndarray], float], n: int, boot: Bootstrap,
                lower: float | None = None) -> dict:
    """The record of a whole-batch statistic: "mean" its plain value on all N samples (the number the evaluator and
    papers report; kept as "mean" for the report), and with an interval the bias-corrected "estimate" the "ci"
    qualifies and the bootstrap "bias"; the check says whether the plain value lies inside the interval too."""
    d = {"mean": plain, "estimate": plain, "ci": None, "method": "basic"}
    b = boot.statistic(fn, n, lower)
    if b is None:
        return d
    d.update(estimate=b["estimate"], ci=b["ci"], bias=b["bias"])
    check_interval(d)
    lo, hi = d["ci"]
    d["plain_in_ci"] = bool(lo <= plain <= hi)
    return d


def fid_entry(reference: np.ndarray, features: np.ndarray, boot: Bootstrap) -> dict:
    """FID of ``features`` against ``reference`` (paired rows) with its bias-corrected estimate and basic interval."""
    return whole_batch(fid(reference, features), lambda i: fid_by_eigenvalues(reference[i], features[i]),
                       len(features), boot, lower=0.0)


def summarize(per: dict[str, np.ndarray], fp_pool: np.ndarray, pool: np.ndarray, boot: Bootstrap) -> dict:
    """Mean and interval of every per-sample metric, and FID-to-FP with its interval."""
    out = {k: boot.mean(per[k]) for k in PER_SAMPLE}
    out["fid_to_fp"] = fid_entry(fp_pool, pool, boot)
    return out


def paired_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], fp_pool: np.ndarray, pool_a: np.ndarray,
                      pool_b: np.ndarray, boot: Bootstrap) -> dict:
    """Per metric: mean of (A − B) over the same samples with its interval, whether the interval excludes 0, and
    which side is closer to FP when it does (the sign of the estimate the interval contains)."""
    out = {}
    for k in PER_SAMPLE:
        out[k] = boot.mean(a[k] - b[k])
    out["fid_to_fp"] = whole_batch(fid(fp_pool, pool_a) - fid(fp_pool, pool_b),
                                   lambda i: fid_by_eigenvalues(fp_pool[i], pool_a[i])
                                   - fid_by_eigenvalues(fp_pool[i], pool_b[i]), len(fp_pool), boot)
    for k, d in out.items():
        lo, hi = d["ci"] if d["ci"] is not None else (math.nan, math.nan)
        d["excludes_zero"] = bool(lo > 0 or hi < 0)
        if d["excludes_zero"]:
            a_closer = (d.get("estimate", d["mean"]) > 0) == HIGHER_IS_CLOSER[k]
            d["closer_to_fp"] = "samples" if a_closer else "other"
        else:
            d["closer_to_fp"] = None
    return out


# ---- files --------------------------------------------------------------------------------------------------------

def read_manifest(path: Path) -> dict | None:
    m = path.parent / MANIFEST
    if not m.is_file():
        return None
    try:
        return json.loads(m.read_text())
    except (OSError, ValueError):
        raise FidelityError(f"{m} is unreadable; regenerate the samples (step 7) or move the manifest away") from None


def is_exact_fp(manifest: dict) -> bool:
    """Step 7's manifest of the exact FP32 model's samples (sampler fp32, no --precision)."""
    return manifest.get("sampler") == "fp32" and "precision" not in manifest


def check_fp_first(fp: ImageBatch, other: ImageBatch) -> None:
    """Where step 7's manifests say which set is which, the reference (first argument) must be the FP32 samples:
    swapped, "FID to FP" would be measured against the quantized samples."""
    mf, mo = read_manifest(fp.path), read_manifest(other.path)
    if mf is None or is_exact_fp(mf):
        return
    swap = " (the arguments look swapped: pass the FP32 samples first)" if mo is not None and is_exact_fp(mo) else ""
    what = f"the {mf.get('sampler', '?')} sampler's set" + (f" in {mf['precision']}" if "precision" in mf else "")
    raise FidelityError(f"{fp.path} is {what} by its manifest, not the exact FP32 samples every metric here is "
                        f"measured against{swap}")


def check_same_plan(fp: ImageBatch, other: ImageBatch) -> dict | None:
    """The plan both files were made from (step 7's manifests, sampler aside), or None when either has no manifest
    (then sample i of one is compared with sample i of the other; ``open_paired`` says so on stderr)."""
    if fp.shape != other.shape:
        raise FidelityError(f"{fp.path} holds {fp.shape[0]} images of {fp.shape[1:]} and {other.path} "
                            f"{other.shape[0]} of {other.shape[1:]}; compare samples made from the same plan")
    mf, mo = read_manifest(fp.path), read_manifest(other.path)
    if mf is None or mo is None:
        return None
    plan_f = {k: v for k, v in mf.items() if k not in PLAN_FREE_KEYS}
    plan_o = {k: v for k, v in mo.items() if k not in PLAN_FREE_KEYS}
    if plan_f != plan_o:
        key = next(k for k in sorted(set(plan_f) | set(plan_o)) if plan_f.get(k) != plan_o.get(k))
        raise FidelityError(f"{fp.path} and {other.path} come from different plans: {key}={plan_f.get(key)!r} vs "
                            f"{plan_o.get(key)!r}; make both with the same --n_samples, --seed, --batch_size, "
                            f"steps, η, scale and model (step 7)")
    return plan_f


def read_labels(batch: ImageBatch) -> np.ndarray | None:
    with np.load(batch.path) as f:
        return np.asarray(f["arr_1"]) if "arr_1" in f.files else None


def check_labels(fp: ImageBatch, other: ImageBatch) -> None:
    a, b = read_labels(fp), read_labels(other)
    if a is not None and b is not None and not np.array_equal(a, b):
        first = int(np.flatnonzero(a != b)[0]) if a.shape == b.shape else 0
        raise FidelityError(f"the labels (arr_1) of {fp.path} and {other.path} differ (first at sample {first}); "
                            f"paired metrics need the same class for the same sample")


def pixel_metrics(fp: ImageBatch, other: ImageBatch, chunk: int = 256) -> dict[str, np.ndarray]:
    """Per-sample PSNR and SSIM, streamed in chunks in file order."""
    ps, ss = [], []
    for a, b in zip(fp.iter_images(chunk), other.iter_images(chunk), strict=True):
        ps.append(psnr(a, b))
        ss.append(ssim(a, b))
    return {"psnr": np.concatenate(ps), "ssim": np.concatenate(ss)}


def is_gray(batch: ImageBatch, chunk: int = 1024) -> bool:
    """Whether every image has R = G = B (the embedded default's Fashion images are gray stored as RGB)."""
    return all(bool((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all())
               for x in batch.iter_images(chunk))


def choose_features(requested: str, fp: ImageBatch) -> str:
    """``auto``: the embedded Fashion classifier for gray images, the OpenAI Inception graph otherwise (color
    32×32 images are CIFAR-like, not Fashion)."""
    if requested != "auto":
        return requested
    return "fashion" if is_gray(fp) else "inception"


# ---- the comparison -----------------------------------------------------------------------------------------------

def open_paired(fp: ImageBatch, path: str | Path) -> tuple[ImageBatch, dict | None]:
    """``path`` opened and checked against the (already opened) FP batch: same plan, same labels."""
    other = open_batch(path, "sample")
    plan = check_same_plan(fp, other)
    check_labels(fp, other)
    if plan is None:
        print(f"note: no {MANIFEST} beside {fp.path} or {other.path}: comparing sample by sample in index order, "
              f"trusting that both were made from the same seeds", file=sys.stderr)
    return other, plan


def measure(fp: ImageBatch, other: ImageBatch, network, fp_pool: np.ndarray) -> tuple[dict, np.ndarray]:
    """Per-sample PSNR, SSIM and feature distance of ``other`` against ``fp``, and ``other``'s pool features."""
    per = pixel_metrics(fp, other)
    pool = compute_activations(network, other, desc=f"features {other.path.parent.name or other.path.name}")["pool"]
    per["feature_distance"] = feature_distance(fp_pool, pool)
    return per, pool


def compare(fp_path: str | Path, path: str | Path, vs: str | Path | None = None, features: str = "auto",
            boot: Bootstrap = Bootstrap(), device: str = "cpu") -> dict:
    """The fidelity record of ``path`` (and of ``vs``, with the paired difference) against the FP samples."""
    fp = open_batch(fp_path, "FP")   # opened (and its pixels verified) once, for both comparisons
    other, plan = open_paired(fp, path)
    check_fp_first(fp, other)
    rival = open_paired(fp, vs)[0] if vs is not None else None
    network = load_network(choose_features(features, fp), device=device)
    fp_pool = compute_activations(network, fp, desc="features FP")["pool"]
    per, pool = measure(fp, other, network, fp_pool)
    record = {"fp": {"path": str(fp.path), "sha256": file_sha256(fp.path)},
              "samples": {"path": str(other.path), "sha256": file_sha256(other.path)},
              "plan": plan, "n": other.n, "feature_network": network.name,
              "bootstrap": {"resamples": boot.resamples, "fid_resamples": boot.fid_resamples, "seed": boot.seed,
                            "level": boot.level, "method": boot.METHOD},
              "psnr_identical": int((per["psnr"] >= psnr_ceiling(fp.shape[1:])).sum()),
              "metrics": summarize(per, fp_pool, pool, boot),
              "per_sample": {k: per[k].tolist() for k in PER_SAMPLE}}
    if rival is not None:
        per_b, pool_b = measure(fp, rival, network, fp_pool)
        record["vs"] = {"path": str(rival.path), "sha256": file_sha256(rival.path),
                        "metrics": summarize(per_b, fp_pool, pool_b, boot),
                        "per_sample": {k: per_b[k].tolist() for k in PER_SAMPLE},
                        "difference": paired_difference(per, per_b, fp_pool, pool, pool_b, boot)}
    return record


NAMES = {"psnr": ("PSNR (dB)", "{:.2f}"), "ssim": ("SSIM", "{:.4f}"),
         "feature_distance": ("Feature distance", "{:.4f}"), "fid_to_fp": ("FID to FP", "{:.3f}")}


def _fmt(d: dict, pattern: str, signed: bool = False) -> str:
    """``estimate [lo, hi]``: the estimate the interval qualifies (a mean, or a whole-batch statistic's
    bias-corrected value, followed by its plain value), and why not when the interval misses it."""
    p = pattern.replace("{:", "{:+") if signed else pattern
    if d["ci"] is None:
        return p.format(d["mean"])
    text = f"{p.format(d.get('estimate', d['mean']))} [{p.format(d['ci'][0])}, {p.format(d['ci'][1])}]"
    if "estimate" in d:
        text += f" bias-corrected; plain {p.format(d['mean'])}, bootstrap bias {d['bias']:+.2g}"
        if not d.get("plain_in_ci", True):
            text += " (the plain value's finite-N bias puts it outside)"
    if d.get("contains_estimate") is False:
        text += f" (interval misses its estimate: {d['why_not']})"
    return text


def report_lines(record: dict) -> list[str]:
    level = int(record["bootstrap"]["level"] * 100)
    lines = [f"{NAMES[k][0]}: {_fmt(d, NAMES[k][1])}" for k, d in record["metrics"].items()]
    lines.append(f"({record['n']} paired samples; {level} % bootstrap intervals, seed {record['bootstrap']['seed']}: "
                 f"percentile for the per-sample means, basic around the bias-corrected estimate for FID to FP; "
                 f"features {record['feature_network']})")
    if "vs" in record:
        lines.append(f"against {record['vs']['path']}:")
        lines += [f"{NAMES[k][0]}: {_fmt(d, NAMES[k][1])}" for k, d in record["vs"]["metrics"].items()]
        lines.append("paired difference (samples − other):")
        for k, d in record["vs"]["difference"].items():
            verdict = (f"{d['closer_to_fp']} closer to FP" if d["excludes_zero"] else "inside the noise")
            lines.append(f"Δ {NAMES[k][0]}: {_fmt(d, NAMES[k][1], signed=True)} -> {verdict}")
    return lines


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fp_samples", help="the FP model's samples (.npz, arr_0 uint8 NHWC), e.g. step 7's fp32 ones")
    p.add_argument("samples", help="a variant's samples made from the same plan (same N, seed, steps, η, scale)")
    p.add_argument("--vs", default=None, help="another variant's samples: the paired difference samples − vs")
    p.add_argument("--json", default=None, help="also write the record (per-sample arrays included) here")
    p.add_argument("--features", default="auto", choices=("auto", *NETWORKS),
                   help="feature network for the feature distance and FID: auto = fashion for gray images (the "
                        "embedded default), inception otherwise")
    p.add_argument("--bootstrap", type=int, default=Bootstrap.resamples, help="bootstrap resamples (per-sample means)")
    p.add_argument("--fid_bootstrap", type=int, default=Bootstrap.fid_resamples,
                   help="bootstrap resamples for FID to FP (0: no interval)")
    p.add_argument("--seed", type=int, default=Bootstrap.seed, help="seed of the bootstrap draws")
    p.add_argument("--device", default="cpu", help="torch device of the Fashion classifier")
    return p.parse_args(argv)


def paired_fidelity(fp_path: str | Path, path: str | Path, json_path: str | Path | None = None,
                    vs: str | Path | None = None, features: str = "auto", boot: Bootstrap = Bootstrap(),
                    device: str = "cpu") -> dict:
    """``compare`` with its report printed and its record written atomically to ``json_path`` (checked before any
    work: the record never goes over a sample file, into a directory or an unwritable folder); the record."""
    inputs = [p for p in (fp_path, path, vs) if p is not None]   # (the manifests beside them are read too)
    inputs += [Path(p).parent / MANIFEST for p in inputs]
    out = check_output_file(json_path, inputs, "--json") if json_path else None
    record = compare(fp_path, path, vs, features, boot, device)
    print("\n".join(report_lines(record)))
    if out is not None:
        write_json_atomic(out, record)
        print(f"wrote {out}")
    return record


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.bootstrap < 1 or args.fid_bootstrap < 0:
        raise FidelityError(f"--bootstrap must be >= 1 and --fid_bootstrap >= 0, got {args.bootstrap}, "
                            f"{args.fid_bootstrap}")
    paired_fidelity(args.fp_samples, args.samples, args.json, args.vs, args.features,
                    Bootstrap(args.bootstrap, args.fid_bootstrap, args.seed), args.device)


if __name__ == "__main__":
    run_cli(main)
