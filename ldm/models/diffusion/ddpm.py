"""DDPM and latent diffusion as Lightning modules (Ho et al. 2020; Rombach et al. 2022; spec ldm.md §1-3, §7-8).

State-dict layout is CompVis': the schedule buffers at top level, the UNet under ``model.diffusion_model``, the
autoencoder under ``first_stage_model``, the conditioning encoder under ``cond_stage_model`` and, with ``use_ema``,
the EMA shadows under ``model_ema``.
"""
from __future__ import annotations

import sys

from contextlib import nullcontext
from functools import partial

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from einops import rearrange

from ldm.models.autoencoder import IdentityFirstStage, VQModelInterface
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule, noise_like
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import ConfigError, count_params, default, exists, init_from_ckpt, instantiate_from_config

def disabled_train(self, mode=True):
    """Replaces ``.train`` of frozen sub-models so that Lightning cannot switch them back to training mode."""
    return self


class DDPM(pl.LightningModule):
    """Gaussian diffusion in pixel space with an ε- or x0-predicting network."""

    def __init__(self, unet_config, timesteps=1000, beta_schedule="linear", loss_type="l2", ckpt_path=None,
                 ignore_keys=(), load_only_unet=False, monitor="val/loss", use_ema=True, first_stage_key="image",
                 image_size=256, channels=3, log_every_t=100, clip_denoised=True, linear_start=1e-4,
                 linear_end=2e-2, cosine_s=8e-3, given_betas=None, original_elbo_weight=0., v_posterior=0.,
                 l_simple_weight=1., conditioning_key=None, parameterization="eps", scheduler_config=None,
                 use_positional_encodings=False, learn_logvar=False, logvar_init=0.):
        super().__init__()
        if parameterization not in ("eps", "x0"):
            raise ConfigError(f"parameterization '{parameterization}' unknown; use 'eps' or 'x0'")
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        count_params(self.model)
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        if loss_type not in ("l1", "l2"):
            raise ConfigError(f"loss_type '{loss_type}' unknown; use 'l1' or 'l2'")
        self.loss_type = loss_type
        self.learn_logvar = learn_logvar
        self.logvar = torch.full(fill_value=logvar_init, size=(self.num_timesteps,))
        if self.learn_logvar:
            self.logvar = nn.Parameter(self.logvar, requires_grad=True)

    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                          linear_end=2e-2, cosine_s=8e-3):
        """Register the 12 persistent float32 schedule buffers (computed in float64) and ``lvlb_weights``."""
        if exists(given_betas):
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                       cosine_s=cosine_s)
        alphas = 1. - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1., alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end
        to_torch = partial(torch.tensor, dtype=torch.float32)

        self.register_buffer("betas", to_torch(betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(alphas_cumprod_prev))
        # q(x_t | x_0)
        self.register_buffer("sqrt_alphas_cumprod", to_torch(np.sqrt(alphas_cumprod)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", to_torch(np.sqrt(1. - alphas_cumprod)))
        self.register_buffer("log_one_minus_alphas_cumprod", to_torch(np.log(1. - alphas_cumprod)))
        self.register_buffer("sqrt_recip_alphas_cumprod", to_torch(np.sqrt(1. / alphas_cumprod)))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", to_torch(np.sqrt(1. / alphas_cumprod - 1)))
        # q(x_{t-1} | x_t, x_0)
        posterior_variance = ((1 - self.v_posterior) * betas * (1. - alphas_cumprod_prev) / (1. - alphas_cumprod)
                              + self.v_posterior * betas)
        self.register_buffer("posterior_variance", to_torch(posterior_variance))
        # log(0) at t = 0 is clipped: the posterior variance is 0 at the start of the chain
        self.register_buffer("posterior_log_variance_clipped", to_torch(np.log(np.maximum(posterior_variance, 1e-20))))
        self.register_buffer("posterior_mean_coef1",
                             to_torch(betas * np.sqrt(alphas_cumprod_prev) / (1. - alphas_cumprod)))
        self.register_buffer("posterior_mean_coef2",
                             to_torch((1. - alphas_cumprod_prev) * np.sqrt(alphas) / (1. - alphas_cumprod)))

        if self.parameterization == "eps":
            lvlb_weights = self.betas ** 2 / (2 * self.posterior_variance * to_torch(alphas)
                                              * (1 - self.alphas_cumprod))
        else:
            lvlb_weights = 0.5 * torch.sqrt(torch.tensor(alphas_cumprod)) / (2. * 1 - torch.tensor(alphas_cumprod))
        lvlb_weights[0] = lvlb_weights[1]  # entry 0 divides by a zero posterior variance
        self.register_buffer("lvlb_weights", lvlb_weights, persistent=False)

    def adapt_checkpoint(self, sd: dict, prefix: str) -> dict:
        """A checkpoint with EMA shadows (``model_ema.*``) loaded into a model built with ``use_ema: False`` (SD's
        v1-inference.yaml and the "full-ema" files): drop the shadows, as the original's ``strict=False`` load
        did, so the live ``model.diffusion_model.*`` weights are used; said on stderr, with the switch."""
        if self.use_ema:
            return sd
        ema = [k for k in sd if k.startswith(prefix + "model_ema.")]
        if ema:
            print(f"note: ignoring the checkpoint's {len(ema)} model_ema.* keys (the config has use_ema: False, "
                  f"so the non-EMA weights are used, as in the original code); set model.params.use_ema: true to "
                  f"sample with the EMA weights", file=sys.stderr)
            sd = {k: v for k, v in sd.items() if not k.startswith(prefix + "model_ema.")}
        return sd

    def ema_scope(self, context=None):
        """Swap the EMA weights into ``self.model`` for the duration of the block (no-op without ``use_ema``)."""
        return self.model_ema.swapped_in(self.model, context) if self.use_ema else nullcontext()

    def init_from_ckpt(self, path, ignore_keys=(), only_model=False):
        """Config-driven ``ckpt_path`` loading (CompVis). Mismatches are reported, not silently ignored."""
        init_from_ckpt(self.model if only_model else self, path, ignore_keys)

    # -- forward process ----------------------------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t, t, noise):
        """x̂0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε."""
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def q_posterior(self, x_start, x_t, t):
        posterior_mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                          + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        posterior_variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def q_sample(self, x_start, t, noise=None):
        """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) n (Ho et al. 2020, Eq. 4)."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    # -- ancestral sampling -------------------------------------------------------------------------------------

    def p_mean_variance(self, x, t, clip_denoised: bool):
        model_out = self.model(x, t)
        x_recon = self.predict_start_from_noise(x, t=t, noise=model_out) if self.parameterization == "eps" \
            else model_out
        if clip_denoised:
            x_recon.clamp_(-1., 1.)
        return self.q_posterior(x_start=x_recon, x_t=x, t=t)

    @torch.no_grad()
    def p_sample(self, x, t, clip_denoised=True, repeat_noise=False):
        b, device = x.shape[0], x.device
        model_mean, _, model_log_variance = self.p_mean_variance(x=x, t=t, clip_denoised=clip_denoised)
        noise = noise_like(x.shape, device, repeat_noise)
        nonzero_mask = (1 - (t == 0).float()).reshape(b, *((1,) * (len(x.shape) - 1)))  # no noise at t == 0
        return model_mean + nonzero_mask * (0.5 * model_log_variance).exp() * noise

    # -- training -----------------------------------------------------------------------------------------------

    def get_loss(self, pred, target, mean=True):
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return torch.nn.functional.mse_loss(target, pred, reduction="mean" if mean else "none")

    def get_input(self, batch, k):
        """Images come channels-last from the data pipeline (CompVis convention): [B, H, W, C] -> [B, C, H, W]."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return rearrange(x, "b h w c -> b c h w").to(memory_format=torch.contiguous_format).float()

    def configure_optimizers(self):
        lr = self.learning_rate
        params = list(self.model.parameters())
        if self.learn_logvar:
            params = params + [self.logvar]
        return torch.optim.AdamW(params, lr=lr)

    def on_train_batch_end(self, *args, **kwargs):
        if self.use_ema:
            self.model_ema(self.model)


class LatentDiffusion(DDPM):
    """Diffusion on first-stage latents, conditioned through ``cond_stage_model`` (Rombach et al. 2022, Eq. 2)."""

    def __init__(self, first_stage_config, cond_stage_config, num_timesteps_cond=None, cond_stage_key="image",
                 cond_stage_trainable=False, concat_mode=True, cond_stage_forward=None, conditioning_key=None,
                 scale_factor=1.0, scale_by_std=False, *args, **kwargs):
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ConfigError("num_timesteps_cond must not exceed timesteps")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        try:
            self.num_downs = len(first_stage_config.params.ddconfig.ch_mult) - 1
        except Exception:
            self.num_downs = 0
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

    def make_cond_schedule(self):
        self.cond_ids = torch.full(size=(self.num_timesteps,), fill_value=self.num_timesteps - 1, dtype=torch.long)
        ids = torch.round(torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond)).long()
        self.cond_ids[:self.num_timesteps_cond] = ids

    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                          linear_end=2e-2, cosine_s=8e-3):
        super().register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        if self.shorten_cond_schedule:
            self.make_cond_schedule()

    def instantiate_first_stage(self, config):
        model = instantiate_from_config(config)
        self.first_stage_model = model.eval()
        self.first_stage_model.train = disabled_train
        for param in self.first_stage_model.parameters():
            param.requires_grad = False

    def instantiate_cond_stage(self, config):
        if not self.cond_stage_trainable:
            if config == "__is_first_stage__":
                self.cond_stage_model = self.first_stage_model
            elif config == "__is_unconditional__":
                self.cond_stage_model = None
            else:
                model = instantiate_from_config(config)
                self.cond_stage_model = model.eval()
                self.cond_stage_model.train = disabled_train
                for param in self.cond_stage_model.parameters():
                    param.requires_grad = False
        else:
            if config in ("__is_first_stage__", "__is_unconditional__"):
                raise ConfigError(f"cond_stage_trainable is true but cond_stage_config is '{config}'")
            self.cond_stage_model = instantiate_from_config(config)

    # -- conditioning and first stage ---------------------------------------------------------------------------

    @property
    def is_conditional(self) -> bool:
        return self.model.conditioning_key is not None

    def get_learned_conditioning(self, c):
        """Raw conditioning -> what the UNet consumes. ClassEmbedder: {key: labels [B]} -> [B, 1, embed_dim]."""
        if self.cond_stage_forward is None:
            if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
                c = self.cond_stage_model.encode(c)
                if isinstance(c, DiagonalGaussianDistribution):
                    c = c.mode()
            else:
                c = self.cond_stage_model(c)
        else:
            c = getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        return c

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior):
        """scale_factor · latent (a posterior sample for KL first stages)."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        if predict_cids:
            if z.dim() == 4:
                z = torch.argmax(z.exp(), dim=1).long()
            z = self.first_stage_model.quantize.get_codebook_entry(z, shape=None)
            z = rearrange(z, "b h w c -> b c h w").contiguous()
        z = 1. / self.scale_factor * z
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z, force_not_quantize=predict_cids or force_not_quantize)
        return self.first_stage_model.decode(z)

    def differentiable_decode_first_stage(self, z, force_not_quantize=False):
        z = 1. / self.scale_factor * z
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z, force_not_quantize=force_not_quantize)
        return self.first_stage_model.decode(z)

    # -- the denoiser -------------------------------------------------------------------------------------------

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        """ε_θ(x_t, t, c). A non-dict ``cond`` is routed by ``conditioning_key`` (spec ldm.md §2)."""
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        x_recon = self.model(x_noisy, t, **cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon

    # -- training -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def get_input(self, batch, k, return_first_stage_outputs=False, force_c_encode=False, cond_key=None,
                  return_original_cond=False, bs=None):
        x = super().get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = xc = None
        if self.model.conditioning_key is not None:
            cond_key = default(cond_key, self.cond_stage_key)
            if cond_key != self.first_stage_key:
                if cond_key in ("caption", "coordinates_bbox", "txt"):  # lists of prompts stay lists
                    xc = batch[cond_key]
                elif cond_key == "class_label":
                    xc = batch
                else:
                    xc = super().get_input(batch, cond_key).to(self.device)
            else:
                xc = x
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc if isinstance(xc, (dict, list)) else xc.to(self.device))
            else:
                c = xc
            if bs is not None:
                c = {k_: v[:bs] for k_, v in c.items()} if isinstance(c, dict) else c[:bs]
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc)
        return out

    def forward(self, x, c, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is not None:
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            if self.shorten_cond_schedule:
                tc = self.cond_ids[t.cpu()].to(self.device)  # (a CPU table, CUDA timesteps)
                c = self.q_sample(x_start=c, t=tc, noise=torch.randn_like(c.float()))
        return self.p_losses(x, c, t, *args, **kwargs)

    def p_losses(self, x_start, cond, t, noise=None):
        """L_simple = ‖n − ε_θ(x_t, t, c)‖² per sample (Ho et al. 2020, Eq. 14), plus the weighted VLB term."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        prefix = "train" if self.training else "val"
        target = x_start if self.parameterization == "x0" else noise
        loss_simple = self.get_loss(model_output, target, mean=False).mean([1, 2, 3])
        loss_dict = {f"{prefix}/loss_simple": loss_simple.mean()}
        logvar_t = self.logvar.to(self.device)[t]
        loss = loss_simple / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def shared_step(self, batch, **kwargs):
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def training_step(self, batch, batch_idx):
        loss, loss_dict = self.shared_step(batch)
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True)
        self.log("global_step", float(self.global_step), prog_bar=False, logger=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        _, loss_dict = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
        self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=False, on_epoch=True)
        self.log_dict({k + "_ema": v for k, v in loss_dict_ema.items()}, prog_bar=False, logger=True,
                      on_step=False, on_epoch=True)

    @torch.no_grad()
    def on_train_batch_start(self, batch, batch_idx):
        # scale_by_std: set scale_factor = 1 / std(latents) once, from the very first batch (Rombach et al. 2022, §4.3)
        if (self.scale_by_std and self.current_epoch == 0 and self.global_step == 0 and batch_idx == 0
                and not self.restarted_from_ckpt):
            x = super().get_input(batch, self.first_stage_key).to(self.device)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
            del self.scale_factor
            self.register_buffer("scale_factor", 1. / z.flatten().std())
            print(f"setting self.scale_factor to {self.scale_factor}")

    def configure_optimizers(self):
        lr = self.learning_rate
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params = params + list(self.cond_stage_model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        opt = torch.optim.AdamW(params, lr=lr)
        if self.use_scheduler:
            scheduler = instantiate_from_config(self.scheduler_config)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=scheduler.schedule)
            return [opt], [{"scheduler": sched, "interval": "step", "frequency": 1}]
        return opt


class DiffusionWrapper(pl.LightningModule):
    """Routes conditioning into the UNet by ``conditioning_key`` (spec ldm.md §2)."""

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        if conditioning_key not in (None, "concat", "crossattn", "hybrid", "adm"):
            raise ConfigError(f"conditioning_key '{conditioning_key}' unknown; "
                              f"use concat, crossattn, hybrid, adm or leave it unset")
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: list | None = None, c_crossattn: list | None = None):
        if self.conditioning_key is None:
            return self.diffusion_model(x, t)
        if self.conditioning_key == "concat":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t)
        if self.conditioning_key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if self.conditioning_key == "hybrid":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t, context=torch.cat(c_crossattn, 1))
        return self.diffusion_model(x, t, y=c_crossattn[0])  # adm


__all__ = ["DDPM", "LatentDiffusion", "DiffusionWrapper", "IdentityFirstStage"]
