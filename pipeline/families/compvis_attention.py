"""Q-Diffusion's attention quantization (Li et al. 2023, §4; spec quantization.md §4.3) for CompVis' attention
modules, part of the CompVis families' quantization specials (``QuantSpecials.attention``): ``QuantCrossAttention``
for SpatialTransformer attention (``CrossAttention``), ``QuantQKVAttention`` for the legacy ``AttentionBlock``
(q and k are pre-scaled by ch^-1/4 before quantization, softmax in float32, as in the LDM code). While every
quantizer is off the wrappers call the same fused attention as ldm, so the FP output is unchanged.
"""
from __future__ import annotations

import torch
from einops import rearrange

from ldm.modules.attention import CrossAttention, scaled_dot_product
from ldm.modules.diffusionmodules.openaimodel import QKVAttention, QKVAttentionLegacy
from quant.attention import AttentionQuantizers
from quant.quantizer import QScheme


class QuantCrossAttention(AttentionQuantizers):
    """CrossAttention with quantized matmul inputs: softmax(Q(q) Q(k)ᵀ/√d) -> Q_sm -> · Q(v)."""

    def __init__(self, attn: CrossAttention, a_scheme: QScheme, sm_scheme: QScheme):
        super().__init__(a_scheme, sm_scheme)
        self.heads, self.scale = attn.heads, attn.scale
        self.to_q, self.to_k, self.to_v, self.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.heads
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=h) for t in (q, k, v))   # [B·h, N|M, d]
        if mask is not None:
            mask = rearrange(mask, "b ... -> b (...)").bool()[:, None, :].repeat_interleave(h, dim=0)
        if not self.active():
            out = scaled_dot_product(q, k, v, mask)
        else:
            sim = torch.einsum("bid,bjd->bij", self.q_quant(q), self.k_quant(k)) * self.scale  # [B·h, N, M]
            if mask is not None:
                sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
            probs = self.sm_quant(sim.softmax(dim=-1))
            out = torch.einsum("bij,bjd->bid", probs, self.v_quant(v))
        return self.to_out(rearrange(out, "(b h) n d -> b n (h d)", h=h))


class QuantQKVAttention(AttentionQuantizers):
    """QKVAttention(Legacy) of AttentionBlock with quantized matmul inputs; q, k scaled by ch^-1/4 first."""

    def __init__(self, attn: QKVAttention | QKVAttentionLegacy, a_scheme: QScheme, sm_scheme: QScheme):
        super().__init__(a_scheme, sm_scheme)
        self.n_heads = attn.n_heads
        self.legacy = isinstance(attn, QKVAttentionLegacy)
        self.fp = attn

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return self.fp(qkv)
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        if self.legacy:  # head by head, each [q | k | v]
            q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        else:            # [q of all heads | k | v]
            q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        s = ch ** -0.25  # [B·H, ch, T] each
        w = torch.einsum("bct,bcs->bts", self.q_quant(q * s), self.k_quant(k * s))
        probs = self.sm_quant(torch.softmax(w.float(), dim=-1).type(w.dtype))
        return torch.einsum("bts,bcs->bct", probs, self.v_quant(v)).reshape(bs, -1, length)


COMPVIS_ATTENTION = {CrossAttention: QuantCrossAttention, QKVAttention: QuantQKVAttention,
                     QKVAttentionLegacy: QuantQKVAttention}
