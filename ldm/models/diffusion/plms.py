"""PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds", PNDM), built like
``ddim.py``: the same precomputed schedule (``DDIMSchedule`` at η = 0), a pure update, a loop with the same
``StepCorrection`` hook, and the CompVis ``PLMSSampler.sample(S, batch_size, shape, conditioning, ...)`` interface.

PNDM splits a step into a *gradient part* and a *transfer part*. The transfer φ is the deterministic DDIM update
(DDIM Eq. 12 with σ_t = 0, ``ddim_step``); the gradient part replaces ε_t by a linear multistep (Adams-Bashforth)
combination ε'_t of the current and previous model outputs:

    ε'_t = (3 ε_t − ε_{t+1}) / 2                                       one previous output
    ε'_t = (23 ε_t − 16 ε_{t+1} + 5 ε_{t+2}) / 12                      two
    ε'_t = (55 ε_t − 59 ε_{t+1} + 37 ε_{t+2} − 9 ε_{t+3}) / 24         three or more (4th order)

(ε_{t+k}: the output k visited steps earlier). The first step has no history; as CompVis implements it (PNDM uses
pseudo Runge-Kutta there) it is a pseudo improved Euler step: x' = φ(x_t, ε_t), ε'_t = (ε_t + ε(x', t_next)) / 2,
one extra model call.

Corrections: ``correction.begin`` is called before the first step as in ``sample_ddim``;
``correction(ε_t, σ_t, step, x_t)`` acts on the model output at t, before the combination, and the
corrected ε_t is what enters the history (as QNCD's PLMS does); the first step's second evaluation at t_next is not
corrected (QNCD's choice: it has no step of its own). Coefficients of every combination sum to 1, so a constant
bias subtracted from ε_t is subtracted from ε'_t.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import (DDIMSampler, DDIMSchedule, DDIMStep, StepCorrection, begin_trajectory, ddim_step,
                                       randn_sampler)


def plms_eps(eps_t: torch.Tensor, old_eps: Sequence[torch.Tensor]) -> torch.Tensor:
    """ε'_t, the Adams-Bashforth combination of ε_t with the previous outputs ``old_eps`` (oldest first; only the last
    three are used). Written as CompVis writes it, so the floats agree. Needs at least one previous output."""
    n = len(old_eps)
    if n == 0:
        raise ValueError("the first PLMS step has no history: it is an improved Euler step (plms_first_eps)")
    if n == 1:
        return (3 * eps_t - old_eps[-1]) / 2
    if n == 2:
        return (23 * eps_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * eps_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


def plms_first_eps(eps_t: torch.Tensor, eps_next: torch.Tensor) -> torch.Tensor:
    """ε'_t of the first step, pseudo improved Euler: the mean of ε at x_t and at the Euler point x' = φ(x_t, ε_t)."""
    return (eps_t + eps_next) / 2


@torch.no_grad()
def sample_plms(eps_fn: Callable[[torch.Tensor, torch.Tensor, DDIMStep], torch.Tensor], x_T: torch.Tensor,
                schedule: DDIMSchedule, *, noise_sampler: Callable[[DDIMStep], torch.Tensor] | None = None,
                correction: StepCorrection | None = None, callback: Callable[[dict], None] | None = None,
                temperature: float = 1., noise_dropout: float = 0., progress: bool = False,
                blend_x: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run the PLMS chain from x_T over ``schedule`` (η = 0) and return the final x.

    Arguments as ``sample_ddim``. The noise is drawn where CompVis draws it (once per transfer, twice in the first
    step) although σ_t = 0 multiplies it: a shared generator then leaves this call in the state CompVis leaves it.
    ``callback`` gets ``i``, ``index``, ``t``, ``x``, ``eps_t`` (corrected model output), ``eps`` (ε'_t, what the
    update used), ``sigma``, ``pred_x0`` and ``x_prev``.
    """
    if schedule.eta != 0:
        raise ValueError(f"PLMS is deterministic: the schedule must have eta 0, got {schedule.eta}")
    noise_sampler = noise_sampler or randn_sampler(x_T.shape, x_T.device)
    steps = list(schedule.steps())
    x = x_T
    b = x.shape[0]
    old_eps: list[torch.Tensor] = []

    def transfer(x_t, eps, step, alpha_t, alpha_prev, sigma):
        noise = noise_sampler(step) * temperature
        if noise_dropout > 0.:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        return ddim_step(x_t, eps, alpha_t, alpha_prev, sigma, noise)

    def advance(x_t, eps_t, step, sigma=None, noise=None):
        """x_{t'} from ε_t by this loop's own multistep update with the current history (improved Euler, one model
        call, at the first step); σ_t = 0, so no noise; touches neither the history nor the noise stream."""
        alpha_t, alpha_prev, zero = (torch.tensor(v, dtype=x_t.dtype, device=x_t.device)
                                     for v in (step.alpha, step.alpha_prev, 0.))
        if old_eps:
            return ddim_step(x_t, plms_eps(eps_t, old_eps), alpha_t, alpha_prev, zero, None)[0]
        step_next = steps[min(steps.index(step) + 1, len(steps) - 1)]
        x_euler = ddim_step(x_t, eps_t, alpha_t, alpha_prev, zero, None)[0]
        t_next = torch.full((x_t.shape[0],), step_next.t, device=x_t.device, dtype=torch.long)
        eps = plms_first_eps(eps_t, eps_fn(x_euler, t_next, step_next))
        return ddim_step(x_t, eps, alpha_t, alpha_prev, zero, None)[0]

    begin_trajectory(correction, eps_fn, b, advance)

    for k, step in enumerate(tqdm(steps, desc="PLMS", disable=not progress, leave=False)):
        t = torch.full((b,), step.t, device=x.device, dtype=torch.long)
        # CompVis: the step after the last is the last itself (used only by a one-step chain's Euler evaluation)
        step_next = steps[min(k + 1, len(steps) - 1)]
        if blend_x is not None:
            x = blend_x(x, t)
        alpha_t, alpha_prev, sigma = (torch.tensor(v, dtype=x.dtype, device=x.device)
                                      for v in (step.alpha, step.alpha_prev, step.sigma))
        eps_t = eps_fn(x, t, step)
        if correction is not None:
            eps_t, sigma = correction(eps_t, sigma, step, x)
        if not old_eps:
            x_euler, _ = transfer(x, eps_t, step, alpha_t, alpha_prev, sigma)
            t_next = torch.full((b,), step_next.t, device=x.device, dtype=torch.long)
            eps = plms_first_eps(eps_t, eps_fn(x_euler, t_next, step_next))
        else:
            eps = plms_eps(eps_t, old_eps)
        x_prev, pred_x0 = transfer(x, eps, step, alpha_t, alpha_prev, sigma)
        old_eps = (old_eps + [eps_t])[-3:]
        if callback is not None:
            callback({"i": step.i, "index": step.index, "t": step.t, "x": x, "eps_t": eps_t, "eps": eps,
                      "sigma": sigma, "pred_x0": pred_x0, "x_prev": x_prev})
        x = x_prev
    return x


class PLMSSampler(DDIMSampler):
    """CompVis-compatible PLMS sampler over ``sample_plms``; ``model``, ``model_fn`` and ``correction`` as in
    ``DDIMSampler`` (whose schedule tables, CompVis attribute names and ``sample`` it shares: only the loop differs).
    η must be 0; ``callback`` gets the per-step dict of ``sample_plms``."""

    loop = staticmethod(sample_plms)

    first_step_evals = 2   # the first step also evaluates ε at the next timestep (improved Euler)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.,
                      verbose: bool = True) -> DDIMSchedule:
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        return super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

