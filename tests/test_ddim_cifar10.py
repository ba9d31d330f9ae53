"""Pixel-space DDIM on CIFAR-10 (ermongroup/ddim ``Model`` + ``generalized_steps``, as QNCD runs it) against the
reference outputs of the original code in ../shared/fixtures/ddim_cifar10 (see its README for how they were made).

The tiny fixture model reproduces the original bit for bit on CPU; the bounds below leave room for other CPUs and
BLAS builds while staying far below the ≈4e-7·max|x| a float64-cumprod ᾱ table would already cause (that one is
caught exactly by the ᾱ-table test).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, SHARED, require_shared
from ldm.models.diffusion.ddim import DDIMStep, sample_ddim
from ldm.models.diffusion.generalized import (compute_alphas, generalized_schedule, get_beta_schedule,
                                              timestep_sequence)
from ldm.modules.diffusionmodules.ddim_unet import Model, get_timestep_embedding

FIXTURE = SHARED / "fixtures" / "ddim_cifar10"
CIFAR10_YML = REPO / "configs" / "cifar10.yml"
SAMPLE_RTOL = 1e-5  # × max|reference|
EPS_ATOL = 1e-5     # the README's bound for ε


def namespace(d: dict) -> argparse.Namespace:
    """The original's ``dict2namespace``: nested dicts become nested namespaces."""
    return argparse.Namespace(**{k: namespace(v) if isinstance(v, dict) else v for k, v in d.items()})


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ours.dtype, ref.shape, ref.dtype)
    return (ours.double() - ref.double()).abs().max().item()


def assert_sample_close(ours: torch.Tensor, ref: torch.Tensor, name: str, rtol: float = SAMPLE_RTOL) -> None:
    err, scale = max_err(ours, ref), ref.abs().max().item()
    assert err <= rtol * scale, f"{name}: max|ours − ref| = {err:.3e} > {rtol:g} × {scale:.3g}"


@pytest.fixture(scope="module")
def fx() -> Path:
    return require_shared(FIXTURE)


@pytest.fixture(scope="module")
def small_cfg(fx) -> dict:
    return yaml.safe_load((fx / "small" / "config.yml").read_text())


@pytest.fixture(scope="module")
def io(fx) -> tuple[dict, dict]:
    return load(fx / "small" / "inputs.pt"), load(fx / "small" / "outputs.pt")


@pytest.fixture(scope="module")
def model(fx, small_cfg) -> Model:
    m = Model(namespace(small_cfg))  # the yml alone: no split_shortcut or any other attribute set by a script
    m.load_state_dict(load(fx / "small" / "model.pt"), strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def betas() -> np.ndarray:
    return get_beta_schedule("linear", 1e-4, 0.02, 1000)


# --- config and architecture --------------------------------------------------------------------------------------

def test_cifar10_yml_is_the_small_layout_at_full_width(fx, small_cfg):
    ours = yaml.safe_load(CIFAR10_YML.read_text())
    manifest = json.loads((fx / "cifar10_manifest.json").read_text())
    assert ours["model"] == manifest["config_model"]
    assert ours["data"] == manifest["config_data"]
    assert ours["diffusion"] == manifest["config_diffusion"]
    assert ours["sampling"] == {"batch_size": 64, "last_only": True}
    full_width = {"ch": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "dropout": 0.1}
    assert ours == {**small_cfg, "model": {**small_cfg["model"], **full_width}}


def test_cifar10_model_state_dict_is_the_checkpoint_layout(fx):
    manifest = json.loads((fx / "cifar10_manifest.json").read_text())
    with torch.device("meta"):
        m = Model(namespace(yaml.safe_load(CIFAR10_YML.read_text())))
    sd = m.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(e["key"], e["shape"]) for e in manifest["keys"]]
    assert {str(v.dtype) for v in sd.values()} == {"torch.float32"} and not list(m.buffers())
    assert sum(p.numel() for p in m.parameters()) == manifest["total_parameters"] == 35_746_307
    for child, n in manifest["parameters_per_child"].items():
        assert sum(p.numel() for p in getattr(m, child).parameters()) == n, child
    for level, n in manifest["parameters_per_level"].items():
        kind, i = level.split(".")
        assert sum(p.numel() for p in getattr(m, kind)[int(i)].parameters()) == n, level


def test_config_forms_build_the_same_model(small_cfg):
    m = small_cfg["model"]
    kwargs = {k: m[k] for k in ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                                "in_channels", "resamp_with_conv")}
    shapes = [{k: tuple(v.shape) for k, v in net.state_dict().items()}
              for net in (Model(small_cfg), Model(namespace(small_cfg)), Model(resolution=32, **kwargs))]
    assert shapes[0] == shapes[1] == shapes[2]
    assert Model(small_cfg, ch_mult=[1, 2, 2]).spec.ch_mult == (1, 2, 2)  # keywords override the config
    with pytest.raises(ValueError, match="lacks"):
        Model({"model": {k: v for k, v in m.items() if k != "ch"}, "data": small_cfg["data"]})
    with pytest.raises(ValueError, match="not supported"):
        Model({**small_cfg, "model": {**m, "type": "bayesian"}})
    with pytest.raises(ValueError, match="x must be"):
        Model(small_cfg)(torch.zeros(1, 3, 16, 16), torch.zeros(1))


# --- ε and the timestep embedding ---------------------------------------------------------------------------------

def test_small_checkpoint_eps_matches_the_original(model, io):
    inputs, outputs = io
    with torch.no_grad():
        for t in (inputs["t"], inputs["t_float"]):  # the sampler passes float timesteps; int gives the same ε
            assert max_err(model(inputs["x"], t), outputs["eps_f32"]) <= EPS_ATOL
        assert max_err(model(inputs["x"], inputs["t_mid"]), outputs["eps_mid_f32"]) <= EPS_ATOL
        assert max_err(model(inputs["x"], 500), outputs["eps_mid_f32"]) <= EPS_ATOL  # a scalar t is broadcast


def test_float64_model_uses_the_float64_embedding(model, fx, small_cfg, io):
    """The original cannot run ``model.double()``; ours does, with the embedding formula evaluated in float64."""
    inputs, outputs = io
    m64 = Model(small_cfg).double().eval()
    m64.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert max_err(m64(inputs["x"].double(), inputs["t"]), outputs["eps_f64"]) <= 1e-9
        assert max_err(m64(inputs["x"].double(), inputs["t_mid"]), outputs["eps_mid_f64"]) <= 1e-9


@pytest.mark.parametrize("dim", [32, 128])
def test_timestep_embedding(io, dim):
    inputs, outputs = io
    t = inputs["t_emb"]
    assert max_err(get_timestep_embedding(t, dim), outputs[f"temb_sinusoid_f32_dim{dim}"]) <= 1e-6
    assert max_err(get_timestep_embedding(t.float(), dim), outputs[f"temb_sinusoid_f32_dim{dim}"]) <= 1e-6
    assert max_err(get_timestep_embedding(t, dim, torch.float64), outputs[f"temb_sinusoid_f64_dim{dim}"]) <= 1e-12


# --- timestep sequences and the ᾱ table ---------------------------------------------------------------------------

def test_timestep_sequences_match_the_original(fx):
    seqs = json.loads((fx / "small" / "index.json").read_text())["timestep_sequences"]
    counts = sorted({int(k.split("_")[1]) for k in seqs})
    assert counts == [5, 10, 20, 25, 50, 100, 250, 1000]
    for n in counts:
        for skip in ("uniform", "quad"):
            seq = timestep_sequence(skip, n)
            assert seq.dtype == np.int64 and seq.tolist() == seqs[f"{skip}_{n}"], (skip, n)
        quad = timestep_sequence("quad", n)
        assert len(quad) - len(np.unique(quad)) == seqs[f"quad_{n}_num_duplicates"]
        rounded = np.rint(np.linspace(0, np.sqrt(800), n) ** 2).astype(np.int64)
        assert np.flatnonzero(rounded != quad).tolist() == seqs[f"quad_{n}_round_differs_at"]
        assert timestep_sequence("quad", n, corrected=True).tolist() == np.unique(rounded).tolist()
    assert timestep_sequence("uniform", 10).tolist() == list(range(0, 1000, 100))  # starts at 900, not 999
    assert len(timestep_sequence("uniform", 30)) == 31                              # ceil(1000 / 33)


def test_corrected_sequences():
    for n in (7, 10, 30, 100, 1000):
        seq = timestep_sequence("uniform", n, corrected=True)
        assert len(seq) == n and (np.diff(seq) > 0).all() and seq[0] == 0
        if 1000 % n == 0:
            assert seq.tolist() == timestep_sequence("uniform", n).tolist()
    quad = timestep_sequence("quad", 100, corrected=True)
    assert (np.diff(quad) > 0).all() and len(quad) == 97 and quad[-1] == 800
    assert timestep_sequence("quad", 10, corrected=True).tolist() == [0, 10, 40, 89, 158, 247, 356, 484, 632, 800]


@pytest.mark.parametrize("args, match", [(("cosine", 10), "unknown"), (("quad", 0), "timesteps >= 1"),
                                         (("uniform", 1001), "exceed")])
def test_bad_sequences_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        timestep_sequence(*args)


def test_alpha_table_is_the_original_float32_cumprod(betas, io):
    _, outputs = io
    assert torch.equal(torch.from_numpy(betas).float(), outputs["sample.betas_f32"])
    t = np.arange(-1, 1000)
    assert torch.equal(compute_alphas(betas, t), outputs["sample.alphas_cumprod_f32_compute_alpha"])
    assert torch.equal(compute_alphas(betas, t, torch.float64), outputs["sample.alphas_cumprod_f64_compute_alpha"])
    with pytest.raises(ValueError, match="beta_schedule"):
        get_beta_schedule("quad", 1e-4, 0.02, 1000)


def test_schedule_tables(betas):
    seq = timestep_sequence("quad", 100)
    s = generalized_schedule(betas, seq, eta=0.0)
    ac = compute_alphas(betas, np.arange(-1, 1000)).double().numpy()
    assert s.timesteps.tolist() == seq.tolist() and s.eta == 0.0 and not s.sigmas.any()
    np.testing.assert_array_equal(s.alphas, ac[seq + 1])
    np.testing.assert_array_equal(s.alphas_prev, np.concatenate([[1.0], ac[seq[:-1] + 1]]))
    steps = list(s.steps())
    assert [st.t for st in steps] == seq[::-1].tolist() and steps[-1].alpha_prev == 1.0
    s1 = generalized_schedule(betas, seq, eta=1.0)
    dup = np.concatenate([[False], np.diff(seq) == 0])
    assert (s1.sigmas[dup] == 0).all() and s1.sigmas[0] == 0 and (s1.sigmas[~dup][1:] > 0).all()
    a, an = s1.alphas, s1.alphas_prev
    # evaluated in float32 as the original does per step (1 − ᾱ_t/ᾱ_next cancels: ~1e-4 relative off float64)
    a32, an32 = torch.from_numpy(a).float(), torch.from_numpy(an).float()
    assert torch.equal(torch.from_numpy(s1.sigmas).float(), ((1 - a32 / an32) * (1 - an32) / (1 - a32)).sqrt())
    np.testing.assert_allclose(s1.sigmas, np.sqrt((1 - a / an) * (1 - an) / (1 - a)), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="ascending"):
        generalized_schedule(betas, seq[::-1], 0.0)


# --- sampling through the project's DDIM loop ---------------------------------------------------------------------

def run_chain(model: Model, x_T: torch.Tensor, betas: np.ndarray, seq: np.ndarray,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[dict]]:
    records: list[dict] = []
    x0 = sample_ddim(lambda x, t, step: model(x, t), x_T, generalized_schedule(betas, seq, 0.0, dtype),
                     callback=records.append)
    return x0, records


@pytest.mark.parametrize("skip", ["uniform", "quad"])
def test_ten_step_samples_match_the_original(model, small_cfg, io, betas, skip):
    inputs, outputs = io
    seq = timestep_sequence(skip, 10)
    assert seq.tolist() == outputs[f"sample.{skip}.seq"].tolist()
    x0, rec = run_chain(model, inputs["x_T"], betas, seq)
    assert len(rec) == 10 and rec[0]["t"] == seq[-1]
    assert_sample_close(rec[0]["x_prev"], outputs[f"sample.{skip}.f32.x_after_first_step"], f"{skip} first step")
    assert_sample_close(x0, outputs[f"sample.{skip}.f32.x0"], f"{skip} x0")
    assert torch.equal(x0, rec[-1]["pred_x0"])  # ᾱ_next = 1 on the last step: the sample is the last x̂0

    m64 = Model(small_cfg).double().eval()
    m64.load_state_dict(model.state_dict())
    x0_64, _ = run_chain(m64, inputs["x_T"].double(), betas, seq, torch.float64)
    assert_sample_close(x0_64, outputs[f"sample.{skip}.f64.x0"], f"{skip} float64 x0", rtol=1e-9)


def test_hundred_step_quad_matches_and_repeats_are_no_ops(model, io, betas):
    """QNCD's CIFAR-10 setting (100 quad steps, η = 0), with its 4 repeated timesteps run as real steps."""
    inputs, outputs = io
    seq = timestep_sequence("quad", 100)
    assert seq.tolist() == outputs["sample.quad100.seq"].tolist()
    x0, rec = run_chain(model, inputs["x_T"], betas, seq)
    assert_sample_close(x0, outputs["sample.quad100.f32.x0"], "quad100 x0")
    assert len(rec) == 100  # every entry costs a model call, repeats included
    repeats = [r for r, nxt in zip(rec, rec[1:]) if r["t"] == nxt["t"]]
    assert len(repeats) == 4
    for r in repeats:  # ᾱ_t = ᾱ_next: x_prev = √ᾱ (x − √(1−ᾱ) ε)/√ᾱ + √(1−ᾱ) ε = x up to rounding
        assert_sample_close(r["x_prev"], r["x"], f"repeat at t={r['t']}", rtol=1e-6)


def test_eta_noise_enters_as_in_generalized_steps(betas):
    """η > 0 on an analytic ε: the loop's result equals the original update order with the same draws."""
    seq = timestep_sequence("quad", 20)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def eps_fn(x, t, step):
        return torch.tanh(x) * (1 + t.float()[:, None, None, None] / 1000)

    g = torch.Generator().manual_seed(5)
    x0 = sample_ddim(eps_fn, x_T, generalized_schedule(betas, seq, eta=0.7),
                     noise_sampler=lambda step: torch.randn(x_T.shape, generator=g))

    g = torch.Generator().manual_seed(5)
    x = x_T
    for i, j in zip(reversed(seq.tolist()), reversed([-1] + seq[:-1].tolist())):
        at, an = (compute_alphas(betas, [v]).reshape(1, 1, 1, 1) for v in (i, j))
        e = eps_fn(x, torch.full((2,), i), None)
        x0_t = (x - e * (1 - at).sqrt()) / at.sqrt()
        c1 = 0.7 * ((1 - at / an) * (1 - an) / (1 - at)).sqrt()
        x = an.sqrt() * x0_t + c1 * torch.randn(x.shape, generator=g) + ((1 - an) - c1 ** 2).sqrt() * e
    assert_sample_close(x0, x, "eta=0.7", rtol=1e-6)


def test_step_correction_sees_the_generalized_steps(model, io, betas):
    """The project's StepCorrection hook runs on this model: it gets every step with t and the (ᾱ_t, ᾱ_next) pair."""
    inputs, _ = io
    seq = timestep_sequence("uniform", 5)
    seen: list[DDIMStep] = []

    def correction(eps, sigma, step, x):
        seen.append(step)
        return eps, sigma

    x0 = sample_ddim(lambda x, t, step: model(x, t), inputs["x_T"], generalized_schedule(betas, seq, 0.0),
                     correction=correction)
    ref, _ = run_chain(model, inputs["x_T"], betas, seq)
    assert torch.equal(x0, ref)
    assert [s.t for s in seen] == [800, 600, 400, 200, 0] and seen[-1].alpha_prev == 1.0
