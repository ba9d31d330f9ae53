"""`make demo QUICK=1` end to end on the embedded default: every pipeline script runs, the report has every row
filled, and a rerun skips every finished step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(not (REPO / "models/ldm/fashion-ldm-vq-4/model.ckpt").exists(),
                                reason="the embedded default checkpoint is missing")


def run_demo(outdir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "quant_scripts/demo.py"), "--quick", "--qncd", "--outdir",
                           str(outdir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, time.perf_counter() - t0


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    _, first = run_demo(out)
    report = (out / "fashion" / "report.md").read_text()
    record = json.loads((out / "fashion" / "report.json").read_text())
    rows = record["rows"]
    assert len(rows) == 15 and {r["sampler"] for r in rows} >= {"fp32", "none", "ptqd", "dd2-channel"}
    for r in rows:
        assert set(r["per_seed"]) == {"0"}  # quick mode: one seed (the full demo runs two)
        for key in ("inception_score", "fid", "sfid", "precision", "recall", "classifier_accuracy"):
            mean, spread = r["summary"][key]
            assert mean == mean and spread >= 0, (r["sampler"], key)  # finite
    assert "| W4A8 | D-D² (channel) |" in report and "| — ± —" not in report
    assert record["sizes"]["W4"] < record["sizes"]["W8"] < record["sizes"]["FP32"]
    assert (out / "fashion" / "fid_by_method.png").stat().st_size > 0
    assert all((out / "fashion" / p).exists() for p in record["images"].values())
    # a rerun: every step is found done
    proc, again = run_demo(out)
    assert "resuming" not in proc.stdout
    assert again < 0.5 * first, (first, again)
