"""Sampling through a model family: latents or images for a list of conditions, with any denoiser and correction.
Every random draw comes from the generators passed in, so a seed fixes the result (steps 1, 6 and 7). ``precision``
(``ldm.precision``) is the arithmetic of the UNet and decoder calls; FP32, the default, leaves them untouched."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from evaluation.generation import Batch
from evaluation.images import to_uint8
from ldm.models.diffusion.ddim import ModelFn, StepCorrection
from ldm.precision import Precision
from ldm.sample import sample_latents as _sample_latents
from pipeline.families import ModelFamily
from pipeline.settings import SamplingSettings


def sample_latents(family: ModelFamily, model, conditions: Sequence[Any] | None, *, settings: SamplingSettings,
                   n: int | None = None, batch_size: int = 16, generator: torch.Generator | None = None,
                   model_fn: ModelFn | None = None, correction: StepCorrection | None = None,
                   progress: bool = True, uncond: Any = None, precision: Precision = Precision.FP32
                   ) -> torch.Tensor:
    """Latents [N, ...]: one per condition (guided with the run's scale against ``uncond``, by default the
    family's null condition), or ``n`` unconditional ones, with the family's loop, conditioning and shape.
    ``model_fn`` defaults to the family's FP denoiser; it runs in ``precision`` (its ε cast back to float32, so
    guidance, correction and update stay float32; the conditioning encoder stays exact)."""
    settings = settings.with_scale(family.guidance_scale(settings.scale))
    conditioner = family.conditioner(model, settings.scale, uncond) if conditions is not None else None
    model_fn = model_fn if model_fn is not None else family.model_fn(model)
    return _sample_latents(model, conditions, settings=settings, n=n, batch_size=batch_size, generator=generator,
                           model_fn=precision.wrap(model_fn, model.betas.device.type), correction=correction,
                           progress=progress, conditioner=conditioner, shape=family.latent_shape(model))


def sample_images(family: ModelFamily, model, conditions: Sequence[Any] | None, *, settings: SamplingSettings,
                  n: int | None = None, batch_size: int = 16, decode_batch_size: int | None = None,
                  precision: Precision = Precision.FP32, **kwargs) -> torch.Tensor:
    """``sample_latents`` decoded by the family: images [N, 3, H, W] in [-1, 1] (float32; the decoder runs in
    ``precision`` too)."""
    z = sample_latents(family, model, conditions, settings=settings, n=n, batch_size=batch_size,
                       precision=precision, **kwargs)
    decode = precision.wrap(family.decode, z.device.type)
    return decode(model, z, batch_size=decode_batch_size or batch_size)


def sample_batch(family: ModelFamily, model, batch: Batch, settings: SamplingSettings, *,
                 model_fn: ModelFn | None = None,
                 correction_for: Callable[[torch.Generator], StepCorrection | None] | None = None,
                 decode_batch_size: int | None = None, precision: Precision = Precision.FP32) -> np.ndarray:
    """One batch of step 7's plan as uint8 [B, H, W, 3] (converted once, ``to_uint8``). x_T and the sampler noise
    come from ``batch.seed``; the correction (``correction_for(generator)``, e.g. ``Variant.correction_for``) gets
    its own generator from ``batch.correction_seed``. Generators live on the model's device, so CPU and CUDA runs
    differ."""
    device = model.betas.device
    generator = torch.Generator(device=device).manual_seed(batch.seed)
    correction = None
    if correction_for is not None:
        correction = correction_for(torch.Generator(device=device).manual_seed(batch.correction_seed))
    labels = None if batch.labels is None else batch.labels.tolist()
    images = sample_images(family, model, labels, settings=settings, n=len(batch), batch_size=len(batch),
                           decode_batch_size=decode_batch_size, generator=generator, model_fn=model_fn,
                           correction=correction, progress=False, precision=precision)
    return to_uint8(images)
