"""CompVis latent diffusion (Rombach et al. 2022): the class-conditional LDM (cin256-v2, the embedded Fashion
default; classifier-free guidance against the ClassEmbedder's null class) and the unconditional LDM. Both sample in
the first stage's latent space and decode with it; ε comes from ``LatentDiffusion.apply_model``."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ldm.models.diffusion.ddim import ModelFn
from ldm.sample import Conditioner, class_conditioner, decode_latents, null_class
from ldm.util import ConfigError, UserFacingError
from pipeline.families.base import ModelFamily, config_target


def _cond_stage(config: Any) -> Any:
    params = config.model.get("params", {}) if hasattr(config.model, "get") else {}
    return params.get("cond_stage_config")


def route_conditioning(conditioning_key: str | None, unet: nn.Module) -> ModelFn:
    """``unet`` behind ``LatentDiffusion.apply_model``'s routing: a non-dict ``cond`` goes to c_concat or c_crossattn
    by the model's ``conditioning_key``, then as ``DiffusionWrapper`` passes it (crossattn: context =
    cat(c_crossattn, 1); concat: cat([x] + c_concat, 1); hybrid: both; adm: y)."""
    key = conditioning_key

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if not isinstance(cond, dict):
            cond = {"c_concat" if key == "concat" else "c_crossattn": cond if isinstance(cond, list) else [cond]}
        if key is None:
            out = unet(x, t)
        elif key == "concat":
            out = unet(torch.cat([x] + cond["c_concat"], dim=1), t)
        elif key == "crossattn":
            out = unet(x, t, context=torch.cat(cond["c_crossattn"], 1))
        elif key == "hybrid":
            out = unet(torch.cat([x] + cond["c_concat"], dim=1), t, context=torch.cat(cond["c_crossattn"], 1))
        elif key == "adm":
            out = unet(x, t, y=cond["c_crossattn"][0])
        else:
            raise ValueError(f"unknown conditioning_key {key!r}")
        return out[0] if isinstance(out, tuple) else out

    return model_fn


class _LatentDiffusion(ModelFamily):
    def unet_model_fn(self, model: nn.Module, unet: nn.Module) -> ModelFn:
        return route_conditioning(model.model.conditioning_key, unet)

    def model_fn(self, model: nn.Module) -> ModelFn:
        return model.apply_model

    def decode(self, model: nn.Module, z: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        return decode_latents(model, z, batch_size=batch_size)


class ClassConditionalLDM(_LatentDiffusion):
    name = "compvis-class-ldm"
    description = "CompVis class-conditional LDM (ClassEmbedder; guidance against the null class)"

    def matches(self, config: Any) -> bool:
        cond = _cond_stage(config)
        return config_target(config).endswith("LatentDiffusion") and hasattr(cond, "get") and \
            str(cond.get("target", "")).endswith("ClassEmbedder")

    def num_classes(self, config: Any) -> int | None:
        n = _cond_stage(config).get("params", {}).get("n_classes")
        return None if n is None else int(n) - 1  # the last class is the null class

    def check_config(self, config: Any, config_name: str) -> None:
        n = self.num_classes(config)
        if n is None or n < 1:
            raise ConfigError(f"{config_name}: the ClassEmbedder needs n_classes >= 2 (real classes + the null class)")

    def conditions(self, model: nn.Module, per_condition: int) -> list[int]:
        k = model.cond_stage_model.n_classes - 1  # all real classes; the last one is the null class
        return [c for c in range(k) for _ in range(per_condition)]

    def conditioner(self, model: nn.Module, scale: float, uncond: Any = None) -> Conditioner:
        return class_conditioner(model, scale, uncond)

    def null_condition(self, model: nn.Module) -> int:
        return null_class(model)

    def check_conditions(self, model: nn.Module, conditions: Sequence[Any], uncond: Any = None) -> None:
        n = model.cond_stage_model.n_classes
        bad = sorted({c for c in conditions if not 0 <= c < n - 1} | ({uncond} - set(range(n)) if uncond is not None
                                                                     else set()))
        if bad:
            raise UserFacingError(f"class ids {bad} out of range for a model with {n - 1} classes (0..{n - 2}; "
                                  f"{n - 1} is the null class)")

    def describe(self, conditions: Sequence[Any] | None, n: int, noun: str = "samples") -> str:
        k = len(set(conditions or ()))
        return f"{len(conditions or ())} class-conditional {noun} over {k} classes"


class UnconditionalLDM(_LatentDiffusion):
    name = "compvis-uncond-ldm"
    description = "CompVis unconditional LDM"

    def matches(self, config: Any) -> bool:
        return config_target(config).endswith("LatentDiffusion") and _cond_stage(config) == "__is_unconditional__"

    def guidance_scale(self, scale: float) -> float:
        return 1.0


FAMILIES = (ClassConditionalLDM(), UnconditionalLDM())
