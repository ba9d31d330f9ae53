"""Q-Diffusion's attention quantization (Li et al. 2023, §4; spec quantization.md §4.3): the activations of the two
attention matmuls — q and k before QKᵀ, the softmax probabilities and v before A·V — get their own quantizers.

``ActQuantizer`` holds one activation range (Δ, z; Δ learnable LSQ-style) and has three explicit states: off
(identity), observing (records what it sees, for calibration), on (fake quantization). The softmax quantizer uses
``sm_abit`` bits on the unsigned grid with z = 0 (probabilities are in [0, 1]); at 16 bits it is left out of
step-size learning, as Q-Diffusion does.

The wrappers replace ldm's attention modules inside a QuantModel only (ldm/ is not edited): ``QuantCrossAttention``
for SpatialTransformer attention (CompVis ``CrossAttention``), ``QuantQKVAttention`` for the legacy ``AttentionBlock``
(q and k are pre-scaled by ch^-1/4 before quantization, softmax in float32, as in the LDM code). While every
quantizer is off the wrappers call the same fused attention as ldm, so the FP output is unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ldm.modules.attention import CrossAttention, scaled_dot_product
from ldm.modules.diffusionmodules.openaimodel import QKVAttention, QKVAttentionLegacy
from quant.quantizer import QScheme, choose_qparams, fake_quant

MAX_OBSERVED = 1 << 20  # elements kept per observed call (attention maps are large; a strided sample suffices)


class ActQuantizer(nn.Module):
    """One per-tensor activation quantizer: Δ (nn.Parameter, learned in the activation phase) and z."""

    def __init__(self, scheme: QScheme):
        super().__init__()
        self.scheme = scheme
        self.a_scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("a_zero_point", torch.zeros(()))
        self.enabled = False
        self.a_ready = False
        self.observed: list[torch.Tensor] | None = None

    @property
    def learnable(self) -> bool:
        return self.scheme.bits < 16

    @torch.no_grad()
    def init_act_qparams_(self, x: torch.Tensor) -> None:
        scale, zp = choose_qparams(x, self.scheme)
        self.a_scale = nn.Parameter(scale.reshape(()).to(x), requires_grad=False)
        self.a_zero_point = zp.reshape(()).to(x)
        self.a_ready = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observed is not None:
            flat = x.detach().flatten()
            self.observed.append(flat[:: max(1, flat.numel() // MAX_OBSERVED)])
        if not self.enabled:
            return x
        if not self.a_ready:
            raise RuntimeError("activation quantization is on but its range was never calibrated")
        return fake_quant(x, self.a_scale, self.a_zero_point, self.scheme.qmin, self.scheme.qmax)

    def extra_repr(self) -> str:
        return f"A{self.scheme.bits} enabled={self.enabled}"


class _AttentionQuantizers(nn.Module):
    """q, k, v quantizers at the activation bits and the softmax quantizer at sm_abit."""

    def __init__(self, a_scheme: QScheme, sm_scheme: QScheme):
        super().__init__()
        self.q_quant, self.k_quant, self.v_quant = (ActQuantizer(a_scheme) for _ in range(3))
        self.sm_quant = ActQuantizer(sm_scheme)

    def active(self) -> bool:
        return any(q.enabled or q.observed is not None
                   for q in (self.q_quant, self.k_quant, self.v_quant, self.sm_quant))


class QuantCrossAttention(_AttentionQuantizers):
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


class QuantQKVAttention(_AttentionQuantizers):
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


def wrap_attention_(model: nn.Module, a_scheme: QScheme, sm_scheme: QScheme) -> int:
    """Replace every CrossAttention / QKVAttention(Legacy) inside ``model`` by its quantizing wrapper (after the
    Conv/Linear swap, so the projections are already QuantLayers). Returns the number of modules wrapped."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, CrossAttention):
            wrapper = QuantCrossAttention(module, a_scheme, sm_scheme)
        elif isinstance(module, (QKVAttention, QKVAttentionLegacy)):
            wrapper = QuantQKVAttention(module, a_scheme, sm_scheme)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
        count += 1
    return count
