"""Conditioning encoders: the class embedder of the class-conditional LDMs and SD v1's CLIP text encoder.

CompVis' BERT and T5 encoders need network downloads and are not provided; a config naming them fails with a
one-line ConfigError from ``instantiate_from_config``. ``FrozenCLIPEmbedder`` needs none: its text tower is built
from its config and takes its weights from the SD checkpoint, its tokenizer from the vendored CLIP BPE file.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

import torch
import torch.nn as nn

from ldm.modules.encoders.clip_text import CLIPTextConfig, CLIPTextModel
from ldm.modules.encoders.clip_tokenizer import BPE_FILE, CLIPTokenizer
from ldm.util import ConfigError

# the text towers FrozenCLIPEmbedder's ``version`` names (transformers hub ids), as configs
CLIP_VERSIONS = {"openai/clip-vit-large-patch14": CLIPTextConfig()}


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


class FrozenCLIPEmbedder(AbstractEncoder):
    """SD v1's text encoder (Rombach et al. 2022, §4.3.2): prompts -> CLIP ``last_hidden_state`` [B, 77, width].

    ``version`` names the text tower (only ``openai/clip-vit-large-patch14``, SD v1's, is known); ``text_config``
    (a dict of ``CLIPTextConfig`` fields) replaces it for other sizes (the tiny test models, the embedded text
    default). ``device`` is accepted for config compatibility and ignored: tokens go where the model is (the
    original sent them to "cuda" by default). ``trainable`` (not in CompVis) leaves the weights trainable, for
    training a small text encoder from scratch; by default they are frozen, as the original's ``freeze()`` does.
    """

    TRANSFORMER = "transformer.text_model."

    def __init__(self, version: str = "openai/clip-vit-large-patch14", device: str = "cuda", max_length: int = 77,
                 text_config: Mapping[str, Any] | None = None, tokenizer_file: str | None = None,
                 trainable: bool = False):
        super().__init__()
        if text_config is not None:
            try:
                config = CLIPTextConfig(**dict(text_config))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"FrozenCLIPEmbedder text_config: {e}") from None
        elif version in CLIP_VERSIONS:
            config = CLIP_VERSIONS[version]
        else:
            raise ConfigError(f"FrozenCLIPEmbedder version {version!r} is not known offline (known: "
                              f"{', '.join(CLIP_VERSIONS)}); give its sizes as text_config")
        if max_length > config.max_position_embeddings:
            raise ConfigError(f"max_length {max_length} exceeds the text model's {config.max_position_embeddings} "
                              f"positions")
        self.tokenizer = CLIPTokenizer(config.vocab_size, max_length, tokenizer_file or BPE_FILE)
        self.transformer = CLIPTextModel(config)
        self.max_length = max_length
        self.trainable = trainable
        if not trainable:
            self.freeze()

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text: str | list[str]) -> torch.Tensor:
        tokens = self.tokenizer(text).to(self.transformer.text_model.embeddings.position_ids.device)
        return self.transformer(tokens)

    def encode(self, text: str | list[str]) -> torch.Tensor:
        return self(text)

    def adapt_checkpoint(self, sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """Bring the text-encoder keys of a checkpoint to the layout of the released SD v1 files (fixture README,
        "loading pitfalls"), announcing every change on stderr:

        - ``{prefix}transformer.{embeddings,encoder,final_layer_norm}.*`` (transformers ≥ 5.6 flattened
          CLIPTextModel, NovelAI-derived files) -> ``{prefix}transformer.text_model.*``;
        - ``position_ids``: absent (transformers ≥ 4.31 saves it non-persistently) or not arange (merged files
          carry float or corrupted copies) -> arange; it is an index, never a weight.
        """
        head = prefix + "transformer."
        full = prefix + self.TRANSFORMER
        flat = [k for k in sd if k.startswith(head) and not k.startswith(full)]
        if flat and not any(k.startswith(full) for k in sd):
            sd = {(full + k[len(head):] if k.startswith(head) else k): v for k, v in sd.items()}
            print(f"note: text encoder keys {head}* (flattened CLIPTextModel layout) read as {full}*",
                  file=sys.stderr)
        if not any(k.startswith(full) for k in sd):
            return sd  # nothing of the text encoder: the strict load names the missing keys
        key = full + "embeddings.position_ids"
        want = self.transformer.text_model.embeddings.position_ids
        got = sd.get(key)
        if got is not None and not (got.shape == want.shape and not got.is_floating_point()
                                    and torch.equal(got.cpu(), want.cpu())):
            print(f"note: {key} in the checkpoint is not arange({want.shape[-1]}) (dtype {got.dtype}); using "
                  f"arange (merged checkpoints are known to carry damaged copies)", file=sys.stderr)
        sd = dict(sd)
        sd[key] = want.detach().clone().cpu()
        return sd
