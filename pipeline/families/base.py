"""The interface a model family implements: everything the pipeline needs to know about one kind of diffusion model
(how to load it, which UNet to quantize, how to condition it, how to sample and decode it).

Steps 1-7 only talk to a family through this interface, so a family is one module (``pipeline/families/<name>.py``)
and adding one touches nothing in ``quant/`` or ``correction/``: quantization sees a UNet (``nn.Module`` with the
``(x, t, context=..., y=...)`` signature and ResBlock / transformer units ``quant.reconstruction.find_units`` knows),
correction sees ``(x, t, c) -> ε`` functions and DDIM steps.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch
import torch.nn as nn

from ldm.models.diffusion.ddim import DDIMSampler, ModelFn
from ldm.sample import Conditioner
from ldm.util import ConfigError, UserFacingError, load_model_from_config


def config_target(config: Any) -> str:
    """The ``model.target`` class path of a CompVis config ('' when there is none)."""
    model = config.get("model") if hasattr(config, "get") else None
    return str(model.get("target", "")) if hasattr(model, "get") else ""


class ModelFamily:
    """One kind of model. Subclasses set ``name`` and ``description`` and override what differs; the defaults here
    are those of CompVis' ``DDPM`` / ``LatentDiffusion`` classes.

    Conditions are opaque per family: class ids for a class-conditional model, prompts for a text model, None for an
    unconditional one (``conditions`` lists those of a calibration or statistics run; ``conditioner`` turns a batch
    of them into (c, uc))."""

    name = "abstract"
    description = ""
    sampler_cls: type[DDIMSampler] = DDIMSampler  # the family's default loop (--plms picks PLMS for a run)
    takes_prompts = False   # a text family: conditions index the run's prompt list (``with_prompts``)

    # ---- recognising and loading ----------------------------------------------------------------------------

    def matches(self, config: Any) -> bool:
        """Whether this family handles a CompVis config (checked on the yaml alone, before anything is built)."""
        raise NotImplementedError

    def check_config(self, config: Any, config_name: str) -> None:
        """Cheap checks of the config before the model is built (one-line ``ConfigError``)."""

    def run_meta(self) -> dict:
        """What else identifies a run's conditions in every artifact's meta (a text family: its prompt list)."""
        return {}

    def num_classes(self, config: Any) -> int | None:
        """Real classes of a class-conditional model (read from the config), None otherwise."""
        return None

    def load(self, config: Any, ckpt: str | os.PathLike | None, *, device: torch.device, trust: bool = False,
             config_name: str = "config", without_unet: bool = False) -> nn.Module:
        """The model with its checkpoint, strictly loaded, in eval mode on ``device``. ``without_unet``: the UNet's
        weights are not read from the checkpoint (a packed quantized UNet replaces them)."""
        try:
            # the EMA copy of the UNet too: the packed file was made from the weights sampling uses
            model = load_model_from_config(config, ckpt, trust=trust, device=device, config_name=config_name,
                                           exclude_prefix=("model.diffusion_model.", "model_ema.")
                                           if without_unet else None)
            if without_unet and getattr(model, "use_ema", False):
                model.use_ema = False   # ema_scope would swap the (uninitialised) EMA weights over the packed UNet
            return model
        except UserFacingError:
            raise
        except (TypeError, ValueError) as e:  # unknown params, or values the modules refuse (GroupNorm widths...)
            raise ConfigError(f"{config_name} does not fit the model code: {' '.join(str(e).split())}") from None

    # ---- the UNet ----------------------------------------------------------------------------------------------

    def unet(self, model: nn.Module) -> nn.Module:
        """The network to quantize (CompVis: ``model.model.diffusion_model``)."""
        return model.model.diffusion_model

    def unet_model_fn(self, model: nn.Module, unet: nn.Module) -> ModelFn:
        """``unet`` (e.g. a QuantModel) behind the family's conditioning routing, as ``(x, t, c) -> ε``."""
        raise NotImplementedError

    def model_fn(self, model: nn.Module) -> ModelFn:
        """The full-precision denoiser ``(x, t, c) -> ε``."""
        return self.unet_model_fn(model, self.unet(model))

    def ema_scope(self, model: nn.Module):
        """Sample and quantize with the EMA weights when the checkpoint has them."""
        return model.ema_scope() if getattr(model, "use_ema", False) else contextlib.nullcontext()

    # ---- conditioning, sampling, decoding ---------------------------------------------------------------------

    def conditions(self, model: nn.Module, per_condition: int) -> list[Any] | None:
        """The conditions of a calibration run: every class ``per_condition`` times; None when unconditional."""
        return None

    def conditioner(self, model: nn.Module, scale: float, uncond: Any = None) -> Conditioner | None:
        """Turns a batch of conditions into (c, uc) for guidance ``scale`` (``uncond``: the condition guided
        against, default the family's null condition); None for an unconditional family."""
        return None

    def null_condition(self, model: nn.Module) -> Any:
        """The condition guidance pushes away from (the null class, the empty prompt); None without guidance."""
        return None

    def check_conditions(self, model: nn.Module, conditions: Sequence[Any], uncond: Any = None) -> None:
        """One-line ``UserFacingError`` for conditions the model cannot take (e.g. class ids out of range)."""

    def guidance_scale(self, scale: float) -> float:
        """The scale in effect: 1 for an unconditional family whatever the run's setting."""
        return scale

    def check_steps(self, config: Any, steps: int, grid: str | None) -> None:
        """Whether the family's timestep grid takes ``steps`` (read from the config alone, before anything is built;
        one line naming --steps otherwise). CompVis: the uniform grid ``range(0, T, T // S) + 1``, whose +1 offset
        must stay below T (so S from T/2 + 1 to T, and a few others, are refused)."""
        from ldm.modules.diffusionmodules.util import make_ddim_timesteps
        try:
            num_timesteps = int(config.model.params.get("timesteps", 1000))
        except (AttributeError, TypeError, ValueError):
            num_timesteps = 1000
        try:
            make_ddim_timesteps("uniform", steps, num_timesteps)
        except ValueError as e:
            raise UserFacingError(f"--steps {steps}: {e}") from None

    def use_grid(self, model: nn.Module, grid: str | None) -> None:
        """Sample ``model`` on the timestep grid ``grid`` (``--skip_type``; None: the family's default). The CompVis
        families have one grid, CompVis' uniform one; anything else is refused in one line."""
        if grid is not None:
            raise UserFacingError(f"--skip_type {grid.replace('-corrected', ' --corrected_grid')}: the {self.name} "
                                  f"family samples on the CompVis uniform grid only; drop --skip_type")

    def latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (model.channels, model.image_size, model.image_size)

    def decode(self, model: nn.Module, z: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] from sampled latents."""
        raise NotImplementedError

    def describe(self, conditions: Sequence[Any] | None, n: int, noun: str = "samples") -> str:
        return f"{n} unconditional {noun}" if conditions is None else f"{len(conditions)} conditioned {noun}"

    def __repr__(self) -> str:
        return f"<model family {self.name}>"
