"""Paired fidelity to FP (evaluation.fidelity): known answers for PSNR and SSIM, bootstrap intervals that cover a
planted difference, plan and label checks, and the CLI end to end with --vs on the embedded classifier."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import run_main, error_line
from evaluation import fidelity as F


def gray_batch(n: int, seed: int, size: int = 32) -> np.ndarray:
    g = np.random.default_rng(seed).integers(40, 216, size=(n, size, size, 1))
    return np.repeat(g, 3, axis=3).astype(np.uint8)


def test_psnr_known_answers():
    a = gray_batch(4, 0)
    same = F.psnr(a, a)
    assert np.all(same == F.psnr_ceiling((32, 32, 3))) and F.psnr_ceiling((32, 32, 3)) == pytest.approx(
        10 * math.log10(255 ** 2 * 32 * 32 * 3))
    shifted = F.psnr(a, a + np.uint8(3))                 # every value off by 3: MSE 9
    np.testing.assert_allclose(shifted, 20 * math.log10(255 / 3), rtol=0, atol=1e-12)
    one = a.copy()
    one[0, 0, 0, 0] += 1                                  # one value off by one: exactly the ceiling
    assert F.psnr(a[:1], one[:1])[0] == pytest.approx(F.psnr_ceiling((32, 32, 3)), abs=1e-12)


def ssim_by_loops(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """SSIM written out window by window (population moments under the normalised weights), for one image."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = w.shape[0]
    per_channel = []
    for ch in range(x.shape[2]):
        a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
        vals = []
        for i in range(a.shape[0] - k + 1):
            for j in range(a.shape[1] - k + 1):
                pa, pb = a[i:i + k, j:j + k], b[i:i + k, j:j + k]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_is_one_on_identical_images_and_matches_a_loop_implementation():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(2, 14, 15, 2)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-30, 31, size=x.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(F.ssim(x, x), 1.0, rtol=0, atol=1e-12)
    w = F.gaussian_window()
    assert w.shape == (11, 11) and w.sum() == pytest.approx(1.0) and w[5, 5] == w.max()
    ours = F.ssim(x, y)
    for i in range(2):
        assert abs(ours[i] - ssim_by_loops(x[i], y[i], w)) < 1e-6
    assert 0 < ours.max() < 1
    with pytest.raises(ValueError, match="smaller than"):
        F.ssim(x[:, :8, :8], y[:, :8, :8])


def test_bootstrap_interval_covers_a_planted_difference():
    boot = F.Bootstrap(resamples=2000, seed=3)
    planted = np.random.default_rng(0).normal(0.3, 1.0, size=400)
    d = boot.mean(planted)
    assert d["ci"][0] < 0.3 < d["ci"][1] and d["ci"][0] > 0          # covers the truth, excludes 0
    null = boot.mean(np.random.default_rng(1).normal(0.0, 1.0, size=400))
    assert null["ci"][0] < 0 < null["ci"][1]
    assert boot.mean(planted) == d                                    # seeded: the same draws every time


def test_paired_difference_names_the_closer_side():
    rng = np.random.default_rng(0)
    a = {"psnr": rng.normal(31, 1, 200), "ssim": rng.normal(0.95, 0.01, 200),
         "feature_distance": rng.normal(1, .1, 200)}
    b = {"psnr": a["psnr"] - 0.5, "ssim": a["ssim"].copy(), "feature_distance": a["feature_distance"] + 0.2}
    pool = rng.normal(size=(200, 4))
    d = F.paired_difference(a, b, pool, pool + 0.01, pool + 0.5, F.Bootstrap(500, 50))
    assert d["psnr"]["excludes_zero"] and d["psnr"]["closer_to_fp"] == "samples"
    assert d["feature_distance"]["closer_to_fp"] == "samples" and d["fid_to_fp"]["closer_to_fp"] == "samples"
    assert not d["ssim"]["excludes_zero"] and d["ssim"]["closer_to_fp"] is None


def write_samples(directory, images, labels=None, manifest=None):
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    np.savez(directory / "samples.npz", **arrays)
    if manifest is not None:
        (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory / "samples.npz"


PLAN = {"format": "x", "model": "m.yaml", "ckpt": "abc", "steps": 20, "eta": 0.0, "scale": 3.0, "n": 64, "seed": 0,
        "batch_size": 16, "classes": 4, "labels": "class = global index mod classes", "device": "cpu", "ema": False}


def test_plans_and_labels_are_checked(tmp_path, capsys):
    fp_img = gray_batch(64, 0)
    labels = np.arange(64) % 4
    fp = write_samples(tmp_path / "fp", fp_img, labels, {**PLAN, "sampler": "fp32", "bits": "fp32"})
    other = write_samples(tmp_path / "q", fp_img, labels, {**PLAN, "seed": 1, "sampler": "none", "bits": "w4a8"})
    line = error_line(run_main(F.main, [fp, other], capsys))
    assert "different plans: seed=0 vs 1" in line
    bad = write_samples(tmp_path / "lab", fp_img, (labels + 1) % 4)           # no manifest: labels still checked
    line = error_line(run_main(F.main, [fp, bad], capsys))
    assert "labels (arr_1)" in line and "first at sample 0" in line
    fewer = write_samples(tmp_path / "few", fp_img[:32])
    assert "compare samples made from the same plan" in error_line(run_main(F.main, [fp, fewer], capsys))


def test_cli_never_writes_over_its_inputs_and_wants_the_fp_set_first(tmp_path, capsys):
    """Issue 32: `--json q.npz` replaced the samples with JSON, and swapped arguments measured "FID to FP" against
    the quantized set; both are refused with one line before any work."""
    fp_img = gray_batch(64, 0)
    labels = np.arange(64) % 4
    fp = write_samples(tmp_path / "fp", fp_img, labels, {**PLAN, "sampler": "fp32", "bits": "fp32"})
    q = write_samples(tmp_path / "q", fp_img, labels, {**PLAN, "sampler": "none", "bits": "w4a8"})
    before = q.read_bytes()
    line = error_line(run_main(F.main, [fp, q, "--json", q], capsys))
    assert "--json" in line and "is also an input" in line and q.read_bytes() == before
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "cannot be written" in error_line(run_main(F.main, [fp, q, "--json", blocker / "f.json"], capsys))
    assert "is a directory" in error_line(run_main(F.main, [fp, q, "--json", tmp_path], capsys))
    line = error_line(run_main(F.main, [q, fp], capsys))
    assert "not the exact FP32 samples" in line and "swapped" in line
    bf16 = write_samples(tmp_path / "bf16", fp_img, labels, {**PLAN, "sampler": "fp32", "bits": "fp32",
                                                             "precision": "bf16"})
    assert "fp32 sampler's set in bf16" in error_line(run_main(F.main, [bf16, fp], capsys))


def test_cli_end_to_end_with_vs(tmp_path, capsys):
    rng = np.random.default_rng(5)
    fp_img = gray_batch(64, 0)
    near = np.clip(fp_img.astype(int) + rng.integers(-2, 3, size=fp_img.shape[:3] + (1,)), 0, 255)
    far = np.clip(fp_img.astype(int) + rng.integers(-12, 13, size=fp_img.shape[:3] + (1,)), 0, 255)
    paths = [write_samples(tmp_path / n, np.repeat(x[..., :1], 3, axis=3).astype(np.uint8) if x.shape[-1] == 1
                           else x.astype(np.uint8)) for n, x in (("fp", fp_img), ("near", near), ("far", far))]
    out = tmp_path / "fid.json"
    proc = run_main(F.main, [*paths[:2], "--vs", paths[2], "--json", out, "--bootstrap", "300",
                             "--fid_bootstrap", "20"], capsys)
    assert proc.returncode == 0, proc.stderr
    assert "no manifest.json beside" in proc.stderr and "Δ PSNR (dB)" in proc.stdout
    rec = json.loads(out.read_text())
    assert rec["n"] == 64 and rec["feature_network"].startswith("fashion-classifier")
    assert len(rec["per_sample"]["psnr"]) == 64 and set(rec["metrics"]) == {"psnr", "ssim", "feature_distance",
                                                                          "fid_to_fp"}
    diff = rec["vs"]["difference"]
    assert diff["psnr"]["excludes_zero"] and diff["psnr"]["closer_to_fp"] == "samples"
    assert diff["ssim"]["closer_to_fp"] == "samples"
    m = rec["metrics"]["psnr"]
    assert m["ci"][0] <= m["mean"] <= m["ci"][1] and m["mean"] > rec["vs"]["metrics"]["psnr"]["mean"]
    np.testing.assert_allclose(np.mean(rec["per_sample"]["psnr"]), m["mean"])


def test_report_ranks_methods_and_states_the_verdict():
    """Synthetic per-sample records: one correction planted 1 dB closer to FP, one identical to the uncorrected."""
    from evaluation.report import fidelity_lines
    rng = np.random.default_rng(0)

    def record(shift):
        n = 300
        base = rng.normal(0, 1, n)
        return {"n": n, "per_sample": {"psnr": (30 + shift + 0.1 * base).tolist(),
                                       "ssim": (0.95 + 0.001 * base).tolist(),
                                       "feature_distance": (0.5 - 0.01 * shift + 0.01 * base).tolist()},
                "metrics": {"fid_to_fp": {"mean": 0.2 - 0.01 * shift}}}

    rng_state = rng.bit_generator.state
    none = [record(0.0)]
    rng.bit_generator.state = rng_state
    same = [record(0.0)]          # the same draws: identical to the uncorrected
    better = [record(1.0)]
    lines, data = fidelity_lines({"W4A8": [("uncorrected", "none", none), ("same", "ptqd", same),
                                           ("better", "dd2-channel", better)]}, F.Bootstrap(500))
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert table[0].startswith("| better |")                               # ranked by PSNR
    assert data["W4A8"]["better"]["vs_uncorrected"]["psnr"]["verdict"] == "closer"
    assert data["W4A8"]["same"]["vs_uncorrected"]["psnr"]["verdict"] == "inside the noise"
    sentence = lines[-1]
    assert "better (PSNR, feature distance)" in sentence and "inside the noise on every metric: same" in sentence


def test_fast_fid_equals_the_evaluators_fid():
    """The bootstrap's eigenvalue form of the Fréchet distance agrees with the sqrtm form the evaluator uses."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 24))
    b = a @ rng.normal(0, 0.3, size=(24, 24)) + rng.normal(0.2, 1, size=(400, 24))
    ref = F.fid(a, b)
    assert ref > 1 and abs(F.fid_by_eigenvalues(a, b) - ref) < 1e-6 * ref
    assert abs(F.fid_by_eigenvalues(a, a)) < 1e-8


def paired_gaussian_features(rng, n: int, d: int, mu: float, sigma: float) -> tuple[np.ndarray, np.ndarray, float]:
    """FP features x ~ N(0, I_d) and 'quantized' ones y = x + e, e ~ N(mu, sigma² I): y ~ N(mu, (1 + sigma²) I), so
    the population FID to FP is known: d·mu² + d·(√(1 + sigma²) − 1)²."""
    x = rng.normal(size=(n, d))
    return x, x + rng.normal(mu, sigma, size=(n, d)), d * mu ** 2 + d * (math.sqrt(1 + sigma ** 2) - 1) ** 2


def test_fid_interval_contains_its_estimate_where_the_percentile_one_misses():
    """A planted biased statistic: FID to FP of features a small error away. Every draw with replacement lies above
    the full-sample FID (duplicates shrink the effective sample), so the percentile interval misses its own
    estimate; the basic interval contains the bias-corrected estimate and the true value, and says that the plain
    FID lies outside by its bias."""
    x, y, truth = paired_gaussian_features(np.random.default_rng(0), 400, 16, 0.0, 0.1)
    boot = F.Bootstrap(fid_resamples=100)
    plain = F.fid(x, y)
    draws = np.array([F.fid_by_eigenvalues(x[i], y[i]) for i in boot.indices(len(x), boot.fid_resamples)])
    percentile = np.percentile(draws, [2.5, 97.5])
    assert plain < percentile[0] and (draws > plain).all()                     # the issue: 0.001 [0.002, 0.003]
    d = F.fid_entry(x, y, boot)
    assert d["mean"] == plain and d["contains_estimate"] and d["ci"][0] <= d["estimate"] <= d["ci"][1]
    assert d["ci"][0] <= truth <= d["ci"][1] and d["bias"] > 0 and not d["plain_in_ci"]
    assert d["estimate"] == pytest.approx(max(2 * F.fid_by_eigenvalues(x, y) - draws.mean(), 0.0))
    assert "bias-corrected" in F._fmt(d, "{:.4f}") and "outside" in F._fmt(d, "{:.4f}")
    # a paired difference of two such FIDs: the same draws, the interval around its estimate
    y2 = x + np.random.default_rng(1).normal(0.0, 0.3, size=x.shape)
    per = {k: np.zeros(len(x)) for k in F.PER_SAMPLE}
    diff = F.paired_difference(per, per, x, y, y2, boot)["fid_to_fp"]
    assert diff["contains_estimate"] and diff["excludes_zero"] and diff["closer_to_fp"] == "samples"


def test_check_interval_says_why_not():
    assert F.check_interval({"mean": 1.0, "ci": [0.5, 1.5]})["contains_estimate"]
    d = F.check_interval({"mean": 1.0, "ci": [1.5, 2.0]})
    assert not d["contains_estimate"] and "skewed" in d["why_not"] and "misses its estimate" in F._fmt(d, "{:.2f}")
    assert F.check_interval({"mean": 1.0, "ci": None}) == {"mean": 1.0, "ci": None}
    from evaluation.report import interval_cell, misses_note
    assert interval_cell(d, ".2f") == "1.00 [1.50, 2.00]†"
    assert "does not contain" in misses_note(["| x | 1 [2, 3]† |"])[1]
    assert interval_cell({"mean": 1.0, "ci": [0.5, 1.5], "contains_estimate": True}, ".2f") == "1.00 [0.50, 1.50]"
    assert misses_note(["| x | 1.00 [0.50, 1.50] |"]) == []


def test_intervals_cover_near_their_nominal_level():
    """200 repetitions of known-distribution cases: the percentile interval of a mean (skewed per-sample values,
    like PSNR) and the basic interval of FID to FP cover the true value near 95 %; the percentile interval of FID to
    FP, what the tool printed before, does not."""
    rng = np.random.default_rng(0)
    reps, boot = 200, F.Bootstrap(resamples=500, fid_resamples=100)
    mean_hits = 0
    for _ in range(reps):
        lo, hi = boot.mean(rng.exponential(1.0, 150))["ci"]                 # true mean 1
        mean_hits += lo <= 1.0 <= hi
    fid_hits = percentile_hits = 0
    for r in range(reps):
        x, y, truth = paired_gaussian_features(rng, 150, 4, 0.05, 0.3)
        b = F.Bootstrap(fid_resamples=100, seed=r)
        d = b.statistic(lambda i: F.fid_by_eigenvalues(x[i], y[i]), len(x))   # unclipped: truth > 0 either way
        lo, hi = d["ci"]
        assert lo <= d["estimate"] <= hi
        fid_hits += lo <= truth <= hi
        percentile_hits += 2 * d["plain"] - hi <= truth <= 2 * d["plain"] - lo   # the same draws, mirrored
    print(f"coverage of 95 % intervals over {reps} repetitions: mean (percentile) {mean_hits / reps:.3f}, "
          f"FID to FP basic {fid_hits / reps:.3f}, FID to FP percentile {percentile_hits / reps:.3f}")
    assert 0.90 <= mean_hits / reps <= 0.99
    assert 0.89 <= fid_hits / reps <= 0.99 and percentile_hits / reps < 0.8
