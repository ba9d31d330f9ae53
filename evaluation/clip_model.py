"""A CLIP image-text model (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") in plain torch, loaded strictly from a LOCAL checkpoint; nothing is downloaded. It serves the CLIP score
(evaluation/clip_score.py; Hessel et al. 2021).

One model class, ``CLIPImageText``, with the parameter names of ``transformers.CLIPModel``; its text tower is the
project's ``ldm.modules.encoders.clip_text.CLIPTextTransformer`` (SD v1's text encoder, causal mask, quick-GELU).
Two checkpoint layouts, told apart by their keys:

* transformers ``CLIPModel``: a folder with ``config.json`` and ``pytorch_model.bin`` / ``model.safetensors`` (or
  their sharded ``*.index.json``), or one state-dict file with ``config.json`` beside it (or ``config=``). Keys
  ``text_model.*``, ``vision_model.{embeddings,pre_layrnorm,encoder.layers.{i},post_layernorm}.*``,
  ``{visual,text}_projection.weight`` (no bias), ``logit_scale``; sizes and ``hidden_act`` from config.json.
* open_clip / OpenAI: one state dict (``.pt``/``.bin``, or a folder holding ``open_clip_pytorch_model.bin``), keys
  ``visual.*``, ``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.*``, ``ln_final``,
  ``text_projection`` [width, embed] (x @ P), ``logit_scale``. Sizes are inferred from the shapes as OpenAI's
  ``build_model`` does (heads = width // 64, except the open_clip towers whose head width is not 64: ViT-H/14,
  g/14, bigG/14); the state dict is converted (``attn.in_proj_*`` split into q, k, v; projections transposed) and
  compared key by key in its own names first, so a mismatch names the open_clip keys. The activation is not in the
  state dict: OpenAI's weights use quick-GELU (the default), LAION-trained open_clip weights plain GELU
  (``activation="gelu"``). OpenAI's released ``ViT-*.pt`` files are TorchScript archives; they are read (with
  ``torch.jit.load``, state dict only, nothing is run) only with ``trust=True``.

Every file is read with ``torch.load(weights_only=True)`` (``.safetensors`` when the package is installed); a missing,
unexpected or reshaped key is an error naming the first of them, never a partial load.

Tokens: ``ldm``'s CLIPTokenizer for both layouts, padding with <|endoftext|> as transformers does (OpenAI's tokenizer
pads with 0). The text feature reads one position, the first <|endoftext|> (argmax of the ids: it is the largest id),
and under the causal mask no position attends to later ones, so the padding cannot change it. Prompts longer than the
context (77 tokens) are truncated, as both tokenizers do.

Images (CLIP's preprocessing, in torch on uint8 NHWC batches): shorter side resized to the model's image size
(antialiased bicubic in PIL's two 8-bit passes, rows then columns), center crop, [0, 1], normalised with CLIP's
mean/std.
"""
from __future__ import annotations

import json
import math
import sys
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.fileio import file_sha256
from ldm.modules.encoders.clip_text import (CLIPAttention, CLIPEncoder, CLIPMLP, CLIPTextConfig, CLIPTextTransformer,
                                            quick_gelu)
from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer
from ldm.util import (CheckpointError, StateDictMismatch, UserFacingError, compare_state_dict, load_checkpoint_file,
                      state_dict_from_checkpoint, trust_from_env)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}
# open_clip vision towers whose head width is not OpenAI's 64 (open_clip model_configs: head_width 80, 88, 104)
OPEN_CLIP_VISION_HEADS = {1280: 16, 1408: 16, 1664: 16}
# integer attributes OpenAI's TorchScript files carry in their state dict (build_model drops them too)
OPENAI_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")
TRANSFORMERS_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for the fields a config.json leaves out
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu")
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu")


def _has_safetensors() -> bool:
    """``.safetensors`` files are read only when the optional package happens to be installed."""
    import importlib.util
    return importlib.util.find_spec("safetensors") is not None


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Sizes of the ViT image tower (field names as transformers' CLIPVisionConfig, which the shared encoder
    layers read)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} "
                             f"heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


class _BidirectionalAttention(CLIPAttention):
    """The image tower's attention: the text tower's, without the causal mask (every patch sees every patch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(CLIPMLP):
    """fc1 → activation → fc2 with a chosen activation (CLIPMLP fixes quick-GELU; LAION weights use GELU)."""

    def __init__(self, config, activation: str):
        super().__init__(config)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _set_layers(encoder: CLIPEncoder, config, activation: str, causal: bool) -> None:
    for layer in encoder.layers:
        if not causal:
            layer.self_attn = _BidirectionalAttention(config)
        if activation != "quick_gelu":
            layer.mlp = _MLP(config, activation)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=p, stride=p, bias=False)
        n = (config.image_size // p) ** 2 + 1
        self.position_embedding = nn.Embedding(n, d)
        # an index, never a weight: the loader sets arange whatever the file holds (transformers ≥ 4.31 omits it)
        self.register_buffer("position_ids", torch.arange(n).expand(1, -1).clone())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)           # [B, grid², D]
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], dim=1)
        return x + self.position_embedding(self.position_ids)


class CLIPVisionTransformer(nn.Module):
    """Pixels [B, 3, S, S] (normalised) -> post-LayerNorm class token [B, hidden_size]."""

    def __init__(self, config: CLIPVisionConfig, activation: str = "quick_gelu"):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)   # sic: transformers' name
        self.encoder = CLIPEncoder(config)
        _set_layers(self.encoder, config, activation, causal=False)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.pre_layrnorm(self.embeddings(pixels)))[:, 0])


class CLIPImageText(nn.Module):
    """CLIP with transformers' CLIPModel parameter names: ``encode_text`` / ``encode_image`` give the projected
    (unnormalised) embeddings the contrastive loss compares."""

    def __init__(self, text: CLIPTextConfig, vision: CLIPVisionConfig, projection_dim: int,
                 text_activation: str = "quick_gelu", vision_activation: str = "quick_gelu"):
        super().__init__()
        self.text_config, self.vision_config, self.projection_dim = text, vision, projection_dim
        self.activations = {"text": text_activation, "vision": vision_activation}
        self.text_model = CLIPTextTransformer(text)
        _set_layers(self.text_model.encoder, text, text_activation, causal=True)
        self.vision_model = CLIPVisionTransformer(vision, vision_activation)
        self.visual_projection = nn.Linear(vision.hidden_size, projection_dim, bias=False)
        self.text_projection = nn.Linear(text.hidden_size, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, N] -> [B, projection_dim]: the final-LayerNorm state at the first <|endoftext|>."""
        hidden = self.text_model(input_ids)
        return self.text_projection(hidden[torch.arange(len(hidden), device=hidden.device), input_ids.argmax(-1)])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixels))


def preprocess(images: np.ndarray | torch.Tensor, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, size, size]: CLIP's Resize(size, bicubic) + CenterCrop + Normalize."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    x = x.to(device).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if min(h, w) != size:
        # torchvision's Resize(int): the shorter side becomes size, the longer int(size · long / short)
        new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        # CLIP resizes a PIL image: PIL filters rows, then columns, each pass rounded to 8 bits; done the same way
        # this agrees with PIL within one level on < 1 % of pixels (a single float pass: up to 5 levels on 15 %)
        for step in ((h, new[1]), new):
            x = F.interpolate(x, size=step, mode="bicubic", align_corners=False, antialias=True).clamp(0, 255).round()
        h, w = new
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))   # torchvision's center_crop
    x = x[..., top:top + size, left:left + size] / 255.0
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---- the open_clip layout ------------------------------------------------------------------------------------------

_TOWERS = (("text_model.encoder.layers.", "transformer.resblocks."),
           ("vision_model.encoder.layers.", "visual.transformer.resblocks."))
_IN_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
             ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))
_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "logit_scale": "logit_scale",
        **{f"{ours}.{kind}": f"{theirs}.{kind}" for kind in ("weight", "bias")
           for ours, theirs in (("text_model.final_layer_norm", "ln_final"),
                                ("vision_model.pre_layrnorm", "visual.ln_pre"),
                                ("vision_model.post_layernorm", "visual.ln_post"))}}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (transformers) names -> open_clip's: q, k, v concatenated into in_proj (nn.MultiheadAttention's order),
    projections transposed, position_ids dropped (open_clip has none)."""
    out = {}
    for key, value in sd.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t()
        for ours, theirs in _TOWERS:
            if not key.startswith(ours):
                continue
            i, rest = key[len(ours):].split(".", 1)
            base = f"{theirs}{i}."
            for a, b in _IN_LAYER:
                if rest.startswith(a):
                    out[base + b + rest[len(a):]] = value
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                parts = [sd[f"{ours}{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{base}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return out


def from_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip names -> ours (the inverse of ``to_open_clip``; keys it does not know are kept for the strict
    check to name)."""
    top = {v: k for k, v in _TOP.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    out = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        if key in transposed:
            out[transposed[key]] = value.t()
            continue
        tower = next(((o, t) for o, t in _TOWERS if key.startswith(t) and "." in key[len(t):]), None)
        if tower is None:
            out[key] = value
            continue
        ours, theirs = tower
        i, rest = key[len(theirs):].split(".", 1)
        base = f"{ours}{i}."
        if rest.startswith("attn.in_proj_"):
            for p, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{base}self_attn.{p}_proj.{rest.rsplit('_', 1)[1]}"] = part
            continue
        renamed = next((base + a + rest[len(b):] for a, b in _IN_LAYER if rest.startswith(b)), None)
        out[renamed or key] = value
    return out


def _open_clip_model(sd: dict[str, torch.Tensor], activation: str, heads: tuple[int, int] | None,
                     where: str) -> CLIPImageText:
    """Sizes from the shapes, as OpenAI's build_model infers them."""
    need = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight", "positional_embedding",
            "ln_final.weight", "text_projection")
    if any(k.startswith("visual.layer1.") for k in sd):
        raise CheckpointError(f"{where} has a ResNet image tower (visual.layer1.*); only ViT CLIP models are "
                              f"supported")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}, needed to infer the open_clip model's sizes")
    conv = sd["visual.conv1.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = sd["ln_final.weight"].shape[0]

    def depth(prefix: str) -> int:
        return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})

    def mlp(prefix: str, width: int) -> int:
        w = sd.get(f"{prefix}0.mlp.c_fc.weight")
        return w.shape[0] if w is not None else 4 * width
    v_heads, t_heads = heads or (OPEN_CLIP_VISION_HEADS.get(v_width, v_width // 64), t_width // 64)
    try:
        vision = CLIPVisionConfig(v_width, mlp("visual.transformer.resblocks.", v_width),
                                  depth("visual.transformer.resblocks."), v_heads, patch * grid, patch)
        text = CLIPTextConfig(sd["token_embedding.weight"].shape[0], t_width, mlp("transformer.resblocks.", t_width),
                              depth("transformer.resblocks."), t_heads, sd["positional_embedding"].shape[0])
    except (ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: the inferred sizes do not make a CLIP model ({e}); pass heads=(vision, "
                              f"text) (--clip_heads)") from None
    return CLIPImageText(text, vision, sd["text_projection"].shape[1], activation, activation)


# ---- the transformers layout ---------------------------------------------------------------------------------------

def _transformers_model(config_path: Path | None, where: str) -> CLIPImageText:
    if config_path is None or not config_path.is_file():
        raise UserFacingError(f"{where} is in the transformers layout but has no config.json beside it; put the "
                              f"model's config.json there or pass --clip_config")
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserFacingError(f"CLIP config {config_path} is unreadable ({type(e).__name__}); pass the model's "
                              f"config.json") from None
    # transformers < 4.27 let text_config_dict override text_config; missing fields take transformers' defaults
    t = {**TEXT_DEFAULTS, **(cfg.get("text_config") or {}), **(cfg.get("text_config_dict") or {})}
    v = {**VISION_DEFAULTS, **(cfg.get("vision_config") or {}), **(cfg.get("vision_config_dict") or {})}
    for tower, c in (("text", t), ("vision", v)):
        if c["hidden_act"] not in ACTIVATIONS:
            raise UserFacingError(f"CLIP config {config_path}: {tower} hidden_act {c['hidden_act']!r} is not "
                                  f"supported ({', '.join(ACTIVATIONS)})")
    try:
        text = CLIPTextConfig(**{k: t[k] for k in TEXT_DEFAULTS if k != "hidden_act"})
        vision = CLIPVisionConfig(**{k: v[k] for k in VISION_DEFAULTS if k != "hidden_act"})
    except (TypeError, ValueError) as e:
        raise UserFacingError(f"CLIP config {config_path}: {e}") from None
    return CLIPImageText(text, vision, int(cfg.get("projection_dim", 512)), t["hidden_act"], v["hidden_act"])


# ---- files ---------------------------------------------------------------------------------------------------------

def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_weights(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """One weights file -> {name: tensor}: weights_only torch.load, .safetensors when the package is there; with
    ``trust`` (or LDM_TRUST_CHECKPOINT=1) also a TorchScript archive (OpenAI's released files) and pickles that
    weights_only loading refuses, as every checkpoint reader of the project."""
    if path.suffix == ".safetensors":
        if not _has_safetensors():
            raise UserFacingError(f"{path} is a .safetensors file and the safetensors package is not installed: "
                                  f"pip install safetensors, or use the model's pytorch_model.bin")
        from safetensors.torch import load_file
        return dict(load_file(str(path)))
    if _is_torchscript(path):
        if not (trust or trust_from_env()):
            raise CheckpointError(f"{path} is a TorchScript archive (OpenAI's released CLIP files are); reading it "
                                  f"needs torch.jit.load: if you trust its source, rerun with --trust_checkpoint, or "
                                  f"use the open_clip / transformers weights of the same model")
        with warnings.catch_warnings():     # torch ≥ 2.9 deprecates TorchScript; these files remain TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        return {k: v for k, v in sd.items() if k not in OPENAI_NON_WEIGHTS}
    sd = state_dict_from_checkpoint(load_checkpoint_file(path, trust=trust), path)
    if sd and all(k.startswith("module.") for k in sd):   # open_clip training checkpoints (DistributedDataParallel)
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _resolve(path: Path, config: str | Path | None) -> tuple[list[Path], Path | None]:
    """(weights files, config.json or None) of a checkpoint path."""
    if not path.is_dir():
        beside = path.parent / "config.json"
        return [path], Path(config) if config is not None else (beside if beside.is_file() else None)
    cfg = Path(config) if config is not None else path / "config.json"
    # safetensors first only when the package can read it; transformers' files before open_clip's (the HF copies
    # of LAION's models hold both)
    order = (lambda names: names) if _has_safetensors() else (lambda names: names[::-1])
    for name in order(TRANSFORMERS_FILES):
        if (path / name).is_file():
            return [path / name], cfg
    for name in (f + ".index.json" for f in order(TRANSFORMERS_FILES)):
        if (path / name).is_file():     # sharded: {"weight_map": {key: shard file}}
            try:
                shards = sorted(set(json.loads((path / name).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
                raise UserFacingError(f"{path / name} is not a weights index ({type(e).__name__})") from None
            return [path / s for s in shards], cfg
    for name in order(OPEN_CLIP_FILES):
        if (path / name).is_file():
            return [path / name], None
    raise UserFacingError(f"CLIP model folder {path} holds no known weights: expected config.json with "
                          f"{' or '.join(TRANSFORMERS_FILES)} (transformers) or open_clip_pytorch_model.bin")


def detect_layout(sd: dict[str, torch.Tensor], where: str) -> str:
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        return "transformers"
    if any(k.startswith("visual.") for k in sd) or "token_embedding.weight" in sd:
        return "open_clip"
    raise CheckpointError(f"{where} is not a CLIP checkpoint: no transformers (vision_model.*, text_model.*) nor "
                          f"open_clip (visual.*, token_embedding.weight) keys (first keys: {', '.join(list(sd)[:3])})")


def _mismatch(expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> StateDictMismatch:
    return StateDictMismatch([(k, tuple(v.shape)) for k, v in expected.items() if k not in sd],
                             [(k, tuple(v.shape)) for k, v in sd.items() if k not in expected],
                             [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items()
                              if k in sd and tuple(sd[k].shape) != tuple(v.shape)])


@dataclass
class LoadedCLIP:
    """A loaded model with its tokenizer and where it came from (for the evaluation record)."""

    model: CLIPImageText
    tokenizer: CLIPTokenizer
    layout: str
    path: Path
    weights: list[Path]
    device: torch.device

    @property
    def image_size(self) -> int:
        return self.model.vision_config.image_size

    def sha256(self) -> str:
        """The weights file's SHA-256; for sharded weights, that of the sorted "sha256  name" lines."""
        if len(self.weights) == 1:
            return file_sha256(self.weights[0])
        import hashlib
        lines = "".join(f"{file_sha256(p)}  {p.name}\n" for p in self.weights)
        return hashlib.sha256(lines.encode()).hexdigest()

    def record(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256(), "layout": self.layout,
                "weights": [str(p) for p in self.weights], "projection_dim": self.model.projection_dim,
                "activations": self.model.activations, "text": self.model.text_config.to_dict(),
                "vision": asdict(self.model.vision_config)}

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float32 [B, projection_dim] (unnormalised)."""
        return self.model.encode_image(preprocess(images, self.image_size, self.device))

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.device))


def load_clip(path: str | Path, *, config: str | Path | None = None, activation: str | None = None,
              heads: tuple[int, int] | None = None, trust: bool = False, device: str | torch.device = "cpu"
              ) -> LoadedCLIP:
    """Load a local CLIP checkpoint of either layout, strictly. ``activation`` (quick_gelu | gelu) and ``heads`` =
    (vision, text) are for the open_clip layout, whose state dict does not hold them (defaults: quick_gelu, OpenAI's,
    and the inferred head counts); the transformers layout takes both from its config.json."""
    path = Path(path)
    if not path.exists():
        raise UserFacingError(f"CLIP model path {path} does not exist; pass a local open_clip / transformers CLIP "
                              f"checkpoint (nothing is downloaded)")
    if activation is not None and activation not in ACTIVATIONS:
        raise UserFacingError(f"unknown CLIP activation {activation!r}; choose {', '.join(ACTIVATIONS)}")
    weights, config_path = _resolve(path, config)
    sd: dict[str, torch.Tensor] = {}
    for f in weights:
        if not f.is_file():
            raise UserFacingError(f"CLIP weights file {f} does not exist (named by {path})")
        sd.update(read_weights(f, trust))
    where = f"CLIP checkpoint {path}"
    layout = detect_layout(sd, where)
    with torch.device("meta"):    # sizes only: every tensor comes from the file (load with assign=True)
        if layout == "open_clip":
            model = _open_clip_model(sd, activation or "quick_gelu", heads, where)
        else:
            model = _transformers_model(config_path, where)
    if layout == "open_clip":
        mismatch = _mismatch(to_open_clip(model.state_dict()), sd)
        if mismatch:
            raise CheckpointError(f"{where} does not match the open_clip CLIP its shapes imply: {mismatch.summary()}")
        sd = from_open_clip(sd)
    for key, buf in model.named_buffers():
        if key.endswith("position_ids"):
            sd[key] = torch.arange(buf.shape[-1]).expand(1, -1).clone()
    mismatch = compare_state_dict(model, sd)
    if mismatch:
        raise CheckpointError(f"{where} does not match the transformers CLIPModel its config.json describes"
                              f" ({config_path}): {mismatch.summary()}")
    model.load_state_dict(sd, strict=True, assign=True)
    if layout == "open_clip" and activation is None:   # not in the file: OpenAI's weights use quick-GELU, LAION's GELU
        print(f"note: {where} does not record its activation; using quick_gelu (OpenAI weights); pass "
              f"--clip_activation gelu for LAION-trained open_clip weights", file=sys.stderr)
    device = torch.device(device)
    model = model.float().to(device).eval().requires_grad_(False)
    text = model.text_config
    try:
        tokenizer = CLIPTokenizer(text.vocab_size, text.max_position_embeddings)
    except UserFacingError as e:
        raise UserFacingError(f"{where}: its text tower does not take CLIP's BPE tokens ({e})") from None
    return LoadedCLIP(model, tokenizer, layout, path, weights, device)
