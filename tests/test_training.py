"""main.py: train, resume and export on tiny random models (the Fashion recipe, shrunk)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import main as train_main
from ldm.util import load_config, load_model_from_config

pytestmark = pytest.mark.filterwarnings("ignore")

DD = {"double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 1, "out_ch": 1, "ch": 32,
      "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
DATA = {"target": "tiny_models.RandomFashionData", "params": {"n": 16, "batch_size": 4}}
LIGHTNING = {"checkpoint_every_n_steps": 2, "trainer": {"max_steps": 3, "limit_val_batches": 1,
                                                        "enable_model_summary": False}}


def vq_config(export):
    return {"model": {"base_learning_rate": 1e-3, "target": "ldm.models.autoencoder.VQModel", "params": {
        "embed_dim": 3, "n_embed": 16, "codebook_restart_every": 2, "ddconfig": DD,
        "lossconfig": {"target": "ldm.modules.losses.VQReconstructionLoss"}}},
        "data": DATA, "lightning": LIGHTNING, "export": {"path": str(export)}}


def ldm_config(vq_ckpt, export):
    return {"model": {"base_learning_rate": 1e-3, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195, "first_stage_key": "image",
        "cond_stage_key": "class_label", "image_size": 8, "channels": 3, "cond_stage_trainable": True,
        "conditioning_key": "crossattn", "use_ema": True, "scale_by_std": True,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32, "attention_resolutions": [2],
            "num_res_blocks": 1, "channel_mult": [1, 1], "num_heads": 1, "use_spatial_transformer": True,
            "context_dim": 16}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": 16, "ckpt_path": str(vq_ckpt), "ddconfig": DD,
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"n_classes": 11, "embed_dim": 16, "key": "class_label", "ucg_rate": 0.1}}}},
        "data": DATA, "lightning": LIGHTNING, "export": {"path": str(export)}}


def test_train_resume_and_export_vq_then_ldm(tmp_path):
    logs = tmp_path / "logs"
    vq_cfg, vq_out = tmp_path / "vq.yaml", tmp_path / "vq" / "model.ckpt"
    OmegaConf.save(OmegaConf.create(vq_config(vq_out)), vq_cfg)
    train_main.main(["--base", str(vq_cfg), "--logdir", str(logs), "--accelerator", "cpu"])
    assert (logs / "vq" / "checkpoints" / "last.ckpt").exists()
    vq = torch.load(vq_out, weights_only=True)
    assert vq["global_step"] == 3 and "quantize.embedding.weight" in vq["state_dict"]

    # a rerun with a larger budget resumes from last.ckpt instead of starting over
    train_main.main(["--base", str(vq_cfg), "--logdir", str(logs), "--accelerator", "cpu", "--max_steps", "4"])
    assert torch.load(vq_out, weights_only=True)["global_step"] == 4

    ldm_cfg, ldm_out = tmp_path / "ldm.yaml", tmp_path / "ldm" / "model.ckpt"
    OmegaConf.save(OmegaConf.create(ldm_config(vq_out, ldm_out)), ldm_cfg)
    train_main.main(["--base", str(ldm_cfg), "--logdir", str(logs), "--accelerator", "cpu"])
    exported = load_config(ldm_out.with_name("config.yaml"))
    assert exported.model.params.use_ema is False  # EMA weights were folded in
    assert "ckpt_path" not in exported.model.params.first_stage_config.params
    sd = torch.load(ldm_out, weights_only=True)["state_dict"]
    assert not any(k.startswith("model_ema.") for k in sd) and "scale_factor" in sd
    assert float(sd["scale_factor"]) != 1.0  # set from the first batch's latent std
    vq_sd = torch.load(vq_out, weights_only=True)["state_dict"]
    assert torch.equal(sd["first_stage_model.quantize.embedding.weight"], vq_sd["quantize.embedding.weight"])
    model = load_model_from_config(exported, ldm_out)  # strict, weights_only
    x = model.apply_model(torch.randn(2, 3, 8, 8), torch.tensor([1, 500]),
                          model.get_learned_conditioning({"class_label": torch.tensor([1, 10])}))
    assert torch.isfinite(x).all()
