"""BRECQ reconstruction on a tiny random LDM: units, AdaRound vs nearest, learned activation steps, caches, resume
after a kill, artifacts and the step 2-3 scripts with their metadata checks."""
from __future__ import annotations

import contextlib
import importlib.util
import math

import pytest
import torch

import tiny_models
from conftest import REPO
from pipeline.artifacts import ArtifactMismatch, load_progress, save_artifact
from ldm.models.diffusion.settings import SamplingSettings
from quant.config import QuantConfig
from quant.layers import QuantLayer, WeightRounding
from quant.model import QuantModel
from pipeline.families.compvis_ldm import ClassConditionalLDM
from pipeline.layout import partial_path
from pipeline.quantize import PARTIAL_KIND, RESUME_KEYS, load_quant_model, resumable_reconstruct
from quant.policy import Precision
from quant.quantizer import adaround_h, rounding_reg
from quant.reconstruction import (OBJECTIVES, AdaRoundObjective, CacheSpec, CalibrationData, Phase, ReconConfig,
                                  RowCache, UnitObjective, capture_unit_io, find_units, optimise_unit, reconstruct_,
                                  sqnr_db)


FAMILY = ClassConditionalLDM()   # the tiny LDM's family
SPECIALS = FAMILY.quant_specials()


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and immune to a loaded machine
    return tiny_models.build(tiny_models.config(tiny_models.CLASS_COND))


@pytest.fixture(scope="module")
def data(tiny):
    from quant.calibration import TimestepDistribution, collect_calibration_set
    cal = collect_calibration_set(tiny, [0, 1, 2, 3] * 4, n=96, settings=SamplingSettings(5, 0.0, 3.0),
                                  distribution=TimestepDistribution.UNIFORM, seed=0, n_holdout=32, progress=False)
    cpu = torch.device("cpu")
    return (CalibrationData(cal["x"], cal["t"], cal["c"], cpu),
            CalibrationData(cal["holdout_x"], cal["holdout_t"], cal["holdout_c"], cpu))


def fresh(tiny, w_bits=4, a_bits=None) -> QuantModel:
    return QuantModel(tiny.model.diffusion_model, QuantConfig(w_bits, a_bits), specials=SPECIALS).init_weights_()


def test_units_follow_module_order_and_skip_eight_bit_layers(tiny):
    qm = fresh(tiny)
    names = [u.name for u in find_units(qm)]
    kinds = {u.name: type(u.module).__name__ for u in find_units(qm)}
    assert names[0] == "time_embed.2"  # time_embed.0 and input_blocks.0.0 are W8A8: not reconstructed (D²-DPM)
    assert "input_blocks.0.0" not in names and "out.2" not in names
    assert kinds["input_blocks.1.0"] == "ResBlock"
    assert any(k == "BasicTransformerBlock" for k in kinds.values())
    assert all(u.layers() for u in find_units(qm))
    # every target-precision layer belongs to exactly one unit
    covered = [id(m) for u in find_units(qm) for m in u.layers()]
    target = [id(m) for _, m in qm.quant_layers() if m.precision is Precision.TARGET]
    assert sorted(covered) == sorted(target)
    assert len(find_units(qm, skip_eight_bit=False)) == len(names) + 3


def test_capture_stops_at_the_unit_and_caches_rows(tiny, data):
    cal, _ = data
    qm = fresh(tiny)
    unit = next(u for u in find_units(qm) if type(u.module).__name__ == "BasicTransformerBlock")
    inputs, out = capture_unit_io(qm, unit, cal, 40, CacheSpec(), quantized=False, act=False, want_output=True)
    assert len(inputs) == 2 and inputs[0].filled == len(cal)  # (x, context)
    idx = torch.tensor([5, 0, 77])
    x, ctx = (c.rows(idx, torch.device("cpu")) for c in inputs)
    torch.testing.assert_close(unit.module(x, ctx), out.rows(idx, torch.device("cpu")), rtol=0, atol=1e-6)
    assert torch.equal(ctx, cal.c[idx])


def test_disk_and_half_caches_return_the_same_rows(tmp_path):
    rows = torch.randn(10, 3, 4)
    caches = [RowCache(10, CacheSpec()), RowCache(10, CacheSpec(directory=str(tmp_path))),
              RowCache(10, CacheSpec(dtype=torch.float16))]
    for c in caches:
        c.append(rows[:6])
        c.append(rows[6:])
    idx = torch.tensor([9, 2, 4, 2])
    assert torch.equal(caches[0].rows(idx, torch.device("cpu")), rows[idx])
    assert torch.equal(caches[1].rows(idx, torch.device("cpu")), rows[idx])
    torch.testing.assert_close(caches[2].rows(idx, torch.device("cpu")), rows[idx], rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def w4(tiny, data):
    """A W4 AdaRound model (shared: reconstruction is the slow part) and its SQNRs before and after."""
    cal, held = data
    qm = fresh(tiny).set_quant_state(weight=True)
    nearest = sqnr_db(qm, held)
    summaries = reconstruct_(qm, cal, Phase.WEIGHT, ReconConfig(iters=120, cache_batch_size=96), progress=False)
    return qm, summaries, nearest, sqnr_db(qm, held)


def test_adaround_beats_nearest_on_held_out_inputs(w4):
    qm, summaries, nearest, adaround = w4
    assert adaround > nearest + 0.3, (nearest, adaround)
    assert all(m.rounding is WeightRounding.ADAROUND_HARD for u in find_units(qm) for m in u.layers())
    assert sum(s["rec_last"] < s["rec_first"] for s in summaries) > len(summaries) // 2
    # hard rounding: every quantized weight is on its integer grid, within one step of the FP weight
    for u in find_units(qm):
        for m in u.layers():
            q = m.quantized_weight() / m.w_scale + m.w_zero_point
            assert torch.allclose(q, q.round(), atol=1e-3)
            assert ((m.quantized_weight() - m.weight).abs() <= m.w_scale * 1.001).all()


def test_activation_steps_are_learned_and_do_not_hurt(tiny, data):
    cal, held = data
    qm = fresh(tiny, 8, 6).set_quant_state(weight=True)
    qm.calibrate_activations_(cal.subset(48).batches(48))
    qm.set_quant_state(weight=True, act=True)
    before = {n: float(m.a_scale) for n, m in qm.quant_layers()}
    s0 = sqnr_db(qm, held, act=True)
    reconstruct_(qm, cal, Phase.ACTIVATION, ReconConfig.activation_defaults(iters=30, cache_batch_size=96),
                 progress=False)
    after = {n: float(m.a_scale) for n, m in qm.quant_layers()}
    assert sum(before[n] != after[n] for n in before) >= len(find_units(qm))
    assert all(v > 0 for v in after.values())
    assert sqnr_db(qm, held, act=True) > s0 - 0.2
    assert not any(p.requires_grad for p in qm.parameters())


def test_a_phase_is_its_objective(tiny, data, monkeypatch):
    """optimise_unit is one loop for every phase: the objective in OBJECTIVES decides what is learned, the loss
    terms and what stays. A phase defined at test time (learning the unit's biases, nothing else) runs through it
    unchanged: its parameters move, the rounding stays nearest, each iteration enters its context once."""
    cal, _ = data
    seen = []

    class Biases(UnitObjective):
        def begin(self):
            return [layer.bias for layer in self.unit.layers() if layer.bias is not None]

        @contextlib.contextmanager
        def iteration(self, k):
            seen.append(k)
            yield lambda rec: rec

        def finish(self):
            seen.append("finish")

    monkeypatch.setitem(OBJECTIVES, Phase.WEIGHT, Biases)
    qm = fresh(tiny).set_quant_state(weight=True)
    unit = next(u for u in find_units(qm) if u.is_block)
    inputs, target = capture_unit_io(qm, unit, cal, 96, CacheSpec(), quantized=False, act=False, want_output=True)
    before = [layer.bias.clone() for layer in unit.layers() if layer.bias is not None]
    summary = optimise_unit(unit, Phase.WEIGHT, inputs, target, ReconConfig(iters=5, lr=1e-2), 0,
                            torch.device("cpu"), progress=False)
    after = [layer.bias for layer in unit.layers() if layer.bias is not None]
    assert seen == [0, 1, 2, 3, 4, "finish"] and set(summary) == {"rec_first", "rec_last"}
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(layer.rounding is WeightRounding.NEAREST and not layer.bias.requires_grad for layer in unit.layers())


def test_adaround_objective_adds_the_regulariser_after_the_warm_up(tiny):
    """λ Σ (1 − |2h(α) − 1|^β) joins the loss once the warm-up (20 %) is over, with β decaying 20 → 2 (AdaRound,
    Eq. 24-25): iteration 5 of 10 has β = 2 + 18 · (1 − 3/8) = 13.25."""
    qm = fresh(tiny)
    unit = next(u for u in find_units(qm) if u.is_block)
    objective = AdaRoundObjective(unit, ReconConfig(iters=10, round_weight=0.5))
    alphas = objective.begin()
    assert alphas and all(layer.rounding is WeightRounding.ADAROUND_SOFT for layer in unit.layers())
    with objective.iteration(1) as total:
        assert float(total(torch.tensor(1.0))) == 1.0
    with objective.iteration(5) as total:
        reg = sum(rounding_reg(adaround_h(a), 13.25) for a in alphas)
        assert torch.allclose(total(torch.tensor(1.0)), 1.0 + 0.5 * reg)
    objective.finish()
    assert all(layer.rounding is WeightRounding.ADAROUND_HARD for layer in unit.layers())


def test_activation_phase_needs_calibrated_ranges(tiny, data):
    qm = fresh(tiny, 8, 8)
    with pytest.raises(RuntimeError, match="calibrate_activations_"):
        reconstruct_(qm, data[0], Phase.ACTIVATION, ReconConfig(iters=1), progress=False)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny, data, tmp_path, monkeypatch):
    cal, _ = data
    cfg = ReconConfig(iters=4, cache_batch_size=96, seed=3)
    meta = {"w_bits": 4, "test": 1}
    whole = fresh(tiny)
    resumable_reconstruct(whole, cal, Phase.WEIGHT, cfg, tmp_path / "a.pt", meta, progress=False)

    import pipeline.quantize as pipeline
    saves = {"n": 0}
    real_save = pipeline.save_artifact

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves["n"] += 1
        if saves["n"] == 3:
            raise KeyboardInterrupt  # killed right after the third unit's checkpoint
    monkeypatch.setattr(pipeline, "save_artifact", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        resumable_reconstruct(fresh(tiny), cal, Phase.WEIGHT, cfg, tmp_path / "b.pt", meta, progress=False)
    monkeypatch.setattr(pipeline, "save_artifact", real_save)
    resume = load_progress(partial_path(tmp_path / "b.pt"), PARTIAL_KIND, meta, needs=RESUME_KEYS)
    assert resume["next_unit"] == 3 and len(resume["summaries"]) == 3
    resumed = fresh(tiny).load_quant_state_dict_(resume["quant_state"])   # as a step builds it from the checkpoint
    summaries = resumable_reconstruct(resumed, cal, Phase.WEIGHT, cfg, tmp_path / "b.pt", meta, resume,
                                      progress=False)
    assert len(summaries) == len(find_units(resumed))
    a, b = whole.quant_state_dict(), resumed.quant_state_dict()
    assert a.keys() == b.keys()
    for name in a:
        for key, value in a[name].items():
            assert (torch.equal(value, b[name][key]) if torch.is_tensor(value) else value == b[name][key]), \
                (name, key)


def test_stale_and_old_checkpoints_are_named_and_ignored(tiny, data, tmp_path, capsys):
    cal, _ = data
    meta = {"w_bits": 4, "test": 1}
    ckpt = partial_path(tmp_path / "a.pt")
    assert load_progress(ckpt, PARTIAL_KIND, meta, needs=RESUME_KEYS) is None   # none there: nothing said
    resumable_reconstruct(fresh(tiny), cal.subset(8), Phase.WEIGHT, ReconConfig(iters=1, cache_batch_size=8),
                          tmp_path / "a.pt", meta, progress=False)
    assert load_progress(ckpt, PARTIAL_KIND, meta, needs=RESUME_KEYS) is not None
    assert load_progress(ckpt, PARTIAL_KIND, {**meta, "w_bits": 8}, needs=RESUME_KEYS) is None
    assert load_progress(ckpt, PARTIAL_KIND, meta, needs=[*RESUME_KEYS, "later"]) is None
    ckpt.write_bytes(ckpt.read_bytes()[:100])   # a killed write
    assert load_progress(ckpt, PARTIAL_KIND, meta, needs=RESUME_KEYS) is None
    out = capsys.readouterr().out
    assert "its w_bits differs; starting over" in out and "holds no later" in out and "cannot be read" in out


def test_artifact_round_trip_and_mismatch(tiny, data, w4, tmp_path):
    cal, held = data
    qm = fresh(tiny, 4, 8).load_quant_state_dict_(w4[0].quant_state_dict()).set_quant_state(weight=True)
    qm.calibrate_activations_(cal.subset(32).batches(32))
    qm.set_quant_state(weight=True, act=True)
    meta = {"model": "tiny", "ckpt": "x", "w_bits": 4, "a_bits": 8, "policy": "d2dpm", "channel_wise": False}
    path = save_artifact(tmp_path / "q.pt", "quant", meta, {"quant_state": qm.quant_state_dict()})
    loaded, got = load_quant_model(tiny.model.diffusion_model, path, {"w_bits": 4, "a_bits": 8}, family=FAMILY)
    x, t, c = next(held.batches(16))
    assert torch.equal(loaded(x, t, context=c), qm(x, t, context=c))
    with pytest.raises(ArtifactMismatch, match="w_bits=4.*w_bits=8"):
        load_quant_model(tiny.model.diffusion_model, path, {"w_bits": 8}, family=FAMILY)


# ---- the scripts --------------------------------------------------------------------------------------------------


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "quant_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steps_1_to_3_on_a_tiny_model(tiny, tmp_path, capsys):
    from ldm.util import UserFacingError
    cfg_path, ckpt = tiny_models.write(tiny_models.config(tiny_models.CLASS_COND), tiny, tmp_path / "m")
    common = ["--config", str(cfg_path), "--ckpt", str(ckpt), "--steps", "5", "--outdir", str(tmp_path / "out")]
    load_script("collect_imagenet_calibration_set").main(
        common + ["--n", "48", "--n_holdout", "16", "--calibration_trajectories_per_class", "3"])
    qw, qa = load_script("quantize_weight"), load_script("quantize_weight_activation")
    qw.main(common + ["--weight_iters", "4"])
    run = tmp_path / "out" / "custom" / "scale3_eta0_steps5"
    assert (run / "w4" / "quant_w4.pt").exists() and not partial_path(run / "w4" / "quant_w4.pt").exists()
    assert "AdaRound" in capsys.readouterr().out
    qa.main(common + ["--act_iters", "3", "--act_init_samples", "16"])
    art = torch.load(run / "w4a8" / "quant_w4a8.pt", weights_only=True)
    assert art["meta"]["a_bits"] == 8 and art["meta"]["w_bits"] == 4 and "sqnr_db" in art["meta"]
    qw.main(common + ["--weight_iters", "4"])
    assert "skipping" in capsys.readouterr().out
    # bad inputs: one-line errors naming the problem
    # a calibration set of another grid: copied into the 7-step run directory, or recorded on other timesteps
    (tmp_path / "out" / "custom" / "scale3_eta0_steps7").mkdir()
    import shutil
    shutil.copy(run / "calibration.pt", tmp_path / "out" / "custom" / "scale3_eta0_steps7" / "calibration.pt")
    with pytest.raises(ArtifactMismatch, match="steps=5.*steps=7"):
        qw.main(common[:4] + ["--steps", "7", "--outdir", str(tmp_path / "out"), "--weight_iters", "2"])
    cal = torch.load(run / "calibration.pt", weights_only=True)
    cal["meta"]["timesteps"] = [t + 1 for t in cal["meta"]["timesteps"]]
    payload = {k: v for k, v in cal.items() if k != "meta"}
    meta = {k: v for k, v in cal["meta"].items() if k not in ("format", "version")}
    save_artifact(run / "calibration.pt", "calibration", meta, payload)
    with pytest.raises(ArtifactMismatch, match="DDIM grid"):
        qw.main(common + ["--weight_iters", "2", "--force"])
    with pytest.raises(ArtifactMismatch, match="not found.*quantize_weight.py --w_bits 8"):  # no W8 weights yet
        qa.main(common + ["--w_bits", "8", "--act_iters", "2", "--act_init_samples", "4"])
    with pytest.raises(ArtifactMismatch, match="policy='d2dpm'.*policy='all'"):  # weights of another policy
        qa.main(common + ["--policy", "all", "--act_iters", "2", "--act_init_samples", "4"])
    with pytest.raises(UserFacingError, match="unknown --policy"):
        qw.main(common + ["--policy", "nope"])
    # an artifact from another model (other checkpoint file)
    other = tiny_models.build(tiny_models.config(tiny_models.CLASS_COND), seed=1)
    _, ckpt2 = tiny_models.write(tiny_models.config(tiny_models.CLASS_COND), other, tmp_path / "m2")
    with pytest.raises(ArtifactMismatch, match="ckpt="):
        qa.main(["--config", str(cfg_path), "--ckpt", str(ckpt2)] + common[4:] + ["--act_iters", "2"])


def test_qncd_smoothing_through_steps_2_and_3(tiny, tmp_path):
    """--scale_split_static: S is folded in before the weight ranges, persisted in both artifacts, restored
    exactly by the loader; the smoothed model with quantization off is still the FP UNet."""
    cfg_path, ckpt = tiny_models.write(tiny_models.config(tiny_models.CLASS_COND), tiny, tmp_path / "m")
    common = ["--config", str(cfg_path), "--ckpt", str(ckpt), "--steps", "5", "--outdir", str(tmp_path / "out")]
    load_script("collect_imagenet_calibration_set").main(
        common + ["--n", "32", "--n_holdout", "8", "--calibration_trajectories_per_class", "2"])
    qw, qa = load_script("quantize_weight"), load_script("quantize_weight_activation")
    qw.main(common + ["--weight_iters", "2", "--scale_split_static"])
    qa.main(common + ["--act_iters", "1", "--act_init_samples", "8", "--scale_split_static"])
    path = tmp_path / "out" / "custom" / "scale3_eta0_steps5" / "w4a8" / "quant_w4a8.pt"
    art = torch.load(path, weights_only=True)
    assert art["meta"]["smoothing"] == "code" and art["smoothing"]["factors"]
    unet = tiny.model.diffusion_model
    qm, _ = load_quant_model(unet, path, {"smoothing": "code", "a_bits": 8}, family=FAMILY)
    again, _ = load_quant_model(unet, path, {"smoothing": "code"}, family=FAMILY)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)
    c = tiny.get_learned_conditioning({"class_label": torch.tensor([0, 1, 2, 3])}).detach()
    with torch.no_grad():
        assert torch.equal(qm(x, t, context=c), again(x, t, context=c))
        qm.set_quant_state(weight=False, act=False)
        ref = unet(x, t, context=c)
        assert float((qm(x, t, context=c) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    with pytest.raises(ArtifactMismatch, match="smoothing"):  # the smoothed weights need the flag in step 3 too
        qa.main(common + ["--act_iters", "1", "--act_init_samples", "8", "--force"])
    # --quant_mode qncd: QNCD's recipe = the smoothing above (code formula) + running-stat ranges; --act_iters 0 skips
    # step learning (QNCD's released flow)
    qa.main(common + ["--act_iters", "0", "--act_init_samples", "8", "--quant_mode", "qncd", "--force"])
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["smoothing"] == "code" and meta["running_stat"] == "all" and meta["act_iters"] == 0
    assert math.isfinite(meta["sqnr_before_running_stat_db"]) and math.isfinite(meta["sqnr_db"])
    from ldm.util import UserFacingError
    with pytest.raises(UserFacingError, match="--rs_sm_only .* --sm_abit"):
        qa.main(common + ["--rs_sm_only", "--scale_split_static"])


def test_running_stat_is_an_ema_of_batch_extremes(tiny, data):
    """Known answer on the first layer (its input is x itself): after two batches with extremes (−2, 3) and (−1, 5),
    the EMA bounds are 0.95·(−2) + 0.05·(−1) = −1.95 and 0.95·3 + 0.05·5 = 3.1, and Δ, z follow the min-max formula."""
    qm = fresh(tiny, a_bits=8)
    qm.set_quant_state(weight=True)
    qm.calibrate_activations_(data[0].batches(32))
    qm.set_quant_state(weight=True, act=True)
    x0, t, c = next(data[0].batches(4))
    first = qm.model.input_blocks[0][0]
    assert isinstance(first, QuantLayer) and first.act_quant
    b1, b2 = x0.clamp(-1.5, 2.5), x0.clamp(-0.5, 4.5)
    b1[0, 0, 0, 0], b1[0, 0, 0, 1] = -2.0, 3.0
    b2[0, 0, 0, 0], b2[0, 0, 0, 1] = -1.0, 5.0
    qm.ema_activation_ranges_([(b1, t, c), (b2, t, c)])
    assert float(first.a_scale) == pytest.approx((3.1 + 1.95) / 255, rel=1e-6)
    assert float(first.a_zero_point) == round(1.95 / ((3.1 + 1.95) / 255))
    with pytest.raises(RuntimeError, match="no active activation quantizer"):  # no attention quantizers (no sm_abit)
        qm.ema_activation_ranges_([(b1, t, c)], softmax_only=True)


def _soft_layer() -> QuantLayer:
    from quant.quantizer import PerChannel, QScheme
    torch.manual_seed(0)
    layer = QuantLayer(torch.nn.Linear(16, 8), QScheme(4, granularity=PerChannel(0)), None)
    layer.weight.requires_grad_(False)
    layer.init_weight_qparams_()
    layer.init_adaround_()
    layer.weight_quant = True
    return layer


def test_one_adaround_iteration_shares_h_and_floor_with_the_same_values_and_gradient():
    """Issue 29: ⌊W/Δ⌋ once per unit and h(α) once per iteration (shared by the soft weight and the regulariser) give
    the per-use formulation's weight and loss exactly and its gradient to float rounding; α's version moving on
    (the optimiser's step) leaves no stale h behind."""
    from quant.quantizer import adaround_fake_quant, round_reg, rounding_reg
    from quant.reconstruction import _soft_rounding, lp_loss
    layer = _soft_layer()
    x, target = torch.randn(4, 16), torch.randn(4, 8)
    s = layer.w_scheme

    def per_use() -> tuple[torch.Tensor, torch.Tensor]:
        w = adaround_fake_quant(layer.weight, layer.w_scale, layer.w_zero_point, layer.alpha, s.qmin, s.qmax, False)
        loss = lp_loss(torch.nn.functional.linear(x, w, layer.bias), target, 2.0) + 0.01 * round_reg(layer.alpha, 8.)
        return loss, torch.autograd.grad(loss, layer.alpha)[0]

    with torch.enable_grad(), _soft_rounding([layer]) as h:
        shared = lp_loss(layer(x), target, 2.0) + 0.01 * rounding_reg(h[0], 8.)
        grad = torch.autograd.grad(shared, layer.alpha)[0]
    assert layer.soft_h is None                      # released after the iteration
    loss, want = per_use()
    assert torch.equal(shared, loss)
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        layer.alpha.add_(0.5)                        # the optimiser's step: the next forward sees the new α
    torch.testing.assert_close(layer.quantized_weight(), adaround_fake_quant(
        layer.weight, layer.w_scale, layer.w_zero_point, layer.alpha, s.qmin, s.qmax, False), rtol=0, atol=0)


def test_lp_loss_at_p2_equals_the_absolute_value_form_with_its_gradient():
    pred, target = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    reference = (pred - target).abs().pow(2.0).sum(1).mean()
    (g_ref,) = torch.autograd.grad(reference, pred)
    from quant.reconstruction import lp_loss
    loss = lp_loss(pred, target, 2.0)
    (g,) = torch.autograd.grad(loss, pred)
    assert torch.equal(loss, reference) and torch.equal(g, g_ref)


def test_a_weight_no_gradient_reaches_is_quantized_once_across_iterations(monkeypatch):
    """The activation phase learns Δ_a only: the (hard-rounded) fake weight is cached with autograd on, too."""
    layer = _soft_layer()
    layer.harden_()
    calls = []
    original = type(layer).quantized_weight
    monkeypatch.setattr(type(layer), "quantized_weight", lambda self: calls.append(1) or original(self))
    with torch.enable_grad():
        for _ in range(3):
            layer(torch.randn(2, 16))
    assert len(calls) == 1
    layer.weight.requires_grad_(True)                # a gradient to W: recomputed every time
    with torch.enable_grad():
        layer(torch.randn(2, 16))
        layer(torch.randn(2, 16))
    assert len(calls) == 3


# ---- activations kept instead of recomputed when they fit (issue 29) -------------------------------------------------

def test_saved_tensor_bytes_counts_what_the_backward_keeps():
    from quant.reconstruction import saved_tensor_bytes
    x, w = torch.randn(1000, requires_grad=True), torch.randn(1000)
    assert saved_tensor_bytes(lambda: x.exp().sum()) == 4000                 # exp keeps its result
    assert saved_tensor_bytes(lambda: (x * w).sum()) == 4000                 # x·w keeps w for x's gradient
    assert saved_tensor_bytes(lambda: (x * x[:500].repeat(2)).sum()) == 8000   # x once, the repeat once
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: x.exp().sum()) == 0


def test_compvis_blocks_keep_activations_inside_and_recompute_after(tiny):
    from ldm.modules.attention import BasicTransformerBlock
    from pipeline.families.base import compvis_keep_activations
    unet = tiny.model.diffusion_model
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    assert block.checkpoint   # CompVis' transformer blocks always recompute
    with compvis_keep_activations(block) as recomputed:
        assert recomputed and not block.checkpoint
    assert block.checkpoint
    res = next(m for m in unet.modules() if type(m).__name__ == "ResBlock")
    with compvis_keep_activations(res) as recomputed:
        assert recomputed is res.use_checkpoint


def test_kept_activations_give_the_recomputed_models_bits(tiny, data):
    """The same reconstruction with every unit recomputing (budget 0) and with the activations kept (the default
    budget): the same quantized model bit for bit; the timings say which units recomputed."""
    cal, _ = data
    states, recomputes = [], []
    for budget in (0, ReconConfig.recompute_above):
        qm = fresh(tiny).set_quant_state(weight=True)
        timings: list = []
        reconstruct_(qm, cal, Phase.WEIGHT, ReconConfig(iters=12, cache_batch_size=96, recompute_above=budget),
                     progress=False, timings=timings)
        states.append(qm.quant_state_dict())
        recomputes.append({t["unit"]: t["recompute"] for t in timings if t["kind"] == "BasicTransformerBlock"})
        assert all(m.checkpoint for m in qm.modules() if type(m).__name__ == "BasicTransformerBlock")  # restored
    assert recomputes[0] and set(recomputes[0].values()) == {True}
    assert recomputes[1].keys() == recomputes[0].keys() and set(recomputes[1].values()) == {False}
    assert _same(*states)


def _same(a, b) -> bool:
    """Nested dicts / lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_one_fp_pass_fills_the_targets_of_the_units_that_fit(tiny, data, monkeypatch):
    """The FP targets of several units come from one pass while their caches fit ``fp_capture_bytes`` (the FP model
    does not change as units are reconstructed): fewer passes, the same quantized model bit for bit; with a budget
    of 0, one pass a unit (as before)."""
    import quant.reconstruction as recon
    cal, _ = data
    passes, real = [], recon.capture_units_io

    def counting(qm, units, d, *args, **kw):
        if len(d) == len(cal) and not (args[2] if len(args) > 2 else kw.get("quantized")):
            passes.append(len(units))
        return real(qm, units, d, *args, **kw)
    monkeypatch.setattr(recon, "capture_units_io", counting)
    states, counts = [], []
    for budget in (0, ReconConfig.fp_capture_bytes):
        passes.clear()
        qm = fresh(tiny).set_quant_state(weight=True)
        reconstruct_(qm, cal, Phase.WEIGHT, ReconConfig(iters=6, cache_batch_size=40, fp_capture_bytes=budget),
                     progress=False)
        states.append(qm.quant_state_dict())
        counts.append(list(passes))
    n_units = len(find_units(fresh(tiny)))
    assert counts[0] == [1] * n_units                      # one FP pass a unit
    assert sum(counts[1]) == n_units and len(counts[1]) < n_units / 4   # the tiny model's caches fit: few passes
    assert _same(*states)


def test_killed_steps_2_and_3_resume_to_the_same_bytes(tiny, tmp_path, monkeypatch, capsys):
    """Steps 2 and 3 (with QNCD's smoothing) killed after a unit's checkpoint and run again: the model is built
    from the checkpoint as from any quant artifact (smoothing, ranges, rounding, learned steps), the SQNRs taken
    before the interruption are read back, and both artifacts equal an uninterrupted run's byte for byte."""
    import hashlib
    import pipeline.quantize as pipeline
    cfg_path, ckpt = tiny_models.write(tiny_models.config(tiny_models.CLASS_COND), tiny, tmp_path / "m")
    qw, qa = load_script("quantize_weight"), load_script("quantize_weight_activation")
    paths = {}
    for name in ("whole", "killed"):
        common = ["--config", str(cfg_path), "--ckpt", str(ckpt), "--steps", "5", "--outdir", str(tmp_path / name)]
        load_script("collect_imagenet_calibration_set").main(
            common + ["--n", "32", "--n_holdout", "8", "--calibration_trajectories_per_class", "2"])
        steps = [(qw, ["--weight_iters", "2", "--scale_split_static"]),
                 (qa, ["--act_iters", "2", "--act_init_samples", "8", "--scale_split_static"])]
        for script, flags in steps:
            if name == "killed":
                real_save, saves = pipeline.save_artifact, []

                def save_then_die(*args, **kwargs):
                    real_save(*args, **kwargs)
                    saves.append(args[0])
                    if len(saves) == 2:
                        raise KeyboardInterrupt   # killed right after the second unit's checkpoint
                monkeypatch.setattr(pipeline, "save_artifact", save_then_die)
                with pytest.raises(KeyboardInterrupt):
                    script.main(common + flags)
                monkeypatch.undo()
                assert all(p.name.endswith(".partial.pt") for p in saves)
                capsys.readouterr()
            script.main(common + flags)
            if name == "killed":
                assert "resuming" in capsys.readouterr().out
        run = tmp_path / name / "custom" / "scale3_eta0_steps5"
        paths[name] = [run / "w4" / "quant_w4.pt", run / "w4a8" / "quant_w4a8.pt"]
        assert torch.load(paths[name][1], weights_only=True)["meta"]["smoothing"] == "code"
    for whole, killed in zip(paths["whole"], paths["killed"]):
        assert killed.exists() and not partial_path(killed).exists()
        digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (whole, killed)]
        assert digest[0] == digest[1], killed.name
