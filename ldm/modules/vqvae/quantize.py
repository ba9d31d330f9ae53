"""Vector quantizer of the VQ first stage (van den Oord et al. 2017; taming-transformers' ``VectorQuantizer2``).

Checkpoint-compatible with taming's class: keys ``embedding.weight`` (and ``used`` with ``remap``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange


class VectorQuantizer2(nn.Module):
    """Nearest-codebook quantization z [B, C, H, W] -> z_q, with a straight-through gradient.

    Distances are ‖z‖² + ‖e‖² − 2 z·e (the original's formula, so ties break identically). The commitment loss is
    ``mean((sg[z_q] − z)²) + β mean((z_q − sg[z])²)`` with ``legacy=True`` (β on the other term otherwise); the flag
    changes gradients only.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float, remap: str | None = None, unknown_index: str = "random",
                 sane_index_shape: bool = False, legacy: bool = True):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
        self.remap = remap
        if self.remap is not None:
            self.register_buffer("used", torch.tensor(np.load(self.remap, allow_pickle=False)))
            self.re_embed = self.used.shape[0]
            self.unknown_index = unknown_index
            if self.unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed = self.re_embed + 1
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, ...]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape).to(device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > self.used.shape[0]:  # extra token
            inds[inds >= self.used.shape[0]] = 0
        return torch.gather(used[None, :][inds.shape[0] * [0], :], 1, inds).reshape(ishape)

    def forward(self, z: torch.Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        z = rearrange(z, "b c h w -> b h w c").contiguous()
        z_flattened = z.view(-1, self.e_dim)
        e = self.embedding.weight
        d = (torch.sum(z_flattened ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
             - 2 * torch.einsum("bd,dn->bn", z_flattened, rearrange(e, "n d -> d n")))  # [B·H·W, n_e]
        min_encoding_indices = torch.argmin(d, dim=1)
        z_q = self.embedding(min_encoding_indices).view(z.shape)
        if self.legacy:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()  # straight-through
        z_q = rearrange(z_q, "b h w c -> b c h w").contiguous()
        if self.remap is not None:
            min_encoding_indices = min_encoding_indices.reshape(z.shape[0], -1)
            min_encoding_indices = self.remap_to_used(min_encoding_indices).reshape(-1, 1)
        if self.sane_index_shape:
            min_encoding_indices = min_encoding_indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, min_encoding_indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple | None) -> torch.Tensor:
        """indices [B·H·W] -> codebook vectors, [B, C, H, W] when ``shape`` = (B, H, W, C) is given."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
