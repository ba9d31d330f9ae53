"""Schedules and layer helpers of the CompVis diffusion code (spec ldm.md §3, §4, §6).

Schedules are computed in float64 and cast to float32 by the caller, as the original does; the DDIM
discretisation keeps the original's ``+1`` offset so that released checkpoints sample exactly as published.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


_F64 = dict(dtype=torch.float64, device="cpu")


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """β_1..β_T in float64. ``linear`` is linear in √β (Rombach et al. 2022 / CompVis), not in β."""
    # explicit CPU: the model may be built under a `torch.device("meta")` context
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, **_F64) ** 2
    elif schedule == "cosine":
        # Nichol & Dhariwal 2021, Eq. 17; clipped at 0.999.
        timesteps = torch.arange(n_timestep + 1, **_F64) / n_timestep + cosine_s
        alphas = torch.cos(timesteps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = np.clip((1 - alphas[1:] / alphas[:-1]).numpy(), a_min=0, a_max=0.999)
        return betas
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, **_F64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, **_F64) ** 0.5
    else:
        raise ValueError(f"beta schedule '{schedule}' unknown; use linear, cosine, sqrt_linear or sqrt")
    return betas.numpy()


def make_ddim_timesteps(discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int,
                        verbose: bool = False) -> np.ndarray:
    """The DDPM timesteps a DDIM chain visits, ascending (Song et al. 2021, §4.2; CompVis discretisation).

    ``uniform``: ``range(0, T, T // S) + 1``. The +1 (kept for parity with released results) means the chain
    starts at t = T - T//S + 1 and ends with a UNet call at t = 1, and the number of steps is ceil(T / (T // S)),
    which is not always S. Where the +1 would reach t = T the original crashes; we refuse with a clear message.
    """
    if num_ddim_timesteps < 1 or num_ddim_timesteps > num_ddpm_timesteps:
        raise ValueError(f"DDIM steps must be in 1..{num_ddpm_timesteps}, got {num_ddim_timesteps}")
    if discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif discr_method == "quad":
        steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * .8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise ValueError(f"DDIM discretisation '{discr_method}' unknown; use 'uniform' or 'quad'")
    steps_out = steps + 1
    if steps_out.max() >= num_ddpm_timesteps:
        raise ValueError(
            f"{num_ddim_timesteps} DDIM steps with the CompVis '+1' offset would visit t={steps_out.max()}, beyond "
            f"the last trained timestep {num_ddpm_timesteps - 1}; pick another step count (e.g. 10, 20, 50, 100, 250)")
    if verbose:
        print(f"Selected timesteps for ddim sampler: {steps_out}")
    return steps_out


def make_ddim_sampling_parameters(alphacums: np.ndarray, ddim_timesteps: np.ndarray, eta: float,
                                  verbose: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ᾱ_t, ᾱ_prev, σ_t) for the visited timesteps, in float64 (DDIM Eq. 16).

    ᾱ_prev of the last step is ᾱ_0 = 1 - β_1 (CompVis), not 1.
    σ_t = η √((1 - ᾱ_prev) / (1 - ᾱ_t)) √(1 - ᾱ_t / ᾱ_prev).
    """
    alphacums = np.asarray(alphacums, dtype=np.float64)
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        print(f"Selected alphas for ddim sampler: a_t: {alphas}; a_(t-1): {alphas_prev}")
        print(f"For the chosen value of eta, which is {eta}, this results in the following sigma_t schedule "
              f"for ddim sampler {sigmas}")
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: tuple) -> torch.Tensor:
    """Gather ``a[t]`` and reshape to broadcast over a batch of shape ``x_shape``: [B] -> [B, 1, ..., 1]."""
    b = t.shape[0]
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def checkpoint(func, inputs, params, flag: bool):
    """Gradient checkpointing when ``flag`` and gradients are needed; otherwise a plain call (same numbers)."""
    if flag and torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim]: cos half first, frequencies exp(-ln(max_period) i / (dim // 2))."""
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 (the UNet's ``normalization``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dimensions: {dims}")
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Module:
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dimensions: {dims}")
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def noise_like(shape, device, repeat: bool = False) -> torch.Tensor:
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


def interpolate_nearest(x: torch.Tensor, dims: int) -> torch.Tensor:
    if dims == 3:
        return F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
    return F.interpolate(x, scale_factor=2, mode="nearest")
