"""DiT (Peebles & Xie 2023) as a diffusion model the project's DDIM loops, calibration and statistics can sample: the
denoiser, DiT's β schedule and its respaced timesteps, and the first stage that decodes its latents.

    model = DiTDiffusion(dit, first_stage)            # first_stage: DiffusersVAE or VQFirstStage (ldm.dit_sample)
    schedule = model.sampling_schedule(50, eta=0.0)   # DDIMSchedule over DiT's respaced timesteps
    eps = model.apply_model(x, t, y)                  # the ε half of the learned-sigma output
    images = model.decode_first_stage(z)

* β: DiT's ``create_diffusion``: linear 1e-4 … 0.02 over T = 1000 (``respace.linear_betas``), float64 tables.
* ``sampling_schedule(S, η, grid)``: the visited timesteps of ``space_timesteps`` -- ``str(S)`` (DiT's sample.py:
  ``create_diffusion(str(num_sampling_steps))``, fractional stride, Python rounding) or, for ``grid="uniform"``,
  ``ddimS`` (the integer stride) -- with the respaced ᾱ (``RespacedSchedule``): the last step goes to ᾱ_prev = 1,
  as DiT's ``ddim_sample`` does, and σ_t(η) is DDIM's Eq. 16 on the respaced values. The project's loop then runs
  DDIM Eq. 12 with ε as the model gives it, where DiT re-derives ε from x̂0 (equal in exact arithmetic; see
  ``dit_sampling.ddim_learned_step``).
* ``denoiser`` (``DiTDenoiser``) is the network the pipeline quantizes: the DiT behind the UNet call signature
  ``(x, t, context=y) -> ε``. The variance half v is computed by the DiT and dropped here: DDIM does not use it.

Nothing here loads files: the DiT comes from ``ldm.models.dit_checkpoint``, the first stage from
``ldm.models.diffusers_vae.load_diffusers_vae`` or ``ldm.dit_sample.load_ldm_first_stage``.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from ldm.errors import UserFacingError
from ldm.models.diffusion.ddim import DDIMSchedule
from ldm.models.diffusion.respace import RespacedSchedule, linear_betas, space_timesteps
from ldm.modules.dit import DiT

# grids besides DiT's default respacing "S": "uniform" = DiT's "ddimS" (range(0, T, stride), integer stride)
DIT_GRIDS = ("uniform",)


class FirstStage(Protocol):
    """What decodes a DiT's latents: the module (moved with the model) and ``decode(z)`` -> images in [−1, 1]."""

    model: nn.Module
    scale_factor: float

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        ...


def dit_respacing(num_steps: int, grid: str | None = None) -> str:
    """DiT's respacing string for ``num_steps`` steps on ``grid`` (None: DiT's default "S"; "uniform": "ddimS")."""
    if grid is None:
        return str(num_steps)
    if grid == "uniform":
        return f"ddim{num_steps}"
    raise UserFacingError(f"timestep grid {grid!r}: a DiT samples on its respaced grid (default) or 'uniform' "
                          f"(DiT's ddimN integer stride); drop --skip_type or pass --skip_type uniform")


def dit_schedule(num_steps: int, eta: float, grid: str | None = None, num_timesteps: int = 1000) -> DDIMSchedule:
    """The DDIM schedule over DiT's respaced timesteps: ᾱ_t, ᾱ_prev of ``RespacedSchedule`` (ᾱ_prev = 1 after the
    last step), σ_t = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev) (Song et al. 2021 Eq. 16), float64."""
    if eta < 0:
        raise UserFacingError(f"eta must be >= 0, got {eta}")
    rs = RespacedSchedule.make(dit_respacing(num_steps, grid), num_timesteps)
    a, a_prev = rs.alphas_cumprod, rs.alphas_cumprod_prev
    sigmas = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
    return DDIMSchedule(rs.timestep_map.astype(np.int64), a, a_prev, sigmas, float(eta))


def check_dit_steps(num_steps: int, grid: str | None = None, num_timesteps: int = 1000) -> None:
    """Whether DiT's respacing takes ``num_steps`` on ``grid`` (one ``UserFacingError`` line naming --steps)."""
    spacing = dit_respacing(num_steps, grid)
    try:
        space_timesteps(num_timesteps, spacing)
    except UserFacingError as e:
        raise UserFacingError(f"--steps {num_steps}: {e}") from None


class DiTDenoiser(nn.Module):
    """The DiT behind the UNet call signature the quantization and sampling code use: ``(x, t, context=y)`` -> ε,
    the first C channels of the DiT's output (its learned-sigma output is [ε; v], 2C channels). ``y`` may also be
    passed as ``y=``. The DiT is ``self.dit``, so its layers are named ``dit.blocks.0.attn.qkv`` and so on."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        labels = y if y is not None else context
        if labels is None:
            raise ValueError("a DiT is class-conditional: pass the labels (the null class for unconditional ε)")
        return self.dit(x, timesteps, labels)[:, :self.dit.in_channels]


class DiTDiffusion(nn.Module):
    """A DiT with DiT's linear β schedule and the first stage that decodes its latents: the CompVis attributes the
    loops read (``betas``, ``alphas_cumprod``, ``num_timesteps``, ``channels``, ``image_size`` = the latent size,
    ``apply_model``, ``decode_first_stage``) and ``sampling_schedule`` (``ldm.models.diffusion.ddim.model_schedule``
    returns it to every loop, calibration and statistics run)."""

    parameterization = "eps"

    def __init__(self, dit: DiT, first_stage: FirstStage, num_timesteps: int = 1000):
        super().__init__()
        self.model = DiTDenoiser(dit)
        self.first_stage = first_stage
        self.first_stage_model = first_stage.model   # registered, so .to(device) moves it with the DiT
        betas = linear_betas(num_timesteps)
        self.register_buffer("betas", torch.as_tensor(betas).float(), persistent=False)
        self.register_buffer("alphas_cumprod", torch.as_tensor(np.cumprod(1.0 - betas)).float(), persistent=False)
        self.num_timesteps = int(num_timesteps)
        self.channels, self.image_size = dit.in_channels, dit.input_size

    @property
    def dit(self) -> DiT:
        return self.model.dit

    def sampling_schedule(self, num_steps: int, eta: float, grid: str | None = None) -> DDIMSchedule:
        return dit_schedule(num_steps, eta, grid, self.num_timesteps)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """ε for latents x at timesteps t with class labels ``cond`` (the null class: unconditional)."""
        return self.model(x, t, context=cond)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Images (unclamped, [−1, 1] nominal) from latents, as the first stage decodes them (DiT's VAE:
        ``decoder(z / scale)``; a CompVis VQ first stage: quantize ``(1/scale)·z``, then decode)."""
        return self.first_stage.decode(z)
