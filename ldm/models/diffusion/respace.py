"""Respaced DDPM schedules with learned variance, as DiT samples them (Nichol & Dhariwal 2021, "Improved DDPM",
§4 "Improving sampling speed" and Eq. 15; DiT's ``create_diffusion(str(N))``).

* ``space_timesteps`` picks the visited timesteps of a T-step chain: "N" or comma sections "N1,N2,..." (T split
  into equal sections, each strided by a fractional stride rounded with Python's ``round`` -- half to even, so
  "7", "13" and "25" differ from a round-half-up port) or "ddimN" (an integer stride giving exactly N steps).
* ``RespacedSchedule`` keeps the visited t_i and recomputes every table from the respaced betas
  β'_i = 1 − ᾱ(t_i)/ᾱ(t_{i−1}) (ᾱ before the first visited step = 1) in float64. The model is called with the
  original t_i (``timestep_map``), not with i.
* ``coefficients`` gives one step's values as float32 scalars: the original casts each float64 table entry to
  float32 before use, so all per-step arithmetic is float32 (fixture README, pitfall 10).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from ldm.errors import UserFacingError
from ldm.models.diffusion.ddim import DDIMStep


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DDPM's linear β schedule (Ho et al. 2020 §4), 1e-4 … 0.02 for T = 1000, scaled by 1000/T for other T."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def _spaced_section(start: int, size: int, count: int) -> list[int]:
    """``count`` timesteps of [start, start + size): a float stride accumulated step by step, each rounded with
    Python's half-to-even ``round`` (accumulating, not multiplying, keeps the original's exact rounding cases)."""
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    position, taken = 0.0, []
    for _ in range(count):
        taken.append(start + round(position))
        position += stride
    return taken


def space_timesteps(num_timesteps: int, spacing: str | int | list[int]) -> list[int]:
    """The visited timesteps (ascending) of a ``num_timesteps`` chain for a respacing string (Improved DDPM §4).

    ``""`` or ``None`` keeps all; ``"N"`` or ``N`` is one section; ``"N1,N2,..."`` splits the chain into that many
    near-equal sections (the first ``T mod k`` one longer) with Nj steps each; ``"ddimN"`` uses the smallest integer
    stride s with len(range(0, T, s)) == N."""
    if spacing is None or spacing == "":
        return list(range(num_timesteps))
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        try:
            wanted = int(spacing[4:])
        except ValueError:
            raise UserFacingError(f"respacing {spacing!r}: expected ddimN with an integer N (e.g. ddim50)") from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise UserFacingError(f"respacing {spacing!r}: no integer stride gives exactly {wanted} of {num_timesteps} "
                              f"steps; use {wanted} (fractional stride) instead")
    if isinstance(spacing, int):
        counts = [spacing]
    elif isinstance(spacing, str):
        try:
            counts = [int(part) for part in spacing.split(",")]
        except ValueError:
            raise UserFacingError(f"respacing {spacing!r}: expected N, N1,N2,... or ddimN (integers)") from None
    else:
        counts = [int(c) for c in spacing]
    base, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for k, count in enumerate(counts):
        size = base + (1 if k < extra else 0)
        if not 1 <= count <= size:
            raise UserFacingError(f"respacing {spacing!r}: section {k} has {size} timesteps, cannot take {count} "
                                  f"(each count must be 1..{size})")
        steps += _spaced_section(start, size, count)
        start += size
    return sorted(set(steps))


@dataclass(frozen=True, eq=False)
class StepCoefficients:
    """One step's schedule values as float32 scalar tensors (the original's ``_extract_into_tensor`` casts)."""

    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    min_log: torch.Tensor       # posterior_log_variance_clipped: v = −1
    max_log: torch.Tensor       # log β'_i: v = +1
    nonzero: torch.Tensor       # 0 at the last step (i = 0), where no noise is added


@dataclass(frozen=True, eq=False)
class RespacedSchedule:
    """Float64 tables over the visited steps i = 0 … S−1 (ascending t), recomputed from the respaced betas."""

    timestep_map: np.ndarray    # [S] int64: the original t_i the model sees at step i
    betas: np.ndarray           # [S] β'_i
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    spacing: str = ""

    @classmethod
    def from_betas(cls, betas: np.ndarray, timestep_map: np.ndarray, spacing: str = "") -> "RespacedSchedule":
        """All derived tables of a β schedule (Ho et al. 2020 Eqs. 6-7: the posterior q(x_{t−1} | x_t, x0))."""
        betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # the first entry is 0 (ᾱ_prev = 1): its log is replaced by the second's, as Improved DDPM clips it
        clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:])) if len(betas) > 1 \
            else np.array([])
        return cls(timestep_map=np.asarray(timestep_map, dtype=np.int64), betas=betas, alphas_cumprod=ac,
                   alphas_cumprod_prev=ac_prev, alphas_cumprod_next=np.append(ac[1:], 0.0),
                   sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
                   sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
                   posterior_variance=posterior_variance, posterior_log_variance_clipped=clipped,
                   posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
                   posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac), spacing=spacing)

    @classmethod
    def make(cls, spacing: str | int = "250", num_timesteps: int = 1000,
             base_betas: np.ndarray | None = None) -> "RespacedSchedule":
        """DiT's ``create_diffusion(spacing)``: linear βs over ``num_timesteps``, visited steps from
        ``space_timesteps``, β'_i = 1 − ᾱ(t_i)/ᾱ(t_{i−1})."""
        base = linear_betas(num_timesteps) if base_betas is None else np.asarray(base_betas, dtype=np.float64)
        use = set(space_timesteps(len(base), spacing))
        last, betas, kept = 1.0, [], []
        for t, ac in enumerate(np.cumprod(1.0 - base, axis=0)):
            if t in use:
                betas.append(1 - ac / last)
                last = ac
                kept.append(t)
        return cls.from_betas(np.array(betas), np.array(kept), str(spacing))

    def __len__(self) -> int:
        return len(self.betas)

    @property
    def log_betas(self) -> np.ndarray:
        """log β'_i, the learned log-variance at v = +1 (``max_log``)."""
        return np.log(self.betas)

    def coefficients(self, index: int, device: torch.device | str = "cpu") -> StepCoefficients:
        """Step ``index``'s values, each float64 entry cast to float32 (as the original does before any use)."""
        def at(table: np.ndarray) -> torch.Tensor:
            return torch.tensor(float(table[index]), dtype=torch.float64).float().to(device)
        return StepCoefficients(
            alpha_bar=at(self.alphas_cumprod), alpha_bar_prev=at(self.alphas_cumprod_prev),
            sqrt_recip_alphas_cumprod=at(self.sqrt_recip_alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=at(self.sqrt_recipm1_alphas_cumprod),
            posterior_mean_coef1=at(self.posterior_mean_coef1), posterior_mean_coef2=at(self.posterior_mean_coef2),
            min_log=at(self.posterior_log_variance_clipped), max_log=at(self.log_betas),
            nonzero=torch.tensor(float(index != 0), dtype=torch.float32, device=device))

    def step(self, index: int, i: int, sigma: float) -> DDIMStep:
        """The ``DDIMStep`` of row ``index`` (``i`` = steps taken before it) that corrections key on: t is the
        original timestep the model sees, ᾱ and ᾱ_prev the respaced values, ``sigma`` as the caller defines it."""
        return DDIMStep(i, index, int(self.timestep_map[index]), float(self.alphas_cumprod[index]),
                        float(self.alphas_cumprod_prev[index]), float(sigma))

    def ddpm_steps(self) -> Iterator[DDIMStep]:
        """Steps in sampling order; ``sigma`` is the posterior std √β̃_i, the σ of the DDIM update (Song et al. 2021
        Eq. 12) whose mean equals the DDPM posterior mean (= DDIM at η = 1). The learned variance changes only the
        injected noise, not the mean (docs/DIT.md)."""
        n = len(self)
        for i in range(n):
            yield self.step(n - 1 - i, i, np.sqrt(self.posterior_variance[n - 1 - i]))

    def ddim_steps(self, eta: float) -> Iterator[DDIMStep]:
        """Steps in sampling order with the DDIM σ_i(η) = η √((1 − ᾱ_prev)/(1 − ᾱ)) √(1 − ᾱ/ᾱ_prev) (float64)."""
        if eta < 0:
            raise UserFacingError(f"eta must be >= 0, got {eta}")
        n = len(self)
        for i in range(n):
            index = n - 1 - i
            a, ap = self.alphas_cumprod[index], self.alphas_cumprod_prev[index]
            yield self.step(index, i, eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap))

    def tables(self) -> dict[str, np.ndarray]:
        """Every table by its name (the original's attribute names), ``log_betas`` included."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "spacing"}
        out["log_betas"] = self.log_betas
        return out
