"""The VAE DiT decodes with (``stabilityai/sd-vae-ft-ema`` / ``-mse``, Rombach et al. 2022's KL-f8 first stage,
fine-tuned) read from a diffusers-format folder into the CompVis ``ldm.models.autoencoder.AutoencoderKL``, without
diffusers.

A folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (read by ``ldm.safetensors_file``, no
package needed) or ``.bin`` (``torch.load(weights_only=True)``). The architecture comes from the config; the keys are
renamed by ``compvis_key`` (the rules verified in ``../shared/fixtures/dit/vae_key_map.json``: resnets ->
``block``, diffusers' ``up_blocks`` counted from the lowest resolution -> CompVis ``up`` from the highest, the
mid-block attention's Linear q/k/v/out -> 1×1 convs). Both attention spellings are read: ``to_q/to_k/to_v/to_out.0``
and the older ``query/key/value/proj_attn`` (diffusers <= 0.13 files). The load is strict.

The latent scale comes from ``config.json``'s ``scaling_factor``; the sd-vae-ft-* configs (written by diffusers 0.4)
have none, and then diffusers' ``AutoencoderKL`` default 0.18215 applies -- the value DiT hard-codes. DiT decodes
``vae.decode(z / scale)`` (a division; LDM's ``(1/scale)·z`` differs by float rounding).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.safetensors_file import load_safetensors
from ldm.util import CheckpointError, ConfigError, load_checkpoint_file, load_state_dict_checked

DIFFUSERS_DEFAULT_SCALING = 0.18215   # diffusers AutoencoderKL(scaling_factor=0.18215) when config.json has none
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# CompVis' Normalize() hard-codes 32 groups, so only such configs map onto its modules
COMPVIS_GROUPS = 32
_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
              "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_RESNET = re.compile(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


@dataclass
class DiffusersVAE:
    """The CompVis autoencoder, the latent scale and where that scale came from (for the run's record)."""

    model: AutoencoderKL
    scale_factor: float
    scale_source: str
    folder: Path

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) from DiT-space latents: ``decoder(z / scale)`` as DiT's sample.py."""
        return self.model.decode(z / self.scale_factor)


def compvis_ddconfig(config: dict[str, Any], where: str = "config.json") -> tuple[dict[str, Any], int]:
    """(ddconfig, embed_dim) of the CompVis AutoencoderKL that a diffusers AutoencoderKL config describes; a
    config outside what the CompVis modules can express is one line naming the field."""
    def need(key: str, ok, what: str) -> Any:
        value = config.get(key)
        if not ok(value):
            raise ConfigError(f"{where}: {key} = {value!r} cannot be loaded into the CompVis AutoencoderKL ({what})")
        return value
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConfigError(f"{where} describes a {config['_class_name']}, not an AutoencoderKL; pass the VAE folder "
                          f"(e.g. sd-vae-ft-ema)")
    channels = need("block_out_channels", lambda v: isinstance(v, list) and v and all(
        isinstance(c, int) and c % v[0] == 0 for c in v), "a list of multiples of its first entry")
    levels = len(channels)
    need("down_block_types", lambda v: v == ["DownEncoderBlock2D"] * levels, f"{levels}× DownEncoderBlock2D")
    need("up_block_types", lambda v: v == ["UpDecoderBlock2D"] * levels, f"{levels}× UpDecoderBlock2D")
    for key, want in (("act_fn", "silu"), ("norm_num_groups", COMPVIS_GROUPS), ("use_quant_conv", True),
                      ("use_post_quant_conv", True), ("mid_block_add_attention", True)):
        if key in config:
            need(key, lambda v, w=want: v == w, f"only {want!r} is supported")
    latent = need("latent_channels", lambda v: isinstance(v, int) and v > 0, "a positive integer")
    ddconfig = dict(double_z=True, z_channels=latent, resolution=config.get("sample_size", 256),
                    in_channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3), ch=channels[0],
                    ch_mult=[c // channels[0] for c in channels],
                    num_res_blocks=need("layers_per_block", lambda v: isinstance(v, int) and v > 0, "positive"),
                    attn_resolutions=[], dropout=0.0)
    return ddconfig, latent


def compvis_key(key: str, levels: int) -> str:
    """The CompVis name of a diffusers AutoencoderKL key (``levels`` = len(block_out_channels))."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    found = _RESNET.match(key)
    if found:
        side, _, level, kind, j, rest = found.groups()
        level = int(level) if side == "encoder" else levels - 1 - int(level)   # diffusers counts up from the bottom
        part = "down" if side == "encoder" else "up"
        if kind == "resnets":
            return f"{side}.{part}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{side}.{part}.{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    found = _MID.match(key)
    if found:
        side, kind, j, rest = found.groups()
        if kind == "resnets":
            return f"{side}.mid.block_{int(j) + 1}.{rest}"
        name, _, leaf = rest.rpartition(".")
        if name not in _ATTENTION:
            raise CheckpointError(f"unknown mid-block attention tensor {key!r} in the VAE weights")
        return f"{side}.mid.attn_1.{_ATTENTION[name]}.{leaf}"
    return key


def to_compvis_state(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Rename every key and reshape the attention's Linear weights [C, C] to the CompVis 1×1 convs [C, C, 1, 1]."""
    out = {}
    for key, value in sd.items():
        new = compvis_key(key, levels)
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", new) and value.ndim == 2:
            value = value[:, :, None, None]
        if new in out:
            raise CheckpointError(f"VAE weights name {new} twice (both attention spellings present?)")
        out[new] = value
    return out


def vae_folder(path: str | os.PathLike) -> Path:
    """The folder with config.json: ``path`` itself, or its ``vae/`` (a whole diffusers pipeline folder)."""
    path = Path(path)
    for candidate in (path, path / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"no VAE config.json in {path}: pass a diffusers AutoencoderKL folder (config.json + "
                          f"{WEIGHT_FILES[0]}), e.g. a download of stabilityai/sd-vae-ft-ema")


def read_vae_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The diffusers state dict: .safetensors preferred (as diffusers), else .bin with weights_only loading."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return load_safetensors(path) if name.endswith(".safetensors") else dict(load_checkpoint_file(path))
    raise CheckpointError(f"{folder} has config.json but no weights ({' or '.join(WEIGHT_FILES)}); download "
                          f"the whole VAE folder")


def load_diffusers_vae(path: str | os.PathLike, device: str | torch.device = "cpu") -> DiffusersVAE:
    """The VAE of a diffusers folder as a strict-loaded CompVis AutoencoderKL (eval mode) with its latent scale."""
    folder = vae_folder(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{folder / 'config.json'} is not valid JSON ({e})") from None
    ddconfig, embed_dim = compvis_ddconfig(config, str(folder / "config.json"))
    model = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=embed_dim)
    sd = to_compvis_state(read_vae_weights(folder), len(ddconfig["ch_mult"]))
    load_state_dict_checked(model, sd, strict=True, source=f"VAE weights in {folder}",
                            config=f"the AutoencoderKL its config.json describes")
    if config.get("scaling_factor") is not None:
        scale, source = float(config["scaling_factor"]), f"{folder / 'config.json'}: scaling_factor"
    else:
        scale, source = DIFFUSERS_DEFAULT_SCALING, (f"{folder / 'config.json'} has no scaling_factor: diffusers' "
                                                    f"AutoencoderKL default")
    return DiffusersVAE(model.to(device).eval(), scale, source, folder)
