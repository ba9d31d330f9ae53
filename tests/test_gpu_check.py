"""benchmarks/gpu_check.py: its CPU smoke run (every row ok, the JSON's structure), and the CUDA failures it was
written for, reproduced on a CPU: a tensor made on the default device beside the data's (a meta default device
stands in for "not the data's device"), a summary reading the GPU peak of a stage that never touched CUDA, and
step 7's projection counting per-batch overhead once per sample."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
import torch.nn as nn

from conftest import REPO
from integer_checks import int_mm_exact, require_exact_int_mm

sys.path.insert(0, str(REPO / "benchmarks"))

import cin256_rehearsal  # noqa: E402
import gpu_check_parts  # noqa: E402
from gpu_check_parts import Row, compare_sqnr  # noqa: E402

from quant.integer import Backend, to_integer_  # noqa: E402
from quant.layers import QuantLayer  # noqa: E402
from quant.quantizer import QScheme, ScaleSearch  # noqa: E402


# ---- the integer path's device placement (the to_integer_ crash on CUDA; int8_weight alone: test_integer.py) ------

def w8a8_layers() -> tuple[nn.Sequential, nn.Sequential, torch.Tensor]:
    """A calibrated W8A8 Linear and 1×1 conv (the shapes torch._int_mm takes), each in its own container, and an
    input of the Linear."""
    torch.manual_seed(0)
    lin = QuantLayer(nn.Linear(32, 16), QScheme(8, search=ScaleSearch.MAX), QScheme(8, search=ScaleSearch.MAX))
    conv = QuantLayer(nn.Conv2d(16, 8, 1), QScheme(8, search=ScaleSearch.MAX), QScheme(8, search=ScaleSearch.MAX))
    with torch.no_grad():
        lin.weight.add_(0.3)     # asymmetric weights: z_w far from the middle, the c = 128 branch
    x = torch.randn(20, 32) + 0.5
    with torch.no_grad():
        h = lin(x).view(20, 16, 1, 1)          # (quantization off: the float layer)
    for q, inp in ((lin, x), (conv, h)):
        q.init_weight_qparams_()
        q.init_act_qparams_(inp)
        q.weight_quant = q.act_quant = True
    return nn.Sequential(lin), nn.Sequential(conv), x


def test_to_integer_int_mm_makes_nothing_on_the_default_device():
    """to_integer_ with Backend.INT_MM (what CUDA runs) and the integer forward, under a meta default device: every
    tensor comes from the layer or is made on its device; the outputs equal fake-quant up to float summation."""
    require_exact_int_mm()
    lin, conv, x = w8a8_layers()
    with torch.inference_mode():
        fake = lin(x)
        fake_conv = conv(fake.view(20, 16, 1, 1))
    with torch.device("meta"):
        report = {**to_integer_(lin, Backend.INT_MM), **{"1": to_integer_(conv, Backend.INT_MM)["0"]}}
    assert set(report.values()) == {"int_mm"}, report
    assert lin[0].has_offset           # the 8-bit weight's c − z_w term is exercised
    with torch.inference_mode(), torch.device("meta"):
        y = lin(x)
        y_conv = conv(fake.view(20, 16, 1, 1))
    assert y.device.type == y_conv.device.type == "cpu"
    torch.testing.assert_close(y, fake, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_conv, fake_conv, rtol=1e-4, atol=1e-4)


# ---- the cin256 rehearsal's summary and projections -----------------------------------------------------------------

def rec(wall=10.0, load=2.0, host=2 ** 30, gpu=None):
    return {"wall_s": wall, "load_s": load, "exit": 0, "peak_host_bytes": host, "peak_gpu_bytes": gpu}


FWD = {"unet": {"bytes_per_sample": 50 * 2 ** 20}, "decode": {"bytes_per_sample": 30 * 2 ** 20},
       "layer_input_bytes_per_sample": 40 * 2 ** 20}


def test_summary_table_takes_a_stage_without_gpu_peak(tmp_path, capsys):
    """Step 5 never touches CUDA: its GPU peak is None beside the others' numbers (the crash at the summary)."""
    args = Namespace(device="cuda", classes=2, samples=2, eval_batch=16)
    recs = {"1 calibration": rec(gpu=3 * 2 ** 30), "5 Gaussian fits": rec(gpu=None)}
    proj = cin256_rehearsal.project(args, tmp_path, recs, FWD)
    cin256_rehearsal.print_projection(proj)
    out = capsys.readouterr().out
    last = out.splitlines()[-1].split()
    assert "GPU GiB" in out and last[0] == "5" and last[6] == last[11] == "-"
    step1, step5 = proj
    # on a GPU the forwards' activations grow on the GPU (32 guided rows instead of 4), not in host memory
    assert step1["projected_peak_bytes"] == 2 ** 30
    assert step1["projected_peak_gpu_bytes"] == 3 * 2 ** 30 + 50 * 2 ** 20 * (32 - 4)
    assert step5["projected_peak_gpu_bytes"] is None
    cpu = cin256_rehearsal.project(Namespace(device="cpu", classes=2, samples=2, eval_batch=1), tmp_path,
                                   {"1 calibration": rec()}, FWD)[0]
    assert cpu["projected_peak_bytes"] == 2 ** 30 + 50 * 2 ** 20 * (32 - 4) and cpu["projected_peak_gpu_bytes"] is None


def test_step7_projects_from_one_batch_not_per_sample(tmp_path):
    """50,000 samples = 3,125 batches of 16: load and fixed costs once, the steady batch time 3,125 times (the
    old rule, compute x 50,000 / n, counted the per-run overhead 12,500 times at n = 4)."""
    args = Namespace(device="cuda", classes=4, samples=4, eval_batch=16)
    seconds, rule = cin256_rehearsal.project_sampling(args, rec(wall=12.0, load=2.0), per_batch=3.0)
    assert seconds == pytest.approx(2.0 + (10.0 - 6.0) + 3.0 * 3125) and "3125 batches" in rule
    cpu = Namespace(device="cpu", classes=2, samples=2, eval_batch=1)   # a batch of 1, scaled to 16 rows
    seconds, _ = cin256_rehearsal.project_sampling(cpu, rec(wall=12.0, load=2.0), per_batch=1.0)
    assert seconds == pytest.approx(2.0 + 8.0 + 16.0 * 3125)
    seconds, rule = cin256_rehearsal.project_sampling(args, rec(wall=12.0, load=2.0), per_batch=None)
    assert "no shard times" in rule
    # the per-batch time: between the first and the second shard's writes
    from evaluation.generation import shard_path
    for i, t in ((0, 1000.0), (1, 1003.5)):
        shard_path(tmp_path, i).parent.mkdir(parents=True, exist_ok=True)
        shard_path(tmp_path, i).write_bytes(b"")
        os.utime(shard_path(tmp_path, i), (t, t))
    assert cin256_rehearsal.batch_seconds(tmp_path) == pytest.approx(3.5)
    assert cin256_rehearsal.batch_seconds(tmp_path / "none") is None


# ---- gpu_check ------------------------------------------------------------------------------------------------------

def test_compare_sqnr_states_the_tolerance():
    sq = {"w4_nearest": 20.0, "w4_adaround": 21.0, "w4a8": 18.0}
    dev = [Row("pipeline fashion", True, 1.0, "", {"sqnr": sq})]
    near = Row("x", True, 2.0, "", {"sqnr": {**sq, "w4a8": 18.1}})
    far = Row("x", True, 2.0, "", {"sqnr": {**sq, "w4_adaround": 22.0}})
    ok = compare_sqnr("sqnr vs cpu fashion", dev, "fashion", [near])
    assert ok.ok and "0.100 dB (w4a8" in ok.key and f"{gpu_check_parts.SQNR_TOLERANCE_DB}" in ok.key
    assert not compare_sqnr("s", dev, "fashion", [far]).ok
    assert not compare_sqnr("s", [], "fashion", [near]).ok                       # the device pipeline failed
    assert not compare_sqnr("s", dev, "fashion", [Row("x", False, 1.0, "CPU run: boom")]).ok


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(tmp_path):
    """The check's driver at its smallest counts on the CPU: the parts run as processes, every row ok, the table
    printed, the JSON complete. The pipeline rows (steps 1-7 of the embedded defaults, packed / integer, the CPU
    SQNR rerun, the fidelity CLI) take minutes even at these counts, too long for the suite; they run with
    `python benchmarks/gpu_check.py --device cpu --tiny` (all three defaults, 13 rows) and their pieces are tested
    here and in tests/test_pipeline_correction.py. The integer row needs an exact torch._int_mm (integer_checks)."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    skip = ["pipeline", "dit"] + ([] if int_mm_exact() else ["integer"])   # (dit: tests/test_dit_rehearsal.py)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--device", "cpu", "--tiny",
                           "--skip", *skip, "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["ok"] and rec["device"] == "cpu" and rec["tiny"] and rec["total_s"] > 0
    paths = [r["path"] for r in rec["rows"]]
    assert paths == ([] if "integer" in skip else ["integer W8A8"]) + ["fake-quant ratio", "fake-quant kernel",
                                                                      "cin256 rehearsal"]
    for r in rec["rows"]:
        assert r["ok"] and r["seconds"] >= 0 and r["key"], r
        assert set(r) == {"path", "ok", "seconds", "key", "detail"}
    assert "projected_peak_gpu_bytes" in next(r for r in rec["rows"] if r["path"] == "cin256 rehearsal")["detail"]
    table = proc.stdout[proc.stdout.rindex("key number"):]
    assert all(p in table for p in paths) and f"{len(paths)}/{len(paths)} ok" in table


def test_pipeline_stages_drive_steps_1_to_7_with_the_packed_and_integer_rows(tmp_path):
    """The pipeline part's plan (no run): steps 1-7 of each default with the counts asked, in order, on the device."""
    for preset in ("fashion", "fashion-ddim", "fashion-txt2img"):
        stages = gpu_check_parts.pipeline_stages(preset, "cuda", tmp_path, gpu_check_parts.COUNTS["small"])
        assert [s[0].split()[0] for s in stages] == ["1", "2", "3", "4", "5", "6", "7", "7", "7"]
        assert all(["--preset", preset] == argv[:2] and "cuda" in argv for _, _, argv in stages)
        assert [s[0] for s in gpu_check_parts.pipeline_stages(preset, "cpu", tmp_path,
                                                              gpu_check_parts.COUNTS["tiny"], upto=3)] == \
            ["1 calibration", "2 W4 weights", "3 W4A8 activations"]
