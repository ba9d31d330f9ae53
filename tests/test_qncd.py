"""QNCD: embedding-derived feature smoothing (exact in FP, on cin256-v2 with random weights and on the embedded
default; smaller second-conv input ranges; persistence; order with the weight quantizers) and the runtime noise
probe (planted bias recovered and removed, call overhead, reset per trajectory, D² base), plus the PLMS sampler."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import tiny_models
from conftest import REPO
from ldm.models.diffusion.settings import SamplingSettings
from correction.gaussian import Granularity
from correction.qncd import CenteredProbe, QNCDProbe, bias_estimate, probe_steps, renoise
from ldm.models.diffusion.ddim import DDIMSampler, DDIMSchedule, ddim_step, sample_ddim
from ldm.models.diffusion.plms import PLMSSampler, plms_eps, plms_first_eps, sample_plms
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.util import instantiate_from_config
from pipeline.families.compvis_ldm import ClassConditionalLDM
from quant.config import QuantConfig
from quant.model import QuantModel
from quant.quantizer import ScaleSearch
from quant.smoothing import (ChannelSmoothing, Formula, apply_smoothing_, conv_input_ranges, load_smoothing_,
                             resblocks, smoothing_effect, smoothing_factors, smoothing_state)

FASHION = REPO / "models" / "ldm" / "fashion-ldm-vq-4"
GRID20 = torch.arange(1, 1000, 50)  # the 20-step DDIM grid: the calibration timesteps
SPECIALS = ClassConditionalLDM().quant_specials()   # cin256-v2, the embedded default, the tiny LDM: CompVis UNets


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return tiny_models.build(tiny_models.config(tiny_models.CLASS_COND))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def unet_from(config_path, seed: int = 0):
    torch.manual_seed(seed)
    unet = instantiate_from_config(OmegaConf.load(config_path).model.params.unet_config).eval()
    for m in unet.modules():  # zero-initialised convs (out_layers[3], the output conv) would make smoothing vacuous
        if isinstance(m, torch.nn.Conv2d) and not m.weight.detach().any():
            m.reset_parameters()
    return unet


def fashion_unet():
    unet = unet_from(FASHION / "config.yaml")
    sd = torch.load(FASHION / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    p = "model.diffusion_model."
    unet.load_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)})
    return unet, sd["cond_stage_model.embedding.weight"]


def ranges(unet, batches) -> dict[str, float]:
    return {n: hi - lo for n, (lo, hi) in conv_input_ranges(unet, batches, specials=SPECIALS).items()}


# ---- smoothing ---------------------------------------------------------------------------------------------------

def test_smoothing_is_exact_in_fp_on_cin256_and_narrows_the_second_conv_inputs():
    """cin256-v2's UNet (random weights, 16×16 latents to stay fast): FP output unchanged within 1e-5; every second
    conv's input range shrinks or stays (S ≥ γ = 1 at init), and the embedding-derived part of S is active."""
    unet = unet_from(REPO / "configs" / "latent-diffusion" / "cin256-v2.yaml")
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randn(2, 3, 16, 16, generator=g), torch.tensor([901, 151]), torch.randn(2, 1, 512, generator=g))]
    with torch.no_grad():
        y0 = unet(*batch[0][:2], context=batch[0][2])
    r0 = ranges(unet, batch)
    factors = smoothing_factors(unet, GRID20, specials=SPECIALS)
    assert set(factors) == {n for n, _ in resblocks(unet, specials=SPECIALS)} and len(factors) == 22
    assert max(float(s.max()) for s in factors.values()) > 1.5  # channels whose embedding stands out of its group
    apply_smoothing_(unet, factors, specials=SPECIALS)
    with torch.no_grad():
        y1 = unet(*batch[0][:2], context=batch[0][2])
    r1 = ranges(unet, batch)
    assert rel_err(y1, y0) <= 1e-5
    assert all(r1[n] <= r0[n] * (1 + 1e-5) for n in r0)  # equal up to float noise where S = 1
    assert sum(r1.values()) < 0.98 * sum(r0.values())


@pytest.mark.parametrize("formula", list(Formula))
def test_smoothing_is_exact_in_fp_on_the_embedded_default(formula):
    unet, table = fashion_unet()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 3, 8, 8, generator=g), GRID20.flip(0)[:8]
    c = table[torch.arange(8) % 11][:, None]
    with torch.no_grad():
        y0 = unet(x, t, context=c)
    factors = smoothing_factors(unet, [(x, t, c)], formula=formula, specials=SPECIALS)
    apply_smoothing_(unet, factors, specials=SPECIALS)
    with torch.no_grad():
        assert rel_err(unet(x, t, context=c), y0) <= 1e-5
    if formula is Formula.CODE:
        # 32 GroupNorm groups over 32 or 64 channels: the standardized embedding is 0 or ±1, so the code's S = γ
        for name, block in resblocks(unet, specials=SPECIALS):
            torch.testing.assert_close(factors[name], block.out_layers[0].weight.detach())
    else:  # the paper's S would be 0 where every group has one channel: those blocks stay unsmoothed
        one_per_group = {n for n, b in resblocks(unet, specials=SPECIALS) if b.out_layers[0].num_channels == 32}
        assert one_per_group.isdisjoint(factors)


def test_smoothing_effect_measures_range_and_both_sides_of_the_trade():
    """Known answers on the embedded default. S = 2 everywhere: the range halves, and both SQNRs are unchanged
    (quantization is scale-equivariant, and powers of two are exact). A planted outlier channel (γ, β × 50) with S =
    50 on it: the range falls ~50×, A6 SQNR gains, and W4 SQNR loses, since W·S now holds the outlier column."""
    unet, table = fashion_unet()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), GRID20[torch.arange(16) % 20], table[torch.arange(16) % 10][:, None])]
    name, block = resblocks(unet, specials=SPECIALS)[0]
    c = block.out_layers[3].weight.shape[1]
    twos = smoothing_effect(unet, {name: torch.full((c,), 2.0)}, batches, specials=SPECIALS)[name]
    assert twos["range"][1] == pytest.approx(twos["range"][0] / 2, rel=1e-6)
    for before, after in (*twos["act_sqnr_db"].values(), twos["weight_sqnr_db"]):
        assert after == pytest.approx(before, abs=1e-3)
    with torch.no_grad():
        block.out_layers[0].weight[5] *= 50
        block.out_layers[0].bias[5] = block.out_layers[0].bias[5] * 50 + 50  # SiLU passes it: a positive outlier
    s = torch.ones(c)
    s[5] = 50.0
    e = smoothing_effect(unet, {name: s}, batches, a_bits=(6,), specials=SPECIALS)[name]
    assert e["range"][1] < e["range"][0] / 10
    assert e["act_sqnr_db"][6][1] > e["act_sqnr_db"][6][0] + 10
    assert e["weight_sqnr_db"][1] < e["weight_sqnr_db"][0] - 1
    with pytest.raises(ValueError, match="unsmoothed FP UNet"):
        apply_smoothing_(unet, {name: s}, specials=SPECIALS)
        smoothing_effect(unet, {name: s}, batches, specials=SPECIALS)


@pytest.mark.parametrize("formula", list(Formula))
def test_smoothing_is_exact_in_fp_on_scale_shift_resblocks(formula):
    """The LSUN-style path (use_scale_shift_norm): S from the scale half of the embedding."""
    cfg = tiny_models.config(tiny_models.UNCOND_KL)
    torch.manual_seed(0)
    unet = instantiate_from_config(cfg.model.params.unet_config).eval()
    for m in unet.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.detach().any():
            m.reset_parameters()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([51, 901])
    with torch.no_grad():
        y0 = unet(x, t)
        factors = smoothing_factors(unet, GRID20, formula=formula, specials=SPECIALS)
        assert factors and all(b.use_scale_shift_norm for _, b in resblocks(unet, specials=SPECIALS))
        apply_smoothing_(unet, factors, specials=SPECIALS)
        assert rel_err(unet(x, t), y0) <= 1e-5


def test_smoothing_on_a_quant_model_keeps_the_fp_path_and_feeds_the_activation_quantizer_a_over_s(tiny):
    unet = copy.deepcopy(tiny.model.diffusion_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-like GroupNorm affines, some γ negative: S takes their sign
        for _, block in resblocks(unet, specials=SPECIALS):
            block.out_layers[0].weight.copy_(torch.randn(block.out_layers[0].weight.shape, generator=g))
    x, c = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 1, 16, generator=g)
    t = torch.tensor([1, 301, 601, 951])
    with torch.no_grad():
        y_fp = unet(x, t, context=c)
    qm = QuantModel(unet, QuantConfig(4, 8), search=ScaleSearch.MAX, specials=SPECIALS)
    factors = smoothing_factors(qm, GRID20)
    name = next(iter(factors))
    conv = qm.model.get_submodule(name).out_layers[3]
    seen = []
    hook = conv.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        qm(x, t, context=c)
    apply_smoothing_(qm, factors)
    with torch.no_grad():
        qm(x, t, context=c)
    hook.remove()
    torch.testing.assert_close(seen[1], seen[0] / factors[name].view(1, -1, 1, 1))
    assert isinstance(qm.model.get_submodule(name).out_layers[2], ChannelSmoothing)
    assert f"{name}.out_layers.3" in dict(qm.quant_layers())  # the conv keeps its name (quantized-state keys)
    qm.init_weights_()
    qm.set_quant_state(weight=False, act=False)  # what BRECQ's FP targets run: the original code used a stale W here
    with torch.no_grad():
        assert rel_err(qm(x, t, context=c), y_fp) <= 1e-5
        assert rel_err(unet(x, t, context=c), y_fp) == 0  # the FP UNet it was copied from is untouched
    with pytest.raises(ValueError, match="already smoothed"):
        apply_smoothing_(qm, factors)
    late = QuantModel(unet, QuantConfig(4, 8), search=ScaleSearch.MAX, specials=SPECIALS).init_weights_()
    with pytest.raises(RuntimeError, match="before init_weights_"):
        apply_smoothing_(late, factors)


def test_smoothing_state_round_trip_is_exact_with_the_quantized_state(tiny):
    unet = tiny.model.diffusion_model  # QuantModel copies it: not modified
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.tensor([1, 301, 601, 951]),
                torch.randn(4, 1, 16, generator=g))]
    qm = QuantModel(unet, QuantConfig(4, 8), search=ScaleSearch.MAX, specials=SPECIALS)
    apply_smoothing_(qm, smoothing_factors(qm, batches, formula=Formula.PAPER))
    qm.init_weights_().calibrate_activations_(batches).set_quant_state(weight=True, act=True)
    buf = io.BytesIO()
    torch.save({"smoothing": smoothing_state(qm), "quant_state": qm.quant_state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    # from the checkpoint's weights again
    fresh = QuantModel(unet, QuantConfig(4, 8), search=ScaleSearch.MAX, specials=SPECIALS)
    load_smoothing_(fresh, saved["smoothing"])
    fresh.load_quant_state_dict_(saved["quant_state"]).set_quant_state(weight=True, act=True)
    for (n, a), b in zip(qm.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n  # folded weights and S, bit for bit
    x, t, c = batches[0]
    with torch.no_grad():
        assert torch.equal(qm(x, t, context=c), fresh(x, t, context=c))
    with pytest.raises(ValueError, match="not a smoothing state"):
        load_smoothing_(fresh, {"factors": {}})


# ---- the probe ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def alphas_cumprod():
    return torch.tensor(np.cumprod(1 - make_beta_schedule("linear", 1000, 0.0015, 0.0195)), dtype=torch.float32)


def test_probe_schedule_matches_the_code():
    assert probe_steps(50, 10) == [6, 16, 26, 36, 46]
    assert probe_steps(20, 10) == [6, 16]
    assert probe_steps(20, 10, phase=9) == [0, 10]
    assert QNCDProbe(steps=[3, 7]).extra_calls(20) == 2
    with pytest.raises(ValueError):
        probe_steps(20, 0)


def test_renoise_and_bias_estimate_are_the_spec_formulas():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    a_t, a_p = torch.tensor(0.3), torch.tensor(0.6)
    torch.testing.assert_close(renoise(x, a_t, a_p, z), 0.5 ** 0.5 * x + 0.5 ** 0.5 * z)
    eps = z + torch.tensor([0.5, -1., 2.]).view(1, 3, 1, 1)
    torch.testing.assert_close(bias_estimate(eps, z, Granularity.TENSOR), torch.full((1, 1, 1, 1), 0.5))
    per_channel = torch.tensor([0.5, -1., 2.]).view(1, 3, 1, 1)
    torch.testing.assert_close(bias_estimate(eps, z, Granularity.CHANNEL), per_channel)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("b", [torch.tensor(0.3), torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)],
                         ids=["scalar", "channel"])
def test_probe_recovers_a_planted_bias(tiny, alphas_cumprod, eta, b):
    """A fake quantized model ε̂ = ε_fp + b, probed on the same inputs as ε_fp with the same probe noise: μ_q differs
    by b exactly (what an ideal FP model's probe gives, 0 in expectation, is whatever remains)."""
    unet = tiny.model.diffusion_model
    gran = Granularity.TENSOR if b.numel() == 1 else Granularity.CHANNEL
    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 1, 16, generator=g)
    x = torch.randn(4, 3, 8, 8, generator=g)
    step = list(DDIMSchedule.make(alphas_cumprod, 20, eta).steps())[6]
    sigma = torch.tensor(step.sigma)
    eps = unet(x, torch.full((4,), step.t), context=c)
    mu = {}
    for name, fn in (("fp", lambda x, t, c: unet(x, t, context=c)), ("q", lambda x, t, c: unet(x, t, context=c) + b)):
        probe = QNCDProbe(granularity=gran, generator=torch.Generator().manual_seed(5)).begin(
            lambda x, t, fn=fn: fn(x, t, c), batch_size=4)
        with torch.no_grad():
            mu[name] = probe.estimate(eps, sigma, step, x)
    torch.testing.assert_close(mu["q"] - mu["fp"], b.expand_as(mu["q"]), atol=2e-6, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("b", [torch.tensor(0.3), torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)],
                         ids=["scalar", "channel"])
def test_probe_removes_a_planted_bias_along_a_chain(alphas_cumprod, eta, b):
    """The exact denoiser of N(0, s² I) data (s = 10) plus b. Before the first probe every ε̂ is used as is; after it
    ε̂ − μ_q, and at the low-noise probe μ_q is b within 20 %: the corrected model's bias is mostly gone."""
    gran = Granularity.TENSOR if b.numel() == 1 else Granularity.CHANNEL
    ac = alphas_cumprod.double()

    def ideal(x, t):  # E[ε | x_t] for x0 ~ N(0, s²): √(1−ᾱ) x_t / (ᾱ s² + 1 − ᾱ)
        a = ac[t].view(-1, 1, 1, 1).float()
        return x * (1 - a).sqrt() / (a * 100 + 1 - a)

    probe = QNCDProbe(granularity=gran)  # the loop hands it its ε (begin)
    used = []
    x_T = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sample_ddim(lambda x, t, s: ideal(x, t) + b, x_T, DDIMSchedule.make(alphas_cumprod, 20, eta), correction=probe,
                noise_sampler=lambda s: torch.randn(x_T.shape, generator=torch.Generator().manual_seed(s.i)),
                callback=lambda d: used.append(d["eps"] - ideal(d["x"], torch.full((8,), d["t"]))))
    assert [i for i, _, _ in probe.estimates] == [6, 16]
    for i in range(6):
        torch.testing.assert_close(used[i], b.expand_as(used[i]).clone(), rtol=0, atol=1e-5)
    mu_late = probe.estimates[-1][2]
    torch.testing.assert_close(used[17], (b - mu_late).expand_as(used[17]).clone(), rtol=0, atol=1e-5)
    assert float((mu_late - b).abs().max()) < 0.2 * float(b.abs().max())


def cond(model, labels):
    return model.get_learned_conditioning({"class_label": torch.tensor(labels)})


def counting(unet):
    calls = []

    def fn(x, t, c):
        calls.append(x.shape[0])
        return unet(x, t, context=c)

    return fn, calls


@pytest.mark.parametrize("sampler_cls, extra", [(DDIMSampler, 0), (PLMSSampler, 1)], ids=["ddim", "plms"])
@pytest.mark.parametrize("phase", [None, 9])
def test_probe_overhead_in_unet_calls_matches_its_schedule(tiny, sampler_cls, extra, phase):
    fn, calls = counting(tiny.model.diffusion_model)
    probe = QNCDProbe(10, phase)
    sampler = sampler_cls(tiny, model_fn=fn, correction=probe)  # the loop's begin hook binds the probe
    c, uc = cond(tiny, [0, 1]), cond(tiny, [4, 4])
    sampler.sample(S=20, batch_size=2, shape=(3, 8, 8), conditioning=c, unconditional_conditioning=uc,
                   unconditional_guidance_scale=3.0, verbose=False, generator=torch.Generator().manual_seed(0))
    # PLMS: one more for its first step, and a probe there (phase 9) needs step A's improved-Euler call too
    probe_cost = probe.extra_calls(20, plms=sampler_cls is PLMSSampler)
    assert len(calls) == 20 + extra + probe_cost == 22 + extra + (extra if phase == 9 else 0)
    assert set(calls) == {4}  # every call guided: one batch-doubled call, the probe's included
    assert [i for i, _, _ in probe.estimates] == probe_steps(20, 10, phase)


def test_mu_is_reset_between_trajectories(tiny, alphas_cumprod):
    probe = QNCDProbe(5)
    sampler = DDIMSampler(tiny, model_fn=lambda x, t, c: tiny.apply_model(x, t, c) + 0.5, correction=probe)
    c = cond(tiny, [0, 1])
    sampler.sample(S=10, batch_size=2, shape=(3, 8, 8), conditioning=c, verbose=False)
    assert probe.mu is not None and len(probe.estimates) == 2
    step0 = next(DDIMSchedule.make(alphas_cumprod, 10, 0.0).steps())
    eps, x = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    out, _ = probe(eps, torch.tensor(0.), step0, x)  # a new trajectory starts: the old μ must not leak into it
    assert torch.equal(out, eps) and probe.mu is None and probe.estimates == []
    probe.begin(lambda x, t: tiny.apply_model(x, t, torch.zeros(3, 1, 16)), batch_size=3)
    with pytest.raises(Exception, match="bound to a batch of 3"):
        probe.estimate(eps, torch.tensor(0.), step0, x)


def test_probe_after_a_base_correction_estimates_only_the_residual(alphas_cumprod):
    """A base that removes 0.2 of a planted 0.3: the probe sees (and removes) the remaining 0.1, not 0.3 again."""
    base = lambda eps, sigma, step, x: (eps - 0.2, sigma)  # noqa: E731
    fake = lambda x, t: torch.zeros_like(x) + 0.3  # noqa: E731  (its δ-mean is exactly 0.3 − mean(z))
    probe = QNCDProbe(1, 0, base=base).begin(fake)
    step = next(DDIMSchedule.make(alphas_cumprod, 10, 0.0).steps())
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out, _ = probe(fake(x, None), torch.tensor(0.), step, x)
    assert abs(float(probe.mu) - 0.1) < 0.01
    torch.testing.assert_close(out, torch.full_like(x, 0.3 - 0.2) - probe.mu)


# ---- PLMS -------------------------------------------------------------------------------------------------------

def test_plms_combinations_are_adams_bashforth():
    e, o1, o2, o3 = (torch.tensor(v) for v in (1., 2., 4., 8.))
    assert float(plms_eps(e, [o1])) == pytest.approx((3 * 1 - 2) / 2)
    assert float(plms_eps(e, [o2, o1])) == pytest.approx((23 - 16 * 2 + 5 * 4) / 12)  # old_eps: oldest first
    assert float(plms_eps(e, [o3, o2, o1])) == pytest.approx((55 - 59 * 2 + 37 * 4 - 9 * 8) / 24)
    assert float(plms_eps(e, [o3 * 9, o3, o2, o1])) == float(plms_eps(e, [o3, o2, o1]))  # only the last three
    assert float(plms_first_eps(e, o1)) == 1.5
    with pytest.raises(ValueError):
        plms_eps(e, [])


def test_plms_two_steps_match_a_hand_computation(alphas_cumprod):
    """Step 1: improved Euler (ε at x_T and at its DDIM point); step 2: (3 ε_t − ε_prev)/2; both via DDIM Eq. 12."""
    sched = DDIMSchedule.make(alphas_cumprod, 2, 0.0)
    s0, s1 = list(sched.steps())
    f = lambda x, t: torch.sin(x) * (t.float().view(-1, 1, 1, 1) / 1000)  # noqa: E731
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = torch.tensor(0.)

    def phi(x, eps, st):
        return ddim_step(x, eps, torch.tensor(st.alpha), torch.tensor(st.alpha_prev), zero, None)[0]

    t0, t1 = torch.full((2,), s0.t), torch.full((2,), s1.t)
    e0 = f(x_T, t0)
    x1 = phi(x_T, (e0 + f(phi(x_T, e0, s0), t1)) / 2, s0)
    x2 = phi(x1, (3 * f(x1, t1) - e0) / 2, s1)
    got = sample_plms(lambda x, t, s: f(x, t), x_T, sched)
    torch.testing.assert_close(got, x2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("probe_at", [0, 3])
def test_plms_probe_renoises_the_plms_update(alphas_cumprod, probe_at):
    """Issue 34: under PLMS, QNCD's plms.py re-noises x_{t'} from the full multistep update (improved Euler at the
    first step), not a DDIM step from ε_t alone. Known answer: the probe's model call sees exactly
    renoise(PLMS update of the uncorrected ε_t, z), which differs from the DDIM-step latent by far more than rounding."""
    sched = DDIMSchedule.make(alphas_cumprod, 8, 0.0)
    steps = list(sched.steps())
    f = lambda x, t: torch.sin(x) * (t.float().view(-1, 1, 1, 1) / 1000) + 0.05  # noqa: E731
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    probe = QNCDProbe(steps=[probe_at], generator=torch.Generator().manual_seed(7))
    seen = {}

    def eps_fn(x, t, step):
        if step is None and "x_hat" not in seen:           # the probe's own query (the loops' begin hook)
            seen["x_hat"] = x.clone()
        return f(x, t)

    def record(d):
        if d["i"] == probe_at:
            seen["x"], seen["eps_t"] = d["x"], d["eps_t"]

    sample_plms(eps_fn, x_T, sched, correction=probe, callback=record)
    step = steps[probe_at]
    a_t, a_prev, zero = (torch.tensor(v) for v in (step.alpha, step.alpha_prev, 0.))
    x = seen["x"]
    eps_t = f(x, torch.full((2,), step.t))                     # uncorrected at the probe step (μ reset there)
    if probe_at == 0:
        x_euler = ddim_step(x, eps_t, a_t, a_prev, zero, None)[0]
        combined = plms_first_eps(eps_t, f(x_euler, torch.full((2,), steps[1].t)))
    else:
        history = []                                            # the corrected ε of the earlier steps
        x_k = x_T
        for k in range(probe_at):
            e_k = f(x_k, torch.full((2,), steps[k].t))
            nxt = plms_first_eps(e_k, f(ddim_step(x_k, e_k, torch.tensor(steps[k].alpha),
                                                  torch.tensor(steps[k].alpha_prev), zero, None)[0],
                                        torch.full((2,), steps[k + 1].t))) if k == 0 else plms_eps(e_k, history)
            x_k = ddim_step(x_k, nxt, torch.tensor(steps[k].alpha), torch.tensor(steps[k].alpha_prev), zero, None)[0]
            history = (history + [e_k])[-3:]
        torch.testing.assert_close(x_k, x, rtol=0, atol=1e-6)
        combined = plms_eps(eps_t, history)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    plms_latent = renoise(ddim_step(x, combined, a_t, a_prev, zero, None)[0], a_t, a_prev, z)
    ddim_latent = renoise(ddim_step(x, eps_t, a_t, a_prev, zero, None)[0], a_t, a_prev, z)
    torch.testing.assert_close(seen["x_hat"], plms_latent, rtol=0, atol=1e-6)
    assert (ddim_latent - plms_latent).norm() > 1e3 * 1e-6 * plms_latent.numel() ** 0.5


def test_plms_sampler_is_deterministic_and_compvis_shaped(tiny):
    sampler = PLMSSampler(tiny)
    c, uc = cond(tiny, [0, 1]), cond(tiny, [4, 4])
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(S=10, batch_size=2, shape=(3, 8, 8), conditioning=c, unconditional_conditioning=uc,
              unconditional_guidance_scale=3.0, x_T=x_T, verbose=False, log_every_t=5)
    a, inter = sampler.sample(**kw)
    b, _ = sampler.sample(**kw)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 1 + 3  # x_T, index 9 (first), 5, 0
    with pytest.raises(ValueError, match="eta must be 0"):
        sampler.sample(**{**kw, "eta": 1.0})


def test_probe_binds_itself_to_the_ddim_loop_and_costs_its_schedule():
    """Unbound, the probe gets the loop's guided ε (the loops' begin hook): it works through the plain
    sample_latents / generation path, and its extra UNet calls are exactly its probe steps."""
    import tiny_models
    from correction.qncd import QNCDProbe
    from ldm.sample import sample_latents
    torch.set_num_threads(1)
    model = tiny_models.build(tiny_models.config(tiny_models.CLASS_COND))
    calls = []

    def counting(x, t, c):
        calls.append(int(t[0]))
        return model.apply_model(x, t, c)

    probe = QNCDProbe(5, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = sample_latents(model, [0, 1, 2], settings=SamplingSettings(10, 0.0, 3.0), batch_size=3, generator=g,
                             model_fn=counting, correction=probe, progress=False)
    assert torch.isfinite(out).all()
    assert len(calls) == 10 + probe.extra_calls(10) == 12
    assert [i for i, _, _ in probe.estimates] == [i for i in range(10) if probe.is_probe(i)]


# ---- the centered probe (issue 34 item 3) -------------------------------------------------------------------------

def centered_fit(alphas_cumprod, gran, fp_mean, bias, eta=0.0):
    """A step-5 Gaussian fit whose tables say: E[ε_fp] = ``fp_mean`` and E[Δ] = ``bias`` at every timestep (per
    channel for a channel-wise fit): μ_x = fp_mean + bias, μ_y = bias; unit variances, uncorrelated."""
    from correction.gaussian import GaussianFit
    from correction.statistics import SamplingConfig
    sampling = SamplingConfig.make(alphas_cumprod, 20, eta, 1.0)
    t, g = len(sampling.timesteps), (1 if gran is Granularity.TENSOR else 3)
    m, b = (torch.as_tensor(v, dtype=torch.float64).flatten().expand(g) for v in (fp_mean, bias))
    mu = torch.stack([m + b, b], -1).expand(t, g, 2).clone()
    cov = torch.eye(2, dtype=torch.float64).expand(t, g, 2, 2).clone()
    return GaussianFit(gran, sampling, mu, cov, torch.full((t, g), 1000))


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("gran", [Granularity.TENSOR, Granularity.CHANNEL])
def test_centered_probe_recovers_a_planted_bias_and_gives_zero_on_the_fp_model(alphas_cumprod, gran, eta):
    """An FP model with its own mean ε, c(t) = c, on top of the exact denoiser of N(0, I) data (x_t ~ N(0, I) at
    every t), and a fake quantized one ε̂ = ε_fp + b; the fit knows E[ε_fp] = c (from μ_x − μ_y). Step A lands on a
    latent of the data's marginal at t' (``advance`` given: the estimator alone, not the drift of a trajectory that
    c would cause on this toy model). On the FP model QNCD's μ is c (its own mean ε) and the centered μ_c is 0
    within the batch's spread; on ε̂, μ_c is b and QNCD's μ is b + c."""
    c = torch.tensor([0.2, -0.1, 0.3]).view(1, 3, 1, 1) if gran is Granularity.CHANNEL else torch.tensor(0.2)
    b = torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1) if gran is Granularity.CHANNEL else torch.tensor(0.3)
    ac = alphas_cumprod

    def fp(x, t):   # E[ε | x_t] for x0 ~ N(0, I) is √(1 − ᾱ) x_t, plus the model's own mean c
        return x * (1 - ac[t]).sqrt().view(-1, 1, 1, 1) + c

    fit = centered_fit(ac, gran, c, b, eta)
    g = torch.Generator().manual_seed(0)
    x, x_next = torch.randn(64, 3, 16, 16, generator=g), torch.randn(64, 3, 16, 16, generator=g)
    land = lambda x, eps, step, sigma, z: x_next  # noqa: E731
    for i in (6, 16):
        step = list(DDIMSchedule.make(ac, 20, eta).steps())[i]
        sigma, t = torch.tensor(step.sigma), torch.full((64,), step.t)
        for name, fn, want in (("fp", fp, torch.zeros(())), ("q", lambda x, t: fp(x, t) + b, b)):
            eps = fn(x, t)
            mu_c = CenteredProbe(fit, generator=torch.Generator().manual_seed(5)).begin(fn, 64, land).estimate(
                eps, sigma, step, x)
            mu_q = QNCDProbe(granularity=gran, generator=torch.Generator().manual_seed(5)).begin(
                fn, 64, land).estimate(eps, sigma, step, x)
            assert mu_c.shape == mu_q.shape == ((1, 1, 1, 1) if gran is Granularity.TENSOR else (1, 3, 1, 1))
            torch.testing.assert_close(mu_c, want.expand_as(mu_c), atol=0.02, rtol=0)    # batch spread ~0.005
            torch.testing.assert_close(mu_q, (want + c).expand_as(mu_q), atol=0.03, rtol=0)
            assert float((mu_q - want).abs().max()) > 0.09   # QNCD's μ keeps the FP model's own mean


def test_centered_probe_cancels_the_noise_draw_exactly_on_a_linear_model(alphas_cumprod):
    """With ε linear in x the antithetic pair leaves no trace of z: μ_c does not depend on the probe's seed, while
    QNCD's μ moves with it (by about the spread 1/√(B·C·H·W) of the draw's mean)."""
    fit = centered_fit(alphas_cumprod, Granularity.TENSOR, 0.0, 0.0)
    step = list(DDIMSchedule.make(alphas_cumprod, 20, 0.0).steps())[6]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fn = lambda x, t: 0.5 * x  # noqa: E731
    mus = {cls: [(CenteredProbe(fit, generator=torch.Generator().manual_seed(s)) if cls == "c" else
                  QNCDProbe(generator=torch.Generator().manual_seed(s))).begin(fn, 2).estimate(
        fn(x, None), torch.tensor(0.), step, x) for s in range(4)] for cls in ("c", "q")}
    assert max(float((m - mus["c"][0]).abs()) for m in mus["c"]) < 1e-6
    assert max(float((m - mus["q"][0]).abs()) for m in mus["q"]) > 1e-3


def test_centered_probe_is_one_registry_entry_and_costs_two_calls_per_probe(alphas_cumprod):
    """``cprobe-tensor`` parses, builds a CenteredProbe from the tensor-wise fit, checks the fit's settings, and in
    20 DDIM steps probes at i = 6, 16 with two model calls each; from a probe on, ε̂ − μ_c is used."""
    from pipeline.corrections import METHODS
    from pipeline.sampler_spec import SamplerSpec
    from correction.statistics import ConfigMismatch
    spec = SamplerSpec.parse("cprobe-tensor")
    assert spec.method is METHODS["cprobe"] and spec.needs_generator
    fit = centered_fit(alphas_cumprod, Granularity.TENSOR, 0.1, 0.0)
    probe = spec.method.build(fit, torch.Generator().manual_seed(0))
    assert isinstance(probe, CenteredProbe) and probe.extra_calls(20) == 4
    probe.check_config(steps=20, eta=0.0, scale=1.0)
    with pytest.raises(ConfigMismatch):
        probe.check_config(steps=50, eta=0.0, scale=1.0)
    calls, used = [], []
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def model(x, t, c):
        calls.append(1)
        return 0.5 * x + 0.1

    sample_ddim(model, x_T, DDIMSchedule.make(alphas_cumprod, 20, 0.0), correction=probe,
                callback=lambda d: used.append(d["eps"] - (0.5 * d["x"] + 0.1)))
    assert len(calls) == 24 and [i for i, _, _ in probe.estimates] == [6, 16]
    torch.testing.assert_close(used[5], torch.zeros_like(used[5]))
    torch.testing.assert_close(used[10], -probe.estimates[0][2].expand_as(used[10]))
