"""DiT, the class-conditional latent diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers", §3.2, Fig. 3): patchified latents + a fixed 2-D sin-cos position table, transformer blocks with
adaLN-Zero conditioning on c = t-embedding + class-embedding, a final adaLN layer, and an output of 2C channels
(ε and the learned-variance interpolation values v of Nichol & Dhariwal 2021 Eq. 15).

The module tree reproduces the released models' ``state_dict`` key for key (``DiT-XL-2-256x256.pt``: 292 keys,
``pos_embed`` included because it is a non-trainable ``nn.Parameter``), with the timm-compatible names
``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` but without a timm dependency. The numeric conventions of the
original that a port can get wrong (fixture README ``../shared/fixtures/dit``, pitfalls 1-6, 13, 16):

* the timestep features are ``[cos, sin]`` (cos first) with frequencies exp(−ln(10⁴)·k/half), k < half;
* ``pos_embed``'s first half encodes the token's column, the second its row;
* the null class is row ``num_classes`` of the label table (present only when ``class_dropout_prob > 0``), and
  label dropout happens only in train mode;
* ``forward_with_cfg`` guides only the first three output channels (see there).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.errors import UserFacingError
from ldm.util import instantiate_from_config

# The paper's Table 1 sizes (depth, hidden size D, heads) × patch sizes 2, 4, 8: "DiT-XL/2" ... "DiT-S/8".
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
DIT_SIZES: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": patch}
    for size, (depth, hidden, heads) in _SIZES.items() for patch in (2, 4, 8)}

# The first-stage VAE (sd-vae-ft-ema / -mse) downsamples by 8; DiT's sample.py uses input_size = image_size // 8.
VAE_DOWNSAMPLING = 8


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps t [N] -> [N, dim], DiT's ``[cos, sin]`` order.

    Frequencies ω_k = exp(−ln(max_period)·k/half), k < half = dim // 2 (divided by ``half``, not ``half − 1`` as
    in the DDPM/LDM ``get_timestep_embedding``, which also puts sin first); an odd ``dim`` gets a zero column."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        feats = torch.cat([feats, torch.zeros_like(feats[:, :1])], dim=-1)
    return feats


def sincos_position_table(dim: int, grid: int) -> np.ndarray:
    """The fixed 2-D position table [grid², dim] in float64 (MAE's construction, used by DiT §3.1 "Patchify").

    Token ``row·grid + col`` gets ``[sin(col·ω), cos(col·ω), sin(row·ω), cos(row·ω)]`` with
    ω_k = 10000^(−k/(dim/4)), k < dim/4: the column half comes first (the original builds its mesh width-first)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs a hidden size divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1. / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    pos = np.arange(grid, dtype=np.float64)
    rows, cols = np.meshgrid(pos, pos, indexing="ij")          # [grid, grid]: rows[r, c] = r, cols[r, c] = c

    def half_table(p: np.ndarray) -> np.ndarray:
        angles = p.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([half_table(cols), half_table(rows)], axis=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift, with per-sample [N, D] parameters broadcast over the tokens of x [N, T, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Latent [N, C, H, W] -> tokens [N, (H/p)·(W/p), D] by a p×p stride-p convolution, tokens in row-major order."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.input_size = input_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            # the position table has a fixed token count (the original's timm PatchEmbed asserts the same)
            raise UserFacingError(f"DiT built for {self.input_size}×{self.input_size} latents got "
                                  f"{tuple(x.shape[-2:])}; use the config of the matching image size "
                                  f"(image_size = {VAE_DOWNSAMPLING}·latent size)")
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t -> 256 sinusoidal features -> Linear, SiLU, Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.frequency_size))


class LabelEmbedder(nn.Module):
    """Class labels -> embeddings; with label dropout (classifier-free guidance training) the table has one extra
    row, the null class ``num_classes``. Dropout happens in train mode only, or where ``force_drop_ids == 1``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            dropped = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            dropped = force_drop_ids == 1
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.drop(labels, force_drop_ids)
        rows = self.embedding_table.num_embeddings
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= rows):
            null = f", null class {self.num_classes}" if rows > self.num_classes else ""
            raise UserFacingError(f"class labels must lie in [0, {rows - 1}] for this DiT ({self.num_classes} "
                                  f"classes{null}), got {int(labels.min())}..{int(labels.max())}")
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with timm's ``qkv`` / ``proj`` layout (qkv bias on), softmax(q·kᵀ/√d_head)·v."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        # the fused kernel, as timm >= 0.9 in the reference run (the explicit form differs by float rounding only)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, as DiT) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block (DiT §3.2): (shift, scale, gate) for attention and for the MLP, in that order, regressed from
    SiLU(c); each branch's output is gated before the residual sum. LayerNorms have no affine parameters."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN (shift first, then scale) and a linear map of each token to its p·p·C_out patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The DiT denoiser: ``forward(x, t, y)`` -> [N, 2C, H, W] (ε, then v) with ``learn_sigma``, else [N, C, H, W].

    Constructor arguments are the original's, so ``DiT(**config)`` of a released size builds its exact key set.
    """

    # forward_with_cfg guides this many leading output channels: the original hard-codes 3, not in_channels.
    cfg_channels = 3

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"latent size {input_size} is not a multiple of the patch size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma, self.num_classes, self.num_heads = learn_sigma, num_classes, num_heads
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        # fixed, but a Parameter (requires_grad False) as in the original, so it is part of the state_dict
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def null_class(self) -> int:
        """The label of the unconditional embedding (``num_classes``); DiT's scripts hard-code 1000 instead."""
        if self.y_embedder.embedding_table.num_embeddings == self.num_classes:
            raise UserFacingError("this DiT has no null-class embedding (class_dropout_prob = 0): classifier-free "
                                  "guidance is not possible; sample with cfg scale 1 and no null labels")
        return self.num_classes

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation (§3.2 "adaLN-Zero"): Xavier-uniform linear and patch weights, zero biases, N(0, 0.02)
        class table and timestep MLP, the sin-cos table, and zeroed modulation and output layers, so that every
        block starts as the identity. Loading a checkpoint overwrites all of it."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))       # as a linear map of the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.pos_embed.device.type != "meta":
            self.pos_embed.copy_(torch.from_numpy(sincos_position_table(self.pos_embed.shape[-1],
                                                                        self.grid_size)).float()[None])
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [N, g², p·p·C_out] -> [N, C_out, g·p, g·p]; a token's vector is ordered (p_row, p_col, channel)."""
        n, g, p, c = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)    # n, c, g_row, p_row, g_col, p_col
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ε (and v) for latents x [N, C, H, W] at timesteps t [N] (fractional allowed) with labels y [N]."""
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance exactly as the original DiT (Ho & Salimans 2022 with DiT's conventions).

        The batch is [conditional half; unconditional half]: y = [labels…, null…]. Only the **first half of x** is
        used, for both passes (the second half's values are ignored: the model runs on cat([x₁, x₁]) with t and y
        whole). Guidance ε = u + s·(c − u) is applied to the **first three output channels only** (``cfg_channels``,
        hard-coded 3 in the original for reproducibility, not ``in_channels``) and written to both halves; the other
        channels -- ε channel 3 of a 4-channel latent and all the variance values v -- keep the conditional output in
        the first half and the unconditional output in the second. At s = 1 the guided channels equal the
        conditional ones only up to float rounding (u + 1·(c − u))."""
        if x.shape[0] % 2:
            raise UserFacingError(f"forward_with_cfg needs an even batch [conditional; unconditional], "
                                  f"got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        guided, rest = out[:, :self.cfg_channels], out[:, self.cfg_channels:]
        cond, uncond = guided.chunk(2, dim=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def dit_config(name: str = "DiT-XL/2", image_size: int = 256, num_classes: int = 1000, in_channels: int = 4,
               **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of a named size at ``image_size`` (latent size image_size // 8), as DiT's sample.py
    builds ``DiT_models[name](input_size=image_size // 8, num_classes=...)``; ``overrides`` replace any of them."""
    if name not in DIT_SIZES:
        raise UserFacingError(f"unknown DiT size {name!r}; known: {', '.join(DIT_SIZES)}")
    if image_size % VAE_DOWNSAMPLING:
        raise UserFacingError(f"image size {image_size} is not a multiple of {VAE_DOWNSAMPLING} (the VAE's "
                              f"downsampling); DiT's released sizes are 256 and 512")
    config = dict(input_size=image_size // VAE_DOWNSAMPLING, in_channels=in_channels, mlp_ratio=4.0,
                  class_dropout_prob=0.1, num_classes=num_classes, learn_sigma=True, **DIT_SIZES[name])
    unknown = set(overrides) - set(config)
    if unknown:
        raise UserFacingError(f"unknown DiT argument(s) {sorted(unknown)}; known: {sorted(config)}")
    config.update(overrides)
    if config["input_size"] % config["patch_size"]:
        raise UserFacingError(f"{name} at image size {image_size}: latent size {config['input_size']} is not a "
                              f"multiple of the patch size {config['patch_size']}")
    return config


def named_dit(name: str = "DiT-XL/2", image_size: int = 256, num_classes: int = 1000, **overrides: Any) -> DiT:
    """A DiT of a named size (``target: ldm.modules.dit.named_dit`` with ``params: {name: DiT-B/4, image_size: 256}``
    in a config)."""
    return DiT(**dit_config(name, image_size, num_classes, **overrides))


def build_dit(config: Mapping[str, Any]) -> DiT:
    """A DiT from a config's ``model`` section (``{target, params}``) or from plain constructor arguments."""
    if "target" in config:
        model = instantiate_from_config(config)
        if not isinstance(model, DiT):
            raise UserFacingError(f"config target {config['target']} does not build a DiT")
        return model
    return DiT(**config)
