"""Text-to-image LDMs with SD v1's structure (CompVis ``LatentDiffusion`` + ``FrozenCLIPEmbedder``): Stable Diffusion
v1.4 / v1.5 as QNCD runs it on MS-COCO captions, and the embedded Fashion text default.

Conditions are indices into the run's **prompt list** (one prompt per line of ``--prompts`` / ``--from_file``, or
the preset's file): condition i is prompt i, guided against the empty prompt. So every step works for text exactly as
for classes: step 7's plan gives sample j the prompt j mod P (each caption once for P = N, the MS-COCO protocol),
samples.npz's labels are prompt indices, the calibration set holds the text embeddings of each input, and the
prompt list's SHA-256 is in the meta of what depends on it (the calibration set, the noise statistics, step 7's
manifest), so a set made from other prompts is remade, not reused.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn as nn

from ldm.data.prompts import load_prompts, prompts_fingerprint  # noqa: F401  (re-exported)
from ldm.sample import Conditioner
from ldm.util import ConfigError, UserFacingError
from pipeline.families.base import config_target
from pipeline.families.compvis_ldm import _cond_stage, _LatentDiffusion


class TextToImageLDM(_LatentDiffusion):
    name = "compvis-txt2img"
    description = "SD-v1-structured text-to-image LDM (FrozenCLIPEmbedder; guidance against the empty prompt)"
    takes_prompts = True

    def __init__(self, prompts: Sequence[str] | None = None, source: str | None = None):
        self.prompts = None if prompts is None else tuple(prompts)
        self.source = source

    def with_prompts(self, prompts: Sequence[str], source: str) -> "TextToImageLDM":
        """This family bound to a run's prompt list (the registry's instance stays unbound)."""
        bound = copy.copy(self)
        bound.prompts, bound.source = tuple(prompts), source
        return bound

    def _bound(self) -> tuple[str, ...]:
        if self.prompts is None:
            raise UserFacingError("a text-to-image model needs prompts: pass --prompts FILE (one per line) or a "
                                  "preset that names one")
        return self.prompts

    def matches(self, config: Any) -> bool:
        cond = _cond_stage(config)
        return config_target(config).endswith("LatentDiffusion") and hasattr(cond, "get") and \
            str(cond.get("target", "")).endswith("FrozenCLIPEmbedder")

    def check_config(self, config: Any, config_name: str) -> None:
        if config.model.params.get("conditioning_key", "crossattn") != "crossattn":
            raise ConfigError(f"{config_name}: a FrozenCLIPEmbedder model conditions through cross-attention; "
                              f"set conditioning_key: crossattn")

    def run_meta(self) -> dict:
        prompts = self._bound()
        return {"prompts": prompts_fingerprint(prompts), "n_prompts": len(prompts)}

    def num_classes(self, config: Any) -> int | None:
        return len(self._bound())

    def conditions(self, model: nn.Module, per_condition: int) -> list[int]:
        return [i for i in range(len(self._bound())) for _ in range(per_condition)]

    def prompt(self, condition: Any) -> str:
        """The prompt of a condition: an index into the prompt list, or a prompt itself."""
        return condition if isinstance(condition, str) else self._bound()[int(condition)]

    def conditioner(self, model: nn.Module, scale: float, uncond: Any = None) -> Conditioner:
        uncond_prompt = self.null_condition(model) if uncond is None else self.prompt(uncond)

        @torch.no_grad()
        def conditioning(conditions: Sequence[Any]):
            prompts = [self.prompt(c) for c in conditions]
            c = model.get_learned_conditioning(prompts)
            return c, (None if scale == 1.0 else model.get_learned_conditioning([uncond_prompt] * len(prompts)))
        return conditioning

    def null_condition(self, model: nn.Module) -> str:
        return ""   # SD v1 guides against the empty prompt

    def check_conditions(self, model: nn.Module, conditions: Sequence[Any], uncond: Any = None) -> None:
        n = len(self._bound())
        bad = sorted({c for c in conditions if not isinstance(c, str) and not 0 <= int(c) < n})
        if bad:
            raise UserFacingError(f"prompt indices {bad[:5]} out of range for {n} prompts (0..{n - 1})")

    def describe(self, conditions: Sequence[Any] | None, n: int, noun: str = "samples") -> str:
        k = len(set(conditions or ()))
        return f"{len(conditions or ())} text-conditional {noun} over {k} prompts of {self.source}"


FAMILIES = (TextToImageLDM(),)
