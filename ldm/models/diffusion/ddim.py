"""DDIM sampling (Song et al. 2021) as one pure update function driven by a precomputed schedule.

Three layers, each testable alone:

* ``DDIMSchedule`` -- the data: visited timesteps with their ᾱ_t, ᾱ_prev and σ_t (CompVis discretisation,
  including its ``+1`` offset and ᾱ_prev = ᾱ_0 on the last step, so released checkpoints sample as published).
* ``ddim_step`` -- the update, DDIM Eq. (12). Noise is passed in. Quantization-noise corrections (D²-DPM, PTQD,
  QNCD) change only its inputs -- a corrected ε and possibly a reduced σ_t -- through a ``StepCorrection``.
* ``sample_ddim`` -- the loop: walks the schedule, calls ``eps_fn(x, t, step)``, applies the correction, draws the
  noise, steps, and reports every step to ``callback`` with the timestep explicit.

``DDIMSampler`` keeps the CompVis ``sample(S, batch_size, shape, conditioning, ...)`` interface on top of these.
Models reach it through one ``(x, t, cond) -> ε`` function (``model.apply_model`` by default), so an FP, a
fake-quantized or an instrumented UNet are interchangeable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (x [B,C,H,W], t [B], cond) -> ε


@dataclass(frozen=True)
class DDIMStep:
    """One step of the chain. ``i`` counts steps from 0 (noisiest); ``index`` is the row of the schedule tables
    (``len - 1 - i``, CompVis' ``index``); ``t`` is the DDPM timestep given to the UNet."""

    i: int
    index: int
    t: int
    alpha: float       # ᾱ_t
    alpha_prev: float  # ᾱ at the next (less noisy) visited timestep; ᾱ_0 = 1 − β_1 after the last step
    sigma: float       # σ_t(η)


@dataclass(frozen=True)
class DDIMSchedule:
    """Visited timesteps (ascending, as CompVis stores them) and their float64 ᾱ_t, ᾱ_prev, σ_t tables."""

    timesteps: np.ndarray    # [S] int64
    alphas: np.ndarray       # [S] float64 ᾱ_t
    alphas_prev: np.ndarray  # [S] float64
    sigmas: np.ndarray       # [S] float64 σ_t = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)
    eta: float

    @classmethod
    def make(cls, alphas_cumprod: torch.Tensor | np.ndarray, num_steps: int, eta: float,
             discretize: str = "uniform") -> "DDIMSchedule":
        """Build the schedule for ``num_steps`` DDIM steps over the model's ᾱ table (float32 buffer, T entries)."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        ac = np.asarray(torch.as_tensor(alphas_cumprod).detach().cpu().double().numpy())
        ts = make_ddim_timesteps(discretize, num_steps, len(ac))
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(ac, ts, eta)
        return cls(ts.astype(np.int64), alphas, alphas_prev, sigmas, float(eta))

    def __len__(self) -> int:
        return len(self.timesteps)

    def steps(self) -> Iterator[DDIMStep]:
        """The steps in sampling order (t descending); each carries its (ᾱ_t, ᾱ_prev) pair from the tables."""
        n = len(self)
        for i in range(n):
            index = n - 1 - i
            yield DDIMStep(i, index, int(self.timesteps[index]), float(self.alphas[index]),
                           float(self.alphas_prev[index]), float(self.sigmas[index]))


def model_schedule(model: Any, num_steps: int, eta: float, discretize: str = "uniform",
                   grid: str | None = None) -> DDIMSchedule:
    """The DDIM schedule a model is sampled with: the model's own ``sampling_schedule(num_steps, eta, grid)`` when
    it defines one (the pixel DDPM of ``generalized.GeneralizedDDPM``: its timestep grid -- ``grid``, or the model's
    default when None -- and ᾱ table, final step to ᾱ = 1), else CompVis' ``DDIMSchedule.make`` over
    ``model.alphas_cumprod`` (which has one grid: a ``grid`` is refused). Every loop, calibration and statistics run
    asks here, so a model family with its own discretisation plugs in without touching them."""
    own = getattr(model, "sampling_schedule", None)
    if own is not None:
        return own(num_steps, eta) if grid is None else own(num_steps, eta, grid=grid)
    if grid is not None:
        raise ValueError(f"timestep grid {grid!r}: this model samples on the CompVis uniform grid only")
    return DDIMSchedule.make(model.alphas_cumprod, num_steps, eta, discretize)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor,
              sigma_t: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update, Song et al. (2021) Eq. (12):

        x̂0     = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t                       "predicted x0"
        x_prev = √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ_t²) ε + σ_t z       "direction to x_t" + noise

    ``alpha_t``, ``alpha_prev``, ``sigma_t`` broadcast against x_t [B, C, H, W] (scalars, [B,1,1,1], or a
    per-channel σ_t [1,C,1,1]); ``noise`` z ~ N(0, I) is passed in (None means no noise). Returns (x_prev, x̂0).
    """
    pred_x0 = (x_t - (1. - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    x_prev = alpha_prev.sqrt() * pred_x0 + (1. - alpha_prev - sigma_t ** 2).sqrt() * eps
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t [B]) -> the loop's guided ε


class StepCorrection(Protocol):
    """Changes the inputs of one update: (ε, σ_t) -> (ε', σ_t'). ``x`` is x_t; ``step`` carries t.

    A correction that must query the denoiser itself (QNCD's probe) also defines ``begin(eps_fn, batch_size,
    advance)``: every loop (``sample_ddim``, ``sample_plms``) calls it once before the first step with its own guided
    ``eps_fn(x, t)`` (same conditioning, guidance and model as the steps use), the batch size, and ``advance(x_t, ε_t,
    step, σ_t, z) -> x_{t'}``, the loop's own update from a candidate ε_t at the current step with the correction's
    own noise z (DDIM: Eq. 12; PLMS: the multistep combination with the loop's current history, improved Euler at
    the first step, σ_t = 0), which changes no loop state. That is the only way a correction receives the model or
    the solver."""

    def __call__(self, eps: torch.Tensor, sigma: torch.Tensor, step: DDIMStep,
                 x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


def begin_trajectory(correction: StepCorrection | None, eps_fn: Callable[..., torch.Tensor], batch_size: int,
                     advance: Callable[..., torch.Tensor]) -> None:
    """The loops' one hook: hand ``correction`` the loop's guided ε as ``eps_fn(x, t)`` and its deterministic update
    ``advance(x_t, ε_t, step)``, if it asks for them."""
    begin = getattr(correction, "begin", None)
    if begin is not None:
        begin(lambda x, t: eps_fn(x, t, None), batch_size, advance)


def ddim_advance(x_t: torch.Tensor, eps: torch.Tensor, step: "DDIMStep", sigma_t: torch.Tensor,
                 noise: torch.Tensor | None) -> torch.Tensor:
    """The DDIM update (Eq. 12) of ``x_t`` with ``eps``, σ_t and ``noise`` at ``step``: the DDIM loop's ``advance``."""
    alpha_t, alpha_prev = (torch.tensor(v, dtype=x_t.dtype, device=x_t.device) for v in (step.alpha, step.alpha_prev))
    return ddim_step(x_t, eps, alpha_t, alpha_prev, sigma_t, noise)[0]


def cfg_eps(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any,
            scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ε = ε_u + s (ε_c − ε_u), in one batched call with the
    unconditional half first (as CompVis batches it). Without ``uncond`` or with s = 1 it is ε_c."""
    if uncond is None or scale == 1.:
        return model_fn(x, t, cond)
    x_in, t_in = torch.cat([x] * 2), torch.cat([t] * 2)
    if isinstance(cond, dict):
        c_in = {k: [torch.cat([u, c]) for u, c in zip(uncond[k], cond[k], strict=True)] if isinstance(cond[k], list)
                else torch.cat([uncond[k], cond[k]]) for k in cond}
    else:
        c_in = torch.cat([uncond, cond])
    e_u, e_c = model_fn(x_in, t_in, c_in).chunk(2)
    return e_u + scale * (e_c - e_u)


def randn_sampler(shape: tuple, device: torch.device, generator: torch.Generator | None = None
                  ) -> Callable[[DDIMStep], torch.Tensor]:
    """Default noise: a fresh N(0, I) draw every step, even where σ_t = 0 (keeps CompVis' RNG stream)."""
    return lambda step: torch.randn(shape, device=device, generator=generator)


@torch.no_grad()
def sample_ddim(eps_fn: Callable[[torch.Tensor, torch.Tensor, DDIMStep], torch.Tensor], x_T: torch.Tensor,
                schedule: DDIMSchedule, *, noise_sampler: Callable[[DDIMStep], torch.Tensor] | None = None,
                correction: StepCorrection | None = None, callback: Callable[[dict], None] | None = None,
                temperature: float = 1., noise_dropout: float = 0., progress: bool = False,
                blend_x: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run the DDIM chain from x_T over ``schedule`` and return the final x (not the last x̂0).

    ``eps_fn(x, t, step)`` returns the (guided) ε for x at timesteps t [B] (``step`` is None when a correction
    queries it through ``begin``, e.g. at a re-noised x). ``callback`` receives a dict with
    ``i``, ``index``, ``t``, ``x`` (x_t), ``eps`` (after correction), ``sigma``, ``pred_x0`` and ``x_prev``.
    ``blend_x(x, t)`` replaces x_t before the step (CompVis' masked sampling: known regions re-noised from x0).
    """
    noise_sampler = noise_sampler or randn_sampler(x_T.shape, x_T.device)
    x = x_T
    b = x.shape[0]
    begin_trajectory(correction, eps_fn, b, ddim_advance)
    steps = tqdm(schedule.steps(), total=len(schedule), desc="DDIM", disable=not progress, leave=False)
    for step in steps:
        t = torch.full((b,), step.t, device=x.device, dtype=torch.long)
        if blend_x is not None:
            x = blend_x(x, t)
        eps = eps_fn(x, t, step)
        # Table values act as tensors of x's dtype at use, as in CompVis (torch.full(..., value) per step).
        alpha_t, alpha_prev, sigma = (torch.tensor(v, dtype=x.dtype, device=x.device)
                                      for v in (step.alpha, step.alpha_prev, step.sigma))
        if correction is not None:
            eps, sigma = correction(eps, sigma, step, x)
        noise = noise_sampler(step) * temperature
        if noise_dropout > 0.:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        x_prev, pred_x0 = ddim_step(x, eps, alpha_t, alpha_prev, sigma, noise)
        if callback is not None:
            callback({"i": step.i, "index": step.index, "t": step.t, "x": x, "eps": eps, "sigma": sigma,
                      "pred_x0": pred_x0, "x_prev": x_prev})
        x = x_prev
    return x


class DDIMSampler:
    """CompVis-compatible DDIM sampler over ``sample_ddim``.

    ``model`` is a LatentDiffusion or DDPM (for its ᾱ table, device and, by default, ``apply_model``). ``model_fn``
    replaces the denoiser (e.g. a quantized UNet) with the same ``(x, t, cond) -> ε`` signature; ``correction``
    adjusts the inputs of every DDIM update (see ``StepCorrection``). ``schedule`` is accepted for CompVis call
    compatibility and unused: the ᾱ table always comes from ``model``.
    """

    loop = staticmethod(sample_ddim)  # the sampling loop over the schedule; PLMSSampler swaps in its own
    first_step_evals = 1   # model calls of the first step (PLMS: 2; the calibration records only the first)

    def __init__(self, model, schedule: str = "linear", model_fn: ModelFn | None = None,
                 correction: StepCorrection | None = None, **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.model_fn = model_fn if model_fn is not None else model.apply_model
        self.correction = correction
        self.ddim_schedule: DDIMSchedule | None = None

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.,
                      verbose: bool = True) -> DDIMSchedule:
        """Build the tables, exposed under their CompVis names as well (``ddim_timesteps``, ``ddim_alphas``, ...)."""
        s = model_schedule(self.model, ddim_num_steps, ddim_eta, ddim_discretize)
        if verbose:
            print(f"DDIM schedule: {len(s)} steps at t = {s.timesteps[::-1].tolist()}, eta {ddim_eta}")
        self.ddim_schedule = s
        self.ddim_timesteps = s.timesteps
        self.ddim_alphas = torch.tensor(s.alphas, dtype=torch.float32)
        self.ddim_alphas_prev = s.alphas_prev
        self.ddim_sigmas = s.sigmas
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1. - self.ddim_alphas)
        ac = self.model.alphas_cumprod.detach().float().cpu()
        ac_prev = self.model.alphas_cumprod_prev.detach().float().cpu()
        # σ over the full T-step chain; used only when sampling with the original DDPM steps
        self.ddim_sigmas_for_original_num_steps = ddim_eta * torch.sqrt(
            (1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev))
        return s

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0., mask=None, x0=None, temperature=1.,
               noise_dropout=0., score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1., unconditional_conditioning=None,
               generator: torch.Generator | None = None, noise_sampler=None, **kwargs):
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` DDIM steps. Returns (samples, intermediates).

        ``intermediates`` = {'x_inter': [...], 'pred_x0': [...]} with x_T first in both (CompVis), then every step
        whose index is a multiple of ``log_every_t`` and the first step. ``callback`` gets the per-step dict of
        ``sample_ddim``; ``img_callback(pred_x0, i)`` is the CompVis hook. ``generator`` seeds x_T and the noise.
        """
        if kwargs:
            raise TypeError(f"DDIMSampler.sample got unsupported arguments: {sorted(kwargs)}")
        if quantize_x0:
            raise ValueError("quantize_x0 is not supported (it changes the update body, not its inputs)")
        if conditioning is not None:
            n = _batch_len(conditioning)
            if n != batch_size:
                raise ValueError(f"conditioning has batch size {n}, but batch_size is {batch_size}")
        schedule = self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        device = self.model.betas.device
        size = (batch_size, *shape)
        if x_T is None:
            x_T = torch.randn(size, device=device, generator=generator)
        if noise_sampler is None:
            noise_sampler = randn_sampler(size, device, generator)

        blend_x = None
        if mask is not None:
            if x0 is None:
                raise ValueError("masked sampling needs x0 (the latent whose masked-in region is kept)")
            blend_x = lambda x, t: self.model.q_sample(x0, t) * mask + (1. - mask) * x  # noqa: E731

        def eps_fn(x, t, step):
            e = cfg_eps(self.model_fn, x, t, conditioning, unconditional_conditioning, unconditional_guidance_scale)
            if score_corrector is not None:
                assert self.model.parameterization == "eps"
                e = score_corrector.modify_score(self.model, e, x, t, conditioning, **(corrector_kwargs or {}))
            return e

        intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}
        total = len(schedule)

        def on_step(d):
            if d["index"] % log_every_t == 0 or d["index"] == total - 1:
                intermediates["x_inter"].append(d["x_prev"])
                intermediates["pred_x0"].append(d["pred_x0"])
            if callback is not None:
                callback(d)
            if img_callback is not None:
                img_callback(d["pred_x0"], d["i"])

        samples = self.loop(eps_fn, x_T, schedule, noise_sampler=noise_sampler, correction=self.correction,
                            callback=on_step, temperature=temperature, noise_dropout=noise_dropout,
                            progress=verbose, blend_x=blend_x)
        return samples, intermediates


def _batch_len(c: Any) -> int:
    if isinstance(c, dict):
        v = next(iter(c.values()))
        return _batch_len(v[0] if isinstance(v, list) else v)
    if isinstance(c, list):
        return len(c)
    return c.shape[0]

