"""The report's figures (evaluation.plots, drawn with matplotlib): the files exist as PNGs, every glyph of the method
names renders, and the data kept in report.json is the data of the records the figure was drawn from."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from evaluation.fidelity import Bootstrap
from evaluation.plots import bits_figure, interval, noise_statistics_figure
from evaluation.report import Row, fidelity_lines, report_figures, write_report

SETTINGS = ("W8A8", "W4A8", "W4A4")
METHODS = (("uncorrected", "none"), ("PTQD", "ptqd"), ("D-D² (channel)", "dd2-channel"))


def fidelity_record(rng, n: int, shift: float) -> dict:
    psnr = 30 + shift + rng.normal(0, 1, n)
    per = {"psnr": psnr.tolist(), "ssim": (0.9 + shift / 100 + rng.normal(0, 0.01, n)).tolist(),
           "feature_distance": np.abs(0.4 - shift / 10 + rng.normal(0, 0.05, n)).tolist()}
    return {"n": n, "per_sample": per, "metrics": {"fid_to_fp": {"mean": 2.0 - shift, "ci": [1.5, 2.5]}}}


def synthetic_run(seed: int = 0, n: int = 64):
    rng = np.random.default_rng(seed)
    rows = [Row("FP32", "—", "fp32", {0: {"metrics": {"fid": 1.5}}, 1: {"metrics": {"fid": 1.6}}})]
    groups = {}
    for k, setting in enumerate(SETTINGS):
        for j, (method, sampler) in enumerate(METHODS):
            rows.append(Row(setting, method, sampler, {s: {"metrics": {"fid": 1.6 + k + 0.1 * j + s / 10}}
                                                       for s in (0, 1)}))
            recs = [fidelity_record(rng, n, shift=-3 * k + 0.5 * j) for _ in (0, 1)]
            groups.setdefault(setting, []).append((method, sampler, recs))
    return rows, groups


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rows, groups = synthetic_run()
    lines, fidelity = fidelity_lines(groups, Bootstrap(resamples=200))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph … missing from font": a failure here
        figures = report_figures(out, rows, fidelity, SETTINGS)
    context = {"title": "t", "n": 64, "seeds": [0, 1], "steps": 20, "eta": 0.0, "scale": 3.0, "reference": "r",
               "features": "f", "machine": "m"}
    md = write_report(out, rows, context, {}, {"x": 1.0}, {}, {}, {"Paired fidelity": lines},
                      {"fidelity": fidelity}, figures)
    return out, md, json.loads((out / "report.json").read_text()), rows


def test_every_figure_is_a_png_linked_from_the_report(report):
    out, md, record, _ = report
    assert set(record["figures"]) == {"methods", "bits"}
    for fig in record["figures"].values():
        with Image.open(out / fig["file"]) as im:
            assert im.format == "PNG" and im.width > 800 and im.height > 300
        assert f"]({fig['file']})" in md.read_text()


def test_methods_figure_data_is_the_reports_numbers(report):
    _, _, record, rows = report
    data = record["figures"]["methods"]["data"]
    fidelity = record["extra"]["fidelity"]
    assert list(data["settings"]) == list(SETTINGS)
    assert data["references"]["FID to the reference"] == {"label": "FP32", "value": pytest.approx(1.55)}
    for setting, panels in data["settings"].items():
        by_metric = {p["metric"]: p["points"] for p in panels}
        for r in (r for r in record["rows"] if r["setting"] == setting):
            mean, spread = r["summary"]["fid"]
            assert by_metric["FID to the reference"][r["method"]] == pytest.approx(
                {"mean": mean, "lo": mean - spread, "hi": mean + spread})
        for method, d in fidelity[setting].items():
            assert by_metric["PSNR to FP (dB)"][method] == pytest.approx(
                {"mean": d["psnr"]["mean"], "lo": d["psnr"]["ci"][0], "hi": d["psnr"]["ci"][1]})
            assert by_metric["feature distance to FP"][method]["mean"] == pytest.approx(
                d["feature_distance"]["mean"])
            if method != "uncorrected":  # the paired panel: the difference to the uncorrected model
                assert by_metric["Δ PSNR vs uncorrected, paired (dB)"][method]["mean"] == pytest.approx(
                    d["vs_uncorrected"]["psnr"]["mean"])


def test_bits_figure_data_follows_the_settings_in_order(report):
    _, _, record, _ = report
    data = record["figures"]["bits"]["data"]
    fidelity = record["extra"]["fidelity"]
    assert data["settings"] == list(SETTINGS)
    ssim = next(p for p in data["panels"] if p["metric"] == "SSIM to FP")
    for method, values in ssim["series"].items():
        assert [v["mean"] for v in values] == pytest.approx([fidelity[s][method]["ssim"]["mean"] for s in SETTINGS])
    # the planted ordering: each lower setting is farther from FP
    psnr = next(p for p in data["panels"] if p["metric"] == "PSNR to FP (dB)")["series"]["uncorrected"]
    assert psnr[0]["mean"] > psnr[1]["mean"] > psnr[2]["mean"]


def test_bits_figure_refuses_a_series_of_the_wrong_length(tmp_path):
    with pytest.raises(ValueError, match="2 values for 3 settings"):
        bits_figure(tmp_path / "b.png", SETTINGS, [{"metric": "PSNR", "better": "higher",
                                                    "series": {"PTQD": [interval(1.0), interval(2.0)]}}], "t")
    assert not (tmp_path / "b.png").exists()


def test_noise_figure_keeps_its_series_and_refuses_ragged_tables(tmp_path):
    t = [999, 500, 1]
    series = {"tensor-wise": {"mu_y": [0.0, 0.1, 0.2], "sigma_y": [1, 2, 3], "rho": [0.1, 0.0, -0.1]}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = noise_statistics_figure(tmp_path / "n.png", t, series, "W4A8: Δ per timestep, η 0")
    assert data["series"]["tensor-wise"]["sigma_y"] == [1.0, 2.0, 3.0] and data["timesteps"] == t
    assert Image.open(tmp_path / "n.png").format == "PNG"
    with pytest.raises(ValueError, match="2 values for 3 steps"):
        noise_statistics_figure(tmp_path / "m.png", t, {"channel 0": {**series["tensor-wise"], "rho": [1, 2]}}, "t")
