"""First-stage autoencoders of latent diffusion (Rombach et al. 2022, §3.1; spec ldm.md §5).

``VQModelInterface`` is what LDM-4 (cin256-v2, LSUN bedrooms) uses: ``encode`` returns pre-quantization latents and
``decode`` quantizes them first (unless ``force_not_quantize``). ``AutoencoderKL`` returns a Gaussian posterior.
Training of the first stage (losses, optimisers) is configured by ``lossconfig``; the released LDM configs use
``torch.nn.Identity`` there because the first stage is frozen.
"""
from __future__ import annotations

from contextlib import contextmanager

import pytorch_lightning as pl
import torch

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer
from ldm.util import instantiate_from_config, load_checkpoint_file, state_dict_from_checkpoint


def _init_from_ckpt(module: torch.nn.Module, path: str, ignore_keys=()) -> None:
    sd = state_dict_from_checkpoint(load_checkpoint_file(path), path)
    sd = {k: v for k, v in sd.items() if not any(k.startswith(ik) for ik in ignore_keys)}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    print(f"Restored {type(module).__name__} from {path}: {len(missing)} missing, {len(unexpected)} unexpected keys")


def _images_from_batch(batch: dict, key: str) -> torch.Tensor:
    x = batch[key]
    if x.ndim == 3:
        x = x[..., None]
    return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()  # b h w c -> b c h w


class VQModel(pl.LightningModule):
    def __init__(self, ddconfig, lossconfig, n_embed, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None, batch_resize_range=None, scheduler_config=None,
                 lr_g_factor=1.0, remap=None, sane_index_shape=False, use_ema=False):
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
            _init_from_ckpt(self, ckpt_path, ignore_keys)
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor

    @contextmanager
    def ema_scope(self, context=None):
        if self.use_ema:
            self.model_ema.store(self.parameters())
            self.model_ema.copy_to(self)
            if context is not None:
                print(f"{context}: Switched to EMA weights")
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.parameters())
                if context is not None:
                    print(f"{context}: Restored training weights")

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
    def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
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
            _init_from_ckpt(self, ckpt_path, ignore_keys)

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
