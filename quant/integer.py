"""Integer execution of a quantized UNet: Conv/Linear layers whose weights and inputs are quantized run as
int8 × uint8 → int32 products with one float rescale, instead of the fake-quant emulation (a float op on rounded
floats). The result is the fake-quant model's function: the same integer grid, only the float summation differs.

    report = to_integer_(qm)          # QuantLayers -> IntegerLayers in place; {fqn: how that layer runs}
    eps = qm(x, t, context=c)         # same model, same outputs (up to float rounding), int8 weights in memory

One layer, with activation codes x_q = clamp(round(x/Δ_a) + z_a) ∈ [0, 2^a − 1] and weight codes q ∈ [0, 2^b − 1]
(zero point z_w, step Δ_w per output channel o; ``quant.quantizer``'s grid conventions):

    y_o = Σ_k x̂_k ŵ_ok + b_o = Δ_a Δ_w,o Σ_k (x_q,k − z_a)(q_ok − z_w,o) + b_o

The weight is stored as the int8 w_ok = q_ok − c_o. For b ≤ 7 bits c = z_w (w fits int8, nothing else to do); for
8-bit asymmetric weights q − z_w spans [−255, 255], so c = 128 and the rest, (c_o − z_w,o)·Δ_w,o·Σ_window x̂, is added
from the input's channel sum (one cheap box filter). The activation zero point is exact in both backends: oneDNN
takes z_a itself; for ``torch._int_mm`` (int8 × int8) the codes are shifted by 128 and (128 − z_a)·Σ_k w_ok is folded
into the bias through the weight row sums.

Backends (``Backend``), chosen per layer:

- ``ONEDNN`` (x86 CPUs; PyTorch's ``onednn::qconv2d_pointwise`` / ``qlinear_pointwise`` with float32 output): every
  Conv1d/Conv2d/Linear. On AVX2 without VNNI the u8 × s8 multiply-add (vpmaddubsw) sums two products in int16 and
  saturates, so a layer runs here only if 2·(2^a − 1)·max|w| ≤ 32767 (e.g. 4-bit weights with 8-bit inputs) or
  ``onednn_int8_exact()`` (a known-answer probe with extreme codes) shows the machine's kernels do not saturate.
- ``INT_MM`` (CUDA; also runs on CPU, slowly, which is how the tests check it): ``torch._int_mm`` for Linear and 1×1
  stride-1 convs (K and N multiples of 8).
- ``FLOAT``: the dequantized weight (computed once from the int8 codes) and the fake-quantized input, i.e. the
  fake-quant model's own arithmetic; layers no integer kernel takes exactly (the 3×3 convs on CUDA, saturating
  shapes) run so. Weight-only layers keep their dequantized weight (``FloatWeightLayer``); shortcut-split layers and
  grids over 8 bits stay QuantLayers (fake-quant), each named in ``to_integer_``'s report.

The attention matmuls and the softmax stay in floating point (Q-Diffusion's attention quantizers, if any, keep
fake-quantizing them).
"""
from __future__ import annotations

import enum
import functools
import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.layers import QuantLayer
from quant.model import QuantModel
from quant.quantizer import fake_quant, pack_bits, unpack_bits

INT16_MAX = 32767


class Backend(enum.Enum):
    ONEDNN = "onednn"
    INT_MM = "int_mm"
    FLOAT = "float"


def default_backend(device: torch.device) -> Backend:
    return Backend.INT_MM if device.type == "cuda" else Backend.ONEDNN


@functools.lru_cache(maxsize=None)
def onednn_int8_exact() -> bool:
    """Whether this CPU's oneDNN int8 kernels accumulate u8 × s8 without int16 saturation (VNNI / AMX do, AVX2's
    vpmaddubsw does not): a 3×3 conv and a Linear with codes 255 × 127, where a saturating kernel is off by far."""
    if not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
        return False
    x = torch.full((1, 16, 4, 4), 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w = torch.full((8, 16, 3, 3), 127, dtype=torch.int8)
    ones = torch.ones(8)
    packed = torch.ops.onednn.qconv_prepack(w, ones, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    y = torch.ops.onednn.qconv2d_pointwise(x, 1.0, 0, packed, ones, torch.zeros(8, dtype=torch.int64), None,
                                           [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
    return bool((y == 255 * 127 * 16 * 9).all())


class IntegerLayer(nn.Module):
    """An inference Conv1d/Conv2d/Linear with int8 weights: built from a calibrated QuantLayer (``from_quant``) or
    from a packed file's codes (``quant.export``); it holds no float weight unless its backend is FLOAT."""

    def __init__(self, kind: type, op_kwargs: dict, codes: torch.Tensor, bits: int, w_base: torch.Tensor,
                 w_scale: torch.Tensor, w_shift: torch.Tensor, bias: torch.Tensor | None, a_scale: float,
                 a_zero_point: int, a_qmax: int, backend: Backend):
        super().__init__()
        self.kind, self.op_kwargs, self.backend = kind, dict(op_kwargs), backend
        # the master copy of the weight: its unsigned codes at their storage width (4-bit two per byte), as in the
        # packed file; the int8 w = codes + base is made when a backend packs it, not kept
        self.w_shape, self.store_bits = tuple(codes.shape), 4 if bits <= 4 else 8
        self.register_buffer("w_codes", pack_bits(codes, self.store_bits))
        self.register_buffer("w_base", w_base.reshape(-1).to(torch.int16).contiguous().clone())  # qmin − c
        self.register_buffer("w_scale", w_scale.reshape(-1).float().contiguous().clone())  # Δ_w per channel
        # c − z_w per output channel (an integer): the weight part int8 could not hold (8-bit weights), else zeros
        self.register_buffer("w_shift", w_shift.reshape(-1).float().contiguous().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.a_scale, self.a_zero_point, self.a_qmax = float(a_scale), int(a_zero_point), int(a_qmax)
        self.has_offset = bool(self.w_shift.abs().max() > 0)
        self._packed = None            # backend-prepacked weight, made on first use on the current device
        self._packed_shape = None      # the input shape oneDNN's prepacked weight was made for
        self._float_weight = None

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_quant(cls, layer: QuantLayer, codes: torch.Tensor, backend: Backend) -> "IntegerLayer":
        """``codes``: the layer's unsigned weight codes (``QuantLayer.weight_codes``)."""
        base, scale, shift = int8_weight(codes, layer.w_scheme.qmin, layer.w_scale, layer.w_zero_point,
                                         layer.w_scheme.bits)
        return cls(layer.kind, layer.op_kwargs, codes.cpu(), layer.w_scheme.bits, base, scale, shift, layer.bias,
                   layer.a_scale.item(), int(layer.a_zero_point.item()), layer.a_scheme.qmax, backend)

    @property
    def w_int(self) -> torch.Tensor:
        """The int8 weight w = q − c [C_out, C_in/groups, *k] (made from the stored codes on each call)."""
        codes = unpack_bits(self.w_codes, self.store_bits, math.prod(self.w_shape)).view(self.w_shape)
        return (codes + self.w_base.view((-1,) + (1,) * (len(self.w_shape) - 1))).to(torch.int8)

    def max_abs_weight(self, codes: torch.Tensor) -> int:
        """max |w| of the int8 weight, from the per-channel extremes of its unsigned ``codes``."""
        rows = codes.reshape(codes.shape[0], -1)
        base = self.w_base.to(rows.device).long()
        return int(torch.maximum((rows.amin(1) + base).abs(), (rows.amax(1) + base).abs()).max())

    # -- forward ------------------------------------------------------------------------------------------------

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 activation codes clamp(round(x/Δ_a) + z_a): the fake-quant's own formula, in place on one copy."""
        return (x / self.a_scale).round_().add_(self.a_zero_point).clamp_(0, self.a_qmax).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is Backend.FLOAT:
            return self._float_forward(x)
        x_q = self.codes(x)
        y = self._onednn(x_q) if self.backend is Backend.ONEDNN else self._int_mm(x_q)
        if self.has_offset:
            y = self._add_offset_(y, x_q)      # y is this call's own fresh output
        return y

    def dequantized_weight(self) -> torch.Tensor:
        """ŵ = (w + c − z_w)·Δ_w: the fake-quantized weight, bit for bit (the integer is exact in float32)."""
        shape = (-1,) + (1,) * (len(self.w_shape) - 1)
        return (self.w_int.float() + self.w_shift.view(shape)) * self.w_scale.view(shape)

    def _float_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._float_weight is None or self._float_weight.device != x.device:
            self._float_weight = self.dequantized_weight().to(x.device)
        x = fake_quant(x, self.a_scale, float(self.a_zero_point), 0, self.a_qmax)   # no autograd: scalars do
        return _float_op(self.kind, x, self._float_weight, self.bias, self.op_kwargs)

    def _onednn(self, x_q: torch.Tensor) -> torch.Tensor:
        n_out = self.w_shape[0]
        zeros = torch.zeros(n_out, dtype=torch.int64)
        if self.kind is nn.Linear:
            lead = x_q.shape[:-1]
            rows = x_q.reshape(-1, x_q.shape[-1])
            packed = self._prepacked(tuple(rows.shape), lambda shape: torch.ops.onednn.qlinear_prepack(
                self.w_int, list(shape)))
            y = torch.ops.onednn.qlinear_pointwise(rows, self.a_scale, self.a_zero_point, packed, self.w_scale,
                                                   zeros, self.bias, 1.0, 0, torch.float32, "none", [], "")
            return y.view(*lead, n_out)
        one_d = self.kind is nn.Conv1d
        kw = _conv2d_kwargs(self.op_kwargs, one_d)
        x4 = (x_q.unsqueeze(2) if one_d else x_q).contiguous(memory_format=torch.channels_last)
        packed = self._prepacked(tuple(x4.shape), lambda shape: torch.ops.onednn.qconv_prepack(
            self.w_int.unsqueeze(2) if one_d else self.w_int, self.w_scale, self.a_scale, self.a_zero_point,
            kw["stride"], kw["padding"], kw["dilation"], kw["groups"], list(shape)))
        y = torch.ops.onednn.qconv2d_pointwise(x4, self.a_scale, self.a_zero_point, packed, self.w_scale,
                                               zeros, self.bias, kw["stride"], kw["padding"], kw["dilation"],
                                               kw["groups"], 1.0, 0, torch.float32, "none", [], "")
        return y.squeeze(2) if one_d else y

    def _prepacked(self, input_shape: tuple, prepack) -> torch.Tensor:
        """The oneDNN weight prepacked for this input shape. Without the shape oneDNN picks a blocked layout for a
        default problem size, and for some shapes its kernel is then several times slower (cin256's 1536 → 384
        feed-forward Linear at 2,048 rows: 9.9 → 2.6 ms, one thread); one copy is kept, remade when the shape
        changes (sampling calls every layer with one shape, the last partial batch aside)."""
        if self._packed is None or self._packed_shape != input_shape:
            self._packed, self._packed_shape = prepack(input_shape), input_shape
        return self._packed

    def _int_mm(self, x_q: torch.Tensor) -> torch.Tensor:
        """Linear or 1×1 conv as one int8 GEMM: A = x_q − 128 (int8), acc = A·wᵀ, then
        y = Δ_a Δ_w (acc + (128 − z_a)·Σ_k w_ok) + b."""
        if self._packed is None or self._packed[0].device != x_q.device:
            w = self.w_int.reshape(self.w_int.shape[0], -1).to(x_q.device)
            row_sum = w.sum(dim=1, dtype=torch.int64).float()
            scale = self.a_scale * self.w_scale.to(x_q.device)
            shift = (128 - self.a_zero_point) * row_sum * scale
            # w [N, K] row-major = wᵀ column-major: the "TN" operand layout cuBLASLt's int8 GEMM takes
            self._packed = (w.contiguous(), scale, shift + (0 if self.bias is None else self.bias.to(x_q.device)))
        w, scale, shift = self._packed
        rows = x_q if self.kind is nn.Linear else x_q.movedim(1, -1)
        lead = rows.shape[:-1]
        a = (rows.reshape(-1, rows.shape[-1]).to(torch.int16) - 128).to(torch.int8)
        m = a.shape[0]
        if m <= 16:  # cuBLASLt's int8 GEMM needs more than 16 rows
            a = torch.cat([a, a.new_zeros(17 - m, a.shape[1])])
        y = torch.addcmul(shift, torch._int_mm(a, w.t())[:m].float(), scale).view(*lead, -1)
        return y if self.kind is nn.Linear else y.movedim(-1, 1)

    def _add_offset_(self, y: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
        """y += (c_o − z_w,o)·Δ_w,o · Σ_{k in the window of o} x̂_k: the part of the 8-bit weight int8 does not hold,
        added in place as a broadcast product (no output-sized temporary). Σ x̂ = Δ_a·Σ (x_q − z_a) is summed over
        the uint8 codes in int32 (one cheap pass, exact), not over a float copy of the dequantized input."""
        coeff = self.w_shift * self.w_scale * self.a_scale
        if self.kind is nn.Linear:
            k = x_q.shape[-1]
            centered = (x_q.sum(dim=-1, keepdim=True, dtype=torch.int32) - k * self.a_zero_point).float()
            return y.addcmul_(centered, coeff)                        # [..., 1] × [N_out] -> [..., N_out]
        groups, n_out = self.op_kwargs["groups"], self.w_shape[0]
        per_group = x_q.shape[1] // groups
        summed = x_q.unflatten(1, (groups, per_group)).sum(dim=2, dtype=torch.int32)      # [N, groups, *spatial]
        summed = (summed - per_group * self.a_zero_point).float()   # Σ_c (x_q − z_a): 0 where the padding is
        ones = torch.ones(groups, 1, *self.w_shape[2:], device=x_q.device)
        box = _float_op(self.kind, summed, ones, None, {**self.op_kwargs, "groups": groups})
        if groups > 1:
            box = box.repeat_interleave(n_out // groups, dim=1)
        return y.addcmul_(box, coeff.view((1, -1) + (1,) * (box.ndim - 2)))

    def _apply(self, fn, recurse=True):
        self._packed, self._float_weight = None, None      # repacked on the new device / dtype at the next call
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"{self.kind.__name__} {self.w_shape} W{self.store_bits}-stored backend={self.backend.value}"
                f"{' +offset' if self.has_offset else ''}")


def int8_weight(codes: torch.Tensor, qmin: int, w_scale: torch.Tensor, w_zero_point: torch.Tensor, bits: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base = qmin − c, Δ_w, c − z_w), each [C_out] on the codes' device, for the int8 weight w = codes + base =
    q − c of unsigned ``codes``. Per output channel, c = z_w where q − z_w fits int8 (always for ≤ 7 bits), else
    c = 128 (8-bit asymmetric grids: q ∈ [0, 255]). No host round trip: the choice is a tensor op, so the weights
    can stay on the GPU (or the meta device)."""
    n_out = codes.shape[0]
    scale = w_scale.reshape(-1).expand(n_out) if w_scale.numel() == 1 else w_scale.reshape(n_out)
    zp = w_zero_point.reshape(-1).expand(n_out) if w_zero_point.numel() == 1 else w_zero_point.reshape(n_out)
    zp_int = zp.round().long().to(codes.device)
    c = zp_int
    if bits > 7:
        rows = codes.reshape(n_out, -1).long() + qmin                  # q per output channel
        fits = ((rows.amin(1) - zp_int) >= -128) & ((rows.amax(1) - zp_int) <= 127)
        c = torch.where(fits, zp_int, torch.full_like(zp_int, 128))
    return qmin - c, scale.float().to(codes.device), (c - zp_int).float()


def kept_reason(layer: QuantLayer) -> str | None:
    """Why a QuantLayer stays as it is (fake-quant) instead of becoming an IntegerLayer, or None."""
    if layer.split is not None:
        return "shortcut split (two input ranges)"
    if layer.w_scheme.bits > 8 or (layer.a_scheme is not None and layer.a_scheme.bits > 8):
        return "more than 8 bits"
    if layer.a_scheme is not None and layer.a_scheme.symmetric:
        return "symmetric activation grid"
    if layer.w_scale.numel() not in (1, layer.weight.shape[0]):
        return "weight ranges not per tensor or per output channel"
    return None


def choose_backend(layer: QuantLayer, max_abs_w: int, backend: Backend) -> tuple[Backend, str]:
    """The backend this layer (inputs quantized; its int8 weight at most ``max_abs_w`` in magnitude) can run on
    exactly, and why it falls back to FLOAT when it does."""
    shape = layer.weight.shape
    if backend is Backend.ONEDNN:
        if layer.weight.device.type != "cpu" or not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
            return Backend.FLOAT, "oneDNN int8 kernels need a CPU build with oneDNN"
        worst = 2 * layer.a_scheme.qmax * max_abs_w
        if worst > INT16_MAX and not onednn_int8_exact():
            return Backend.FLOAT, "u8×s8 pair sums would saturate int16 on this CPU (AVX2 without VNNI)"
        return Backend.ONEDNN, ""
    if backend is Backend.INT_MM:
        k = math.prod(shape[1:])
        one_by_one = layer.kind is nn.Linear or (
            all(s == 1 for s in shape[2:]) and all(s == 1 for s in layer.op_kwargs["stride"])
            and all(p == 0 for p in layer.op_kwargs["padding"]) and layer.op_kwargs["groups"] == 1)
        if not one_by_one:
            return Backend.FLOAT, "not a Linear or 1×1 conv (no int8 conv kernel on this device)"
        if k % 8 or k < 16 or shape[0] % 8:
            return Backend.FLOAT, "K or N not a multiple of 8, or K < 16 (torch._int_mm)"
        return Backend.INT_MM, ""
    return Backend.FLOAT, "asked for float"


@torch.no_grad()
def to_integer_(model: nn.Module, backend: Backend | None = None) -> dict[str, str]:
    """Replace every QuantLayer of ``model`` (a QuantModel or its UNet) by an IntegerLayer, in place, freeing the
    float master weights. Returns {fqn: backend value, or "float: <why>"} for every replaced layer."""
    if isinstance(model, QuantModel):   # names relative to the UNet, as the policy and the quantized state use
        model = model.model
    report = {}
    for name, layer in list(_quant_layers(model)):
        if not (layer.weight_quant and layer.w_ready):
            raise ValueError(f"{name}: weight quantization is off or uncalibrated; set_quant_state(weight=True) "
                             f"on a calibrated model first")
        kept = kept_reason(layer)
        if kept:
            report[name] = f"fake-quant: {kept}"
            continue
        device = layer.weight.device
        chosen = backend or default_backend(device)
        codes = layer.weight_codes()
        if not (layer.act_quant and layer.a_ready):
            new = FloatWeightLayer.from_quant(layer, codes)
            how, why = Backend.FLOAT, "weight-only (input not quantized)"
        else:
            new = IntegerLayer.from_quant(layer, codes, Backend.FLOAT)
            how, why = choose_backend(layer, new.max_abs_weight(codes), chosen)
            new.backend = how
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new.to(device))
        report[name] = how.value if how is not Backend.FLOAT else f"float: {why}"
    return report


class FloatWeightLayer(nn.Module):
    """A weight-only quantized layer: the dequantized weight, kept as float (nothing to compute in integers)."""

    def __init__(self, kind: type, op_kwargs: dict, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.kind, self.op_kwargs = kind, dict(op_kwargs)
        self.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_quant(cls, layer: QuantLayer, codes: torch.Tensor) -> "FloatWeightLayer":
        q = codes.to(layer.weight.device).float() + layer.w_scheme.qmin
        return cls(layer.kind, layer.op_kwargs, (q - layer.w_zero_point) * layer.w_scale, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float_op(self.kind, x, self.weight, self.bias, self.op_kwargs)


def _quant_layers(model: nn.Module) -> Iterable[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def _float_op(kind: type, x, w, bias, op_kwargs: dict) -> torch.Tensor:
    if kind is nn.Linear:
        return F.linear(x, w, bias)
    return (F.conv2d if kind is nn.Conv2d else F.conv1d)(x, w, bias, **op_kwargs)


def _conv2d_kwargs(op_kwargs: dict, one_d: bool) -> dict:
    if not one_d:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in op_kwargs.items()}
    return {"stride": [1, op_kwargs["stride"][0]], "padding": [0, op_kwargs["padding"][0]],
            "dilation": [1, op_kwargs["dilation"][0]], "groups": op_kwargs["groups"]}


def layer_summary(report: dict[str, str]) -> dict[str, int]:
    """How many layers run on each backend (fallback reasons grouped)."""
    out: dict[str, int] = {}
    for how in report.values():
        out[how] = out.get(how, 0) + 1
    return out
