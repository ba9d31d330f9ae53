"""A quantized Conv/Linear: it holds parameters only (Δ, z, AdaRound α, learned activation Δ); the math is
``quant.quantizer``. Calibration is an explicit verb (``init_weight_qparams_``, ``init_act_qparams_``), never a lazy
first forward.
"""
from __future__ import annotations

import enum

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.policy import Precision
from quant.quantizer import (FakeQuantKernel, QScheme, adaround_h, adaround_init_alpha, choose_qparams, fake_quant,
                             quantize, rounded_fake_quant, soft_rounded_fake_quant)


class WeightRounding(enum.Enum):
    NEAREST = "nearest"
    ADAROUND_SOFT = "adaround_soft"  # h(α) in [0, 1], while reconstructing
    ADAROUND_HARD = "adaround_hard"  # [α ≥ 0], after reconstruction


class QuantLayer(nn.Module):
    """Fake-quantized replacement of an nn.Conv1d/Conv2d/Linear. The FP weight stays the master copy.

    Forward: x -> fake_quant(x; Δ_a, z_a) if activations are on; W -> fake-quantized W if weights are on; then the
    original op with the original stride/padding/groups.
    """

    def __init__(self, module: nn.Module, w_scheme: QScheme, a_scheme: QScheme | None,
                 precision: Precision = Precision.TARGET):
        super().__init__()
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            raise TypeError(f"cannot quantize {type(module).__name__}")
        self.kind = type(module)
        self.op_kwargs = ({} if isinstance(module, nn.Linear) else
                          dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                               groups=module.groups))
        self.weight = module.weight
        self.bias = module.bias
        self.w_scheme, self.a_scheme = w_scheme, a_scheme
        self.precision = precision  # what the layer policy chose (8-bit head/stem layers are not reconstructed)
        self.register_buffer("w_scale", torch.ones(()))
        self.register_buffer("w_zero_point", torch.zeros(()))
        self.a_scale = nn.Parameter(torch.ones(()), requires_grad=False)  # learned (LSQ) during reconstruction
        self.register_buffer("a_zero_point", torch.zeros(()))
        self.alpha: nn.Parameter | None = None       # AdaRound's V while it is optimised (soft rounding)
        # ⌊W/Δ⌋ while α is learned (W and Δ stay fixed meanwhile); a buffer so that .to() moves it, not saved
        self.register_buffer("_w_floor", None, persistent=False)
        self.soft_h: torch.Tensor | None = None       # h(α) of the current optimiser iteration, when one is set
        self.register_buffer("round_up", None)        # bool [α ≥ 0] once hardened: 1 byte a weight, not 4
        self.rounding = WeightRounding.NEAREST
        self.weight_quant = False
        self.act_quant = False
        self.kernel = FakeQuantKernel.AUTO   # how sampling computes the activation fake-quant (same values)
        self.w_ready = self.a_ready = False
        # Q-Diffusion shortcut splitting: input channels [0, split) and [split, C) get their own activation range
        # and their own weight ranges (input-channel slices), for the concatenated [h ; skip] decoder input
        self.split: int | None = None

    def set_split_(self, split: int) -> None:
        if not 0 < split < self.weight.shape[1] or self.w_ready or self.a_ready:
            raise ValueError(f"split {split} must be inside 1..{self.weight.shape[1] - 1} and set before calibration")
        self.split = split

    # -- explicit calibration verbs -----------------------------------------------------------------------------

    @torch.no_grad()
    def init_weight_qparams_(self) -> None:
        if self.split is None:
            scale, zp = choose_qparams(self.weight, self.w_scheme)
        else:  # one range per input-channel slice, expanded to the weight's shape [C_out, C_in, ...]
            parts = [self.weight[:, :self.split], self.weight[:, self.split:]]
            qp = [choose_qparams(w, self.w_scheme) for w in parts]
            scale = torch.cat([s.expand_as(w) for (s, _), w in zip(qp, parts, strict=False)], dim=1)
            zp = torch.cat([z.expand_as(w) for (_, z), w in zip(qp, parts, strict=False)], dim=1)
        self.w_scale, self.w_zero_point = scale.to(self.weight), zp.to(self.weight)
        self.w_ready = True

    @torch.no_grad()
    def init_act_qparams_(self, x: torch.Tensor) -> None:
        """Range of this layer's input ``x`` ([N, C, ...] with a split, any shape without)."""
        if self.a_scheme is None:
            raise ValueError("this layer has no activation quantizer")
        if self.split is None:
            scale, zp = choose_qparams(x, self.a_scheme)
        else:
            qp = [choose_qparams(part, self.a_scheme) for part in (x[:, :self.split], x[:, self.split:])]
            scale, zp = torch.stack([s.reshape(()) for s, _ in qp]), torch.stack([z.reshape(()) for _, z in qp])
        self.a_scale = nn.Parameter(scale.reshape(-1).squeeze(0).to(x), requires_grad=False)
        self.a_zero_point = zp.reshape(-1).squeeze(0).to(x)
        self.a_ready = True

    def _act_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.split is None:
            return self.a_scale, self.a_zero_point
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        k, rest = self.split, x.shape[1] - self.split
        # expand + cat: no per-forward device->host sync (repeat_interleave with tensor repeats had one on CUDA)
        return (torch.cat([self.a_scale[:1].expand(k), self.a_scale[1:].expand(rest)]).view(shape),
                torch.cat([self.a_zero_point[:1].expand(k), self.a_zero_point[1:].expand(rest)]).view(shape))

    @torch.no_grad()
    def init_adaround_(self) -> None:
        """Start AdaRound from the unrounded weight: α with h(α) = frac(W/Δ)."""
        if not self.w_ready:
            raise RuntimeError("init_weight_qparams_ must run before init_adaround_")
        self.alpha = nn.Parameter(adaround_init_alpha(self.weight, self.w_scale))
        self._w_floor, self.soft_h = torch.floor(self.weight / self.w_scale), None
        self.round_up = None
        self.rounding = WeightRounding.ADAROUND_SOFT

    @torch.no_grad()
    def harden_(self) -> None:
        """End of AdaRound: keep only the rounding decision [α ≥ 0] (a 400 M-parameter UNet keeps 0.4 GB of masks
        instead of 1.6 GB of α)."""
        if self.alpha is None:
            raise RuntimeError("init_adaround_ must run before harden_")
        self.round_up, self.alpha = (self.alpha >= 0).detach(), None
        self._w_floor = self.soft_h = None
        self.rounding = WeightRounding.ADAROUND_HARD

    # -- forward ----------------------------------------------------------------------------------------------

    def quantized_weight(self) -> torch.Tensor:
        s = self.w_scheme
        if self.rounding is WeightRounding.NEAREST:
            return fake_quant(self.weight, self.w_scale, self.w_zero_point, s.qmin, s.qmax)
        if self.rounding is WeightRounding.ADAROUND_HARD:
            return rounded_fake_quant(self.weight, self.w_scale, self.w_zero_point, self.round_up, s.qmin, s.qmax)
        # ⌊W/Δ⌋ fixed while α is learned (from init_adaround_), h(α) fixed for one iteration when the optimiser set it
        # (``soft_h``, shared with the regulariser): the same values, fewer kernels per iteration (issue 29)
        w_floor = self._w_floor if self._w_floor is not None else torch.floor(self.weight / self.w_scale)
        h = self.soft_h if self.soft_h is not None else adaround_h(self.alpha)
        return soft_rounded_fake_quant(w_floor, h, self.w_scale, self.w_zero_point, s.qmin, s.qmax)

    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor:
        """The unsigned integer grid values of the quantized weight (int64, 0..2^b − 1): what the packed export
        stores and the integer kernels multiply."""
        s = self.w_scheme
        if self.rounding is WeightRounding.NEAREST:
            q = quantize(self.weight, self.w_scale, self.w_zero_point, s.qmin, s.qmax)
        elif self.rounding is WeightRounding.ADAROUND_HARD:
            q = torch.clamp(torch.floor(self.weight / self.w_scale) + self.round_up.to(self.weight.dtype)
                            + self.w_zero_point, s.qmin, s.qmax)
        else:
            raise ValueError("soft AdaRound rounding has no integer codes; finish reconstruction (harden_) first")
        return (q - s.qmin).round().long()  # shift signed grids to 0..2^b − 1

    def _weight_for_forward(self) -> torch.Tensor:
        """The fake-quantized weight; while no gradient reaches it, it is computed once and reused until the weight,
        its (Δ, z), the rounding or α change (sampling calls every layer 20-250 times with the same weight; the
        activation phase of reconstruction learns Δ_a only, over thousands of iterations)."""
        needs_grad = torch.is_grad_enabled() and (self.weight.requires_grad or self.w_scale.requires_grad)
        if needs_grad or self.rounding is WeightRounding.ADAROUND_SOFT:
            return self.quantized_weight()
        key = (self.rounding, *((id(v), v._version, v.device) for v in
                                (self.weight, self.w_scale, self.w_zero_point, self.alpha, self.round_up)
                                if v is not None))
        if getattr(self, "_wq_key", None) != key:
            self._wq, self._wq_key = self.quantized_weight().detach(), key
        return self._wq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant:
            if not self.a_ready:
                raise RuntimeError("activation quantization is on but its range was never calibrated")
            scale, zero_point = self._act_params(x)
            x = fake_quant(x, scale, zero_point, self.a_scheme.qmin, self.a_scheme.qmax, self.kernel)
        if self.weight_quant:
            if not self.w_ready:
                raise RuntimeError("weight quantization is on but init_weight_qparams_ never ran")
            w = self._weight_for_forward()
        else:
            w = self.weight
        if self.kind is nn.Linear:
            return F.linear(x, w, self.bias)
        conv = F.conv2d if self.kind is nn.Conv2d else F.conv1d
        return conv(x, w, self.bias, **self.op_kwargs)

    def extra_repr(self) -> str:
        a = f"A{self.a_scheme.bits}" if self.a_scheme else "A-"
        split = f" split={self.split}" if self.split else ""
        return f"{self.kind.__name__} W{self.w_scheme.bits}{a} rounding={self.rounding.value}{split}"
