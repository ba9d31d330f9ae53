"""Conditioning encoders. Only the class embedder is needed by the class-conditional LDMs we target.

CompVis' text encoders (BERT, CLIP, T5) need network downloads and are not provided; a config naming them fails
with a one-line ConfigError from ``instantiate_from_config``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


class ClassEmbedder(nn.Module):
    """Class label -> one context token: ``batch[key]`` [B] -> [B, 1, embed_dim].

    The last class (``n_classes - 1``; 1000 for cin256-v2) is the null label used for classifier-free guidance.
    ``ucg_rate``: in training mode, replace each label by the null class with this probability (label dropout, so
    one network learns both ε(x, c) and ε(x, ∅); Ho & Salimans 2022).
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class", ucg_rate: float = 0.0):
        super().__init__()
        if not 0.0 <= ucg_rate < 1.0:
            raise ValueError(f"ucg_rate must be in [0, 1), got {ucg_rate}")
        self.key = key
        self.ucg_rate = ucg_rate
        self.embedding = nn.Embedding(n_classes, embed_dim)

    @property
    def n_classes(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, batch: dict, key: str | None = None) -> torch.Tensor:
        key = self.key if key is None else key
        c = batch[key]
        if self.training and self.ucg_rate > 0.0:
            drop = torch.rand(c.shape, device=c.device) < self.ucg_rate
            c = torch.where(drop, torch.full_like(c, self.n_classes - 1), c)
        return self.embedding(c[:, None])
