"""Timestep-aware statistics of the quantization noise (D²-DPM §"Timestep-aware noise statistics", Algorithm 1
lines 1-8; PTQD §4 "Quantization noise correction"), streamed so that memory does not grow with the samples.

At every DDIM step t the quantized and the FP model see the same x_t on an FP trajectory, both with classifier-free
guidance; ε̂ is the guided quantized output, ε_fp the guided FP output and Δ = ε̂ − ε_fp the quantization noise.
Every element of every sample is one observation of the vector v = (ε̂, Δ, ε_fp). ``NoiseStatistics`` keeps, per
timestep and latent channel, the count, Σv and Σvvᵀ in float64 -- enough for the D² joint Gaussian of (ε̂, Δ)
(``correction.gaussian``) and PTQD's regression of Δ on ε_fp (``correction.ptqd``), tensor-wise (pool the channels)
or channel-wise.

The 4σ outlier filter of the original fit (drop elements with |Δ − mean Δ| > 4·std Δ, mean and std over all elements
of the timestep, or of the channel for the channel-wise fit) needs the values again once mean and std are known.
With ``spill_dir`` the accumulator appends (ε̂, ε_fp) as float32 to one file per timestep, and
``filtered_moments`` makes the second pass over them as ``np.memmap`` chunks (the original kept all of it, ~3 GB,
on the GPU). RAM stays at one chunk; disk is 8·C·H·W bytes per sample and step (2 GB for ImageNet, 1024 × 20).

``SamplingConfig`` is the sampling settings (steps, η, guidance scale, DDIM timesteps) statistics belong to; every
fit carries it and every correction checks the sampler against it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ldm.models.diffusion.ddim import DDIMSchedule, DDIMStep, ModelFn, cfg_eps, randn_sampler
from ldm.models.diffusion.settings import SamplingSettings
from ldm.sample import Conditioner, class_conditioner, latent_shape
from ldm.util import UserFacingError

# Positions in the observation vector v = (ε̂, Δ, ε_fp).
EPS_HAT, DELTA, EPS_FP = 0, 1, 2
STATE_VERSION = 1


class CorrectionError(UserFacingError):
    """Statistics, fits or corrections that cannot be used as asked (one-line message naming the fix)."""


class ConfigMismatch(CorrectionError):
    """Sampling settings differ from those the statistics were collected with."""


class MissingTimestep(CorrectionError):
    """A timestep has no statistics (the original fell back to an identity covariance; we stop)."""


# ---------------------------------------------------------------------------------------------------------------------
# The sampling settings statistics belong to
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingConfig:
    """DDIM settings a set of statistics is valid for. ``timesteps`` ascending and distinct, as ``DDIMSchedule``
    stores them; they are the keys of every per-timestep table (t ∈ {1, 51, …, 951} for 20 steps). ``length`` is the
    number of steps of the chain; it exceeds ``len(timesteps)`` only for a grid that repeats timesteps (the original
    quad grid of the pixel DDIM: 100 steps over 96 timesteps), whose repeats share their timestep's row."""

    steps: int
    eta: float
    scale: float
    timesteps: tuple[int, ...]
    length: int | None = None

    def __post_init__(self):
        ts = tuple(int(t) for t in self.timesteps)
        length = len(ts) if self.length is None else int(self.length)
        if self.steps < 1 or self.eta < 0 or not ts or list(ts) != sorted(set(ts)) or length < len(ts):
            raise ValueError(f"invalid sampling config: steps={self.steps}, eta={self.eta}, timesteps={ts}, "
                             f"length={length}")
        object.__setattr__(self, "timesteps", ts)
        object.__setattr__(self, "length", length)
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "eta", float(self.eta))
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def from_schedule(cls, schedule: DDIMSchedule, steps: int, scale: float) -> "SamplingConfig":
        return cls(steps, schedule.eta, scale, tuple(sorted(set(schedule.timesteps.tolist()))), len(schedule))

    @classmethod
    def make(cls, alphas_cumprod, steps: int, eta: float, scale: float) -> "SamplingConfig":
        return cls.from_schedule(DDIMSchedule.make(alphas_cumprod, steps, eta), steps, scale)

    @classmethod
    def for_run(cls, model, settings: SamplingSettings) -> "SamplingConfig":
        """The record of a run's ``settings`` on ``model``: its schedule's timesteps (the run's grid included)."""
        return cls.from_schedule(settings.schedule(model), settings.steps, settings.scale)

    def row(self, t: int, what: str = "the statistics") -> int:
        """Row of timestep ``t`` in the per-timestep tables."""
        try:
            return self.timesteps.index(int(t))
        except ValueError:
            raise MissingTimestep(f"{what} {_has_no(t)} (it covers the {len(self.timesteps)} DDIM timesteps "
                                  f"t = {_fmt_ts(self.timesteps)}); refit for the schedule you sample with") from None

    def check(self, *, steps: int, eta: float, scale: float, what: str = "the statistics") -> None:
        """Stop with one line naming both values if the sampler's settings differ from ours."""
        for name, have, want in (("steps", self.steps, steps), ("eta", self.eta, eta), ("scale", self.scale, scale)):
            if not math.isclose(float(have), float(want), rel_tol=1e-6, abs_tol=1e-6):
                raise ConfigMismatch(f"{what} were collected with {name}={have:g}, but sampling asks for "
                                     f"{name}={float(want):g}; sample with {name}={have:g} or collect statistics "
                                     f"(and refit) for {name}={float(want):g}")

    def check_step(self, step: DDIMStep, what: str = "the statistics") -> int:
        """Check one DDIM step against these settings (its chain length, η and t) and return its row.

        The chain length is i + index + 1; η is recovered from the step's σ_t, ᾱ_t and ᾱ_prev
        (σ_t = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)). The guidance scale does not travel with a step:
        ``check`` it where the sampler is configured."""
        n = step.i + step.index + 1
        if n != self.length:
            raise ConfigMismatch(f"{what} were collected for {self.steps} DDIM steps, but sampling runs {n}; sample "
                                 f"with steps={self.steps} or collect statistics (and refit) for {n} steps")
        a, ap = step.alpha, step.alpha_prev
        base = math.sqrt(max((1 - ap) / (1 - a) * (1 - a / ap), 0.0))
        if base > 1e-8:
            eta = step.sigma / base
            if not math.isclose(eta, self.eta, rel_tol=1e-4, abs_tol=1e-4):
                raise ConfigMismatch(f"{what} were collected with eta={self.eta:g}, but sampling asks for "
                                     f"eta={eta:.4g}; sample with eta={self.eta:g} or collect statistics "
                                     f"(and refit) for eta={eta:.4g}")
        return self.row(step.t, what)

    def to_dict(self) -> dict:
        d = {"steps": self.steps, "eta": self.eta, "scale": self.scale,
             "timesteps": torch.tensor(self.timesteps, dtype=torch.int64)}
        if self.length != len(self.timesteps):   # only a grid with repeated timesteps records it
            d["length"] = self.length
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingConfig":
        return cls(int(d["steps"]), float(d["eta"]), float(d["scale"]),
                   tuple(torch.as_tensor(d["timesteps"]).tolist()), d.get("length"))


def _fmt_ts(ts: Sequence[int]) -> str:
    ts = list(ts)
    return ", ".join(map(str, ts)) if len(ts) <= 4 else f"{ts[0]}, {ts[1]}, …, {ts[-1]}"


def _has_no(t: int) -> str:
    return f"has no statistics for t={int(t)}"


# ---------------------------------------------------------------------------------------------------------------------
# Sufficient statistics
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of v = (ε̂, Δ, ε_fp) per timestep (row r ↔ ``timesteps[r]``) and channel, float64:

        n   [T, C]        int64    number of elements (samples × H × W)
        s1  [T, C, 3]     float64  Σ v
        s2  [T, C, 3, 3]  float64  Σ v vᵀ

    ``pooled()`` sums the channels (C = 1): the tensor-wise statistics of the same elements."""

    timesteps: tuple[int, ...]
    n: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor

    def pooled(self) -> "Moments":
        return Moments(self.timesteps, self.n.sum(1, keepdim=True), self.s1.sum(1, keepdim=True),
                       self.s2.sum(1, keepdim=True))

    def mean(self) -> torch.Tensor:
        """E[v], [T, C, 3]."""
        return self.s1 / self.n[..., None]

    def cov(self, ddof: int = 0) -> torch.Tensor:
        """Covariance of v, [T, C, 3, 3]; ``ddof`` 0 = population, 1 = sample (np.cov)."""
        n = self.n[..., None, None].to(torch.float64)
        m = self.mean()
        return (self.s2 - n * m[..., :, None] * m[..., None, :]) / (n - ddof)

    def require_complete(self, what: str = "the statistics") -> None:
        """Every timestep must have data: a fit with an empty timestep would fall back to something arbitrary."""
        empty = [t for t, c in zip(self.timesteps, self.n.min(1).values.tolist(), strict=True) if c < 2]
        if empty:
            raise MissingTimestep(f"{what} {_has_no(empty[0])}" + (f" (and {len(empty) - 1} more timesteps)"
                                  if len(empty) > 1 else "") + "; collect statistics for the whole schedule")


def _moments_of(q: torch.Tensor, f: torch.Tensor, keep: torch.Tensor | None = None):
    """Per-channel (count [C], Σv [C, 3], Σvvᵀ [C, 3, 3]) of ε̂ = q, Δ = q − f, ε_fp = f, all [B, C, N] float64;
    elements where ``keep`` is False contribute nothing."""
    v = torch.stack([q, q - f, f], dim=-1)                           # [B, C, N, 3]
    if keep is None:
        count = torch.full((q.shape[1],), q.shape[0] * q.shape[2], dtype=torch.int64)
    else:
        v = v * keep[..., None]
        count = keep.sum((0, 2)).to(torch.int64).cpu()
    v = v.transpose(0, 1).reshape(q.shape[1], -1, 3)                  # [C, B·N, 3]
    return count, v.sum(1).cpu(), (v.transpose(1, 2) @ v).cpu()


# ---------------------------------------------------------------------------------------------------------------------
# The accumulator
# ---------------------------------------------------------------------------------------------------------------------

class NoiseStatistics:
    """Streaming accumulator of ``Moments`` over DDIM steps, with an optional disk spill for the outlier filter.

    ``update(t, eps_q, eps_fp)`` takes one step's guided outputs [B, C, H, W] (any float dtype, any device). Sums
    stay on the CPU in float64; nothing per sample is kept in memory. With ``spill_dir``, each timestep's values
    are appended as float32 rows [2, C, H·W] (ε̂, ε_fp) to ``spill_dir/t{t:04d}.f32``.

    ``state_dict()`` holds only tensors and numbers (``torch.load(weights_only=True)`` reads it back);
    ``from_state_dict(sd, spill_dir)`` resumes, truncating spill files to the rows the state counts (rows written
    after the last saved state are dropped). ``merge_(other)`` adds another accumulator (e.g. another rank's).
    """

    def __init__(self, sampling: SamplingConfig, spill_dir: str | os.PathLike | None = None):
        self.sampling = sampling
        self.timesteps = sampling.timesteps
        self.shape: tuple[int, int, int] | None = None  # (C, H, W) of ε, fixed by the first update
        self.samples = torch.zeros(len(self.timesteps), dtype=torch.int64)  # ε maps seen per timestep
        self._n = self._s1 = self._s2 = None
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            if any(self._spill_path(t).exists() for t in self.timesteps):
                raise CorrectionError(f"{self.spill_dir} already holds spilled statistics; resume with "
                                      f"NoiseStatistics.from_state_dict(state, spill_dir) or use an empty folder")

    # -- accumulation ------------------------------------------------------------------------------------------------
    def _allocate(self, shape: tuple[int, int, int]) -> None:
        t, c = len(self.timesteps), shape[0]
        self.shape = shape
        self._n = torch.zeros(t, c, dtype=torch.int64)
        self._s1 = torch.zeros(t, c, 3, dtype=torch.float64)
        self._s2 = torch.zeros(t, c, 3, 3, dtype=torch.float64)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if self.shape is None:
            self._allocate(shape)
        elif tuple(shape) != self.shape:
            raise ValueError(f"ε has shape [*, {', '.join(map(str, shape))}], earlier updates had "
                             f"[*, {', '.join(map(str, self.shape))}]")

    @torch.no_grad()
    def update(self, t: int, eps_q: torch.Tensor, eps_fp: torch.Tensor) -> None:
        """Add one DDIM step: ε̂ = ``eps_q`` and ε_fp = ``eps_fp``, both guided, [B, C, H, W], at timestep ``t``."""
        if eps_q.shape != eps_fp.shape or eps_q.ndim != 4:
            raise ValueError(f"eps_q {tuple(eps_q.shape)} and eps_fp {tuple(eps_fp.shape)} must both be [B, C, H, W]")
        if int(t) not in self.timesteps:
            raise ConfigMismatch(f"t={int(t)} is not one of the {len(self.timesteps)} DDIM timesteps these "
                                 f"statistics collect (t = {_fmt_ts(self.timesteps)}); sample with the same settings")
        r = self.timesteps.index(int(t))
        self._check_shape(tuple(eps_q.shape[1:]))
        b, c = eps_q.shape[:2]
        q = eps_q.detach().reshape(b, c, -1).to(torch.float64)   # [B, C, H·W]
        f = eps_fp.detach().reshape(b, c, -1).to(torch.float64)
        n, s1, s2 = _moments_of(q, f)
        self._n[r] += n
        self._s1[r] += s1
        self._s2[r] += s2
        self.samples[r] += b
        if self.spill_dir is not None:
            rows = torch.stack([eps_q.detach(), eps_fp.detach()], 1).to("cpu", torch.float32)  # [B, 2, C, H, W]
            with open(self._spill_path(t), "ab") as fh:
                rows.numpy().tofile(fh)

    def moments(self) -> Moments:
        """Unfiltered moments (what PTQD's regression and the filter's thresholds use)."""
        if self.shape is None:
            raise MissingTimestep("the statistics are empty; collect them first")
        return Moments(self.timesteps, self._n.clone(), self._s1.clone(), self._s2.clone())

    # -- the outlier filter (second pass) ----------------------------------------------------------------------------
    def _spill_path(self, t: int) -> Path:
        return self.spill_dir / f"t{int(t):04d}.f32"

    def _row_floats(self) -> int:
        c, h, w = self.shape
        return 2 * c * h * w

    def _spilled(self, r: int) -> np.memmap | None:
        """The spilled rows of timestep row r as a read-only memmap [samples, 2, C, H·W]."""
        rows = int(self.samples[r])
        if rows == 0:
            return None
        c, h, w = self.shape
        return np.memmap(self._spill_path(self.timesteps[r]), dtype=np.float32, mode="r",
                         shape=(rows, 2, c, h * w))

    @torch.no_grad()
    def filtered_moments(self, k: float = 4.0, per_channel: bool = False,
                         chunk_bytes: int = 64 << 20) -> Moments:
        """Moments of the elements with |Δ − mean Δ| ≤ k·std Δ (population std), the filter of the original fit.

        Mean and std come from the unfiltered moments of the timestep: over all elements (``per_channel`` False,
        the tensor-wise fit) or over each channel's elements (the channel-wise fit). A dropped element is dropped
        jointly from ε̂, Δ and ε_fp. Returns per-channel moments either way (``pooled()`` gives the tensor-wise
        ones). Reads the spill in chunks of about ``chunk_bytes``."""
        if self.spill_dir is None:
            raise CorrectionError(f"the {k:g}σ outlier filter needs the values themselves; collect the statistics "
                                  f"with a spill folder (NoiseStatistics(..., spill_dir=...)) or fit without it")
        full = self.moments()
        full.require_complete()
        ref = full if per_channel else full.pooled()
        mean_y = ref.mean()[..., DELTA]                                # [T, C or 1]
        std_y = ref.cov(ddof=0)[..., DELTA, DELTA].clamp_min(0).sqrt()
        n, s1, s2 = torch.zeros_like(full.n), torch.zeros_like(full.s1), torch.zeros_like(full.s2)
        per_chunk = max(1, chunk_bytes // (4 * self._row_floats()))
        for r in range(len(self.timesteps)):
            mm = self._spilled(r)
            m, s = mean_y[r].view(1, -1, 1), std_y[r].view(1, -1, 1)   # broadcast over [b, C, H·W]
            for start in range(0, len(mm), per_chunk):
                a = torch.from_numpy(np.array(mm[start:start + per_chunk])).to(torch.float64)  # [b, 2, C, H·W]
                q, f = a[:, 0], a[:, 1]
                keep = ((q - f) - m).abs() <= k * s
                dn, d1, d2 = _moments_of(q, f, keep)
                n[r] += dn
                s1[r] += d1
                s2[r] += d2
            del mm
        return Moments(self.timesteps, n, s1, s2)

    # -- persistence and merging -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors and numbers: {version, sampling, shape [3] (empty before the first update), n [T, C],
        s1 [T, C, 3], s2 [T, C, 3, 3], samples [T], spilled}."""
        if self.shape is None:  # nothing seen yet: zero channels
            t = len(self.timesteps)
            n, s1, s2 = (torch.zeros(t, 0, dtype=torch.int64), torch.zeros(t, 0, 3, dtype=torch.float64),
                         torch.zeros(t, 0, 3, 3, dtype=torch.float64))
        else:
            n, s1, s2 = self._n.clone(), self._s1.clone(), self._s2.clone()
        return {"version": STATE_VERSION, "sampling": self.sampling.to_dict(),
                "shape": torch.tensor(self.shape or (), dtype=torch.int64), "n": n, "s1": s1, "s2": s2,
                "samples": self.samples.clone(), "spilled": self.spill_dir is not None}

    @classmethod
    def from_state_dict(cls, state: dict, spill_dir: str | os.PathLike | None = None) -> "NoiseStatistics":
        """Rebuild from ``state_dict()``. Pass the spill folder the state was collected with to keep the outlier
        filter available; its files are cut back to the rows the state counts."""
        if state.get("version") != STATE_VERSION:
            raise CorrectionError(f"noise statistics state has version {state.get('version')}, this code reads "
                                  f"{STATE_VERSION}; collect the statistics again")
        obj = cls(SamplingConfig.from_dict(state["sampling"]))
        obj.samples = state["samples"].clone().to(torch.int64)
        if state["shape"].numel():
            obj.shape = tuple(int(v) for v in state["shape"].tolist())
            obj._n, obj._s1, obj._s2 = (state[k].clone() for k in ("n", "s1", "s2"))
        if spill_dir is not None:
            if not state["spilled"] and int(obj.samples.sum()):
                raise CorrectionError("these statistics were collected without a spill folder; the outlier filter "
                                      "cannot be added afterwards")
            obj.spill_dir = Path(spill_dir)
            obj.spill_dir.mkdir(parents=True, exist_ok=True)
            for r, t in enumerate(obj.timesteps):
                want = int(obj.samples[r]) * (obj._row_floats() if obj.shape else 0) * 4
                p = obj._spill_path(t)
                have = p.stat().st_size if p.exists() else 0
                if have < want:
                    raise CorrectionError(f"{p} holds {have} bytes, the saved statistics count {want}; the spill "
                                          f"folder does not belong to this state")
                if p.exists():
                    os.truncate(p, want)
        return obj

    def merge_(self, other: "NoiseStatistics") -> "NoiseStatistics":
        """Add ``other``'s statistics (and spilled rows) to ours, in place; both must share the sampling config."""
        if other.sampling != self.sampling:
            raise ConfigMismatch(f"cannot merge statistics collected for steps={other.sampling.steps}, "
                                 f"eta={other.sampling.eta:g}, scale={other.sampling.scale:g} into ones for "
                                 f"steps={self.sampling.steps}, eta={self.sampling.eta:g}, "
                                 f"scale={self.sampling.scale:g}")
        if (self.spill_dir is None) != (other.spill_dir is None):
            raise CorrectionError("cannot merge statistics with spilled values and statistics without: the outlier "
                                  "filter would see only part of the data")
        if other.shape is None:
            return self
        self._check_shape(other.shape)
        if self.spill_dir is not None:
            if self.spill_dir.resolve() == other.spill_dir.resolve():
                raise CorrectionError(f"both statistics spill to {self.spill_dir}; merge needs separate folders")
            for r, t in enumerate(self.timesteps):
                mm = other._spilled(r)
                if mm is None:
                    continue
                with open(self._spill_path(t), "ab") as fh:
                    for start in range(0, len(mm), 256):
                        np.asarray(mm[start:start + 256]).tofile(fh)
                del mm
        self._n += other._n
        self._s1 += other._s1
        self._s2 += other._s2
        self.samples += other.samples
        return self


# ---------------------------------------------------------------------------------------------------------------------
# Collection along FP trajectories
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def collect_noise_statistics(model, q_model_fn: ModelFn, stats: NoiseStatistics, labels: Sequence[int] | None,
                             *, n: int | None = None, uncond_label: int | None = None, batch_size: int = 16,
                             seed: int = 0, fp_model_fn: ModelFn | None = None,
                             on_batch: Callable[[NoiseStatistics, int], None] | None = None,
                             progress: bool = True, conditioner: Conditioner | None = None,
                             settings: SamplingSettings | None = None) -> NoiseStatistics:
    """Stream (ε̂, ε_fp) of every DDIM step into ``stats`` (D²-DPM Algorithm 1 lines 1-8; the original's
    ``DDIMSampler_collectQuantError``): both models run on the same x_t, each with classifier-free guidance at the
    statistics' scale, and x_t advances with the FP ε, so the statistics follow FP trajectories.

    One trajectory per entry of ``labels`` (class-conditional, guided against ``uncond_label``, by default the null
    class), or ``n`` unconditional ones when ``labels`` is None. Batch k draws x_T and its noise from its own
    generator, seeded by (``seed``, first sample index), so a run resumes exactly: ``stats`` restored from a state
    saved by ``on_batch(stats, samples_done)`` continues at the next batch (same ``batch_size``). ``conditioner``
    turns a batch of ``labels`` into (c, uc) (default: class conditioning against ``uncond_label``).
    ``settings`` are the run's (grid and loop; default DDIM on the model's default grid at the statistics' steps,
    η and scale, which they must equal): PLMS' first-step look-ahead at the next t is not a step input and is not
    counted."""
    cfg = stats.sampling
    settings = settings or SamplingSettings(cfg.steps, cfg.eta, cfg.scale)
    if (settings.steps, settings.eta, settings.scale) != (cfg.steps, cfg.eta, cfg.scale):
        raise ConfigMismatch(f"sampling settings {settings.flags()} differ from the statistics' steps {cfg.steps}, "
                             f"eta {cfg.eta:g}, scale {cfg.scale:g}")
    schedule = settings.schedule(model)
    if SamplingConfig.from_schedule(schedule, cfg.steps, cfg.scale) != cfg:
        raise ConfigMismatch(f"the model's {cfg.steps}-step DDIM schedule visits t = "
                             f"{_fmt_ts(schedule.timesteps.tolist())} ({len(schedule)} steps), the statistics "
                             f"t = {_fmt_ts(cfg.timesteps)} ({cfg.length} steps)")
    # a repeated timestep (original quad grid) leaves x_t unchanged: its ε pair is counted once, at the first visit
    first_visit = {st.i for st in schedule.steps() if st.index == len(schedule) - 1
                   or schedule.timesteps[st.index + 1] != st.t}
    conditional = labels is not None
    total = len(labels) if conditional else n
    if not total:
        raise ValueError("nothing to collect: give labels or n > 0")
    done = int(stats.samples[0])
    if bool((stats.samples != done).any()) or done % batch_size:
        raise CorrectionError(f"the statistics hold {stats.samples.tolist()} samples per timestep, not a whole "
                              f"number of batches of {batch_size}; resume from a state saved by on_batch with that "
                              f"batch size")
    if done > total:
        raise CorrectionError(f"the statistics already hold {done} samples, more than the {total} asked for")
    fp_model_fn = fp_model_fn or model.apply_model
    device = model.betas.device
    scale = cfg.scale
    if conditional and conditioner is None:
        conditioner = class_conditioner(model, scale, uncond_label)

    for start in range(done, total, batch_size):
        stop = min(start + batch_size, total)
        size = (stop - start, *latent_shape(model))
        batch_seed = int(np.random.SeedSequence([seed, start]).generate_state(1)[0])
        g = torch.Generator(device=device).manual_seed(batch_seed)
        x_T = torch.randn(size, generator=g, device=device)
        c, uc = conditioner(labels[start:stop]) if conditional else (None, None)

        calls = [0]

        def eps_fn(x, t, step, c=c, uc=uc):
            e_fp = cfg_eps(fp_model_fn, x, t, c, uc, scale)
            lookahead = settings.first_step_evals == 2 and calls[0] == 1   # PLMS' Euler evaluation
            calls[0] += 1
            if step.i in first_visit and not lookahead:
                stats.update(step.t, cfg_eps(q_model_fn, x, t, c, uc, scale), e_fp)
            return e_fp  # FP trajectory

        settings.loop_fn(eps_fn, x_T, schedule, noise_sampler=randn_sampler(size, device, g), progress=progress)
        if on_batch is not None:
            on_batch(stats, stop)
    return stats
