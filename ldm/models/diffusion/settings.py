"""The one sampling-settings type: DDIM steps S, η, guidance scale s, timestep grid and loop (DDIM or PLMS),
validated once. Every sampling path takes it whole -- ``sample`` below, the calibration and the noise statistics
walkers -- and asks it for the schedule (``schedule(model)``, the grid included) and the loop (``loop_fn``), so no
path re-takes steps / η / scale / grid / loop one by one, and nothing changes a model in place to pick its grid.

``ldm.models.diffusion.ddim.DDIMSampler.sample`` stays as the CompVis-compatible outside face; the project's own
sampling goes through ``sample`` here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ldm.errors import UserFacingError
from ldm.models.diffusion.ddim import (DDIMSchedule, DDIMStep, StepCorrection, cfg_eps, model_schedule,
                                       randn_sampler, sample_ddim)
from ldm.models.diffusion.plms import sample_plms


@dataclass(frozen=True)
class SamplingSettings:
    """``steps`` DDIM steps, η (0: deterministic DDIM; 1: DDPM-like), classifier-free guidance ``scale`` (1: none),
    ``grid``: the timestep grid when not the model's default (pixel DDIM: quad, uniform, ...; None: the default),
    ``plms``: PLMS (Liu et al. 2022) instead of DDIM on the same grid (needs η = 0)."""

    steps: int
    eta: float
    scale: float
    grid: str | None = None
    plms: bool = False

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UserFacingError(f"--steps must be >= 1, got {self.steps}")
        for name in ("eta", "scale"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise UserFacingError(f"--{name} must be a finite number, got {v}")
        if not 0 <= self.eta <= 1:
            raise UserFacingError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like; above 1 the DDIM "
                                  f"update takes the square root of 1 - ᾱ_prev - σ_t² < 0: NaN, black images), "
                                  f"got {self.eta:g}")
        if self.scale < 0:
            raise UserFacingError(f"--scale must be >= 0 (1 = no guidance), got {self.scale}")
        if self.plms and self.eta != 0:
            raise UserFacingError(f"PLMS (--plms, or the preset's plms: true) is deterministic: it needs --eta 0, "
                                  f"got {self.eta:g}; pass --ddim for DDIM")
        object.__setattr__(self, "eta", float(self.eta))
        object.__setattr__(self, "scale", float(self.scale))

    def meta(self) -> dict[str, Any]:
        """The keys every artifact of a run records and is checked on (``grid`` only when one was chosen, so the
        artifacts of CompVis runs keep their keys)."""
        return {"steps": self.steps, "eta": self.eta, "scale": self.scale,
                **({"grid": self.grid} if self.grid is not None else {}), **({"plms": True} if self.plms else {})}

    def with_scale(self, scale: float) -> "SamplingSettings":
        """The same settings at guidance ``scale`` (a family without guidance samples at 1)."""
        return self if scale == self.scale else replace(self, scale=scale)

    # ---- what a sampling path asks of them -------------------------------------------------------------------

    @property
    def loop(self) -> str:
        """The loop's name, for messages and records."""
        return "PLMS" if self.plms else "DDIM"

    @property
    def loop_fn(self) -> Callable[..., torch.Tensor]:
        """The loop: ``sample_ddim`` or ``sample_plms`` (same arguments, same ``StepCorrection`` hook)."""
        return sample_plms if self.plms else sample_ddim

    @property
    def first_step_evals(self) -> int:
        """Model calls of the first step: PLMS also evaluates ε at the next timestep (improved Euler)."""
        return 2 if self.plms else 1

    def schedule(self, model: Any) -> DDIMSchedule:
        """The schedule ``model`` is sampled with under these settings, on this run's grid."""
        return model_schedule(model, self.steps, self.eta, grid=self.grid)

    def flags(self) -> str:
        grid = "" if self.grid is None else " " + grid_flags(self.grid)
        plms = " --plms" if self.plms else ""
        return f"--steps {self.steps} --eta {self.eta:g} --scale {self.scale:g}{grid}{plms}"

    def check_num_timesteps(self, num_timesteps: int) -> None:
        if self.steps > num_timesteps:
            raise UserFacingError(f"--steps {self.steps} exceeds the model's {num_timesteps} timesteps")


def grid_name(skip_type: str | None, corrected: bool) -> str | None:
    """``--skip_type`` and ``--corrected_grid`` as one grid name (``ldm.models.diffusion.generalized.GRIDS``)."""
    if skip_type is None:
        if corrected:
            raise UserFacingError("--corrected_grid needs a --skip_type (uniform or quad)")
        return None
    return f"{skip_type}-corrected" if corrected else skip_type


def grid_flags(grid: str) -> str:
    skip, _, fix = grid.partition("-")
    return f"--skip_type {skip}" + (" --corrected_grid" if fix else "")


@torch.no_grad()
def sample(model_fn: Callable, x_T: torch.Tensor, schedule: DDIMSchedule, settings: SamplingSettings, *,
           cond: Any = None, uncond: Any = None, generator: torch.Generator | None = None,
           correction: StepCorrection | None = None, progress: bool = False,
           callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """One batch from x_T through the settings' loop over ``schedule`` (``settings.schedule(model)``): ε by
    ``cfg_eps`` at the settings' scale against ``uncond``, a fresh N(0, I) per step from ``generator`` (CompVis' RNG
    stream: what ``DDIMSampler.sample`` draws), the correction through the loops' one hook."""
    def eps_fn(x: torch.Tensor, t: torch.Tensor, step: DDIMStep | None) -> torch.Tensor:
        return cfg_eps(model_fn, x, t, cond, uncond, settings.scale)

    return settings.loop_fn(eps_fn, x_T, schedule, noise_sampler=randn_sampler(x_T.shape, x_T.device, generator),
                            correction=correction, callback=callback, progress=progress)
