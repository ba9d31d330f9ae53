"""The evaluation network of the embedded default: a Fashion-MNIST classifier standing in for Inception-v3.

It exposes the same three taps the OpenAI evaluator reads from Inception (spec evaluator.md §4):
``pool`` (global-average-pooled last features, like pool_3), ``spatial`` (the first channels of a mid-level
feature map, flattened in NHWC order, like mixed_6/conv[..., :7]) and ``logits`` (softmax for IS).
Train: ``python main.py --base configs/eval/fashion-classifier.yaml``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.util import load_checkpoint_file, load_config, load_state_dict_checked, state_dict_from_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "models" / "eval" / "fashion-classifier"


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FashionClassifier(pl.LightningModule):
    """VGG-style CNN on 1×32×32 images in [-1, 1]: three stages of two 3×3 convs (32→16→8→… px)."""

    def __init__(self, widths=(32, 64, 128), spatial_channels: int = 8, num_classes: int = 10,
                 dropout: float = 0.3, weight_decay: float = 5e-4, label_smoothing: float = 0.1,
                 max_steps: int = 5000):
        super().__init__()
        w0, w1, w2 = widths
        self.stage1 = nn.Sequential(*_conv_bn(1, w0), *_conv_bn(w0, w0), nn.MaxPool2d(2))    # 16×16
        self.stage2 = nn.Sequential(*_conv_bn(w0, w1), *_conv_bn(w1, w1), nn.MaxPool2d(2))   # 8×8
        self.stage3 = nn.Sequential(*_conv_bn(w1, w2), *_conv_bn(w2, w2))                   # 8×8
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(w2, num_classes))
        self.spatial_channels = spatial_channels
        self.weight_decay, self.label_smoothing, self.max_steps = weight_decay, label_smoothing, max_steps

    @property
    def pool_dim(self) -> int:
        return self.head[1].in_features

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [N, 1, 32, 32] in [-1, 1] -> pool [N, w2], spatial [N, 8·8·spatial_channels] (NHWC order),
        logits [N, num_classes]."""
        h2 = self.stage2(self.stage1(x))
        spatial = h2[:, :self.spatial_channels].permute(0, 2, 3, 1).reshape(len(x), -1)
        pool = self.stage3(h2).mean(dim=(2, 3))
        return {"pool": pool, "spatial": spatial, "logits": self.head(pool)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)["logits"]

    # -- training ---------------------------------------------------------------------------------------------

    @staticmethod
    def _batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["image"].permute(0, 3, 1, 2).float(), batch["class_label"].long()

    def training_step(self, batch, batch_idx):
        x, y = self._batch(batch)
        # random translation by up to 2 px (flips come from the data module)
        pad = F.pad(x, (2, 2, 2, 2), value=-1.0)
        dy, dx = torch.randint(0, 5, (2,)).tolist()
        x = pad[:, :, dy:dy + 32, dx:dx + 32]
        loss = F.cross_entropy(self(x), y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        x, y = self._batch(batch)
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.learning_rate, total_steps=self.max_steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def uint8_to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (3 or 1 channels, 28 or 32 px) -> [N, 1, 32, 32] float in [-1, 1] (channel mean = gray)."""
    x = torch.as_tensor(np.asarray(images)).float()
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {tuple(x.shape)}")
    x = x.mean(dim=3, keepdim=True).permute(0, 3, 1, 2) / 127.5 - 1.0
    if x.shape[-1] == 28:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    if x.shape[-2:] != (32, 32):
        raise ValueError(f"the Fashion classifier takes 28×28 or 32×32 images, got {tuple(x.shape[-2:])}")
    return x


@torch.no_grad()
def compute_features(model: FashionClassifier, images: np.ndarray, batch_size: int = 500,
                     device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """uint8 NHWC images -> {'pool', 'spatial', 'logits', 'softmax'} float32 arrays (evaluation mode)."""
    model = model.eval().to(device)
    out: dict[str, list] = {"pool": [], "spatial": [], "logits": []}
    for i in range(0, len(images), batch_size):
        f = model.features(uint8_to_input(images[i:i + batch_size]).to(device))
        for k in out:
            out[k].append(f[k].float().cpu())
    res = {k: torch.cat(v).numpy() for k, v in out.items()}
    res["softmax"] = torch.softmax(torch.from_numpy(res["logits"]), dim=1).numpy()
    return res


def load_fashion_classifier(directory: str | Path = DEFAULT_DIR) -> FashionClassifier:
    """The committed classifier (weights_only load, strict keys)."""
    directory = Path(directory)
    cfg = load_config(directory / "config.yaml")
    model = FashionClassifier(**cfg.model.get("params", {}))
    sd = state_dict_from_checkpoint(load_checkpoint_file(directory / "model.ckpt"), directory / "model.ckpt")
    load_state_dict_checked(model, sd, source=f"checkpoint {directory / 'model.ckpt'}",
                            config=str(directory / "config.yaml"))
    return model.eval()
