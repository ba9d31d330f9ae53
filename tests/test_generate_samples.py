"""Step 7, quant_scripts/generate_evaluation_samples_dist.py and evaluation/generation.py: torchrun and a single
process give the same file, class balance, resume after a kill or a lost shard, the pixel conversion, samplers
plugged in through pipeline.sampling, and one-line errors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm.models.diffusion.settings import SamplingSettings

from conftest import REPO, error_line, load_script, run_main
from evaluation import generation as G
from pipeline.layout import RunLayout
from pipeline.steps import evaluation_samples as step

SCRIPT = REPO / "quant_scripts" / "generate_evaluation_samples_dist.py"
N, BATCH, STEPS, SEED = 8, 2, 4, 3          # tiny model: 4 real classes (+ null class 4), 32×32 images
CLASSES = 4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT, "generate_evaluation_samples_dist")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return tiny_checkpoints


def flags(tiny, outdir, *extra, kind="cond"):
    cfg, ckpt = tiny[kind]
    return ["--config", cfg, "--ckpt", ckpt, "--n_samples", N, "--batch_size", BATCH, "--steps", STEPS,
            "--seed", SEED, "--device", "cpu", "--outdir", outdir, *extra]


def sample_dir(outdir, sampler="fp32", tag="fp32", n=N, seed=SEED) -> Path:
    return RunLayout(Path(outdir), "custom", STEPS, 0.0, 3.0).eval_samples(tag, sampler, n, seed)


def run_inproc(script, capsys, args):
    """main() in this process via run_cli: (exit code, stdout, stderr) as a subprocess would give them."""
    proc = run_main(script.main, args, capsys)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(code, err, *fragments):
    line = error_line(subprocess.CompletedProcess([], code, "", err))
    for f in fragments:
        assert f in line, line


@pytest.fixture(scope="module")
def reference(script, tiny, tmp_path_factory):
    """One uninterrupted single-process run: the file every other way of making it must equal."""
    outdir = tmp_path_factory.mktemp("ref")
    from pipeline.cli import run_cli
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cli(lambda: script.main([str(a) for a in flags(tiny, outdir)]))
    finally:
        torch.set_num_threads(threads)
    d = sample_dir(outdir)
    return {"outdir": outdir, "dir": d, "bytes": (d / G.SAMPLES).read_bytes()}


def pairs(s):
    """The set of (label, image) pairs of a samples file, order-free."""
    return sorted((int(lab), img.tobytes()) for lab, img in zip(s["arr_1"], s["arr_0"], strict=True))


def load_samples(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# ---- the plan -----------------------------------------------------------------------------------------------------

def test_plan_labels_batches_and_seeds():
    plan = G.Plan(12, 5, 7, 4)
    assert plan.num_batches == 3
    np.testing.assert_array_equal(plan.labels, np.arange(12) % 4)
    np.testing.assert_array_equal(np.bincount(plan.labels), [3, 3, 3, 3])
    last = plan.batch(2)
    np.testing.assert_array_equal(last.indices, [10, 11])
    np.testing.assert_array_equal(last.labels, [2, 3])
    # seeds: a function of (base seed, batch index) only, distinct per batch and per stream
    seeds = [plan.batch(b).seed for b in range(3)] + [plan.batch(b).correction_seed for b in range(3)]
    assert len(set(seeds)) == 6 and all(0 <= s < 2 ** 63 for s in seeds)
    assert G.Plan(12, 5, 7, 4).batch(1).seed == plan.batch(1).seed != G.Plan(12, 5, 8, 4).batch(1).seed
    # the ranks' shares of the pending batches: disjoint, and together all of them
    pending = [0, 2, 3, 5, 8, 9, 11]
    shares = [G.assign(pending, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == pending and shares[0] == [0, 5, 11]


def test_plan_over_a_class_subset():
    plan = G.Plan(6, 4, 0, 3, (7, 2, 5))
    np.testing.assert_array_equal(plan.labels, [7, 2, 5, 7, 2, 5])
    np.testing.assert_array_equal(plan.batch(1).labels, [2, 5])
    # the same seeds as the full plan: only the labels differ
    assert plan.batch(1).seed == G.Plan(6, 4, 0, 3).batch(1).seed
    with pytest.raises(ValueError, match="class_ids holds 2 ids but num_classes is 3"):
        G.Plan(6, 4, 0, 3, (1, 2))


def test_unbalanced_n_is_refused():
    with pytest.raises(G.GenerationError, match="multiple of 10 .e.g. 1000 or 1010."):
        G.Plan(1001, 250, 0, 10)
    assert G.Plan(7, 2, 0, None).labels is None   # unconditional: any N


# ---- single process vs torchrun -----------------------------------------------------------------------------------

def test_single_process_output(reference):
    s = load_samples(reference["dir"] / G.SAMPLES)
    assert sorted(s) == ["arr_0", "arr_1"]
    assert s["arr_0"].dtype == np.uint8 and s["arr_0"].shape == (N, 32, 32, 3)
    assert s["arr_1"].dtype == np.int64
    np.testing.assert_array_equal(s["arr_1"], np.arange(N) % CLASSES)        # labels by global index
    np.testing.assert_array_equal(np.bincount(s["arr_1"]), [N // CLASSES] * CLASSES)
    assert len({img.tobytes() for img in s["arr_0"]}) == N                    # a distinct image per sample
    assert len(list((reference["dir"] / G.SHARDS).glob("batch_*.npz"))) == N // BATCH
    # the evaluator accepts it
    from evaluation.npz_io import open_batch
    batch = open_batch(reference["dir"] / G.SAMPLES, "sample")
    assert batch.shape == (N, 32, 32, 3)
    np.testing.assert_array_equal(batch.read_images(), s["arr_0"])


def test_torchrun_two_ranks_gives_the_same_file(reference, tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           *map(str, flags(tiny, tmp_path))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout and proc.stdout.count("wrote ") == 1   # rank 0 reports and merges
    ours = sample_dir(tmp_path) / G.SAMPLES
    assert ours.read_bytes() == reference["bytes"]
    a, b = load_samples(ours), load_samples(reference["dir"] / G.SAMPLES)
    assert pairs(a) == pairs(b)


# ---- resume ---------------------------------------------------------------------------------------------------------

def test_killed_run_resumes_to_the_same_file(script, reference, tiny, tmp_path, capsys, monkeypatch):
    made = []
    real = step.sample_batch

    def dies_after_two(family, model, batch, *a, **kw):
        if len(made) == 2:
            raise KeyboardInterrupt       # what Ctrl-C or a kill between two batches leaves behind
        made.append(batch.index)
        return real(family, model, batch, *a, **kw)

    monkeypatch.setattr(step, "sample_batch", dies_after_two)
    code, _, err = run_inproc(script, capsys, flags(tiny, tmp_path))
    d = sample_dir(tmp_path)
    assert code == 130 and made == [0, 1]
    assert not (d / G.SAMPLES).exists()
    assert sorted(p.name for p in (d / G.SHARDS).iterdir()) == ["batch_000000.npz", "batch_000001.npz"]
    (d / G.SHARDS / ".batch_000002.npz.tmp999").write_bytes(b"half a file")   # a write cut short

    made.clear()
    monkeypatch.setattr(step, "sample_batch", lambda family, model, batch, *a, **kw: made.append(batch.index) or
                        real(family, model, batch, *a, **kw))
    code, out, err = run_inproc(script, capsys, flags(tiny, tmp_path))
    assert code == 0, err
    assert made == [2, 3] and "2 to make" in out
    assert (d / G.SAMPLES).read_bytes() == reference["bytes"]
    assert not list((d / G.SHARDS).glob(".*"))


def test_lost_shard_is_remade_and_nothing_else(script, reference, tiny, tmp_path, capsys, monkeypatch):
    shutil.copytree(reference["outdir"], tmp_path, dirs_exist_ok=True)
    d = sample_dir(tmp_path)
    (d / G.SHARDS / "batch_000001.npz").unlink()
    (d / G.SHARDS / "batch_000003.npz").write_bytes(b"not a zip")     # unreadable counts as missing
    before = {p.name: p.stat().st_mtime_ns for p in (d / G.SHARDS).glob("batch_00000[02].npz")}
    made = []
    real = step.sample_batch
    monkeypatch.setattr(step, "sample_batch", lambda family, model, batch, *a, **kw: made.append(batch.index) or
                        real(family, model, batch, *a, **kw))
    code, _, err = run_inproc(script, capsys, flags(tiny, tmp_path))
    assert code == 0, err
    assert made == [1, 3]
    assert {p: (d / G.SHARDS / p).stat().st_mtime_ns for p in before} == before
    assert (d / G.SAMPLES).read_bytes() == reference["bytes"]
    # complete: a rerun makes nothing and leaves the file alone
    made.clear()
    code, out, _ = run_inproc(script, capsys, flags(tiny, tmp_path))
    assert code == 0 and made == [] and "nothing to do" in out


def test_other_settings_are_not_mixed_in(script, reference, tiny, tmp_path, capsys):
    shutil.copytree(reference["outdir"], tmp_path, dirs_exist_ok=True)
    d = sample_dir(tmp_path)
    args = flags(tiny, tmp_path)
    args[args.index("--batch_size") + 1] = 4
    code, _, err = run_inproc(script, capsys, args)
    assert_one_line_error(code, err, "batch_size=2, but batch_size=4", "--force")
    assert (d / G.SAMPLES).read_bytes() == reference["bytes"]           # untouched
    code, _, err = run_inproc(script, capsys, args + ["--force"])
    assert code == 0, err
    assert len(list((d / G.SHARDS).glob("batch_*.npz"))) == 2
    s = load_samples(d / G.SAMPLES)
    np.testing.assert_array_equal(s["arr_1"], np.arange(N) % CLASSES)


def test_merge_refuses_a_foreign_shard(tmp_path):
    plan = G.Plan(4, 2, 0, 2)
    (tmp_path / G.SHARDS).mkdir()
    images = np.zeros((2, 8, 8, 3), np.uint8)
    G.write_shard(G.shard_path(tmp_path, 0), images, [0, 1], [0, 1])
    G.write_shard(G.shard_path(tmp_path, 1), images, [0, 1], [0, 1])     # batch 0's indices under batch 1's name
    with pytest.raises(G.GenerationError, match="batch_000001.npz does not hold batch 1"):
        G.merge_shards(tmp_path, plan)
    assert not (tmp_path / G.SAMPLES).exists()


# ---- pixels -----------------------------------------------------------------------------------------------------

def test_samples_are_the_decoded_latents_of_their_batch_seed(reference, tiny):
    """Recompute batch 1 by hand (seed → DDIM latents → decoder → to_uint8) and find it in the merged file."""
    from evaluation.images import to_uint8
    from ldm.sample import decode_latents, sample_latents
    from ldm.util import load_config, load_model_from_config
    cfg, ckpt = tiny["cond"]
    model = load_model_from_config(load_config(cfg), ckpt)
    batch = G.Plan(N, BATCH, SEED, CLASSES).batch(1)
    z = sample_latents(model, batch.labels.tolist(), settings=SamplingSettings(STEPS, 0.0, 3.0), batch_size=BATCH,
                       generator=torch.Generator().manual_seed(batch.seed), progress=False)
    images = to_uint8(decode_latents(model, z))
    s = load_samples(reference["dir"] / G.SAMPLES)
    np.testing.assert_array_equal(s["arr_0"][2:4], images)


def test_pixel_conversion_happens_once(script, tiny, tmp_path, capsys, monkeypatch):
    """A decoder with known outputs (1 channel, an asymmetric ramp over [-1.2, 1.2]) -> the expected uint8 NHWC."""
    ramp = torch.linspace(-1.2, 1.2, 32 * 32).reshape(1, 1, 32, 32)
    ramp[0, 0, 0, :5] = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])

    def known_decoder(model, z, batch_size=16):
        return ramp.repeat(len(z), 1, 1, 1)

    from pipeline.families.compvis_ldm import ClassConditionalLDM
    monkeypatch.setattr(ClassConditionalLDM, "decode", lambda self, model, z, batch_size=16: known_decoder(model, z))
    code, _, err = run_inproc(script, capsys, flags(tiny, tmp_path))
    assert code == 0, err
    arr = load_samples(sample_dir(tmp_path) / G.SAMPLES)["arr_0"]
    v = ramp[0, 0].numpy()                                       # float32, as the model's output
    expected = np.clip(np.round((v + np.float32(1)) * np.float32(127.5)), 0, 255).astype(np.uint8)
    assert arr.shape == (N, 32, 32, 3)
    for k in range(N):
        for c in range(3):   # gray repeated to RGB, rows stay rows
            np.testing.assert_array_equal(arr[k, :, :, c], expected)
    assert arr[0, 0, :5, 0].tolist() == [0, 64, 128, 191, 255]
    assert arr[0, 0, 5, 0] == 0 and arr[0, -1, -1, 0] == 255    # clipped, not wrapped


# ---- samplers through pipeline.sampling, unconditional models -------------------------------------------------------

def test_quantized_sampler_goes_through_build_variant(script, reference, tiny, tmp_path, capsys, monkeypatch):
    calls, generators = [], []

    class FakeVariant:
        def __init__(self, model):
            self.model_fn = lambda x, t, c: 0.5 * model.apply_model(x, t, c)

        def check_sampling(self, settings):
            calls.append(("check", settings.meta()))

        def correction_for(self, generator):
            generators.append(generator.initial_seed())
            return lambda eps, sigma, step, x: (eps, sigma)

        def fingerprints(self):
            return {"quant": "0123abcd"}

    def build_variant(spec, family, model, layout, tag, expect, packed=None, execution=None):
        calls.append(("build", str(spec), tag.w_bits, tag.a_bits, expect["steps"]))
        assert packed is None and execution.value == "fake"      # the defaults: the quant artifact, fake-quant
        return FakeVariant(model)

    monkeypatch.setattr(step, "build_variant", build_variant)
    code, _, err = run_inproc(script, capsys, flags(tiny, tmp_path, "--sampler", "sd2-tensor", "--w_bits", 8))
    assert code == 0, err
    assert calls[0] == ("build", "sd2-tensor", 8, 8, STEPS)
    assert calls[1] == ("check", {"steps": STEPS, "eta": 0.0, "scale": 3.0})
    plan = G.Plan(N, BATCH, SEED, CLASSES)
    assert generators == [plan.batch(b).correction_seed for b in range(plan.num_batches)]
    d = sample_dir(tmp_path, "sd2-tensor", "w8a8")
    assert '"quant": "0123abcd"' in (d / G.MANIFEST).read_text()
    s, ref = load_samples(d / G.SAMPLES), load_samples(reference["dir"] / G.SAMPLES)
    np.testing.assert_array_equal(s["arr_1"], ref["arr_1"])
    assert not np.array_equal(s["arr_0"], ref["arr_0"])     # the variant's model_fn was used


def test_unconditional_model_has_no_labels(script, tiny, tmp_path, capsys):
    args = flags(tiny, tmp_path, kind="uncond")
    args[args.index("--n_samples") + 1] = 3
    code, _, err = run_inproc(script, capsys, args)
    assert code == 0, err
    s = load_samples(sample_dir(tmp_path, n=3) / G.SAMPLES)
    assert list(s) == ["arr_0"] and s["arr_0"].shape == (3, 32, 32, 3)


def test_class_subset_run(script, tiny, tmp_path, capsys):
    args = flags(tiny, tmp_path, "--classes", 3, 1)
    args[args.index("--n_samples") + 1] = 4
    code, _, err = run_inproc(script, capsys, args)
    assert code == 0, err
    d = RunLayout(Path(tmp_path), "custom", STEPS, 0.0, 3.0).eval_samples("fp32", "fp32", 4, SEED, (3, 1))
    assert d.name.endswith("_classes3-1") and not sample_dir(tmp_path, n=4).exists()
    s = load_samples(d / G.SAMPLES)
    np.testing.assert_array_equal(s["arr_1"], [3, 1, 3, 1])


# ---- bad inputs ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,fragment", [
    (("--n_samples", 7), "--n_samples 7: 7 samples cannot be split evenly over 4 classes"),
    (("--sampler", "sd3-tensor"), "unknown sampler 'sd3-tensor'"),
    (("--n_samples", 0), "--n_samples must be >= 1"),
    (("--seed", -1), "--seed must be >= 0"),
    (("--steps", 3), "--steps 3"),
    (("--classes", 1, 4), "--classes [4] out of range for a model with 4 classes"),
    (("--classes", 1, 2, 3), "--n_samples 8: 8 samples cannot be split evenly over 3 classes"),
])
def test_bad_inputs(script, tiny, tmp_path, capsys, extra, fragment):
    code, _, err = run_inproc(script, capsys, flags(tiny, tmp_path) + list(extra))
    assert_one_line_error(code, err, fragment)
    assert not list(tmp_path.rglob(G.SAMPLES))
