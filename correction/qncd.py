"""QNCD's "runtime noise estimation" (Chu et al., ACM MM 2024, arXiv 2403.19140; the "Filter Out" branch of its
pipeline figure; spec qncd_ptqd.md §A.3, from the official plms.py, as the paper's equations were not available) as a
``StepCorrection`` over the one DDIM (or PLMS) update.

At a probe step t → t' the quantized model's bias is measured on a latent whose noise is known:

    A  x̃_{t'} = φ(x̃_t, ε̂_t)                                   the step's own update (DDIM Eq. 12), μ not applied
    B  x̂_t   = √(ᾱ_t/ᾱ_{t'}) x̃_{t'} + √(1 − ᾱ_t/ᾱ_{t'}) z,  z ~ N(0, I)   forward transition back to t
    C  δ     = ε̂(x̂_t, t, c) − z                               same conditioning and guidance; an ideal ε-model's
       μ_q   = mean(δ)                                          δ averages to 0, a quantized one's to its bias
    D  ε̂_t ← ε̂_t − μ_q, and every later step's ε̂ ← ε̂ − μ_q until the next probe

μ_q is a scalar (the code: mean over batch, channels, pixels) or per latent channel (mean over batch and pixels).
The code's σ_q = std(δ)/4 is computed there and then forced to 0; no variance correction here either.

Schedule: a probe at every step i (0-based) with (i − 1) mod R = phase, phase = ⌊R/2⌋ by default (the code: R = 10
gives i = 6, 16, 26, ... ); phase = R − 1 probes at i = 0, 10, ... . Each probe costs one extra (guided, so
batch-doubled) model call. μ_q is reset at the first step of every trajectory (the original kept it across
``sample()`` calls, so a batch's first steps reused the previous batch's bias).

A is the sampling loop's own update, handed to the probe with the model by the loops' hook (``begin``'s ``advance``):
under DDIM Eq. 12; under PLMS, as QNCD's plms.py, the Adams-Bashforth combination of ε̂_t with the loop's history
(improved Euler at the first step, which costs the probe one more model call there), not a plain DDIM step from
ε̂_t. With η > 0 the step's own noise is unknown to a correction, so A draws its own σ_t z₁ (from the probe's
generator): x̃_{t'} is then a sample at t' as the re-noising assumes. With a ``base`` correction
(D-D², S-D², PTQD) the probe is a *residual* bias estimator (spec §C.1): the base corrects ε̂_t first, the probe's
own prediction is corrected by the same base (an S-D² base draws from its generator for it), and μ_q measures only
what the base left, so the mean is never subtracted twice.

What the probe measures is E[ε̂(x̂_t) − z], which is the model's bias only while x̃_{t'} is on the data manifold: an
exact denoiser explains a drift of the trajectory's mean as noise, so a drift accumulated before a probe enters μ_q
(and, subtracted, can push the trajectory further). The response to a drift falls with the noise level: late probes
measure the bias best (on the exact denoiser of N(0, 10²) data with a planted bias b, 20 DDIM steps: μ_q ≈ 0 at
i = 6, ≈ 0.87 b at i = 16).

The probe calls the model with the conditioning and guidance of the batch being sampled: every loop (DDIM, PLMS)
hands it its own guided ε through ``begin(eps_fn, batch_size)`` before the first step (the loops' one correction
hook), so any sampler built with ``correction=probe`` works; nothing else binds it.

``CenteredProbe`` (issue 34 item 3) removes from μ the two parts that are not quantization error. With the FP
model's own mean ε at t from the step-5 Gaussian fit, m_fp(t) = E[ε̂] − E[Δ] = μ_x(t) − μ_y(t) (Δ = ε̂ − ε_fp on the
calibration trajectories; per channel with a channel-wise fit), and an antithetic pair of re-noisings,

    B' x̂_t^± = √(ᾱ_t/ᾱ_{t'}) x̃_{t'} ± √(1 − ᾱ_t/ᾱ_{t'}) z                     the same z, both signs
    C' μ_c  = ½ [mean ε̂(x̂_t^+, t) + mean ε̂(x̂_t^−, t)] − m_fp(t)

The injected noise's mean is exactly 0 over the pair (QNCD's μ keeps −mean(z), spread 1/√(B·C·H·W)), and so is the
part of the model's response linear in z; what the FP model itself predicts on average at t is subtracted. On the FP
model (ε̂ = ε_fp, x̃_{t'} on its trajectories) μ_c is 0 up to the batch-to-batch spread of the mean ε; on
ε̂ = ε_fp + b it is b. It costs two model calls per probe (QNCD's one).
"""
from __future__ import annotations

from typing import Iterable

import torch

from correction.gaussian import GaussianFit, Granularity
from correction.statistics import CorrectionError
from ldm.models.diffusion.ddim import DDIMStep, EpsFn, StepCorrection, ddim_advance

DEFAULT_INTERVAL = 10  # the code's --reverse_interval


# ---- the math (pure) -----------------------------------------------------------------------------------------

def probe_steps(n_steps: int, interval: int = DEFAULT_INTERVAL, phase: int | None = None) -> list[int]:
    """The steps i in [0, n_steps) that probe: (i − 1) mod R = phase, phase = ⌊R/2⌋ by default (QNCD plms.py)."""
    if interval < 1:
        raise ValueError(f"the probe interval R must be >= 1, got {interval}")
    phase = interval // 2 if phase is None else phase
    if not 0 <= phase < interval:
        raise ValueError(f"the probe phase must be in [0, {interval}), got {phase}")
    return [i for i in range(n_steps) if (i - 1) % interval == phase]


def renoise(x_prev: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x̂_t = √(ᾱ_t/ᾱ_{t'}) x̃_{t'} + √(1 − ᾱ_t/ᾱ_{t'}) z: the forward transition q(x_t | x_{t'}) with known noise z
    (step B; DDPM Eq. 4 between two visited timesteps)."""
    ratio = alpha_t / alpha_prev
    return ratio.sqrt() * x_prev + (1. - ratio).sqrt() * z


def bias_estimate(eps_probe: torch.Tensor, z: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """μ_q = mean(ε̂(x̂_t) − z) (step C): over all elements ([1, 1, 1, 1]) or over batch and pixels ([1, C, 1, 1]),
    accumulated in float64."""
    delta = (eps_probe - z).double()
    dims = tuple(range(delta.ndim)) if granularity is Granularity.TENSOR else (0, *range(2, delta.ndim))
    return delta.mean(dim=dims, keepdim=True).to(eps_probe.dtype)


# ---- the correction ------------------------------------------------------------------------------------------

class QNCDProbe:
    """QNCD runtime noise estimation as a ``StepCorrection`` ``(ε̂, σ_t, step, x_t) -> (ε̂ − μ_q, σ_t)``.

    ``interval``/``phase`` set the probe schedule (``probe_steps``), or ``steps`` lists the probing step indices
    explicitly. ``granularity``: ``Granularity.TENSOR`` (scalar μ_q, the code) or ``CHANNEL``. ``base``: a correction
    applied first, to the step's ε̂ and to the probe's prediction (the probe then estimates the residual bias).
    ``generator`` draws the probe's noise z (and z₁ at η > 0); it is separate from the sampler's, so probing does not
    change the sampler's own noise. ``estimates`` holds (i, t, μ_q) of the current trajectory's probes."""

    method = "QNCD"

    def __init__(self, interval: int = DEFAULT_INTERVAL, phase: int | None = None, *,
                 steps: Iterable[int] | None = None, granularity: Granularity = Granularity.TENSOR,
                 base: StepCorrection | None = None, generator: torch.Generator | None = None):
        probe_steps(0, interval, phase)  # validates R and the phase
        self.interval, self.phase = interval, (interval // 2 if phase is None else phase)
        self.steps = None if steps is None else frozenset(int(i) for i in steps)
        self.granularity = Granularity(granularity)
        self.base = base
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._eps_fn: EpsFn | None = None
        self._batch: int | None = None
        self._advance = ddim_advance
        self.reset()

    # -- the loops' hook ----------------------------------------------------------------------------------------

    def begin(self, eps_fn: EpsFn, batch_size: int | None = None, advance=None) -> "QNCDProbe":
        """Query ``eps_fn(x, t) -> ε``, the sampling loop's own guided ε, and step A with ``advance(x_t, ε, step, σ_t,
        z) -> x_{t'}``, the loop's own update (the loops call this before their first step; call it yourself to use
        ``estimate`` alone: without ``advance``, A is the DDIM update). Also resets μ_q."""
        self._eps_fn, self._batch = eps_fn, batch_size
        self._advance = advance if advance is not None else ddim_advance
        self.reset()
        return self

    def reset(self) -> None:
        """Forget μ_q: the start of a trajectory (also automatic at step i = 0)."""
        self.mu: torch.Tensor | None = None
        self.estimates: list[tuple[int, int, torch.Tensor]] = []
        self._deferred = False   # a probe due on a step that does not advance waits for the next one

    # -- schedule -----------------------------------------------------------------------------------------------

    def is_probe(self, i: int) -> bool:
        if self.steps is not None:
            return i in self.steps
        return (i - 1) % self.interval == self.phase

    def extra_calls(self, n_steps: int, plms: bool = False) -> int:
        """Model calls a trajectory of ``n_steps`` steps costs on top of the sampler's (one per probe; under PLMS a
        probe at the first step costs one more, step A's improved-Euler evaluation)."""
        return sum(self.is_probe(i) for i in range(n_steps)) + int(plms and n_steps > 0 and self.is_probe(0))

    def check_config(self, *, steps: int, eta: float, scale: float) -> None:
        """The base's fit must match the sampler settings; the probe itself adapts to any."""
        if hasattr(self.base, "check_config"):
            self.base.check_config(steps=steps, eta=eta, scale=scale)

    # -- the StepCorrection -----------------------------------------------------------------------------------

    def __call__(self, eps: torch.Tensor, sigma: torch.Tensor, step: DDIMStep,
                 x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if step.i == 0:
            self.reset()
        sigma_sched = sigma
        if self.base is not None:
            eps, sigma = self.base(eps, sigma, step, x)
        due = self.is_probe(step.i) or self._deferred
        if due and step.alpha_prev == step.alpha:
            # a step from t to t (a repeated timestep of the original pixel-DDIM quad grid) leaves x unchanged, and
            # re-noising across it adds no noise: ε̂(x̂_t) − z would not measure the bias. The probe moves to the
            # next step that advances.
            self._deferred = True
        elif due:
            self._deferred = False
            # μ_q is re-estimated from this step's own uncorrected update (the code zeroes it first)
            self.mu = self.estimate(eps, sigma, step, x, sigma_sched)
            self.estimates.append((step.i, step.t, self.mu.detach().cpu()))
        if self.mu is not None:
            eps = eps - self.mu
        return eps, sigma

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        g = self.generator
        return torch.randn(like.shape, generator=g, device=g.device, dtype=torch.float32).to(like)

    @torch.no_grad()
    def estimate(self, eps: torch.Tensor, sigma: torch.Tensor, step: DDIMStep, x: torch.Tensor,
                 sigma_sched: torch.Tensor | None = None) -> torch.Tensor:
        """μ_q from one probe (steps A-C) at ``step`` for x_t = ``x`` whose (base-corrected) output is ``eps`` and
        noise level ``sigma``; ``sigma_sched`` is the scheduled σ_t the base sees (default ``sigma``). Draws from the
        probe's generator (its only side effect)."""
        sigma_sched = sigma if sigma_sched is None else sigma_sched
        if self._eps_fn is None:
            raise CorrectionError("the QNCD probe has no model to query: sample with it as a sampler's correction "
                                  "(the loop calls probe.begin), or call probe.begin(eps_fn) first")
        if self._batch is not None and self._batch != x.shape[0]:
            raise CorrectionError(f"the QNCD probe is bound to a batch of {self._batch}, the sampler runs "
                                  f"{x.shape[0]}; begin it with this batch's eps_fn")
        alpha_t, alpha_prev = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in (step.alpha, step.alpha_prev))
        z1 = self._randn(x) if bool((sigma != 0).any()) else None
        x_next = self._advance(x, eps, step, sigma, z1)                               # A
        z = self._randn(x)
        x_hat = renoise(x_next, alpha_t, alpha_prev, z)                               # B
        t = torch.full((x.shape[0],), step.t, device=x.device, dtype=torch.long)
        eps_hat = self._eps_fn(x_hat, t)                                              # C
        if self.base is not None:
            eps_hat, _ = self.base(eps_hat, sigma_sched, step, x_hat)
        return bias_estimate(eps_hat, z, self.granularity)

    def __repr__(self) -> str:
        when = f"steps={sorted(self.steps)}" if self.steps is not None else f"R={self.interval}, phase={self.phase}"
        base = f", base={self.base!r}" if self.base is not None else ""
        return f"QNCDProbe({when}, {self.granularity.value}-wise{base})"



class CenteredProbe(QNCDProbe):
    """The probe with μ_c (steps B', C' of the module docstring): ``fit`` (a step-5 ``GaussianFit``, tensor- or
    channel-wise; its granularity is μ_c's) gives m_fp(t) = μ_x(t) − μ_y(t); each probe re-noises with z and −z.
    Schedule, reset, deferral and subtraction as ``QNCDProbe`` (no base: it is a method of its own)."""

    method = "centered probe"

    def __init__(self, fit: GaussianFit, interval: int = DEFAULT_INTERVAL, phase: int | None = None, *,
                 steps: Iterable[int] | None = None, generator: torch.Generator | None = None):
        super().__init__(interval, phase, steps=steps, granularity=fit.granularity, generator=generator)
        self.fit = fit
        self.fp_mean = (fit.mu_x - fit.mu_y).float()   # [T, G]: m_fp per timestep (and channel)

    def extra_calls(self, n_steps: int, plms: bool = False) -> int:
        return 2 * sum(self.is_probe(i) for i in range(n_steps)) + int(plms and n_steps > 0 and self.is_probe(0))

    def check_config(self, *, steps: int, eta: float, scale: float) -> None:
        self.fit.sampling.check(steps=steps, eta=eta, scale=scale, what="the centered probe's Gaussian fit")

    def fp_mean_at(self, t: int, like: torch.Tensor) -> torch.Tensor:
        """m_fp(t) as [1, 1, 1, 1] (tensor-wise) or [1, C, 1, 1] (channel-wise)."""
        m = self.fp_mean[self.fit.row(t)]
        if m.numel() not in (1, like.shape[1]):
            raise CorrectionError(f"the centered probe's fit has {m.numel()} channels, the latent {like.shape[1]}")
        return m.view(1, -1, *([1] * (like.ndim - 2))).to(like)

    @torch.no_grad()
    def estimate(self, eps: torch.Tensor, sigma: torch.Tensor, step: DDIMStep, x: torch.Tensor,
                 sigma_sched: torch.Tensor | None = None) -> torch.Tensor:
        """μ_c from one probe (A, B', C') at ``step`` for x_t = ``x`` with output ``eps``; draws z (and z₁ at η > 0)
        from the probe's generator."""
        if self._eps_fn is None:
            raise CorrectionError("the centered probe has no model to query: sample with it as a sampler's "
                                  "correction, or call probe.begin(eps_fn) first")
        if self._batch is not None and self._batch != x.shape[0]:
            raise CorrectionError(f"the centered probe is bound to a batch of {self._batch}, the sampler runs "
                                  f"{x.shape[0]}; begin it with this batch's eps_fn")
        alpha_t, alpha_prev = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in (step.alpha, step.alpha_prev))
        z1 = self._randn(x) if bool((sigma != 0).any()) else None
        x_next = self._advance(x, eps, step, sigma, z1)                               # A
        z = self._randn(x)
        t = torch.full((x.shape[0],), step.t, device=x.device, dtype=torch.long)
        zero = torch.zeros_like(z)
        pair = [bias_estimate(self._eps_fn(renoise(x_next, alpha_t, alpha_prev, s * z), t), zero, self.granularity)
                for s in (1., -1.)]                                                    # B', C'
        return (pair[0] + pair[1]) / 2 - self.fp_mean_at(step.t, x)

    def __repr__(self) -> str:
        when = f"steps={sorted(self.steps)}" if self.steps is not None else f"R={self.interval}, phase={self.phase}"
        return f"CenteredProbe({when}, {self.granularity.value}-wise)"
