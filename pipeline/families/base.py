"""The interface a model family implements: everything the pipeline needs to know about one kind of diffusion model
(how to load it, which UNet to quantize, how to condition it, how to sample and decode it).

Steps 1-7 only talk to a family through this interface, so a family is one module (``pipeline/families/<name>.py``)
and adding one touches nothing in ``quant/`` or ``correction/``: quantization sees a UNet (``nn.Module`` with the
``(x, t, context=..., y=...)`` signature) and the family's ``quant_specials()`` (its reconstruction units, smoothing
sites, shortcut splits and layer policies: ``quant.specials.QuantSpecials``), correction sees ``(x, t, c) -> ε``
functions and DDIM steps. ``COMPVIS_SPECIALS``, those of CompVis' ``UNetModel``, are the default.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ldm.models.diffusion.ddim import DDIMSampler, ModelFn
from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, Downsample, ResBlock
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.sample import Conditioner
from ldm.util import ConfigError, UserFacingError, load_model_from_config
from pipeline.basics import disable_grad_checkpointing, grad_checkpoint_flags
from pipeline.families.compvis_attention import COMPVIS_ATTENTION
from quant.policy import D2DPMPolicy, ExcludeParts, quantize_all_policy
from quant.specials import QuantSpecials, SmoothingSite


def config_target(config: Any) -> str:
    """The ``model.target`` class path of a CompVis config ('' when there is none)."""
    model = config.get("model") if hasattr(config, "get") else None
    return str(model.get("target", "")) if hasattr(model, "get") else ""


# ---- quantization specials of CompVis' UNetModel (openaimodel.py) ---------------------------------------------------

def compvis_time_embedding(unet: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """emb = time_embed(sinusoid(t)), what every ResBlock's emb_layers read. A UNet with class embedding
    (``num_classes``: emb also holds label_emb(y)) is refused: its embedding is not a function of t alone."""
    if getattr(unet, "num_classes", None) is not None:
        raise ValueError("smoothing factors need the class labels of a UNet with num_classes (label_emb); only UNets "
                         "conditioned through context (cin256-v2, the embedded default) are supported")
    param = next(unet.parameters())
    t_emb = timestep_embedding(t.to(param.device), unet.model_channels, repeat_only=False).to(param.dtype)
    return unet.time_embed(t_emb)


def compvis_shortcut_splits(unet: nn.Module) -> dict[str, int]:
    """{fqn of a decoder ResBlock's skip conv: channels of h in its concatenated input [h ; skip]}.

    The UNet pushes every input block's output on a stack and each output block pops one: output block i gets the
    skip of input block −(i + 1). An input block's output channels are those of its last channel-changing module.
    """
    chans = []
    for block in unet.input_blocks:
        c = None
        for m in block:
            if isinstance(m, (ResBlock, Downsample)):
                c = m.out_channels
            elif isinstance(m, nn.Conv2d):
                c = m.weight.shape[0]
        chans.append(c)
    splits = {}
    for i, block in enumerate(unet.output_blocks):
        res = block[0]
        if isinstance(res, ResBlock) and isinstance(res.skip_connection, nn.Conv2d):
            splits[f"output_blocks.{i}.0.skip_connection"] = res.channels - chans[-(i + 1)]
    return splits


def resblock_embedding(block: nn.Module, emb: torch.Tensor) -> torch.Tensor:
    return block.emb_layers(emb)


def resblock_is_film(block: nn.Module) -> bool:
    return bool(block.use_scale_shift_norm)


# ResBlock: e = emb_layers(emb); out_layers = [GroupNorm, SiLU, Dropout, conv] (QNCD smooths the conv's input)
COMPVIS_SMOOTHING = SmoothingSite(ResBlock, norm="out_layers.0", conv="out_layers.3", slot="out_layers.2",
                                  time_embedding=compvis_time_embedding, block_embedding=resblock_embedding,
                                  scale_shift=resblock_is_film)


@contextlib.contextmanager
def compvis_keep_activations(unit: nn.Module) -> Iterator[bool]:
    """CompVis' blocks recompute their forward in the backward when their ``checkpoint`` (transformer blocks: always)
    or ``use_checkpoint`` (ResBlocks, per config) flag is set: off inside, as they were after; yields whether any
    was set."""
    flags = grad_checkpoint_flags(unit)
    disable_grad_checkpointing(unit)
    try:
        yield any(on for _, _, on in flags)
    finally:
        for m, name, on in flags:
            setattr(m, name, on)


COMPVIS_SPECIALS = QuantSpecials(
    unit_types=(ResBlock, BasicTransformerBlock, AttentionBlock),   # AttentionBlock: LSUN-style legacy attention
    smoothing_sites=(COMPVIS_SMOOTHING,),
    shortcut_splits=compvis_shortcut_splits,
    policies={"d2dpm": D2DPMPolicy(eight_bit=("time_embed.0", "input_blocks.0.0", "out.2"),  # embedding, in, out
                                   fp32_parts=("skip_connection",), fp32_suffixes=(".op",)),  # 1×1 skips, Downsample
              "all": quantize_all_policy,
              "qncd-sd": ExcludeParts(("transformer_blocks",))},
    attention=COMPVIS_ATTENTION,
    keep_activations=compvis_keep_activations)


class ModelFamily:
    """One kind of model. Subclasses set ``name`` and ``description`` and override what differs; the defaults here
    are those of CompVis' ``DDPM`` / ``LatentDiffusion`` classes.

    Conditions are opaque per family: class ids for a class-conditional model, prompts for a text model, None for an
    unconditional one (``conditions`` lists those of a calibration or statistics run; ``conditioner`` turns a batch
    of them into (c, uc))."""

    name = "abstract"
    description = ""
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

    def quant_specials(self) -> QuantSpecials:
        """What quantization must know of ``unet``'s network (BRECQ units, QNCD smoothing sites, Q-Diffusion shortcut
        splits, the layer policies by name); passed to ``quant.api.quantize``. Default: CompVis' UNetModel."""
        return COMPVIS_SPECIALS

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
        """Whether the family's timestep grid ``grid`` (None: its default) takes ``steps`` (read from the config alone,
        before anything is built; one line naming the flag otherwise). CompVis: one grid, the uniform
        ``range(0, T, T // S) + 1``, whose +1 offset must stay below T (so S from T/2 + 1 to T, and a few others, are
        refused); any other grid is refused."""
        from ldm.modules.diffusionmodules.util import make_ddim_timesteps
        if grid is not None:
            raise UserFacingError(f"--skip_type {grid.replace('-corrected', ' --corrected_grid')}: the {self.name} "
                                  f"family samples on the CompVis uniform grid only; drop --skip_type")
        try:
            num_timesteps = int(config.model.params.get("timesteps", 1000))
        except (AttributeError, TypeError, ValueError):
            num_timesteps = 1000
        try:
            make_ddim_timesteps("uniform", steps, num_timesteps)
        except ValueError as e:
            raise UserFacingError(f"--steps {steps}: {e}") from None

    def latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (model.channels, model.image_size, model.image_size)

    def decode(self, model: nn.Module, z: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] from sampled latents."""
        raise NotImplementedError

    def describe(self, conditions: Sequence[Any] | None, n: int, noun: str = "samples") -> str:
        return f"{n} unconditional {noun}" if conditions is None else f"{len(conditions)} conditioned {noun}"

    def __repr__(self) -> str:
        return f"<model family {self.name}>"
