"""The evaluator: parity with the OpenAI evaluator's metric code (shared fixture), known answers, one-line errors on
bad batches, and evaluator.py end to end with the embedded Fashion classifier."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SHARED, load_script, require_shared, run_main
from evaluation import metrics as M
from evaluation.features import FeatureNetworkError, check_compatible, choose_network, compute_activations
from evaluation.npz_io import BatchError, check_pair, open_batch
from evaluation.statistics import FIDStatistics

FIXTURE = SHARED / "fixtures" / "evaluator_reference"
FASHION_REF = REPO / "models" / "eval" / "fashion_test_reference.npz"
SCRIPT = REPO / "evaluator.py"


# ---------------------------------------------------------------------------------------------------------------------
# (a) parity with the reference implementation (fixture: synthetic activations run through the original code)


@pytest.fixture(scope="module")
def reference_case():
    d = require_shared(FIXTURE)
    inputs = dict(np.load(d / "inputs.npz"))
    ref = {k: inputs[f"ref_{k}"] for k in ("pool", "spatial", "softmax")}
    sample = {k: inputs[f"sample_{k}"] for k in ("pool", "spatial", "softmax")}
    return ref, sample, inputs, dict(np.load(d / "diagnostics.npz")), json.loads((d / "expected.json").read_text())


def assert_rel(ours: float, ref: float, rel: float, name: str) -> None:
    assert abs(ours - ref) <= rel * abs(ref), f"{name}: {ours!r} vs reference {ref!r} (rel {abs(ours / ref - 1):.2e})"


@pytest.mark.slow  # two dense sqrtm of ~2048² (as the reference): 20-60 s on 2 cores
def test_parity_all_five_metrics(reference_case):
    ref, sample, _, _, expected = reference_case
    got = M.evaluate_features(ref, sample)
    assert list(got) == list(M.METRICS)
    for key in ("inception_score", "fid", "sfid"):
        assert_rel(got[key], expected[key], 1e-6, key)
    assert got["precision"] == expected["precision"] and got["recall"] == expected["recall"]


def test_parity_inception_score_is_bit_exact_including_ragged_splits(reference_case):
    _, sample, inputs, _, expected = reference_case
    # float32 arithmetic in the reference's order reproduces TF+numpy exactly (spec §9)
    assert M.inception_score(sample["softmax"]) == expected["inception_score"]
    assert M.inception_score(sample["softmax"], split_size=300) == expected["extras"]["inception_score_split_size_300"]
    assert M.inception_score(inputs["ref_softmax"]) == expected["extras"]["inception_score_of_ref_softmax"]
    assert M.inception_split_sizes(800, 300) == [300, 300, 200]


def test_parity_precision_recall_point_by_point(reference_case):
    ref, sample, _, diag, expected = reference_case
    ref_radii, sample_radii = M.manifold_radii(ref["pool"]), M.manifold_radii(sample["pool"])
    in_ref, in_sample = M.manifold_membership(ref["pool"], sample["pool"], ref_radii, sample_radii)
    np.testing.assert_array_equal(in_ref, diag["precision_status"])
    np.testing.assert_array_equal(in_sample, diag["recall_status"])
    assert in_ref.sum() == expected["diagnostics"]["precision_count"]
    assert in_sample.sum() == expected["diagnostics"]["recall_count"]
    # our float32 radii vs exact float64 ones: tight; vs the reference's float16 ones: within its noise (≈2-5)
    x = ref["pool"].astype(np.float64)
    norms = (x * x).sum(1)
    exact = np.sort(norms[:, None] + norms[None] - 2 * x @ x.T, axis=1)[:, 3]
    np.testing.assert_allclose(ref_radii, exact, rtol=1e-4)
    assert np.abs(ref_radii - diag["ref_radii"]).max() < 5
    assert np.abs(sample_radii - diag["sample_radii"]).max() < 5


def test_parity_statistics_means(reference_case):
    ref, sample, _, diag, _ = reference_case
    for feats, key in ((ref["pool"], "mu_pool_ref"), (sample["pool"], "mu_pool_sample"),
                       (ref["spatial"], "mu_spatial_ref"), (sample["spatial"], "mu_spatial_sample")):
        mu = M.fid_statistics({"pool": feats}, "pool").mu
        assert mu.dtype == np.float32 and np.array_equal(mu, diag[key]), key


# ---------------------------------------------------------------------------------------------------------------------
# (b) known answers


def test_inception_score_of_uniform_one_hot_is_k():
    k = 7
    one_hot = np.eye(k, dtype=np.float32)[np.arange(70) % k]       # exact zeros: 0·log 0 must count as 0
    assert M.inception_score(one_hot) == pytest.approx(k, rel=1e-6)
    same = np.tile(np.float32([0.5, 0.25, 0.25]), (40, 1))          # p(y|x) = p(y): no information, IS = 1
    assert M.inception_score(same) == pytest.approx(1.0, abs=1e-6)


def test_inception_score_splits_are_consecutive_and_equally_weighted():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 5)) * 3
    p = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)

    def one_split(q):
        q = q.astype(np.float64)
        return np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), axis=1)))

    expected = np.mean([one_split(p[:5]), one_split(p[5:10]), one_split(p[10:])])
    assert M.inception_score(p, split_size=5) == pytest.approx(expected, rel=1e-5)
    assert M.inception_score(p, split_size=100) == pytest.approx(one_split(p), rel=1e-5)


def test_frechet_distance_of_identical_statistics_is_zero():
    feats = np.random.default_rng(1).normal(size=(400, 16)).astype(np.float32)
    s = FIDStatistics.from_features(feats)
    assert s.frechet_distance(s) == pytest.approx(0.0, abs=1e-8)
    shifted = FIDStatistics.from_features(feats + 1)                 # same covariance, mean moved by 1 per dim
    assert s.frechet_distance(shifted) == pytest.approx(16.0, rel=1e-5)


def test_identical_sets_give_fid_zero_and_full_precision_recall():
    rng = np.random.default_rng(2)
    feats = {"pool": rng.normal(size=(200, 12)).astype(np.float32),
             "spatial": rng.normal(size=(200, 10)).astype(np.float32),
             "softmax": np.full((200, 4), 0.25, np.float32)}
    got = M.evaluate_features(feats, feats)
    assert got["fid"] == pytest.approx(0, abs=1e-8) and got["sfid"] == pytest.approx(0, abs=1e-8)
    assert got["precision"] == 1.0 and got["recall"] == 1.0
    assert got["inception_score"] == pytest.approx(1.0, abs=1e-6)


def test_precision_recall_hand_example():
    # reference: 0..4 on a line; k = 3 -> radius² of 0 and 4 is 9, of 1, 2 and 3 it is 4
    ref = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]], np.float32)
    # samples: 7 lies exactly on the ball of 4 (a tie counts as inside), 7.5 and -10 are outside every ball
    sample = np.array([[7.0], [7.5], [-10.0], [2.5]], np.float32)
    np.testing.assert_array_equal(M.manifold_radii(ref), [9, 4, 4, 4, 9])
    in_ref, in_sample = M.manifold_membership(ref, sample, M.manifold_radii(ref), M.manifold_radii(sample))
    np.testing.assert_array_equal(in_ref, [True, False, False, True])
    # sample radii²: 7 -> 289, 7.5 -> 306.25, -10 -> 306.25, 2.5 -> 156.25 (its 3rd NN is -10): every ref is covered
    assert in_sample.all()
    assert M.precision_recall(ref, sample) == (0.5, 1.0)
    far = ref + 100
    assert M.precision_recall(ref, far) == (0.0, 0.0)


def test_precision_recall_do_not_depend_on_block_sizes():
    rng = np.random.default_rng(3)
    ref, sample = rng.normal(size=(150, 8)), rng.normal(0.3, 1.1, size=(110, 8))
    one_block = M.precision_recall(ref, sample)
    assert M.precision_recall(ref, sample, row_batch_size=7, col_batch_size=13) == one_block
    np.testing.assert_array_equal(M.manifold_radii(ref, row_batch_size=9, col_batch_size=4), M.manifold_radii(ref))
    d = M.squared_distances(ref[:5], sample[:6])
    assert d.dtype == np.float32 and (d >= 0).all()
    np.testing.assert_allclose(d, ((ref[:5, None] - sample[None, :6]) ** 2).sum(-1), rtol=1e-5, atol=1e-5)


def test_stored_statistics_take_precedence_and_missing_inputs_are_named():
    rng = np.random.default_rng(4)
    feats = {"pool": rng.normal(size=(60, 6)).astype(np.float32), "spatial": rng.normal(size=(60, 5)),
             "softmax": np.full((60, 3), 1 / 3, np.float32)}
    pool, spatial = FIDStatistics.from_features(feats["pool"]), FIDStatistics.from_features(feats["spatial"])
    stats_only = {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu, "sigma_s": spatial.sigma}
    got = M.evaluate_features(stats_only, feats, metrics=("fid", "sfid"))
    assert got["fid"] == pytest.approx(0, abs=1e-8) and got["sfid"] == pytest.approx(0, abs=1e-8)
    with pytest.raises(ValueError, match="precision needs reference 'pool'"):
        M.evaluate_features(stats_only, feats)
    with pytest.raises(ValueError, match="incomplete"):
        M.evaluate_features({"mu": pool.mu, "sigma": pool.sigma}, feats, metrics=("fid",))
    with pytest.raises(ValueError, match="k=3 need more than 3 points"):
        M.manifold_radii(np.zeros((3, 2)))


# ---------------------------------------------------------------------------------------------------------------------
# (c) bad batches: one-line errors


def images(n=6, size=32, dtype=np.uint8, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels)).astype(dtype)


def save(path: Path, *args, **kwargs) -> Path:
    np.savez(path, *args, **kwargs)
    return path


@pytest.mark.parametrize("make, fragments", [
    (lambda p: save(p, labels=np.arange(4)), ["has no 'arr_0'", "labels"]),
    (lambda p: save(p, images().astype(np.float32) / 255), ["float images", "uint8"]),
    (lambda p: save(p, images(dtype=np.int16) * 2), ["outside 0..255"]),
    (lambda p: save(p, images(channels=1)), ["1 channels", "np.repeat"]),
    (lambda p: save(p, images().transpose(0, 3, 1, 2)), ["looks like NCHW"]),
    (lambda p: save(p, images(n=3)), ["3 images", "at least 4"]),
    (lambda p: save(p, images()[..., 0]), ["expected images [N, H, W, 3]"]),
    (lambda p: save(p, images(), mu=np.zeros(3)), ["incomplete", "sigma"]),
    (lambda p: save(p, images(), mu=np.zeros(3), sigma=np.eye(2), mu_s=np.zeros(2), sigma_s=np.eye(2)),
     ["not a mean [D] and a covariance"]),
    (lambda p: p.write_bytes(b"definitely not a zip file") and p, ["not a readable .npz"]),
])
def test_bad_batch_is_one_clear_line(tmp_path, make, fragments):
    path = make(tmp_path / "batch.npz")
    with pytest.raises(BatchError) as e:
        open_batch(path, "sample")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for f in fragments:
        assert f in msg, msg


def test_accepted_batches_and_truncated_data(tmp_path):
    wide = open_batch(save(tmp_path / "wide.npz", images(dtype=np.int64), np.arange(6)), "sample")
    assert wide.read_images().dtype == np.uint8 and wide.stats is None
    np.testing.assert_array_equal(wide.read_images(), images())
    compressed = tmp_path / "c.npz"
    np.savez_compressed(compressed, images(n=10))
    chunks = list(open_batch(compressed, "sample").iter_images(4))
    assert [len(c) for c in chunks] == [4, 4, 2] and np.array_equal(np.concatenate(chunks), images(n=10))
    # a whole file cut short loses its zip directory: refused on open
    good = save(tmp_path / "good.npz", images(n=50))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:20000])
    with pytest.raises(BatchError, match="not a readable .npz"):
        open_batch(cut, "reference")
    # a member whose data ends early: found by the verification pass, or while streaming without it
    short = truncated_member_npz(tmp_path / "short.npz")
    with pytest.raises(BatchError, match=r"is corrupt: arr_0 could not be read \(arr_0 ends after 1 of 6 images"):
        open_batch(short, "sample")
    batch = open_batch(short, "sample", verify=False)
    with pytest.raises(BatchError, match=r"is corrupt: arr_0 could not be read \(arr_0 ends after 1 of 6 images"):
        batch.read_images()
    # flipped bytes inside a compressed member: zlib or the CRC check refuses them before any compute
    flipped = bytearray(compressed.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    with pytest.raises(BatchError, match="corrupt"):
        open_batch(tmp_path / "flipped.npz", "sample")


def truncated_member_npz(path: Path) -> Path:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, images())
    data = buf.getvalue()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", data[:len(data) - 4 * 32 * 32 * 3 - 10])
    return path


def test_mismatched_sizes_and_networks(tmp_path):
    ref = open_batch(save(tmp_path / "r.npz", images(size=32)), "reference")
    sample = open_batch(save(tmp_path / "s.npz", images(size=64)), "sample")
    with pytest.raises(BatchError, match="image sizes differ: reference .* 32×32, samples .* 64×64"):
        check_pair(ref, sample)

    class Stub:
        name, pool_dim, spatial_dim = "fashion-classifier sha256:abc", 4, 3

        @staticmethod
        def check_image_size(h, w):
            if (h, w) != (32, 32):
                raise FeatureNetworkError(f"takes 32×32, got {h}×{w}")

    stats = {"mu": np.zeros(4), "sigma": np.eye(4), "mu_s": np.zeros(3), "sigma_s": np.eye(3)}
    declared = open_batch(save(tmp_path / "d.npz", images(), **stats, feature_network=np.array("other sha256:1")),
                          "reference")
    with pytest.raises(FeatureNetworkError, match="stores statistics of 'other sha256:1'"):
        check_compatible(declared, Stub())
    wrong_dims = open_batch(save(tmp_path / "w.npz", images(), **{**stats, "mu_s": np.zeros(2),
                                                                  "sigma_s": np.eye(2)}), "reference")
    with pytest.raises(FeatureNetworkError, match="2-d spatial statistics"):
        check_compatible(wrong_dims, Stub())
    with pytest.raises(FeatureNetworkError, match="sample batch .* takes 32×32, got 64×64"):
        check_compatible(sample, Stub())
    check_compatible(open_batch(save(tmp_path / "ok.npz", images(), **stats), "reference"), Stub())
    # auto: Fashion only when the reference names the Fashion classifier
    fashion = open_batch(save(tmp_path / "f.npz", images(), feature_network=np.array("fashion-classifier sha256:1")),
                         "reference")
    assert choose_network("auto", fashion) == "fashion" and choose_network("auto", ref) == "inception"
    assert choose_network("inception", fashion) == "inception"


def run_script(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture
def run_inproc(capsys):
    """evaluator.main in this process (no interpreter start-up); same exit code and streams as the script."""
    module = load_script(SCRIPT, "evaluator_cli")
    return lambda *args: run_main(module.main, args, capsys)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_cli_missing_arr_0_and_float_images_exit_2_without_json(tmp_path):
    ref = save(tmp_path / "ref.npz", images())
    out = tmp_path / "result.json"
    no_images = save(tmp_path / "labels_only.npz", labels=np.arange(5))
    assert_one_line_error(run_script(ref, no_images, "--json", out), "has no 'arr_0'", str(no_images))
    floats = save(tmp_path / "floats.npz", images().astype(np.float32) / 127.5 - 1)
    assert_one_line_error(run_script(ref, floats, "--json", out), "float images")
    assert not out.exists() and not list(tmp_path.glob(".result.json*"))


def test_cli_other_bad_inputs(tmp_path, run_inproc):
    ref = save(tmp_path / "ref.npz", images())
    out = tmp_path / "result.json"
    cases = [
        ((ref, save(tmp_path / "big.npz", images(size=64)), "--features", "fashion"), ["image sizes differ"]),
        ((ref, tmp_path / "missing.npz"), ["sample batch", "not found"]),
        ((ref, truncated_member_npz(tmp_path / "short.npz"), "--features", "fashion"), ["is corrupt"]),
        ((save(tmp_path / "r64.npz", images(size=64)), save(tmp_path / "s64.npz", images(size=64)),
          "--features", "fashion"), ["takes 28×28 or 32×32 images, got 64×64"]),
        ((ref, ref, "--features", "inception", "--inception_graph", tmp_path / "none.pb"),
         ["Inception graph", "not found", "classify_image_graph_def.pb", "openaipublic.blob.core.windows.net"]),
        ((ref, ref, "--batch_size", 0), ["--batch_size must be >= 1"]),
        ((ref, ref, "--json", tmp_path), ["is a directory"]),
        ((ref, ref, "--json", ref / "x.json"), ["a file is in the way", "pass another --json path"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(run_inproc(*args, "--json", out) if "--json" not in map(str, args)
                              else run_inproc(*args), *fragments)
        assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed here")
def test_cli_inception_without_tensorflow_says_how_to_install(tmp_path, run_inproc):
    ref = save(tmp_path / "ref.npz", images())
    graph = tmp_path / "classify_image_graph_def.pb"
    graph.write_bytes(b"\x00" * 16)
    assert_one_line_error(run_inproc(ref, ref, "--inception_graph", graph), "needs TensorFlow",
                          "pip install tensorflow-cpu", "--features fashion")


# ---------------------------------------------------------------------------------------------------------------------
# (d) end to end with the Fashion classifier


@pytest.fixture(scope="module")
def fashion_images():
    if not FASHION_REF.is_file():
        pytest.skip(f"{FASHION_REF} not found (committed with the embedded default)")
    ref = np.load(FASHION_REF)
    return ref["arr_0"], {k: ref[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "feature_network")}


def parse_metric_lines(stdout: str) -> dict[str, float]:
    labels = dict((label, key) for key, label in
                  (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
                   ("precision", "Precision"), ("recall", "Recall")))
    found = {}
    for line in stdout.splitlines():
        label, _, value = line.partition(": ")
        if label in labels:
            found[labels[label]] = float(value)
    return found


def test_end_to_end_fashion(fashion_images, tmp_path):
    from evaluation.features import FashionFeatures
    arr, _ = fashion_images
    ref_path = save(tmp_path / "ref.npz", arr[:150])
    sample_path = save(tmp_path / "sample.npz", arr[5000:5120], np.zeros(120, np.int64))
    out = tmp_path / "out" / "result.json"
    proc = run_script(ref_path, sample_path, "--features", "fashion", "--json", out, "--batch_size", 50,
                      "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if ": " in line]
    assert [line.split(": ")[0] for line in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    record = json.loads(out.read_text())
    accuracy = record["metrics"].pop("classifier_accuracy")  # stderr only: not an OpenAI-evaluator line
    assert parse_metric_lines(proc.stdout) == record["metrics"]      # printed with the full repr
    assert record["n_samples"] == 120 and record["n_reference"] == 150 and record["features"] == "fashion"
    assert record["reference"]["sha256"] == hashlib.sha256(ref_path.read_bytes()).hexdigest()
    assert record["settings"]["inception_score_splits"] == [120]
    assert "120 samples < the IS split size 5000" in proc.stderr

    # the CLI equals the library on the same features (features → statistics → metrics)
    network = FashionFeatures()
    assert record["feature_network"] == network.name
    sample_acts = compute_activations(network, open_batch(sample_path, "sample"), 50)
    expected = M.evaluate_features(compute_activations(network, open_batch(ref_path, "reference"), 50), sample_acts)
    assert record["metrics"] == expected
    assert accuracy == float(np.mean(sample_acts["softmax"].argmax(1) == 0))
    assert 1 < expected["inception_score"] < 10 and 0 < expected["precision"] <= 1 and 0 < expected["recall"] <= 1


def test_end_to_end_stored_statistics_pick_the_fashion_network(fashion_images, tmp_path, run_inproc):
    arr, stored = fashion_images
    ref_path = save(tmp_path / "ref.npz", arr[:100], **stored)       # 10k-image statistics + 100 images for P/R
    real = save(tmp_path / "real.npz", arr[6000:6100])
    noise = save(tmp_path / "noise.npz", images(n=100, seed=5))
    out = tmp_path / "r.json"
    first = run_inproc(ref_path, real, "--json", out)                  # --features auto -> fashion (declared)
    assert first.returncode == 0, first.stderr
    record = json.loads(out.read_text())
    assert record["features"] == "fashion" and record["reference"]["statistics"] == "stored"
    second = run_inproc(ref_path, noise)
    assert second.returncode == 0, second.stderr
    good, bad = record["metrics"], parse_metric_lines(second.stdout)
    assert bad["fid"] > 10 * good["fid"] and bad["precision"] < good["precision"]


# ---------------------------------------------------------------------------------------------------------------------
# the TensorFlow path, where TensorFlow is installed (pip install tensorflow-cpu): a stand-in graph with the tensor
# names and shapes of classify_image_graph_def.pb (the real one is a 95 MB download)


def synthetic_inception_graph(tf, path: Path) -> Path:
    """DecodeJpeg output [H, W, 3] -> ExpandDims -> ResizeBilinear 299² -> (x − 128)/128 -> a 1×1-conv stand-in
    network with mixed_6/conv [B, 17, 17, 192], pool_3 [B, 1, 1, 2048] and softmax/logits/MatMul (+ bias)."""
    rng = np.random.default_rng(7)
    graph = tf.Graph()
    with graph.as_default():
        decoded = tf.compat.v1.placeholder(tf.float32, [None, None, 3], name="DecodeJpeg")
        x = tf.expand_dims(decoded, 0, name="ExpandDims")
        x = tf.compat.v1.image.resize_bilinear(x, [299, 299], align_corners=False, name="ResizeBilinear")
        x = tf.multiply(tf.subtract(x, 128.0, name="Sub"), 1 / 128, name="Mul")
        x = tf.nn.avg_pool2d(x, ksize=19, strides=17, padding="VALID")                       # [B, 17, 17, 3]
        w6 = tf.constant(rng.normal(size=(1, 1, 3, 192)).astype(np.float32))
        mixed_6 = tf.nn.relu(tf.nn.conv2d(x, w6, 1, "VALID"), name="mixed_6/conv")
        w7 = tf.constant((rng.normal(size=(1, 1, 192, 2048)) / 14).astype(np.float32))
        pool = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(mixed_6, w7, 1, "VALID")), axis=[1, 2], keepdims=True,
                              name="pool_3")
        flat = tf.reshape(pool, [-1, 2048], name="pool_3/_reshape")
        weights = tf.constant((rng.normal(size=(2048, 1008)) / 10).astype(np.float32), name="softmax/weights")
        logits = tf.matmul(flat, weights, name="softmax/logits/MatMul")
        biases = tf.constant(rng.normal(size=1008).astype(np.float32), name="softmax/biases")
        tf.nn.softmax(tf.add(logits, biases, name="softmax/logits"), name="softmax")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return path


def test_inception_features_on_a_synthetic_graph(tmp_path):
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is optional: pip install tensorflow-cpu")
    from evaluation.features import InceptionFeatures
    graph_path = synthetic_inception_graph(tf, tmp_path / "classify_image_graph_def.pb")
    batch = open_batch(save(tmp_path / "s.npz", images(n=5, size=40, seed=3)), "sample")
    network = InceptionFeatures(graph_path, device="cpu")
    got = compute_activations(network, batch, batch_size=2)
    assert network.name.endswith(hashlib.sha256(graph_path.read_bytes()).hexdigest())
    assert got["pool"].shape == (5, 2048) and got["spatial"].shape == (5, 2023) and got["softmax"].shape == (5, 1008)

    # the graph run image by image through its own input (what the JPEG decoder would feed)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph_path.read_bytes())
    with tf.Graph().as_default() as g:
        tf.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            for i, image in enumerate(batch.read_images()):
                pool, mixed_6, logits = sess.run(["pool_3:0", "mixed_6/conv:0", "softmax/logits/MatMul:0"],
                                                 {"DecodeJpeg:0": image.astype(np.float32)})
                np.testing.assert_allclose(got["pool"][i], pool.reshape(-1), rtol=1e-5, atol=1e-6)
                # first 7 channels, NHWC order: index (h·17 + w)·7 + c
                np.testing.assert_allclose(got["spatial"][i], mixed_6[0, :, :, :7].reshape(-1), rtol=1e-5, atol=1e-6)
                unbiased = np.exp(logits[0] - logits[0].max())                 # softmax(pool @ W), no bias
                np.testing.assert_allclose(got["softmax"][i], unbiased / unbiased.sum(), rtol=1e-4, atol=1e-7)


def test_reference_activation_cache_gives_the_same_record(fashion_images, tmp_path, run_inproc):
    arr, _ = fashion_images
    ref_path = save(tmp_path / "ref.npz", arr[:100])
    sample_path = save(tmp_path / "sample.npz", arr[5000:5080])
    args = (ref_path, sample_path, "--features", "fashion", "--device", "cpu")
    plain = run_inproc(*args, "--json", tmp_path / "a.json")
    cache = tmp_path / "cache"
    first = run_inproc(*args, "--json", tmp_path / "b.json", "--cache_dir", cache)
    second = run_inproc(*args, "--json", tmp_path / "c.json", "--cache_dir", cache)
    assert plain.returncode == first.returncode == second.returncode == 0
    assert len(list(cache.glob("activations_*.npz"))) == 1
    metrics = [json.loads((tmp_path / f"{k}.json").read_text())["metrics"] for k in "abc"]
    assert metrics[0] == metrics[1] == metrics[2]


def test_degenerate_batches_and_wrong_labels_are_flagged(fashion_images, tmp_path, run_inproc):
    """All-black images (what NaN samples become) and an arr_1 of the wrong length: the metrics are still printed, but
    each problem is one warning line and listed under "warnings" in the JSON."""
    arr, _ = fashion_images
    ref_path = save(tmp_path / "ref.npz", arr[:100])
    broken = arr[5000:5080].copy()
    broken[:30] = 0                                                     # 30 black samples
    sample_path = save(tmp_path / "s.npz", broken, np.zeros(79, np.int64))   # one label short
    out = tmp_path / "r.json"
    proc = run_inproc(ref_path, sample_path, "--json", out, "--features", "fashion")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2
    assert "30 of 80 images of the sample batch" in warnings[0] and "(30 all black" in warnings[0]
    assert "holds 79 int64 values for 80 samples" in warnings[1]
    record = json.loads(out.read_text())
    assert [f"warning: {w}" for w in record["warnings"]] == warnings
    assert "classifier_accuracy" not in record["metrics"]
    clean = run_inproc(ref_path, save(tmp_path / "ok.npz", arr[5000:5080]), "--json", out, "--features", "fashion")
    assert clean.returncode == 0 and "warning" not in clean.stderr and json.loads(out.read_text())["warnings"] == []
