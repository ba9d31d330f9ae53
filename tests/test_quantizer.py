"""Quantizer math: integer grids, round trips, the vectorised scale search against brute force, AdaRound."""
from __future__ import annotations

import pytest
import torch

from quant.quantizer import (PerChannel, PerTensor, QScheme, ScaleSearch, TempDecay, adaround_fake_quant,
                             adaround_h, adaround_init_alpha, choose_qparams, dequantize, fake_quant,
                             qparams_from_range, quantize, round_reg)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, False), (4, True), (8, True)])
def test_grid_is_exact_integers_and_round_trip(bits, symmetric):
    scheme = QScheme(bits, symmetric, PerChannel(0), ScaleSearch.MAX)
    w = torch.randn(6, 5, 3, 3)
    scale, zp = choose_qparams(w, scheme)
    assert scale.shape == (6, 1, 1, 1) and zp.shape == (6, 1, 1, 1)
    q = quantize(w, scale, zp, scheme.qmin, scheme.qmax)
    assert torch.equal(q, q.round()) and q.min() >= scheme.qmin and q.max() <= scheme.qmax
    if symmetric:
        assert not zp.any()
    x_q = dequantize(q, scale, zp)
    # max scheme: the range is covered, so every error is at most half a step
    assert ((x_q - w).abs() <= scale / 2 + 1e-6).all()
    # values already on the grid survive a second pass unchanged
    torch.testing.assert_close(fake_quant(x_q, scale, zp, scheme.qmin, scheme.qmax), x_q)
    # zero is exactly representable
    assert fake_quant(torch.zeros(6, 1, 1, 1), scale, zp, scheme.qmin, scheme.qmax).abs().max() == 0


def test_fake_quant_gradients_flow_through_ste():
    x = torch.cat([torch.linspace(-0.5, 0.5, 11), torch.tensor([2.0])]).requires_grad_()
    scale = torch.tensor(0.1, requires_grad=True)
    fake_quant(x, scale, torch.tensor(7.0), 0, 15).sum().backward()
    assert torch.equal(x.grad[:-1], torch.ones(11))  # inside the grid: identity
    assert x.grad[-1] == 0                           # clamped at qmax: no gradient
    assert scale.grad is not None and scale.grad != 0


def test_inference_fake_quant_is_bit_identical_to_the_ste_path():
    g = torch.Generator().manual_seed(0)
    scale, zp = torch.tensor(0.0371), torch.tensor(7.0)
    ties = (torch.arange(-300, 300) + 0.5) * scale               # exactly between two grid points
    wide = torch.randn(10_000, generator=g) * torch.logspace(-6, 6, 10_000)
    for x in (ties, wide):
        with torch.no_grad():
            fast = fake_quant(x, scale, zp, 0, 255)
        ref = fake_quant(x.clone().requires_grad_(True), scale, zp, 0, 255)   # the autograd (STE) path
        assert torch.equal(fast, ref.detach())
    # per-channel zero points (shortcut-split layers) and a Python-float zero point (integer execution's fallback)
    x = torch.randn(2, 6, 5, 5, generator=g) * 4
    zps = torch.tensor([3.0, 3.0, 3.0, 250.0, 250.0, 250.0]).view(1, 6, 1, 1)
    for z in (zps, 17.0):
        with torch.no_grad():
            fast = fake_quant(x, scale, z, 0, 255)
        ref = fake_quant(x.clone().requires_grad_(True), scale, torch.as_tensor(z), 0, 255)
        assert torch.equal(fast, ref.detach())


def test_fused_fake_quant_differs_only_at_rounding_ties():
    """The one-kernel op used on CUDA (quant.quantizer.fused_fake_quant), run here on the CPU: it multiplies by 1/Δ,
    so only values within float rounding of a tie may land one code apart."""
    from quant.quantizer import fused_fake_quant, fused_fake_quant_applies
    assert not fused_fake_quant_applies(torch.zeros(3), torch.tensor(1.0))   # CPUs keep the bit-identical passes
    g = torch.Generator().manual_seed(0)
    scale, zp = torch.tensor(0.0371), torch.tensor(7.0)
    x = torch.cat([torch.randn(100_000, generator=g) * 3, (torch.arange(-300, 300) + 0.5) * scale])
    with torch.no_grad():
        ref, fused = fake_quant(x, scale, zp, 0, 255), fused_fake_quant(x, scale, zp, 0, 255)
    differ = ref != fused
    assert differ[:100_000].float().mean() < 1e-4                      # random values: (almost) never at a tie
    assert torch.allclose((ref - fused)[differ].abs(), scale.expand(int(differ.sum())), rtol=1e-5)   # one step
    v = x[differ] / scale
    assert ((v - v.floor() - 0.5).abs() < 1e-4).all()                  # and only at ties


def _brute_force(rows, scheme, n=80, p=2.4):
    out = []
    for row in rows:
        best = None
        for i in range(n):
            f = 1 - 0.01 * i
            s, z = qparams_from_range(row.min() * f, row.max() * f, scheme)
            err = ((row - dequantize(quantize(row, s, z, scheme.qmin, scheme.qmax), s, z)).abs() ** p).mean()
            if best is None or err < best[0]:
                best = (err, s, z)
        out.append(best[1:])
    return torch.stack([b[0] for b in out]), torch.stack([b[1] for b in out])


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("max_elements", [2 ** 25, 40])  # the rows whole, and column blocks of 10
def test_mse_search_matches_brute_force(symmetric, max_elements):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.01]).view(4, 1, 1, 1)
    w[2, 0, 0, 0] = 25.0  # an outlier that clipping should cut
    scheme = QScheme(4, symmetric, PerChannel(0), ScaleSearch.MSE)
    scale, zp = choose_qparams(w, scheme, max_elements=max_elements)
    ref_scale, ref_zp = _brute_force(w.reshape(4, -1), scheme)
    torch.testing.assert_close(scale.flatten(), ref_scale)
    torch.testing.assert_close(zp.flatten(), ref_zp)
    assert scale[2] < qparams_from_range(w[2].min(), w[2].max(), scheme)[0]  # the outlier got clipped


def test_blocked_search_of_one_long_row_agrees():
    # a per-tensor activation range over many inputs: one row searched in column blocks, or whole
    x = torch.randn(3, 64, 17, generator=torch.Generator().manual_seed(1)) ** 3
    scheme = QScheme(4, granularity=PerTensor())
    whole, blocked = choose_qparams(x, scheme), choose_qparams(x, scheme, max_elements=1000)
    torch.testing.assert_close(blocked[0], whole[0])
    torch.testing.assert_close(blocked[1], whole[1])
    assert whole[0] < qparams_from_range(x.min(), x.max(), scheme)[0]   # heavy tails: the search clipped


def test_per_tensor_and_other_axis():
    x = torch.randn(2, 7, 4)
    s, z = choose_qparams(x, QScheme(8, granularity=PerTensor()))
    assert s.shape == (1, 1, 1)
    s, z = choose_qparams(x, QScheme(8, granularity=PerChannel(1)))
    assert s.shape == (1, 7, 1)


def test_scheme_validation():
    with pytest.raises(ValueError, match="bits"):
        QScheme(1)
    with pytest.raises(TypeError, match="ScaleSearch"):
        QScheme(4, search="mse")
    assert (QScheme(4).qmin, QScheme(4).qmax, QScheme(4, True).qmin, QScheme(4, True).qmax) == (0, 15, -8, 7)


def test_adaround_starts_at_the_unrounded_weight_and_hardens_to_nearest():
    w = torch.randn(8, 16)
    scheme = QScheme(4, granularity=PerChannel(0), search=ScaleSearch.MAX)
    scale, zp = choose_qparams(w, scheme)
    alpha = adaround_init_alpha(w, scale)
    r = w / scale - torch.floor(w / scale)
    torch.testing.assert_close(adaround_h(alpha), r, atol=1e-5, rtol=0)
    soft = adaround_fake_quant(w, scale, zp, alpha, scheme.qmin, scheme.qmax, hard=False)
    inside = (torch.floor(w / scale) + zp > scheme.qmin) & (torch.floor(w / scale) + zp < scheme.qmax - 1)
    torch.testing.assert_close(soft[inside], w[inside], atol=1e-5, rtol=0)
    hard = adaround_fake_quant(w, scale, zp, alpha, scheme.qmin, scheme.qmax, hard=True)
    torch.testing.assert_close(hard, fake_quant(w, scale, zp, scheme.qmin, scheme.qmax))


def test_rounding_regulariser_and_beta_schedule():
    decay = TempDecay(iters=1000)
    assert decay(0) is None and decay(199) is None        # warm-up: regulariser off
    assert decay(200) == pytest.approx(20.0)
    assert decay(600) == pytest.approx(11.0)              # linear 20 -> 2 over the remaining 80 %
    assert decay(1000) == pytest.approx(2.0)
    alpha = torch.tensor([-50.0, 0.0, 50.0])              # h = 0, 0.5, 1
    assert round_reg(alpha, 2.0).item() == pytest.approx(1.0)  # only the undecided one costs
    assert round_reg(alpha, 20.0).item() == pytest.approx(1.0)
    assert round_reg(torch.tensor([0.3]), 20.0) > round_reg(torch.tensor([0.3]), 2.0)


def test_compiled_fake_quant_is_bit_identical_to_the_passes(compiled_kernels):
    """``--execution compiled`` (FakeQuantKernel.COMPILED): the passes' arithmetic as one torch.compile'd kernel,
    the same values at ties, over twelve decades, on non-contiguous inputs and every rank, from one graph (ranges
    and shapes never recompile it); per-channel zero points keep the passes."""
    from torch._dynamo.utils import counters

    from quant.quantizer import FakeQuantKernel, compiled_fake_quant_applies
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor(0.0371)
    graphs = counters["stats"]["unique_graphs"]
    inputs = [(torch.arange(-300, 300) + 0.5) * scale,                                   # exactly at ties
              torch.randn(10_000, generator=g) * torch.logspace(-6, 6, 10_000),
              torch.randn(2, 6, 5, 5, generator=g).transpose(1, 3) * 4,                  # non-contiguous, rank 4
              torch.randn(3, 77, 40, generator=g) * 9, torch.full((4, 4), float("nan"))]
    with torch.no_grad():
        for x in inputs:
            for zp, (qmin, qmax) in ((7.0, (0, 255)), (0.0, (-8, 7)), (128.0, (0, 255))):
                want = fake_quant(x, scale, torch.tensor(zp), qmin, qmax, FakeQuantKernel.PASSES)
                got = fake_quant(x, scale, torch.tensor(zp), qmin, qmax, FakeQuantKernel.COMPILED)
                assert got.shape == x.shape and got.stride() == want.stride()   # (a matmul's last bits follow it)
                assert torch.equal(got.nan_to_num(), want.nan_to_num())
                assert got.isnan().equal(want.isnan())
    assert counters["stats"]["unique_graphs"] - graphs <= 1   # (0 when an earlier test compiled it)
    zps = torch.tensor([3.0, 250.0]).view(1, 2, 1, 1)
    assert not compiled_fake_quant_applies(torch.zeros(1, 2, 1, 1), zps * scale)   # two ranges: the passes
    with torch.no_grad():
        x = torch.randn(2, 2, 5, 5, generator=g)
        assert torch.equal(fake_quant(x, zps * scale, zps, 0, 255, FakeQuantKernel.COMPILED),
                           fake_quant(x, zps * scale, zps, 0, 255, FakeQuantKernel.PASSES))
    x = torch.randn(20, generator=g, requires_grad=True)        # training: always the STE form, gradients reach x
    fake_quant(x, scale, torch.tensor(7.0), 0, 255, FakeQuantKernel.COMPILED).sum().backward()
    assert x.grad is not None


def test_a_compiler_failure_is_one_line(monkeypatch):
    import quant.quantizer as quantizer

    def broken(*args):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\nmany more lines")
    monkeypatch.setattr(quantizer, "_compiled_kernel", lambda: broken)
    with pytest.raises(quantizer.CompileUnavailable, match=r"^torch.compile could not build the fake-quant kernel "
                       r"on cpu: InductorError: CppCompileError: C\+\+ compile error; install a C\+\+ compiler "
                       r"\(CPU\) or Triton \(CUDA\), or use --execution fake \(the same numbers, [^\n]*\)$"):
        quantizer.check_compiled_fake_quant(torch.device("cpu"))


def test_a_kernel_that_computes_other_values_is_refused(monkeypatch):
    """What a stale cross-ISA cache entry did (16-wide loops over 8-wide vectors: garbage in every other block of
    eight): the check compares with the passes and refuses, naming the way out; it is not a build failure."""
    import quant.quantizer as quantizer

    def wrong(x, scale, lo, hi):
        y = quantizer._exact_fake_quant(x, scale, lo, hi)   # (x: the check's flat 257 values)
        y[8:16] = 1e30
        return y
    monkeypatch.setattr(quantizer, "_compiled_kernel", lambda: wrong)
    with pytest.raises(RuntimeError, match=r"^the compiled fake-quant kernel on cpu differs from the exact passes "
                                           r"\(8 of 257 values\), a torch.compile fault on this machine; use "
                                           r"--execution fake") as e:
        quantizer.check_compiled_fake_quant(torch.device("cpu"))
    assert not isinstance(e.value, quantizer.CompileUnavailable) and "\n" not in str(e.value)
