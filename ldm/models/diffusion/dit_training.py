"""The training objective of a learned-variance ε-model as DiT trains it (Peebles & Xie 2023 §3; DiT's
``create_diffusion(timestep_respacing="")``: linear β, ``learn_sigma=True``, loss type MSE): Improved DDPM's hybrid
loss (Nichol & Dhariwal 2021 §3.1, Eq. 16) L_hybrid = L_simple + L_vlb with λ = 1 (the MSE variant does not rescale
L_vlb by T/1000).

* L_simple = mean over the latent's elements of (ε − ε_θ(x_t, t))² (Ho et al. 2020 Eq. 14).
* L_vlb is the variational bound's term at t, in bits per dimension, for the **variance only**: the mean is built from
  the detached ε_θ ("stop-gradient", Improved DDPM §3.1), Σ_θ from v as in sampling (Eq. 15, unclamped):
  L_t = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) (Ho et al. Eq. 5) for t > 0, and at t = 0 the discretized
  Gaussian decoder's −log p(x_0 | x_1) (Ho et al. Eq. 13, 256 bins over [−1, 1]), each averaged over elements and
  divided by ln 2.

All tables are the un-respaced chain's (``RespacedSchedule.make("")``), each float64 entry cast to float32 before use
as the original does. Written from the equations; ``tests/test_dit_training.py`` checks the pieces against closed
forms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ldm.models.diffusion.respace import RespacedSchedule


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) by the tanh approximation 0.5 (1 + tanh(√(2/π) (x + 0.044715 x³))) (Page 1977), as Ho et al.'s code."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element under N(mean, e^{2 log_scale}) integrated over x's bin of width 2/255 in [−1, 1], the edge
    bins extended to ±∞ (Ho et al. 2020 Eq. 13); probabilities floored at 1e-12."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


@dataclass(frozen=True, eq=False)
class TrainingTables:
    """The per-timestep float32 tables of the T-step chain the loss indexes with t [B]."""

    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    log_betas: torch.Tensor

    @classmethod
    def make(cls, num_timesteps: int = 1000) -> "TrainingTables":
        """Linear β over ``num_timesteps`` (DiT's ``create_diffusion``), no respacing."""
        tables = RespacedSchedule.make("", num_timesteps).tables()
        return cls(**{name: torch.from_numpy(np.asarray(tables[name], dtype=np.float64)).float()
                      for name in cls.__dataclass_fields__})

    def __len__(self) -> int:
        return len(self.log_betas)

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at timesteps t [B], shaped [B, 1, ..., 1] to broadcast against ``like``."""
        values = getattr(self, name).to(like.device)[t]
        return values.view(-1, *([1] * (like.ndim - 1)))


def q_sample(tables: TrainingTables, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (Ho et al. 2020 Eq. 4)."""
    return tables.at("sqrt_alphas_cumprod", t, x0) * x0 + tables.at("sqrt_one_minus_alphas_cumprod", t, x0) * noise


def vlb_bits(tables: TrainingTables, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             v: torch.Tensor) -> torch.Tensor:
    """L_t in bits/dim per sample [B] for the model's (ε, v) at (x_t, t); gradients flow through whatever ε and v
    carry (the hybrid loss passes ε detached)."""
    coef1, coef2 = tables.at("posterior_mean_coef1", t, x0), tables.at("posterior_mean_coef2", t, x0)
    true_mean = coef1 * x0 + coef2 * x_t
    true_log_var = tables.at("posterior_log_variance_clipped", t, x0)
    frac = (v + 1) / 2
    model_log_var = frac * tables.at("log_betas", t, x0) + (1 - frac) * true_log_var
    pred_x0 = tables.at("sqrt_recip_alphas_cumprod", t, x0) * x_t - tables.at("sqrt_recipm1_alphas_cumprod", t,
                                                                              x0) * eps
    model_mean = coef1 * pred_x0 + coef2 * x_t
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def hybrid_loss(model_out: torch.Tensor, tables: TrainingTables, x0: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample terms {"mse", "vb", "loss"} [B] of Improved DDPM's hybrid loss for ``model_out`` = [ε, v] of
    [B, 2C, ...]: L_simple on ε plus L_vlb with ε detached, so L_vlb trains only v (Improved DDPM §3.1)."""
    channels = x0.shape[1]
    if model_out.shape[1] != 2 * channels:
        raise ValueError(f"a learned-variance model returns 2·{channels} channels (ε, v), got {model_out.shape[1]}")
    eps, v = model_out[:, :channels], model_out[:, channels:]
    mse = _mean_flat((noise - eps) ** 2)
    vb = vlb_bits(tables, x0, x_t, t, eps.detach(), v)
    return {"mse": mse, "vb": vb, "loss": mse + vb}
