"""Q-Diffusion's attention quantization (Li et al. 2023, §4; spec quantization.md §4.3): the activations of the two
attention matmuls — q and k before QKᵀ, the softmax probabilities and v before A·V — get their own quantizers.

``ActQuantizer`` holds one activation range (Δ, z; Δ learnable LSQ-style) and has three explicit states: off
(identity), observing (records what it sees, for calibration), on (fake quantization). The softmax quantizer uses
``sm_abit`` bits on the unsigned grid with z = 0 (probabilities are in [0, 1]); at 16 bits it is left out of
step-size learning, as Q-Diffusion does.

Which modules are attention, and how their matmuls are computed, is family knowledge: a family's ``QuantSpecials.
attention`` maps its attention classes to wrappers (``AttentionQuantizers`` subclasses; CompVis': pipeline/families/
compvis_attention.py), which ``wrap_attention_`` puts in their place inside a QuantModel (ldm/ is not edited).
While every quantizer is off a wrapper must compute exactly the module's FP output.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn

from quant.quantizer import FakeQuantKernel, QScheme, choose_qparams, fake_quant

# (module, activation scheme, softmax scheme) -> its quantizing wrapper
AttentionWrapper = Callable[[nn.Module, QScheme, QScheme], nn.Module]
MAX_OBSERVED = 1 << 20  # elements kept per observed call (attention maps are large; a strided sample suffices)


class ActQuantizer(nn.Module):
    """One per-tensor activation quantizer: Δ (nn.Parameter, learned in the activation phase) and z."""

    def __init__(self, scheme: QScheme):
        super().__init__()
        self.scheme = scheme
        self.a_scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("a_zero_point", torch.zeros(()))
        self.enabled = False
        self.a_ready = False
        self.kernel = FakeQuantKernel.AUTO   # how sampling computes the fake-quant (same values)
        self.observed: list[torch.Tensor] | None = None

    @property
    def learnable(self) -> bool:
        return self.scheme.bits < 16

    @torch.no_grad()
    def init_act_qparams_(self, x: torch.Tensor) -> None:
        scale, zp = choose_qparams(x, self.scheme)
        self.a_scale = nn.Parameter(scale.reshape(()).to(x), requires_grad=False)
        self.a_zero_point = zp.reshape(()).to(x)
        self.a_ready = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observed is not None:
            flat = x.detach().flatten()
            self.observed.append(flat[:: max(1, flat.numel() // MAX_OBSERVED)])
        if not self.enabled:
            return x
        if not self.a_ready:
            raise RuntimeError("activation quantization is on but its range was never calibrated")
        return fake_quant(x, self.a_scale, self.a_zero_point, self.scheme.qmin, self.scheme.qmax, self.kernel)

    def extra_repr(self) -> str:
        return f"A{self.scheme.bits} enabled={self.enabled}"


class AttentionQuantizers(nn.Module):
    """q, k, v quantizers at the activation bits and the softmax quantizer at sm_abit: the base of a family's
    attention wrappers (a module whose forward puts its matmul inputs through them when ``active()``)."""

    def __init__(self, a_scheme: QScheme, sm_scheme: QScheme):
        super().__init__()
        self.q_quant, self.k_quant, self.v_quant = (ActQuantizer(a_scheme) for _ in range(3))
        self.sm_quant = ActQuantizer(sm_scheme)

    def active(self) -> bool:
        return any(q.enabled or q.observed is not None
                   for q in (self.q_quant, self.k_quant, self.v_quant, self.sm_quant))


def wrap_attention_(model: nn.Module, wrappers: Mapping[type, AttentionWrapper], a_scheme: QScheme,
                    sm_scheme: QScheme) -> int:
    """Replace every module of ``model`` that is an instance of a key of ``wrappers`` (the family's attention
    classes: ``QuantSpecials.attention``) by ``wrapper(module, a_scheme, sm_scheme)``, after the Conv/Linear swap,
    so the projections are already QuantLayers. Returns the number of modules wrapped."""
    count = 0
    for name, module in list(model.named_modules()):
        wrap = next((w for cls, w in wrappers.items() if isinstance(module, cls)), None)
        if wrap is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrap(module, a_scheme, sm_scheme))
        count += 1
    return count
