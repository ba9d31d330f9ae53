"""Batch sampling helpers over ``ldm.models.diffusion.settings.sample``: guided class-conditional and unconditional
latents, with one ``SamplingSettings`` (steps, η, scale, grid, loop).

Used by the pipeline scripts (FP32 grids, and later quantized and corrected sampling through ``model_fn`` and
``correction``). Everything random comes from one ``torch.Generator``, so a seed fixes the result.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import ModelFn, StepCorrection
from ldm.models.diffusion.settings import SamplingSettings, sample

# a batch of conditions (class ids here; prompts for a text model) -> (c, uc): the conditioning and, for
# classifier-free guidance, the unconditional one (None without guidance)
Conditioner = Callable[[Sequence[Any]], tuple[Any, Any]]


def null_class(model) -> int:
    """The unconditional label for classifier-free guidance: the ClassEmbedder's last class (1000 for cin256-v2)."""
    return model.cond_stage_model.n_classes - 1


def latent_shape(model) -> tuple[int, int, int]:
    return (model.channels, model.image_size, model.image_size)


@torch.no_grad()
def class_conditioning(model, labels: Sequence[int], scale: float, uncond_label: int | None = None):
    """(c, uc) for a batch of class labels: the learned conditioning, and the null class's for guidance (None when
    ``scale`` is 1, i.e. no guidance). ``uncond_label`` defaults to the model's null class."""
    device = model.betas.device
    key = getattr(model.cond_stage_model, "key", "class_label")
    y = torch.as_tensor(list(labels), device=device, dtype=torch.long)
    c = model.get_learned_conditioning({key: y})
    if scale == 1.0:
        return c, None
    uc_label = null_class(model) if uncond_label is None else uncond_label
    return c, model.get_learned_conditioning({key: torch.full_like(y, uc_label)})


def class_conditioner(model, scale: float, uncond_label: int | None = None) -> Conditioner:
    """The ``Conditioner`` of a class-conditional LDM (``class_conditioning`` with these settings)."""
    if not getattr(model, "is_conditional", False):
        raise ValueError("class labels given, but the model is unconditional")
    return lambda labels: class_conditioning(model, labels, scale, uncond_label)


def sample_latents(model, labels: Sequence[Any] | None, *, settings: SamplingSettings, n: int | None = None,
                   uncond_label: int | None = None, batch_size: int = 16, generator: torch.Generator | None = None,
                   model_fn: ModelFn | None = None, correction: StepCorrection | None = None, progress: bool = True,
                   conditioner: Conditioner | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Latents [N, C, H, W] sampled with ``settings`` (steps, η, scale, grid, loop): one per entry of ``labels``
    (class-conditional, guided with the settings' scale against ``uncond_label``; or any conditions
    ``conditioner`` turns into (c, uc)), or ``n`` unconditional ones when ``labels`` is None. Batches of
    ``batch_size``; x_T for all samples is drawn first, so it does not depend on the batching. ``shape`` defaults to
    the model's latent shape, ``model_fn`` to ``model.apply_model``."""
    device = model.betas.device
    conditional = labels is not None
    total = len(labels) if conditional else n
    if not total:
        raise ValueError("nothing to sample: give labels or n > 0")
    if conditional and conditioner is None:
        conditioner = class_conditioner(model, settings.scale, uncond_label)
    shape = tuple(shape or latent_shape(model))
    x_T = torch.randn((total, *shape), generator=generator, device=device)
    schedule = settings.schedule(model)
    model_fn = model_fn if model_fn is not None else model.apply_model
    out = []
    for start in tqdm(range(0, total, batch_size), desc="sampling", disable=not progress):
        stop = min(start + batch_size, total)
        c, uc = conditioner(labels[start:stop]) if conditional else (None, None)
        out.append(sample(model_fn, x_T[start:stop], schedule, settings, cond=c, uncond=uc, generator=generator,
                          correction=correction))
    return torch.cat(out)


@torch.no_grad()
def decode_latents(model, z: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """First-stage decode in batches; images [N, 3, H, W] clamped to [-1, 1]."""
    return torch.cat([model.decode_first_stage(z[i:i + batch_size]) for i in range(0, len(z), batch_size)]
                     ).clamp(-1, 1)
