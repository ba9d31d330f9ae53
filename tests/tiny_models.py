"""Tiny random CompVis-layout configs for unit tests (no reference data needed)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import OmegaConf

VQ_F4 = {
    "target": "ldm.models.autoencoder.VQModelInterface",
    "params": {"embed_dim": 3, "n_embed": 16, "lossconfig": {"target": "torch.nn.Identity"},
               "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3, "out_ch": 3,
                            "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                            "dropout": 0.0}},
}

CLASS_COND = {
    "model": {
        "base_learning_rate": 1.0e-4,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "first_stage_key": "image",
            "cond_stage_key": "class_label", "image_size": 8, "channels": 3, "cond_stage_trainable": True,
            "conditioning_key": "crossattn", "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 1,
                "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 16}},
            "first_stage_config": VQ_F4,
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                  "params": {"n_classes": 5, "embed_dim": 16, "key": "class_label"}},
        },
    }
}

# SD-v1-style text-to-image: FrozenCLIPEmbedder (real BPE truncated to 1,000 tokens, a 2-layer width-16 tower),
# cross-attention over 77 tokens, legacy: false heads, KL first stage with the 0.18215 scale factor.
TEXT_COND = copy.deepcopy(CLASS_COND)
TEXT_COND["model"]["params"].update({
    "cond_stage_key": "txt", "cond_stage_trainable": False, "scale_factor": 0.18215, "channels": 4,
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {
        "device": "cpu", "text_config": {"vocab_size": 1000, "hidden_size": 16, "intermediate_size": 32,
                                         "num_hidden_layers": 2, "num_attention_heads": 2}}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
        "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3,
                     "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                     "dropout": 0.0}}},
})
TEXT_COND["model"]["params"]["unet_config"]["params"].update({"in_channels": 4, "out_channels": 4, "num_heads": 2,
                                                              "legacy": False})

# LSUN-style: unconditional, KL first stage, AttentionBlock with num_head_channels, scale-shift norm,
# resblock up/down, EMA and scale_by_std (the code paths cin256-v2 does not exercise).
UNCOND_KL = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "loss_type": "l1",
            "first_stage_key": "image", "cond_stage_key": "image", "image_size": 8, "channels": 4,
            "cond_stage_trainable": False, "concat_mode": False, "scale_by_std": True, "use_ema": True,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                "attention_resolutions": [1, 2], "num_res_blocks": 1, "channel_mult": [1, 2],
                "num_head_channels": 16, "use_scale_shift_norm": True, "resblock_updown": True}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
                "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3,
                             "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                             "dropout": 0.0}}},
            "cond_stage_config": "__is_unconditional__",
        },
    }
}


def config(base: dict, **unet_overrides):
    cfg = copy.deepcopy(base)
    cfg["model"]["params"]["unet_config"]["params"].update(unet_overrides)
    return OmegaConf.create(cfg)


def build(cfg, seed: int = 0):
    """Instantiate with random weights; zero-initialised output layers are re-initialised so that ε ≠ 0."""
    from ldm.util import instantiate_from_config
    torch.manual_seed(seed)
    model = instantiate_from_config(cfg.model)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.detach().any():
            m.reset_parameters()
    return model.eval()


def write(cfg, model, directory: Path, name: str = "tiny") -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt_path = directory / f"{name}.yaml", directory / f"{name}.ckpt"
    OmegaConf.save(cfg, cfg_path)
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, ckpt_path)
    return cfg_path, ckpt_path


class RandomFashionData:
    """A data module of random 1×32×32 'images' with labels, in the layout of ldm.data.fashion.FashionDataModule."""

    def __init__(self, n: int = 16, batch_size: int = 4, root=None, download=False):
        g = torch.Generator().manual_seed(0)
        self.items = [{"image": torch.rand(32, 32, 1, generator=g) * 2 - 1, "class_label": torch.tensor(i % 10)}
                      for i in range(n)]
        self.batch_size = batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.items, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.items[:4], batch_size=self.batch_size)


def write_text_model(directory: Path, prompts: list[str]) -> tuple[Path, Path, Path, object]:
    """A tiny SD-structured text model written as config + checkpoint, with a prompt file: (config path, checkpoint
    path, prompt file, model)."""
    cfg = config(TEXT_COND)
    model = build(cfg)
    cfg_path, ckpt_path = write(cfg, model, directory, "text")
    prompt_file = directory / "prompts.txt"
    prompt_file.write_text("".join(f"{p}\n" for p in prompts))
    return cfg_path, ckpt_path, prompt_file, model
