"""QuantModel: a UNet whose Conv/Linear layers are QuantLayers chosen by a layer policy (BRECQ's QuantModel).

    qm = QuantModel(unet, w_bits=4, a_bits=8)         # D²-DPM policy, per-tensor asymmetric MSE init
    qm.init_weights_()                                # explicit: weight Δ, z for every layer
    qm.calibrate_activations_(batches)                # explicit: activation Δ, z from calibration inputs
    qm.set_quant_state(weight=True, act=True)
    eps = qm(x, t, context=c)                         # same signature as the UNet
    state = qm.quant_state_dict()                     # Δ, z, rounding (α or round-up mask) per layer
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn as nn

from quant.layers import QuantLayer, WeightRounding
from quant.policy import Precision, d2dpm_policy
from quant.quantizer import PerChannel, PerTensor, QScheme, ScaleSearch


class QuantModel(nn.Module):
    def __init__(self, unet: nn.Module, w_bits: int = 4, a_bits: int | None = 8,
                 policy: Callable[[str, nn.Module], Precision] = d2dpm_policy, channel_wise: bool = False,
                 search: ScaleSearch = ScaleSearch.MSE, copy_model: bool = True):
        super().__init__()
        self.model = copy.deepcopy(unet) if copy_model else unet
        self.w_bits, self.a_bits = w_bits, a_bits
        granularity = PerChannel(0) if channel_wise else PerTensor()

        def schemes(precision: Precision) -> tuple[QScheme, QScheme | None]:
            wb, ab = (8, 8 if a_bits else None) if precision is Precision.EIGHT_BIT else (w_bits, a_bits)
            return (QScheme(wb, False, granularity, search),
                    QScheme(ab, False, PerTensor(), search) if ab else None)

        for name, module in list(self.model.named_modules()):
            precision = policy(name, module)
            if precision is Precision.FP32:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, QuantLayer(module, *schemes(precision), precision=precision))
        self._state = {"weight": False, "act": False}

    def quant_layers(self) -> Iterable[tuple[str, QuantLayer]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, QuantLayer))

    def set_quant_state(self, weight: bool = False, act: bool = False) -> "QuantModel":
        self._state = {"weight": bool(weight), "act": bool(act)}
        for _, layer in self.quant_layers():
            layer.weight_quant = weight
            layer.act_quant = act and layer.a_scheme is not None
        return self

    def quant_state(self) -> dict[str, bool]:
        """The last ``set_quant_state`` arguments, to restore them: ``qm.set_quant_state(**state)``."""
        return dict(self._state)

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
        hooks = [layer.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].flatten()))
                 for n, layer in self.quant_layers() if layer.a_scheme is not None]
        act_state = {n: layer.act_quant for n, layer in self.quant_layers()}
        for _, layer in self.quant_layers():
            layer.act_quant = False
        try:
            for x, t, context in batches:
                self.model(x, t, context=context)
        finally:
            for h in hooks:
                h.remove()
            for n, layer in self.quant_layers():
                layer.act_quant = act_state[n]
        for n, layer in self.quant_layers():
            if n in seen:
                layer.init_act_qparams_(torch.cat(seen[n]))
        return self

    def forward(self, x, timesteps=None, context=None, **kwargs):
        return self.model(x, timesteps, context=context, **kwargs)

    # -- persistence of the quantized state -------------------------------------------------------------------

    def quant_state_dict(self) -> dict[str, dict]:
        """Per quantized layer: Δ/z of weights and activations, the rounding mode and, for AdaRound, α (soft) or
        the round-up mask (hard; 1 bit of information per weight). The FP master weights are not included: they
        come from the model checkpoint."""
        out = {}
        for name, layer in self.quant_layers():
            d = {"w_scale": layer.w_scale.detach().cpu(), "w_zero_point": layer.w_zero_point.detach().cpu(),
                 "a_scale": layer.a_scale.detach().cpu(), "a_zero_point": layer.a_zero_point.detach().cpu(),
                 "rounding": layer.rounding.value, "w_ready": layer.w_ready, "a_ready": layer.a_ready}
            if layer.rounding is WeightRounding.ADAROUND_HARD:
                d["round_up"] = (layer.alpha >= 0).detach().cpu()
            elif layer.rounding is WeightRounding.ADAROUND_SOFT:
                d["alpha"] = layer.alpha.detach().cpu()
            out[name] = d
        return out

    @torch.no_grad()
    def load_quant_state_dict_(self, state: dict[str, dict]) -> "QuantModel":
        layers = dict(self.quant_layers())
        if set(state) != set(layers):
            missing, extra = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
            raise ValueError(f"quantized state does not fit this model: missing {missing[:3]}, unexpected "
                             f"{extra[:3]} (another layer policy or model?)")
        for name, d in state.items():
            layer = layers[name]
            dev = layer.weight.device
            layer.w_scale, layer.w_zero_point = d["w_scale"].to(dev), d["w_zero_point"].to(dev)
            layer.a_scale = nn.Parameter(d["a_scale"].to(dev), requires_grad=False)
            layer.a_zero_point = d["a_zero_point"].to(dev)
            layer.w_ready, layer.a_ready = bool(d["w_ready"]), bool(d["a_ready"])
            layer.rounding = WeightRounding(d["rounding"])
            if layer.rounding is WeightRounding.ADAROUND_HARD:
                layer.alpha = nn.Parameter(d["round_up"].to(dev, layer.weight.dtype) * 2 - 1, requires_grad=False)
            elif layer.rounding is WeightRounding.ADAROUND_SOFT:
                layer.alpha = nn.Parameter(d["alpha"].to(dev))
            else:
                layer.alpha = None
        return self
