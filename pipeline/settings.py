"""The sampler settings of a run (DDIM steps S, η, guidance scale s, grid, PLMS), validated once and checked against
artifacts in one place."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ldm.util import UserFacingError


@dataclass(frozen=True)
class SamplingSettings:
    """``steps`` DDIM steps, η (0: deterministic DDIM; 1: DDPM-like), classifier-free guidance ``scale`` (1: none)."""

    steps: int
    eta: float
    scale: float
    grid: str | None = None   # the timestep grid when not the family's default (pixel DDIM: quad, uniform, ...)
    plms: bool = False        # PLMS (Liu et al. 2022) instead of DDIM on the same grid (--plms; needs η = 0)

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

    @property
    def loop(self) -> str:
        return "PLMS" if self.plms else "DDIM"

    def sampler_cls(self, default: type) -> type:
        """The loop of this run: PLMS with --plms, else the family's ``default``."""
        if not self.plms:
            return default
        from ldm.models.diffusion.plms import PLMSSampler
        return PLMSSampler

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
