"""benchmarks/dit_rehearsal.py: its tiny run on the CPU (steps 1-7 through the real scripts, every stage measured and
projected), the random VAE folder's key renaming against the loader's rules, the depth extrapolation's arithmetic and
its bad inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import dit_rehearsal  # noqa: E402

from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from ldm.models.diffusers_vae import compvis_ddconfig, compvis_key  # noqa: E402


def test_diffusers_names_invert_the_loaders_rules():
    """Every key of the full-size sd-vae-ft-ema (CompVis layout, meta device) survives diffusers_key, compvis_key."""
    ddconfig, embed_dim = compvis_ddconfig(dit_rehearsal.SD_VAE_FT_EMA)
    with torch.device("meta"):
        sd = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"},
                           embed_dim=embed_dim).state_dict()
    assert sum(v.numel() for v in sd.values()) == 83_653_863            # sd-vae-ft-ema's parameter count
    names = {dit_rehearsal.diffusers_key(k, 4) for k in sd}
    assert len(names) == len(sd) and any(".up_blocks.0.upsamplers.0." in n for n in names)
    assert all(compvis_key(dit_rehearsal.diffusers_key(k, 4), 4) == k for k in sd)


def test_tiny_rehearsal_runs_every_stage_and_projects(tmp_path):
    out = tmp_path / "dit.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/dit_rehearsal.py"), "--tiny", "--device", "cpu",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    names = [r["stage"] for r in rec["projection"]]
    assert [n.split()[0] for n in names] == ["1", "2", "3", "4", "5", "6", "7", "7"]
    assert all(s["exit"] == 0 and s["wall_s"] > 0 and s["peak_host_bytes"] > 0 for s in rec["stages"].values())
    for r in rec["projection"]:
        assert r["projected_s"] >= r["measured_s"] * 0.5 and r["projected_peak_bytes"] >= r["measured_peak_bytes"]
    assert set(rec["totals"]) == set(dit_rehearsal.PROTOCOLS)
    assert rec["totals"]["ptq4dit-250"]["calibration_s"] > rec["totals"]["ptq4dit-50"]["calibration_s"] > 0
    assert rec["projected_peak_gpu_bytes"] is None and rec["load_full"] is None   # CPU, all 4 blocks
    units = {u["phase"]: u for u in rec["units"] if u["kind"] == "DiTBlock"}
    assert units["weight"]["units"] == units["activation"]["units"] == 4
    assert "ptq4dit-250: steps 1-3" in proc.stdout and "1 calibration" in proc.stdout


def depth_args(depth=2, full=28):
    return Namespace(depth=depth, full_depth=full, device="cpu")


def test_depth_factors_and_reconstruction_scale_by_block():
    """A 2-of-28-block run: forward-bound parts by the measured per-row ratio, block optimisation x14, block cache
    passes x14 and by the mean prefix (block k's pass runs k + 1 blocks), the final layer's pass by the forward."""
    fwd = {"dit": {"seconds_per_sample": 0.3, "bytes_per_sample": 1.0},
           "dit_full": {"seconds_per_sample": 3.0, "bytes_per_sample": 2.0}, "layer_input_bytes_per_sample": 10.0}
    counts = {"rehearsal": {"parameters": 100, "weight_elements": 80},
              "full": {"parameters": 1000, "weight_elements": 800}}
    dep = dit_rehearsal.depth_factors(depth_args(), fwd, counts)
    c = (3.0 - 0.3) / 26                       # one block, one row
    rest = 0.3 - 2 * c
    assert dep["forward"] == pytest.approx(10.0) and dep["blocks"] == 14 and dep["weights"] == 10
    assert dep["prefix"] == pytest.approx((rest + 14.5 * c) / (rest + 1.5 * c))
    assert dep["missing_bytes"] == 4 * 900
    same = dit_rehearsal.depth_factors(depth_args(28), {**fwd, "dit": fwd["dit_full"]}, counts)
    assert same == {"forward": 1.0, "prefix": 1.0, "weights": 1.0, "blocks": 1.0, "missing_bytes": 0.0}

    units = [{"unit": "dit.t_embedder.mlp.2", "kind": "layer", "rows": 8, "iters": 1, "capture_s": 1.0,
              "optimise_s": 0.5, "cache_bytes": 100},
             *({"unit": f"dit.blocks.{k}", "kind": "DiTBlock", "rows": 8, "iters": 1, "capture_s": 2.0,
                "optimise_s": 3.0, "cache_bytes": 1000} for k in range(2)),
             {"unit": "dit.final_layer.adaLN_modulation.1", "kind": "layer", "rows": 8, "iters": 1,
              "capture_s": 4.0, "optimise_s": 0.25, "cache_bytes": 10}]
    timing = {"units": units, "init_weights_s": 5.0, "sqnr_s": 2.0, "held_out": 2}
    rec = {"wall_s": 40.0, "load_s": 3.0}
    protocol = {**dit_rehearsal.PROTOCOLS["ptq4dit-250"], "calibration": 16, "holdout": 4}
    seconds, cache_grow, _, init_grow, why = dit_rehearsal.project_reconstruction(
        "2", timing, rec, 30.0, fwd, dep, protocol)
    cap = 1.0 + 4.0 * 14 * dep["prefix"] + 4.0 * 10.0
    opt = 0.75 + 6.0 * 14
    other = (40.0 - 3.0 - 15.75 - 5.0 - 2.0) * 10
    assert seconds == pytest.approx(30.0 + 5.0 * 10 + 2.0 * 10 * 2 + other + cap * 2 + opt * 10_000)
    assert cache_grow == 1000 and init_grow == 0 and why.startswith("30 units")


def test_bad_inputs_are_one_line(capsys):
    for argv, words in ((["--depth", "9"], "the model has 4 blocks"),
                        (["--samples", "3"], "--samples must be <= --classes"),
                        (["--n_calibration", "30"], "--n_calibration + --n_holdout must be <= 20")):
        with pytest.raises(SystemExit) as e:
            dit_rehearsal.main(["--tiny", *argv])
        assert str(e.value).startswith("error: ") and words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:   # counts: the parser's one line (tests/test_bad_inputs.py's table)
        dit_rehearsal.main(["--tiny", "--iters", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "argument --iters: must be >= 1, got 0" in lines[0], lines
