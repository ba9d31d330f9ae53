"""Exponential moving average of a module's trainable parameters, stored as buffers (CompVis ``LitEma``).

Buffer names are the parameter names with every dot removed, so ``model_ema.*`` checkpoint keys load unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class LitEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if decay < 0.0 or decay > 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.m_name2s_name = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.clone().detach().data)
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One update: d = min(decay, (1 + n) / (10 + n)); shadow -= (1 - d)(shadow - param)."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(decay, (1 + float(self.num_updates)) / (10 + float(self.num_updates)))
        one_minus_decay = 1.0 - decay
        shadow = dict(self.named_buffers())
        for key, param in model.named_parameters():
            if param.requires_grad:
                s = shadow[self.m_name2s_name[key]]
                s.sub_(one_minus_decay * (s - param.detach().type_as(s)))
            elif key in self.m_name2s_name:
                raise KeyError(f"EMA tracks {key} but it is frozen now")

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for key, param in model.named_parameters():
            if param.requires_grad:
                param.data.copy_(shadow[self.m_name2s_name[key]].data)

    def store(self, parameters) -> None:
        self.collected_params = [param.clone() for param in parameters]

    def restore(self, parameters) -> None:
        for c_param, param in zip(self.collected_params, parameters, strict=True):
            param.data.copy_(c_param.data)
        self.collected_params = []

    @contextmanager
    def swapped_in(self, model: nn.Module, context: str | None = None):
        """Use the EMA weights in ``model`` inside the block; the live weights come back afterwards."""
        self.store(model.parameters())
        self.copy_to(model)
        if context is not None:
            print(f"{context}: Switched to EMA weights")
        try:
            yield None
        finally:
            self.restore(model.parameters())
            if context is not None:
                print(f"{context}: Restored training weights")
