"""Calibration-set recording along guided FP DDIM trajectories, and artifact metadata checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from ldm.models.diffusion.settings import SamplingSettings
from ldm.models.diffusion.ddim import DDIMSchedule
from pipeline.artifacts import ArtifactMismatch, load_artifact, save_artifact
from quant.calibration import TimestepDistribution, collect_calibration_set, draw_subset


@pytest.fixture(scope="module")
def tiny():
    return tiny_models.build(tiny_models.config(tiny_models.CLASS_COND))


def test_uniform_subset_is_even_and_normal_is_skewed_early():
    rng = np.random.default_rng(0)
    u = draw_subset(100, 10, 40, TimestepDistribution.UNIFORM, rng)
    assert [len(u[i]) for i in range(10)] == [10] * 10 and all(len(set(v)) == len(v) for v in u.values())
    nrm = draw_subset(400, 10, 60, TimestepDistribution.NORMAL, np.random.default_rng(0))
    counts = np.array([len(nrm.get(i, [])) for i in range(10)])
    assert counts.sum() == 400 and counts.max() <= 60
    assert counts[:6].sum() > counts[6:].sum()  # N(0.4, 0.4): more samples in the noisy first half
    with pytest.raises(ValueError, match="only 10 x 4"):
        draw_subset(41, 10, 4, TimestepDistribution.UNIFORM, rng)


def test_recorded_inputs_are_the_sampler_inputs(tiny):
    labels = [0, 1, 2, 3, 0, 1]
    data = collect_calibration_set(tiny, labels, n=30, settings=SamplingSettings(5, 0.0, 3.0),
                                   distribution=TimestepDistribution.UNIFORM, seed=3, batch_size=4, progress=False)
    assert data["x"].shape == (30, 3, 8, 8) and data["t"].shape == (30,) and data["c"].shape == (30, 1, 16)
    grid = DDIMSchedule.make(tiny.alphas_cumprod, 5, 0.0).timesteps
    assert sorted(set(data["t"].tolist())) == sorted(grid.tolist())
    assert all((data["t"] == t).sum() == 6 for t in grid)
    # both guidance branches are present: the null class embedding and real ones
    null = tiny.get_learned_conditioning({"class_label": torch.tensor([4])})[0]
    is_null = (data["c"] - null).abs().amax(dim=(1, 2)) < 1e-6
    assert 0 < int(is_null.sum()) < 30
    # every recorded x_t is on a real trajectory: at the first step, x_T itself
    first = data["t"] == grid.max()
    x_T = torch.randn((6, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    for x in data["x"][first]:
        assert (x_T - x).abs().amax(dim=(1, 2, 3)).min() < 1e-6
    again = collect_calibration_set(tiny, labels, n=30, settings=SamplingSettings(5, 0.0, 3.0),
                                    distribution=TimestepDistribution.UNIFORM, seed=3, batch_size=6, progress=False)
    # other batching: the same inputs, up to float summation order
    assert torch.equal(again["t"], data["t"])
    torch.testing.assert_close(again["x"], data["x"], rtol=1e-4, atol=1e-3)


def test_artifact_meta_is_checked(tmp_path):
    path = save_artifact(tmp_path / "calibration.pt", "calibration", {"steps": 20, "model": "abc"},
                         {"x": torch.zeros(2)})
    assert load_artifact(path, "calibration", {"steps": 20})["x"].shape == (2,)
    with pytest.raises(ArtifactMismatch, match="steps=20.*steps=250"):
        load_artifact(path, "calibration", {"steps": 250})
    with pytest.raises(ArtifactMismatch, match="'calibration' artifact, expected 'noise_stats'"):
        load_artifact(path, "noise_stats")
    with pytest.raises(ArtifactMismatch, match="not found"):
        load_artifact(tmp_path / "none.pt", "calibration")


def test_collect_script_writes_a_checked_artifact(tmp_path, capsys):
    import importlib.util

    from conftest import REPO
    cfg = tiny_models.config(tiny_models.CLASS_COND)
    cfg_path, ckpt = tiny_models.write(cfg, tiny_models.build(cfg), tmp_path / "m")
    spec = importlib.util.spec_from_file_location("collect", REPO / "quant_scripts" /
                                                  "collect_imagenet_calibration_set.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--config", str(cfg_path), "--ckpt", str(ckpt), "--n", "40", "--n_holdout", "8", "--steps", "5",
            "--calibration_trajectories_per_class", "2", "--outdir", str(tmp_path / "out")]
    script.main(args)
    out = tmp_path / "out" / "custom" / "scale3_eta0_steps5" / "calibration.pt"
    art = load_artifact(out, "calibration", {"steps": 5, "n": 40, "distribution": "uniform"})
    assert art["x"].shape == (40, 3, 8, 8) and len(art["meta"]["timesteps"]) == 5
    assert art["holdout_x"].shape == (8, 3, 8, 8) and art["holdout_c"].shape == (8, 1, 16)
    script.main(args)
    assert "skipping" in capsys.readouterr().out
    from ldm.util import UserFacingError
    with pytest.raises(UserFacingError, match="raise --calibration_trajectories_per_class"):
        script.main(args[:4] + ["--n", "500"] + args[6:])
    with pytest.raises(UserFacingError, match=">= 0"):
        script.main(args + ["--n_holdout", "-1"])
    # a class subset (a rehearsal of a 1000-class model): its own set, with exactly that class and the null class
    capsys.readouterr()
    script.main(args + ["--calibration_trajectories_per_class", "5", "--calibration_classes", "2", "2"])
    assert "differs); redoing it" in capsys.readouterr().out
    art = load_artifact(out, "calibration", {"classes": [2]})
    assert art["x"].shape == (40, 3, 8, 8)
    assert torch.unique(torch.cat([art["c"], art["holdout_c"]]).flatten(1), dim=0).shape[0] == 2
    with pytest.raises(UserFacingError, match=r"--calibration_classes: class ids \[7\] out of range"):
        script.main(args + ["--calibration_classes", "7", "--force"])
