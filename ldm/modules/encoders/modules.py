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
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    @property
    def n_classes(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, batch: dict, key: str | None = None) -> torch.Tensor:
        key = self.key if key is None else key
        return self.embedding(batch[key][:, None])
