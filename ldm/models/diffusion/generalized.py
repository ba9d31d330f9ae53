"""DDIM as the pixel-space DDIM code samples it (Song et al. 2021, ermongroup/ddim ``generalized_steps``), expressed
as a ``DDIMSchedule`` for the project's one sampling loop.

Song et al. (2021), Eq. (12), with σ_t(η) of Eq. (16): the update is the same as the CompVis one, only the
discretisation differs, so nothing here steps: ``timestep_sequence`` builds the visited timesteps and
``generalized_schedule`` their (ᾱ_t, ᾱ_next, σ_t) tables, which ``ldm.models.diffusion.ddim.sample_ddim`` then walks
with its ``StepCorrection`` hook::

    betas = get_beta_schedule("linear", 1e-4, 0.02, 1000)
    schedule = generalized_schedule(betas, timestep_sequence("quad", 100), eta=0.0)
    x0 = sample_ddim(lambda x, t, step: model(x, t), x_T, schedule)

How the original differs from the LDM/CompVis ``DDIMSampler`` (and what the tables reproduce):

* timesteps are used as they are, without CompVis' ``+1``: ``uniform`` with 10 steps starts at t = 900, ``quad``
  ends at t = 800 and truncates, which creates duplicate timesteps for large step counts (see
  ``timestep_sequence``);
* ᾱ_t is ``cumprod(1 − cat([0], β))[t + 1]`` in float32 from float32 β (the original's ``compute_alpha``, recomputed
  at every step), so t = −1 means ᾱ = 1: the last step goes to ᾱ_next = 1 and the returned sample *is* the last
  x̂0 prediction, where CompVis ends at ᾱ_0 = 1 − β_1;
* σ_t is evaluated in the tables' dtype from those ᾱ, exactly as the original does per step.

With η = 0 the loop reproduces the original bit for bit (the σ·z term is an exact zero in both orders of
summation); with η > 0 the noise must come from the same generator in the same order (one ``randn_like`` per step,
drawn after the model call, which ``randn_sampler`` does), and the sum differs only in the order of two terms.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from ldm.models.diffusion.ddim import DDIMSchedule

__all__ = ["GRIDS", "SKIP_TYPES", "GeneralizedDDPM", "compute_alphas", "generalized_schedule", "get_beta_schedule",
           "parse_grid", "timestep_sequence"]

SKIP_TYPES = ("uniform", "quad")


def get_beta_schedule(beta_schedule: str, beta_start: float, beta_end: float,
                      num_diffusion_timesteps: int) -> np.ndarray:
    """β_1..β_T in float64 (Ho et al. 2020, §4: linear from 1e-4 to 0.02 over T = 1000).

    ``linear`` is linear in β itself (``np.linspace``), unlike the LDM ``linear`` schedule (linear in √β). The
    original converts the result with ``.float()`` before use; ``generalized_schedule`` does that cast.
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if beta_schedule != "linear":
        raise ValueError(f"beta_schedule '{beta_schedule}' is not supported; the pixel-space DDIM configs "
                         f"(CIFAR-10) use 'linear'")
    betas = np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    if not (betas > 0).all() or not (betas <= 1).all():
        raise ValueError(f"betas must lie in (0, 1], got [{betas.min()}, {betas.max()}]")
    return betas


def timestep_sequence(skip_type: str, timesteps: int, num_timesteps: int = 1000,
                      corrected: bool = False) -> np.ndarray:
    """The timesteps a ``timesteps``-step chain visits, ascending int64 (``Diffusion.sample_image``).

    As the original (``corrected=False``), N = ``num_timesteps``:

    * ``uniform``: ``range(0, N, N // timesteps)``: with 10 steps ``[0, 100, …, 900]`` (the chain starts at 900,
      not N − 1); when N is not divisible by the step count the chain has ``ceil(N / (N // timesteps))`` steps,
      e.g. 31 for 30.
    * ``quad``: ``int(s)`` of ``linspace(0, √(0.8 N), timesteps)²``: ends at 0.8 N, *truncates* instead of rounding,
      and repeats timesteps where consecutive values fall within one integer (4 repeats with 100 steps, 312 with
      1000). The original runs a repeated timestep as a step from ᾱ_t to ᾱ_t, which spends a model call and leaves
      x unchanged up to rounding.

    ``corrected=True`` is an explicit alternative, not the published setting:

    * ``uniform``: ``floor(k N / timesteps)`` for k = 0 … timesteps − 1, i.e. exactly ``timesteps`` steps, still
      starting at 0 and ending at N − N / timesteps; identical to the original whenever ``timesteps`` divides N.
    * ``quad``: the same quadratic curve *rounded* to the nearest integer (half to even), then de-duplicated: every
      step is a real one, so the chain has ``timesteps`` minus the number of values that coincide after rounding
      (e.g. 97 steps for 100, the same 10 for 10, where 6 of the 10 timesteps move up by one).
    """
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type '{skip_type}' unknown; use one of {list(SKIP_TYPES)}")
    if timesteps < 1 or num_timesteps < 1:
        raise ValueError(f"need timesteps >= 1 and num_timesteps >= 1, got timesteps={timesteps}, "
                         f"num_timesteps={num_timesteps}")
    if timesteps > num_timesteps:
        raise ValueError(f"{timesteps} sampling steps exceed the {num_timesteps} diffusion timesteps")
    if skip_type == "uniform":
        if corrected:
            seq = np.arange(timesteps, dtype=np.int64) * num_timesteps // timesteps
        else:
            seq = np.arange(0, num_timesteps, num_timesteps // timesteps, dtype=np.int64)
        return seq
    curve = np.linspace(0, np.sqrt(num_timesteps * 0.8), timesteps) ** 2
    if corrected:
        return np.unique(np.rint(curve).astype(np.int64))
    return np.asarray([int(s) for s in curve], dtype=np.int64)


def compute_alphas(betas: torch.Tensor | np.ndarray | Sequence[float], t: torch.Tensor | np.ndarray | Sequence[int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ᾱ at timesteps ``t`` (−1 allowed, giving 1) as the original ``compute_alpha`` computes it: β cast to
    ``dtype`` (float32: the original's ``.float()``), ``(1 − cat([0], β)).cumprod()`` in that dtype, index t + 1.

    The float32 cumulative product is kept, not replaced by a float64 one cast down (as the LDM code does): the two
    differ by up to ~3e-7 relative, which moves samples by ~4e-7 of their magnitude.
    """
    b = torch.as_tensor(np.asarray(betas) if not torch.is_tensor(betas) else betas).detach().cpu().to(dtype)
    if b.dim() != 1:
        raise ValueError(f"betas must be 1-D, got shape {tuple(b.shape)}")
    idx = torch.as_tensor(np.asarray(t) if not torch.is_tensor(t) else t).detach().cpu().long()
    if idx.numel() and (idx.min() < -1 or idx.max() >= len(b)):
        raise ValueError(f"timesteps must lie in -1 … {len(b) - 1}, got {idx.min().item()} … {idx.max().item()}")
    table = (1 - torch.cat([torch.zeros(1, dtype=dtype), b])).cumprod(dim=0)
    return table.index_select(0, idx.reshape(-1) + 1).reshape(idx.shape)


def generalized_schedule(betas: torch.Tensor | np.ndarray | Sequence[float], seq: Sequence[int] | np.ndarray,
                         eta: float, dtype: torch.dtype = torch.float32) -> DDIMSchedule:
    """The ``DDIMSchedule`` whose walk by ``sample_ddim`` is the original ``generalized_steps`` over ``seq``.

    ``seq`` is ascending (as ``timestep_sequence`` returns it; repeats allowed, they are run). Step k goes from
    t = seq[k] to seq_next[k] with ``seq_next = [−1] + seq[:-1]``: ᾱ_t = ᾱ(seq[k]), ᾱ_next = ᾱ(seq_next[k])
    (ᾱ(−1) = 1), and σ_t = η √((1 − ᾱ_t/ᾱ_next)(1 − ᾱ_next)/(1 − ᾱ_t)) (Song et al. 2021, Eq. 16), all computed in
    ``dtype`` as the original does (float32 by default; ``torch.float64`` for a float64 reference run). The tables
    store those values in float64, which holds them exactly, and the loop casts them back to x's dtype.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts = np.asarray(seq, dtype=np.int64).reshape(-1)
    if ts.size == 0:
        raise ValueError("the timestep sequence is empty")
    if (np.diff(ts) < 0).any():
        raise ValueError("the timestep sequence must be ascending (the order timestep_sequence returns)")
    ts_next = np.concatenate([[-1], ts[:-1]]).astype(np.int64)
    a_t = compute_alphas(betas, ts, dtype)
    a_next = compute_alphas(betas, ts_next, dtype)
    sigmas = eta * ((1 - a_t / a_next) * (1 - a_next) / (1 - a_t)).sqrt()
    if not torch.isfinite(sigmas).all():
        raise ValueError("σ_t is not finite: ᾱ_t reaches 1 at a visited timestep (a zero β?)")
    return DDIMSchedule(timesteps=ts, alphas=a_t.double().numpy(), alphas_prev=a_next.double().numpy(),
                        sigmas=sigmas.double().numpy(), eta=float(eta))


GRIDS = ("uniform", "quad", "uniform-corrected", "quad-corrected")


def parse_grid(grid: str) -> tuple[str, bool]:
    """A grid name -> (skip_type, corrected): ``quad`` is the original (truncated, repeats run), ``quad-corrected``
    the explicit fix (``timestep_sequence(corrected=True)``)."""
    if grid not in GRIDS:
        raise ValueError(f"timestep grid {grid!r} unknown; use one of {list(GRIDS)}")
    skip, _, fix = grid.partition("-")
    return skip, bool(fix)


class GeneralizedDDPM(nn.Module):
    """A pixel-space ε-model with the β schedule and timestep grid it is sampled with: what the DDIM loops, the
    calibration and the noise statistics need of a model, for the ermongroup ``Model`` (which has no schedule of its
    own; the original keeps β in its runner).

    ``sampling_schedule(num_steps, eta)`` is ``generalized_schedule`` over ``timestep_sequence(grid)``; ``model(x,
    t)`` is ε. ``alphas_cumprod`` (ᾱ_t for t = 0 … T−1, the original's float32 cumulative product) and the other
    CompVis attributes (``num_timesteps``, ``channels``, ``image_size``, ``apply_model``) let the CompVis-shaped code
    around the loops use it unchanged. ``grid`` is a name of ``GRIDS``: the default grid; a run's own grid travels in
    its ``SamplingSettings`` (``sampling_schedule(..., grid=)``), so the pipeline never changes it in place.
    """

    parameterization = "eps"

    def __init__(self, unet: nn.Module, betas: np.ndarray, channels: int, image_size: int, grid: str = "uniform"):
        super().__init__()
        self.model = unet
        b = torch.as_tensor(np.asarray(betas, dtype=np.float64)).float()   # the original's .float()
        self.register_buffer("betas", b, persistent=False)
        table = compute_alphas(b, torch.arange(-1, len(b)))                 # [T + 1]: t = −1 … T − 1
        self.register_buffer("alphas_cumprod", table[1:].clone(), persistent=False)
        self.register_buffer("alphas_cumprod_prev", table[:-1].clone(), persistent=False)
        self.num_timesteps = len(b)
        self.channels, self.image_size = int(channels), int(image_size)
        self.grid = grid

    @property
    def grid(self) -> str:
        return self._grid

    @grid.setter
    def grid(self, name: str) -> None:
        parse_grid(name)
        self._grid = name

    def sampling_schedule(self, num_steps: int, eta: float, grid: str | None = None) -> DDIMSchedule:
        """The schedule on ``grid`` (None: the model's default grid, ``self.grid``)."""
        skip, corrected = parse_grid(self.grid if grid is None else grid)
        seq = timestep_sequence(skip, num_steps, self.num_timesteps, corrected=corrected)
        return generalized_schedule(self.betas.cpu(), seq, eta)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.model(x, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t)
