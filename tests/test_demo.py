"""`make demo QUICK=1` end to end on the embedded default: every pipeline script runs, the report has every row
filled, a rerun skips every finished step, and the QNCD-smoothed run reports its effect beside the plain run."""
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


def run_demo(outdir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "quant_scripts/demo.py"), "--quick", "--qncd", "--outdir",
                           str(outdir), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, time.perf_counter() - t0


def test_update_results_page_replaces_only_its_own_section(tmp_path):
    from quant_scripts import demo
    report = tmp_path / "report.md"
    report.write_text("# title\n\nConditions: N 10.\n\n## Sample quality\n\n| a |\n\n## Wall time\n\n"
                      "| stage | seconds |\n| **total** | 90.0 |\n")
    page = tmp_path / "page.md"
    page.write_text("top\n<!-- demo-results:start -->\nold\n<!-- demo-results:end -->\nmid\n"
                    "<!-- demo-qncd-results:start -->\nold\n<!-- demo-qncd-results:end -->\nend\n")
    assert demo.update_results_page(report, page, tag="demo-qncd-results")
    text = page.read_text()
    assert text.startswith("top\n<!-- demo-results:start -->\nold\n") and text.endswith("end\n")
    qncd = text.split("<!-- demo-qncd-results:start -->")[1].split("<!-- demo-qncd-results:end -->")[0]
    assert "Conditions: N 10." in qncd and "1.5 min" in qncd and "old" not in qncd
    assert "### Sample quality" in qncd and "#### " not in qncd   # a subsection of the page's "## ..." section
    assert not demo.update_results_page(report, page, tag="missing")


def test_update_results_page_keeps_only_the_sections_asked(tmp_path):
    from quant_scripts import demo
    report = tmp_path / "report.md"
    report.write_text("# t\n\nConditions: N 10.\n\n## Sample quality\n\nbig table\n\n## Bit-width sweep\n\n| row |\n\n"
                      "## Paired fidelity\n\nmore\n\n## Wall time\n\n| **total** | 60.0 |\n")
    page = tmp_path / "page.md"
    page.write_text("<!-- demo-bits-results:start -->\nold\n<!-- demo-bits-results:end -->\n")
    assert demo.update_results_page(report, page, tag="demo-bits-results", keep=["Bit-width sweep"])
    text = page.read_text()
    assert "Conditions: N 10." in text and "### Bit-width sweep\n\n| row |" in text
    assert "big table" not in text and "more" not in text and "1.0 min" in text


def test_sweep_rows_are_unique_and_in_setting_order():
    from quant_scripts import demo
    args = demo.parse_args(["--hard", "--qncd"])
    args.mode = "default"
    rows = demo.variants(args)
    keys = [(v.tag, v.sampler) for v in rows]
    assert len(keys) == len(set(keys))
    order = [demo.SETTING_ORDER.index(v.setting) for v in rows]
    assert order == sorted(order) and rows[0].setting == "FP32"
    for tag in demo.SWEEP:  # every setting has every method
        assert {v.sampler for v in rows if v.tag == tag} >= {s for _, s in demo.METHODS}, tag
    args = demo.parse_args(["--long", "--eta", "1"])
    args.mode = "long"
    assert [v.sampler for v in demo.variants(args)][0] == "fp32" and {v.tag for v in demo.variants(args)} == {
        None, demo.W4A8}


def test_eta_belongs_to_the_long_protocol():
    err = subprocess.run([sys.executable, str(REPO / "quant_scripts/demo.py"), "--eta", "1"], cwd=REPO,
                         capture_output=True, text=True)
    assert err.returncode == 2 and err.stderr.strip().splitlines() == [
        "error: --eta applies to --long (the 250-step protocol); the other modes use the preset's η"]


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
    # paired fidelity to FP for every quantized row, grouped by setting, with intervals and the verdicts
    fid = record["extra"]["fidelity"]
    quantized = [(r["setting"], r["method"]) for r in rows if r["sampler"] != "fp32"]
    assert sorted((s, m) for s in fid for m in fid[s]) == sorted(quantized)
    for s, m in quantized:
        d = fid[s][m]
        assert d["n"] == 30 and d["psnr"]["ci"][0] <= d["psnr"]["mean"] <= d["psnr"]["ci"][1], (s, m)
        assert (m == "uncorrected") == ("vs_uncorrected" not in d), (s, m)
    assert "## Paired fidelity to the FP samples" in report and "W4A8: closer to FP than the uncorrected" in report
    assert record["sizes"]["W4"] < record["sizes"]["W8"] < record["sizes"]["FP32"]
    assert set(record["figures"]) == {"methods", "bits", "noise_w4a8"}  # (W8A8 and W4A8 have paired metrics)
    assert all((out / "fashion" / f["file"]).stat().st_size > 0 for f in record["figures"].values())
    assert all((out / "fashion" / p).exists() for p in record["images"].values())
    # a rerun: every step is found done
    proc, again = run_demo(out)
    assert "resuming" not in proc.stdout
    assert again < 0.5 * first, (first, again)
    # the same with QNCD smoothing: its own outdir, and the smoothing sections compare against the run above
    run_demo(out, "--smooth")
    smooth = tmp_path / "demo-smooth" / "fashion"
    report = (smooth / "report.md").read_text()
    extra = json.loads((smooth / "report.json").read_text())["extra"]
    effect = extra["smoothing_effect"]
    assert len(effect) == 17  # every ResBlock of the embedded default (code formula)
    for e in effect.values():
        assert all(v > 0 for v in e["range"]) and set(e["act_sqnr_db"]) == {"8", "6"}
    assert set(extra["sqnr_without_with"]) >= {"W4 AdaRound", "W4A8", "W4A6"}
    assert len(extra["quality_without_with"]) == 14  # every quantized row, sampled in both runs
    for title in ("QNCD smoothing: effect on each ResBlock's second conv", "ε SQNR without and with smoothing",
                  "Sample quality without and with smoothing"):
        assert f"## {title}" in report
