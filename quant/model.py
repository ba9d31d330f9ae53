"""QuantModel: a UNet whose Conv/Linear layers are QuantLayers chosen by a layer policy (BRECQ's QuantModel).

    qm = QuantModel(unet, QuantConfig(w_bits=4, a_bits=8), specials=family.quant_specials())   # D²-DPM, per-tensor
    qm.init_weights_()                                # explicit: weight Δ, z for every layer
    qm.calibrate_activations_(batches)                # explicit: activation Δ, z from calibration inputs
    qm.set_quant_state(weight=True, act=True)
    eps = qm(x, t, context=c)                         # same signature as the UNet
    state = qm.quant_state_dict()                     # Δ, z, rounding (α or round-up mask) per layer
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from quant.attention import ActQuantizer, wrap_attention_
from quant.layers import QuantLayer, WeightRounding
from quant.policy import LayerFilter, Precision
from quant.quantizer import (FakeQuantKernel, PerTensor, QScheme, ScaleSearch, pack_bits, qparams_from_range,
                             unpack_bits)
from quant.config import QuantConfig
from quant.specials import QuantSpecials


class QuantModel(nn.Module):
    def __init__(self, unet: nn.Module, config: QuantConfig, *, specials: QuantSpecials,
                 filter_fn: LayerFilter | str | None = None, search: ScaleSearch = ScaleSearch.MSE,
                 copy_model: bool = True):
        """The layers of ``unet`` (a copy unless ``copy_model`` is False) quantized as ``config`` says: which layers
        and at which bits by ``filter_fn`` (fqn, module) -> Precision, default the policy ``config.policy`` names
        (a name: ``specials``' predicate of that name); weight ranges of ``config.granularity``; with
        ``config.sm_abit`` the attention matmuls' inputs too (q, k, v at ``a_bits``, softmax output at ``sm_abit``;
        Q-Diffusion); with ``config.split_shortcut`` the quantized convs ``specials.shortcut_splits`` names (the
        decoder blocks' skip convs) get separate ranges for the [h ; skip] halves of their concatenated input
        (Q-Diffusion's shortcut splitting). ``specials``: the model family's (``quant.specials``), kept as
        ``self.specials`` for the verbs that need them (units, smoothing sites). ``search``: how ranges are chosen
        (the L2.4 clipping search, or the max). ``quant.api.quantize`` is the usual way to build one."""
        super().__init__()
        w_bits, a_bits, granularity = config.w_bits, config.a_bits, config.granularity
        sm_abit, split_shortcut = config.sm_abit, config.split_shortcut
        policy = filter_fn if filter_fn is not None else config.policy
        self.model = copy.deepcopy(unet) if copy_model else unet
        self.config = config   # (bits, granularity, sm_abit, split: read them there)
        self.specials = specials
        policy = specials.policy(policy)
        # on the FP modules, before any is wrapped: the family's function sees the network it was written for
        splits = specials.shortcut_splits(self.model) if split_shortcut else {}

        def schemes(precision: Precision) -> tuple[QScheme, QScheme | None]:
            wb, ab = (8, 8 if a_bits else None) if precision is Precision.EIGHT_BIT else (w_bits, a_bits)
            return (QScheme(wb, False, granularity, search),
                    QScheme(ab, False, PerTensor(), search) if ab else None)

        layers: dict[str, QuantLayer] = {}
        for name, module in list(self.model.named_modules()):
            precision = policy(name, module)
            if precision is Precision.FP32:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            layers[name] = QuantLayer(module, *schemes(precision), precision=precision)
            setattr(parent, child, layers[name])
        for name, split in splits.items():
            if name in layers:  # policies that keep skip convs in FP32 have nothing to split
                layers[name].set_split_(split)
        if sm_abit is not None:   # (the config guarantees a_bits)
            if not wrap_attention_(self.model, specials.attention, QScheme(a_bits, False, PerTensor(), search),
                                   QScheme(sm_abit, False, PerTensor(), search)):
                # no silent no-op: the pixel DDPM's AttnBlock computes its matmuls inline, where no wrapper reaches
                raise ValueError("sm_abit asks for quantized attention matmuls, but this UNet has no attention module "
                                 "its family can wrap (QuantSpecials.attention); leave sm_abit unset")
        self._state = {"weight": False, "act": False}
        # the wrapper takes the UNet's mode: a new Module is in training mode, and whoever restores "the model's
        # mode" later (reconstruct_) would otherwise switch an eval UNet's dropout on
        self.training = self.model.training

    def quant_layers(self) -> Iterable[tuple[str, QuantLayer]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, QuantLayer))

    def act_quantizers(self) -> Iterable[tuple[str, ActQuantizer]]:
        """The weightless activation quantizers (attention matmul inputs)."""
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, ActQuantizer))

    def set_quant_state(self, weight: bool = False, act: bool = False) -> "QuantModel":
        self._state = {"weight": bool(weight), "act": bool(act)}
        for _, layer in self.quant_layers():
            layer.weight_quant = weight
            layer.act_quant = act and layer.a_scheme is not None
        for _, quantizer in self.act_quantizers():
            quantizer.enabled = act
        return self

    def use_kernel_(self, kernel: FakeQuantKernel) -> "QuantModel":
        """How sampling computes every activation fake-quant (``FakeQuantKernel``): the values stay those of the
        passes (FUSED: up to codes at rounding ties), only the cost changes; training always takes the STE form."""
        for _, m in [*self.quant_layers(), *self.act_quantizers()]:
            m.kernel = kernel
        return self

    def quant_state(self) -> dict[str, bool]:
        """The last ``set_quant_state`` arguments, to restore them: ``qm.set_quant_state(**state)``."""
        return dict(self._state)

    @contextlib.contextmanager
    def quant_state_as(self, weight: bool = False, act: bool = False) -> Iterator["QuantModel"]:
        """``with qm.quant_state_as(weight=True):`` quantization switched as asked inside, as it was after (also
        on error): the FP and quantized passes of reconstruction and SQNR measurement."""
        state = self.quant_state()
        self.set_quant_state(weight, act)
        try:
            yield self
        finally:
            self.set_quant_state(**state)

    @torch.no_grad()
    def init_weights_(self) -> "QuantModel":
        for _, layer in self.quant_layers():
            layer.init_weight_qparams_()
        return self

    @torch.no_grad()
    def calibrate_activations_(self, batches: Iterable[tuple]) -> "QuantModel":
        """Set every activation range from the layer inputs seen over ``batches`` of (x, t, context): all inputs of a
        layer are concatenated (flattened), then the MSE/max search runs once per layer. Weight quantization stays as
        set, so the inputs are those of the quantized prefix."""
        seen: dict[str, list[torch.Tensor]] = {}
        def record(m, args, n):
            seen.setdefault(n, []).append(args[0].detach() if m.split else args[0].detach().flatten())

        hooks = [layer.register_forward_pre_hook(lambda m, a, n=n: record(m, a, n))
                 for n, layer in self.quant_layers() if layer.a_scheme is not None]
        act_state = {n: layer.act_quant for n, layer in self.quant_layers()}
        for _, layer in self.quant_layers():
            layer.act_quant = False
        quantizers = dict(self.act_quantizers())
        enabled = {n: q.enabled for n, q in quantizers.items()}
        for q in quantizers.values():
            q.enabled, q.observed = False, []
        try:
            for x, t, context in batches:
                self.model(x, t, context=context)
        finally:
            for h in hooks:
                h.remove()
            for n, layer in self.quant_layers():
                layer.act_quant = act_state[n]
            observed = {n: q.observed for n, q in quantizers.items()}
            for n, q in quantizers.items():
                q.enabled, q.observed = enabled[n], None
        for n, layer in self.quant_layers():
            if n in seen:
                # split layers need the channel axis: keep [N, C, ...] rows; others are flattened already
                layer.init_act_qparams_(torch.cat(seen[n]))
        for n, q in quantizers.items():
            if observed[n]:
                q.init_act_qparams_(torch.cat(observed[n]))
        return self

    @torch.no_grad()
    def ema_activation_ranges_(self, batches: Iterable[tuple], momentum: float = 0.95,
                               softmax_only: bool = False) -> "QuantModel":
        """Q-Diffusion's / QNCD's ``--running_stat`` (spec quantization.md §1.4): stream ``batches`` of (x, t,
        context) through the model as it is set (normally weights and activations quantized) and move every active
        activation range by an EMA of the per-batch extremes, x_min ← m·x_min + (1 − m)·min(x) (x_max likewise).
        Before each quantization Δ and z are reset from the EMA bounds with the min-max formula, as the original
        updates them inside the forward, so later layers see inputs quantized with the moving ranges. The EMA starts
        at the first batch's min/max (the original starts at its init batch's). Split layers keep one EMA per half.
        ``softmax_only`` (``--rs_sm_only``): only the attention-probability quantizers. The result overrides the
        MSE-searched or learned ranges."""
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def extremes(x: torch.Tensor, split: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            if split is None:
                return x.min(), x.max()
            halves = (x[:, :split], x[:, split:])
            return torch.stack([h.min() for h in halves]), torch.stack([h.max() for h in halves])

        def update(name: str, module: nn.Module, x: torch.Tensor, scheme: QScheme, split: int | None) -> None:
            lo, hi = extremes(x.detach().float(), split)
            if name in bounds:
                lo = momentum * bounds[name][0] + (1 - momentum) * lo
                hi = momentum * bounds[name][1] + (1 - momentum) * hi
            bounds[name] = (lo, hi)
            scale, zp = qparams_from_range(lo, hi, scheme)
            module.a_scale.data = scale.to(module.a_scale)
            module.a_zero_point = zp.to(module.a_zero_point)

        hooks = []
        if not softmax_only:
            for n, layer in self.quant_layers():
                if layer.act_quant and layer.a_ready:
                    hooks.append(layer.register_forward_pre_hook(
                        lambda m, a, n=n: update(n, m, a[0], m.a_scheme, m.split)))
        for n, q in self.act_quantizers():
            if q.enabled and q.a_ready and (n.endswith("sm_quant") or not softmax_only):
                hooks.append(q.register_forward_pre_hook(lambda m, a, n=n: update(n, m, a[0], m.scheme, None)))
        if not hooks:
            raise RuntimeError("no active activation quantizer to update: calibrate activations and turn them on "
                               "(set_quant_state(weight=True, act=True)) first")
        forward_batches(self.model, batches, hooks)
        return self

    def forward(self, x, timesteps=None, context=None, **kwargs):
        return self.model(x, timesteps, context=context, **kwargs)

    # -- persistence of the quantized state -------------------------------------------------------------------

    def quant_state_dict(self) -> dict[str, dict]:
        """Per quantized layer: Δ/z of weights and activations, the rounding mode and, for AdaRound, α (soft) or
        the round-up mask (hard; packed, 1 bit per weight). The FP master weights are not included: they
        come from the model checkpoint."""
        out = {}
        for name, layer in self.quant_layers():
            d = {"w_scale": layer.w_scale.detach().cpu(), "w_zero_point": layer.w_zero_point.detach().cpu(),
                 "a_scale": layer.a_scale.detach().cpu(), "a_zero_point": layer.a_zero_point.detach().cpu(),
                 "rounding": layer.rounding.value, "w_ready": layer.w_ready, "a_ready": layer.a_ready}
            if layer.rounding is WeightRounding.ADAROUND_HARD:
                d["round_up_bits"] = pack_bits(layer.round_up.cpu(), 1)   # 1 bit a weight on disk
            elif layer.rounding is WeightRounding.ADAROUND_SOFT:
                d["alpha"] = layer.alpha.detach().cpu()
            if layer.split:
                d["split"] = layer.split
            out[name] = d
        for name, q in self.act_quantizers():
            out[name] = {"kind": "act", "a_scale": q.a_scale.detach().cpu(), "a_zero_point": q.a_zero_point.cpu(),
                         "a_ready": q.a_ready, "bits": q.scheme.bits}
        return out

    @torch.no_grad()
    def load_quant_state_dict_(self, state: dict[str, dict], fresh_attention: bool = False) -> "QuantModel":
        """Restore ``quant_state_dict()`` exactly; any layer or quantizer missing or extra is a ValueError.
        ``fresh_attention``: ``state`` is of a model without attention quantizers (step 2's weights) and this one
        adds them: they must all be missing from ``state`` and stay uncalibrated (``calibrate_activations_``)."""
        quantizers = dict(self.act_quantizers())
        layers = {**dict(self.quant_layers()), **quantizers}
        if fresh_attention:
            if set(quantizers) & set(state):
                raise ValueError("fresh_attention: the state already holds attention quantizers")
            layers = dict(self.quant_layers())
        if set(state) != set(layers):
            missing, extra = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
            raise ValueError(f"quantized state does not fit this model: missing {missing[:3]}, unexpected "
                             f"{extra[:3]} (another layer policy or model?)")
        for name, d in state.items():
            layer = layers[name]
            if name in quantizers:
                if d.get("bits") != layer.scheme.bits:
                    raise ValueError(f"{name}: state for {d.get('bits')} bits, this model has {layer.scheme.bits}")
                dev = next(self.model.parameters()).device   # (a fresh quantizer's buffers may still be on the CPU)
                layer.a_scale = nn.Parameter(d["a_scale"].to(dev), requires_grad=False)
                layer.a_zero_point, layer.a_ready = d["a_zero_point"].to(dev), bool(d["a_ready"])
                continue
            if d.get("split") != layer.split:
                raise ValueError(f"{name}: state with shortcut split {d.get('split')}, this model has {layer.split} "
                                 f"(build it with the same split_shortcut)")
            dev = layer.weight.device
            layer.w_scale, layer.w_zero_point = d["w_scale"].to(dev), d["w_zero_point"].to(dev)
            layer.a_scale = nn.Parameter(d["a_scale"].to(dev), requires_grad=False)
            layer.a_zero_point = d["a_zero_point"].to(dev)
            layer.w_ready, layer.a_ready = bool(d["w_ready"]), bool(d["a_ready"])
            layer.rounding = WeightRounding(d["rounding"])
            layer.alpha, layer.round_up, layer._w_floor, layer.soft_h = None, None, None, None
            if layer.rounding is WeightRounding.ADAROUND_HARD:
                layer.round_up = _round_up_mask(name, d, layer.weight).to(dev)
            elif layer.rounding is WeightRounding.ADAROUND_SOFT:
                layer.alpha = nn.Parameter(d["alpha"].to(dev))
        return self


def _round_up_mask(name: str, d: dict, weight: torch.Tensor) -> torch.Tensor:
    """The hardened AdaRound mask of a saved layer: packed bits (``round_up_bits``) or, from artifacts written before
    the packing, a bool tensor (``round_up``)."""
    if "round_up_bits" in d:
        bits, n = d["round_up_bits"], weight.numel()
        if bits.dtype != torch.uint8 or bits.numel() != -(-n // 8):
            raise ValueError(f"{name}: round-up mask of {bits.numel()} bytes, this layer needs {-(-n // 8)}")
        return unpack_bits(bits, 1, n).view(weight.shape).bool()
    if tuple(d["round_up"].shape) != tuple(weight.shape):
        raise ValueError(f"{name}: round-up mask of shape {tuple(d['round_up'].shape)}, weight {tuple(weight.shape)}")
    return d["round_up"].bool()


@torch.no_grad()
def forward_batches(model: nn.Module, batches: Iterable[tuple], handles: list) -> None:
    """model(x, t, context=c) over ``batches`` for what the hook ``handles`` observe; the hooks are removed after,
    also on error."""
    try:
        for x, t, c in batches:
            model(x, t, context=c)
    finally:
        for h in handles:
            h.remove()
