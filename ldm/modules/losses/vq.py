"""Training loss of the VQ first stage without perceptual or adversarial terms.

CompVis trains its autoencoders with LPIPS + a patch discriminator (``VQLPIPSWithDiscriminator``); LPIPS needs
VGG weights from the network. For the 32×32 Fashion-MNIST first stage a pixel loss suffices:
L = w1 |x − x̂|₁ + w2 ‖x − x̂‖² + w_cb · (codebook + β·commitment) (van den Oord et al. 2017, Eq. 3).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class VQReconstructionLoss(nn.Module):
    def __init__(self, l1_weight: float = 1.0, l2_weight: float = 1.0, codebook_weight: float = 1.0):
        super().__init__()
        self.l1_weight, self.l2_weight, self.codebook_weight = l1_weight, l2_weight, codebook_weight

    def forward(self, codebook_loss: torch.Tensor, inputs: torch.Tensor, reconstructions: torch.Tensor,
                split: str = "train") -> tuple[torch.Tensor, dict]:
        l1 = (inputs - reconstructions).abs().mean()
        l2 = (inputs - reconstructions).pow(2).mean()
        loss = self.l1_weight * l1 + self.l2_weight * l2 + self.codebook_weight * codebook_loss.mean()
        return loss, {f"{split}/total_loss": loss.detach(), f"{split}/l1": l1.detach(), f"{split}/l2": l2.detach(),
                      f"{split}/quant_loss": codebook_loss.detach().mean()}
