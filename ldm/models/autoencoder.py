"""First-stage autoencoders of latent diffusion (Rombach et al. 2022, §3.1; spec ldm.md §5).

``VQModelInterface`` is what LDM-4 (cin256-v2, LSUN bedrooms) uses: ``encode`` returns pre-quantization latents and
``decode`` quantizes them first (unless ``force_not_quantize``). ``AutoencoderKL`` returns a Gaussian posterior.
Training of the first stage (losses, optimisers) is configured by ``lossconfig``; the released LDM configs use
``torch.nn.Identity`` there because the first stage is frozen.
"""
from __future__ import annotations

from contextlib import nullcontext

import pytorch_lightning as pl
import torch

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer
from ldm.util import init_from_ckpt, instantiate_from_config


def _images_from_batch(batch: dict, key: str) -> torch.Tensor:
    x = batch[key]
    if x.ndim == 3:
        x = x[..., None]
    return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()  # b h w c -> b c h w


class VQModel(pl.LightningModule):
    def __init__(self, ddconfig, lossconfig, n_embed, embed_dim, ckpt_path=None, ignore_keys=(), ckpt_prefix="",
                 image_key="image",
                 colorize_nlabels=None, monitor=None, batch_resize_range=None, scheduler_config=None,
                 lr_g_factor=1.0, remap=None, sane_index_shape=False, use_ema=False, codebook_restart_every=0):
        super().__init__()
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if colorize_nlabels is not None:
            assert isinstance(colorize_nlabels, int)
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.batch_resize_range = batch_resize_range
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self)
        if ckpt_path is not None:
            init_from_ckpt(self, ckpt_path, ignore_keys, prefix=ckpt_prefix)
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor
        # Dead-code restarts (training only; 0 = off, as in CompVis): every N steps, codes that no input chose in
        # the window are moved onto random encoder outputs of the current batch (Dhariwal et al. 2020, Jukebox §3.3).
        self.codebook_restart_every = codebook_restart_every
        self.register_buffer("_code_hits", torch.zeros(n_embed, dtype=torch.long), persistent=False)

    def ema_scope(self, context=None):
        return self.model_ema.swapped_in(self, context) if self.use_ema else nullcontext()

    def encode(self, x):
        h = self.quant_conv(self.encoder(x))
        quant, emb_loss, info = self.quantize(h)
        return quant, emb_loss, info

    def encode_to_prequant(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, input, return_pred_indices=False):
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        if return_pred_indices:
            return dec, diff, ind
        return dec, diff

    def get_input(self, batch, k):
        return _images_from_batch(batch, k)

    def _step(self, batch, split):
        x = self.get_input(batch, self.image_key)
        h = self.encode_to_prequant(x)
        quant, qloss, (_, _, ind) = self.quantize(h)
        xrec = self.decode(quant)
        loss, log = self.loss(qloss, x, xrec, split=split)
        # codebook usage: fraction of entries hit in this batch (dead codes show up here)
        log[f"{split}/code_usage"] = torch.unique(ind).numel() / float(self.n_embed)
        return loss, log, h.detach(), ind

    def training_step(self, batch, batch_idx):
        """One optimiser over encoder, decoder and codebook (the pixel loss has no discriminator)."""
        loss, log, h, ind = self._step(batch, "train")
        self.log_dict(log, prog_bar=True, on_step=True, on_epoch=False)
        if self.codebook_restart_every:
            self._restart_dead_codes(h, ind)
        return loss

    @torch.no_grad()
    def _restart_dead_codes(self, h: torch.Tensor, idx: torch.Tensor) -> None:
        flat = h.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)  # [B·H·W, embed_dim] encoder outputs
        self._code_hits += torch.bincount(idx.reshape(-1), minlength=self.n_embed)
        if (self.global_step + 1) % self.codebook_restart_every == 0:
            dead = (self._code_hits == 0).nonzero().reshape(-1)
            if len(dead):
                pick = torch.randint(0, len(flat), (len(dead),), device=flat.device)
                self.quantize.embedding.weight.data[dead] = flat[pick]
            self.log("train/restarted_codes", float(len(dead)), on_step=True, on_epoch=False)
            self._code_hits.zero_()

    def on_train_batch_end(self, *args, **kwargs):
        if self.use_ema:
            self.model_ema(self)

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        _, log, _, _ = self._step(batch, "val")
        self.log_dict(log, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        params = (list(self.encoder.parameters()) + list(self.decoder.parameters())
                  + list(self.quantize.parameters()) + list(self.quant_conv.parameters())
                  + list(self.post_quant_conv.parameters()))
        return torch.optim.Adam(params, lr=self.learning_rate, betas=(0.5, 0.9))


class VQModelInterface(VQModel):
    """VQModel as LDM's first stage: ``encode`` stops before the quantizer, ``decode`` quantizes first."""

    def __init__(self, embed_dim, *args, **kwargs):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, h, force_not_quantize=False):
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))


class AutoencoderKL(pl.LightningModule):
    def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=(), ckpt_prefix="",
                 image_key="image",
                 colorize_nlabels=None, monitor=None):
        super().__init__()
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder predicts mean and logvar)")
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            assert isinstance(colorize_nlabels, int)
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            init_from_ckpt(self, ckpt_path, ignore_keys, prefix=ckpt_prefix)

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input, sample_posterior=True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch, k):
        return _images_from_batch(batch, k)


class IdentityFirstStage(torch.nn.Module):
    """A first stage that does nothing (pixel-space diffusion through the LatentDiffusion code path)."""

    def __init__(self, *args, vq_interface=False, **kwargs):
        self.vq_interface = vq_interface
        super().__init__()

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def quantize(self, x, *args, **kwargs):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x, *args, **kwargs):
        return x
