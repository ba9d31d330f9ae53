"""Time-step-aware calibration data (Q-Diffusion §4.1; D²-DPM §3.1): UNet inputs (x_t, t, c) recorded along FP DDIM
trajectories with classifier-free guidance, both branches, through a ``model_fn`` wrapper (ldm/ is not edited).

Which (step, sample) pairs are kept is drawn first, from one seed, so only the calibration subset is ever stored:
``UNIFORM`` spreads them evenly over the DDIM grid; ``NORMAL`` draws each step index from N(0.4, 0.4)·(S − 1)
counted from pure noise (PTQ4DM's NDTC), rounded and clipped, and pairs every x with its true t.
"""
from __future__ import annotations

import enum
from typing import Sequence

import numpy as np
import torch

from ldm.models.diffusion.ddim import ModelFn
from ldm.models.diffusion.settings import SamplingSettings
from ldm.sample import Conditioner, sample_latents


class TimestepDistribution(enum.Enum):
    UNIFORM = "uniform"
    NORMAL = "normal"


def strided_steps(n_steps: int, k: int) -> list[int]:
    """Q-Diffusion / QNCD ``--cali_st k`` (``get_train_samples``): the steps 0, S//k, 2·S//k, … < S of an S-step
    chain, i.e. the whole chain at stride S//k (25 steps for k = 20 or 25 of S = 50, as QNCD's SD set)."""
    if not 1 <= k <= n_steps:
        raise ValueError(f"--cali_st {k} must be between 1 and the {n_steps} sampling steps")
    return list(range(0, n_steps, n_steps // k))


def draw_subset(n: int, n_steps: int, per_step: int, distribution: TimestepDistribution,
                rng: np.random.Generator, cali_st: int | None = None) -> dict[int, np.ndarray]:
    """{step i (0 = noisiest): sorted indices into that step's ``per_step`` recorded inputs}, n pairs in all.
    ``cali_st``: only the ``strided_steps`` (n spread evenly over them), as QNCD's ``--cali_st``."""
    if cali_st is not None:
        steps = strided_steps(n_steps, cali_st)
        if n > len(steps) * per_step:
            raise ValueError(f"{n} calibration samples asked for, but only {len(steps)} steps x {per_step} inputs "
                             f"are recorded")
        counts = np.full(len(steps), n // len(steps))
        counts[: n % len(steps)] += 1
        return {i: np.sort(rng.choice(per_step, size=int(c), replace=False)) for i, c in zip(steps, counts) if c}
    if n > n_steps * per_step:
        raise ValueError(f"{n} calibration samples asked for, but only {n_steps} x {per_step} inputs are recorded")
    if distribution is TimestepDistribution.UNIFORM:
        counts = np.full(n_steps, n // n_steps)
        counts[: n % n_steps] += 1
    else:
        idx = np.clip(np.round(rng.normal(0.4, 0.4, size=n) * (n_steps - 1)), 0, n_steps - 1).astype(int)
        counts = np.bincount(idx, minlength=n_steps)
        # a step drawn more often than it has inputs gives its excess to the nearest steps with room
        while (counts > per_step).any():
            i = int(np.argmax(counts - per_step))
            extra, counts[i] = counts[i] - per_step, per_step
            room = np.flatnonzero(counts < per_step)
            j = room[np.argmin(np.abs(room - i))]
            counts[j] += extra
    return {i: np.sort(rng.choice(per_step, size=int(c), replace=False)) for i, c in enumerate(counts) if c}


_EXTRA = -1   # a model call that is not a step's own evaluation (PLMS' Euler look-ahead): not recorded


def _call_sequence(steps: list, first_step_evals: int) -> list[tuple[int, int]]:
    """(t, step index) of every model call of one trajectory, in order; PLMS (``first_step_evals`` 2) also
    evaluates at the next step's t inside its first step (improved Euler), which is marked _EXTRA."""
    seq = [(st.t, st.i) for st in steps]
    if first_step_evals == 2:
        seq.insert(1, (steps[min(1, len(steps) - 1)].t, _EXTRA))
    return seq


@torch.no_grad()
def collect_calibration_set(model, labels: Sequence[int] | None, *, n: int, settings: SamplingSettings,
                            distribution: TimestepDistribution, seed: int, n_unconditional: int | None = None,
                            batch_size: int = 250, n_holdout: int = 0, progress: bool = True,
                            model_fn: ModelFn | None = None, conditioner: Conditioner | None = None,
                            cali_st: int | None = None) -> dict[str, torch.Tensor]:
    """Sample FP trajectories (one per label, or ``n_unconditional``) and keep ``n`` UNet inputs.

    Returns {"x": [n, C, H, W], "t": [n] int64, "c": [n, ...] (absent for unconditional models)}, ordered by step,
    plus ``n_holdout`` more inputs drawn the same way under "holdout_x", "holdout_t", "holdout_c": never used for
    calibration, they measure the quantized model's error on inputs it was not fit to.
    With guidance each trajectory contributes two inputs per step, indexed branch · n_traj + trajectory
    (unconditional branch first), so the subset does not depend on the batch size. ``model_fn`` is the FP
    denoiser (default ``model.apply_model``), ``conditioner`` turns a batch of ``labels`` into (c, uc) (default:
    class conditioning against the null class); ``settings`` (steps, η, scale, grid, loop) pick the trajectories
    (PLMS, as QNCD and Q-Diffusion calibrate Stable Diffusion); ``cali_st`` keeps only every (S // cali_st)-th step.
    """
    model_fn = model_fn or model.apply_model
    schedule = settings.schedule(model)
    # t -> the steps visiting it, in chain order: a grid may repeat a timestep (the original quad grid does), and
    # every trajectory then calls the model that many times in a row at that t
    t_to_steps: dict[int, list[int]] = {}
    for t, i in _call_sequence(list(schedule.steps()), settings.first_step_evals):
        t_to_steps.setdefault(t, []).append(i)
    calls = dict.fromkeys(t_to_steps, 0)
    n_traj = len(labels) if labels is not None else n_unconditional
    guided = labels is not None and settings.scale != 1.0
    per_step = n_traj * (2 if guided else 1)
    keep = draw_subset(n + n_holdout, len(schedule), per_step, distribution, np.random.default_rng(seed), cali_st)
    kept: dict[int, list] = {i: [] for i in keep}
    seen = dict.fromkeys(range(len(schedule)), 0)  # trajectories of each step seen so far, across batches
    branches = 2 if guided else 1

    def recording_model_fn(x, t, c):
        t0 = int(t[0])   # the timestep travels with the call; only a repeated one needs its visit counted
        visits = t_to_steps[t0]
        i = visits[calls[t0] % len(visits)]
        calls[t0] += 1
        if i == _EXTRA:
            return model_fn(x, t, c)
        b = x.shape[0] // branches
        if i in keep:
            # canonical index of each row, independent of batching: branch · n_traj + trajectory
            rows = np.arange(x.shape[0])
            canonical = (rows // b) * n_traj + seen[i] + rows % b
            hit = np.isin(canonical, keep[i])
            if hit.any():
                sel = torch.as_tensor(np.flatnonzero(hit), device=x.device)
                kept[i].append((canonical[hit], x[sel].cpu(), t[sel].cpu(), None if c is None else c[sel].cpu()))
        seen[i] += b
        return model_fn(x, t, c)

    generator = torch.Generator(device=model.betas.device).manual_seed(seed)
    sample_latents(model, labels, settings=settings, n=n_unconditional, batch_size=batch_size, generator=generator,
                   model_fn=recording_model_fn, progress=progress, conditioner=conditioner)
    xs, ts, cs = [], [], []
    for i in sorted(kept):
        order = np.argsort(np.concatenate([r[0] for r in kept[i]]), kind="stable")
        xs.append(torch.cat([r[1] for r in kept[i]])[order])
        ts.append(torch.cat([r[2] for r in kept[i]])[order])
        if kept[i][0][3] is not None:
            cs.append(torch.cat([r[3] for r in kept[i]])[order])
    every = {"x": torch.cat(xs), "t": torch.cat(ts)}
    if cs:
        every["c"] = torch.cat(cs)
    held = np.zeros(n + n_holdout, dtype=bool)
    held[np.random.default_rng(seed + 1).permutation(n + n_holdout)[:n_holdout]] = True
    held = torch.as_tensor(held)
    out = {k: v[~held] for k, v in every.items()}
    out.update({f"holdout_{k}": v[held] for k, v in every.items()})
    return out
