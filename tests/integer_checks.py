"""The check that an integer-executed UNet (quant.integer.to_integer_) computes its fake-quant twin's function, true
for the right reason on every CPU: integer sums are exact where the float convolution rounds, so an activation code
at a rounding tie can come out one step apart, and a flipped code propagates through the network. A constant bound
on the end-to-end difference would depend on whether the machine runs a layer in int8 or in float (AVX2 vs VNNI);
these checks do not:

1. each integer layer, given its fake-quant twin's input, returns its output within float rounding;
2. the fake-quant UNet fed the integer UNet's layer inputs (teacher forcing) returns the integer UNet's output within
   float rounding: nothing but the layer inputs differs between the two;
3. the layer inputs differ only through codes at rounding ties: up to the first layer whose activation codes differ,
   all agree; there the inputs agree within float rounding, each differing code is one step off, and a rounding
   boundary lies between the two inputs. With no flip anywhere, the outputs agree within float rounding.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn

from quant.layers import QuantLayer


def layer_io(model: nn.Module, names, run: Callable[[], torch.Tensor]):
    """(output of ``run()``, {layer: (input, output)} in execution order)."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, (a[0].clone(), o.clone()))) for n in names]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def activation_codes(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale) + zero_point, 0, qmax)


@torch.no_grad()
def assert_integer_is_fake_quant(integer_unet: nn.Module, fake_unet: nn.Module,
                                 run: Callable[[nn.Module], torch.Tensor]) -> dict:
    """``fake_unet``: a copy taken before conversion; ``run(unet)`` -> its output on fixed inputs. Returns what it
    found (the number of flipped codes, the first layer with one), for the caller to report."""
    layers = {n: m for n, m in fake_unet.named_modules() if isinstance(m, QuantLayer)}
    grids = {n: (m.a_scale.item(), int(m.a_zero_point.item()), m.a_scheme.qmax)
             for n, m in layers.items() if m.act_quant}
    ref, seen = layer_io(fake_unet, layers, lambda: run(fake_unet))
    for name, (inp, out) in seen.items():                                                     # 1.
        torch.testing.assert_close(integer_unet.get_submodule(name)(inp).contiguous(), out, rtol=0,
                                   atol=2e-5 * out.abs().max().item(), msg=name)
    eps, seen_int = layer_io(integer_unet, layers, lambda: run(integer_unet))
    assert list(seen_int) == list(seen)
    forced = [fake_unet.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: (seen_int[n][0],))
              for n in layers]
    try:
        teacher_forced = run(fake_unet)                                                       # 2.
    finally:
        for h in forced:
            h.remove()
    torch.testing.assert_close(eps, teacher_forced, rtol=0, atol=1e-5 * eps.abs().max().item())
    flips = {n: int((activation_codes(seen[n][0], *grids[n]) != activation_codes(seen_int[n][0], *grids[n])).sum())
             for n in grids}
    flipped = [n for n in grids if flips[n]]
    if not flipped:   # no code flipped anywhere: end to end within float rounding
        torch.testing.assert_close(eps, ref, rtol=0, atol=1e-4 * eps.abs().max().item())
        return {"flipped_codes": 0, "first": None}
    first = flipped[0]                                                                          # 3.
    scale = grids[first][0]
    x_fake, x_int = seen[first][0], seen_int[first][0]
    gap = (x_fake - x_int).abs()
    assert gap.max() <= 1e-5 * x_fake.abs().max(), f"{first}: inputs differ beyond float rounding"
    codes_fake, codes_int = (activation_codes(v, *grids[first]) for v in (x_fake, x_int))
    differ = codes_fake != codes_int
    assert (codes_fake - codes_int)[differ].abs().max() == 1
    # a code flips only if a rounding boundary (k + ½)·Δ lies between the two inputs
    to_tie = (x_fake[differ] / scale - (x_fake[differ] / scale).floor() - 0.5).abs()
    assert (to_tie <= gap[differ] / scale + 1e-6).all(), f"{first}: a code flipped away from a rounding tie"
    return {"flipped_codes": sum(flips.values()), "first": first}


def int_mm_exact() -> bool:
    """torch._int_mm on a CPU is PyTorch's reference loop or oneDNN's s8×s8 GEMM, depending on the CPU: a
    known-answer check at the extreme codes (oneDNN limited below the CPU's own ISA, ONEDNN_MAX_CPU_ISA=AVX2 on a
    VNNI CPU, returns wrong sums)."""
    a, b = torch.full((17, 32), 127, dtype=torch.int8), torch.full((32, 8), -128, dtype=torch.int8)
    return bool((torch._int_mm(a, b) == 127 * -128 * 32).all())


def require_exact_int_mm() -> None:
    """Skip a test that uses torch._int_mm as the exact integer reference where it is not exact."""
    if not int_mm_exact():
        pytest.skip("torch._int_mm returns wrong int32 sums on this CPU configuration (oneDNN below the CPU's ISA?)")
