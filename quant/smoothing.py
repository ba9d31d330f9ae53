"""QNCD's "embedding-derived feature smoothing" against intra quantization noise (Chu et al., ACM MM 2024, arXiv
2403.19140; spec qncd_ptqd.md §A.2, from the official quant_block.py, as the paper's equations were not available): a
calibration-time transform of the UNet that leaves its FP output unchanged.

In a ResBlock the time embedding is added to the features right before ``out_layers``:

    h = in_layers(x) + e,   e = emb_layers(emb) [B, C, 1, 1]
    a = SiLU(GN(h))                         the input of the second conv (out_layers[3]); per-tensor activation
    out = conv(Dropout(a); W)               quantization of ``a`` suffers from the channels the embedding inflates

Other families' blocks have the same structure under other names (the pixel DDPM's ResnetBlock, QNCD's CIFAR-10
model: e = temb_proj(swish(temb)), then norm2, swish, dropout, conv2): the family names the parts and computes e in
its ``quant.specials.SmoothingSite``s. Every verb takes ``specials=`` (the family's ``QuantSpecials``); a QuantModel
carries its own.

QNCD divides ``a`` by a per-channel factor S and multiplies it into the conv's input channels (SmoothQuant-style):
conv(a / S; W · S) = conv(a; W). The activation quantizer then sees a / S, the weight quantizer W · S.

S comes from the embeddings alone, over the calibration timesteps (``Formula``):

    ẽ = standardize_GN(e)          e standardized inside each GroupNorm group of out_layers[0] (no affine)
    CODE  (released code):  S_c = γ_c · mean_n max(ẽ_n,c, 1)          γ = out_layers[0].weight
    PAPER (as summarised):  S_c = mean_n |ẽ_n,c · γ_c|                (scale-shift blocks: mean_n |1 + scale_n,c|)

GroupNorm always has 32 groups, so |ẽ| ≤ √(C/32 − 1): in narrow UNets the embedding term is void. With C = 32 or 64
(the embedded default) ẽ is 0 or ±1, the code's S is exactly γ (smoothing only undoes GroupNorm's scale) and the
paper's is 0 where groups hold one channel (such blocks are left unsmoothed). In cin256-v2 (C = 192 … 960, 6 … 30
channels per group) the embedding term acts. |S| is floored at ``MIN_SCALE``; S keeps γ's sign.

Verbs, in the order the pipeline uses them:

    S = smoothing_factors(unet, calibration)   # FP embeddings only: cheap, no UNet forward
    apply_smoothing_(qm_or_unet, S)            # BEFORE init_weights_(): Δ_w must be chosen on W · S
    S = smooth_(qm, calibration)               # the two above in one call (pipeline step 2)
    state = smoothing_state(qm)                # persisted beside the quantized state
    load_smoothing_(fresh, state)              # re-folds the same S into the checkpoint's weights: bit-exact

Why the original corrupted the FP targets of W4 reconstruction, and why this cannot: its quantized layer kept a
frozen ``org_weight`` copied before the fold and used it whenever weight quantization was off, so every "FP" forward
computed conv(a / S; W). Here S is folded into the *master* weight (``QuantLayer.weight`` is the module's own
Parameter; there is no second copy), and the division travels with the model as a module, so the model with
quantization off computes exactly the FP function, whichever object the FP targets are taken from.
"""
from __future__ import annotations

import enum
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.layers import QuantLayer
from quant.model import QuantModel, forward_batches
from quant.quantizer import PerChannel, PerTensor, QScheme, choose_qparams, fake_quant
from quant.specials import QuantSpecials, SmoothingSite

FORMAT = "qncd-smoothing"
VERSION = 1
# |S| floor: γ_c (hence S_c) can be ~0 or negative. The transform stays exact for any S ≠ 0, but a/S must not blow up
# a channel into the range of the whole tensor (spec A.2, last pitfall).
MIN_SCALE = 1e-2


class Formula(enum.Enum):
    CODE = "code"    # huanpengchu/QNCD quant_block.py: γ · mean(max(ẽ, 1)) (no absolute value)
    PAPER = "paper"  # the paper's formula as a secondary summary reports it: mean |ẽ · γ|


class ChannelSmoothing(nn.Module):
    """a ↦ Dropout(a / S), QNCD's runtime division (spec A.2 step 7).

    It replaces ``out_layers[2]`` (the Dropout, which it wraps: elementwise, so it commutes with the division)
    rather than being inserted: the conv keeps its name ``out_layers.3``, so checkpoint keys, layer-policy names and
    quantized-state keys are those of the unsmoothed model. Being *before* the conv, the conv's activation
    quantizer (a QuantLayer's input) sees a / S. S is a persistent buffer ``scale`` [C] (float32)."""

    def __init__(self, scale: torch.Tensor, dropout: nn.Module):
        super().__init__()
        if scale.ndim != 1 or not bool((scale != 0).all()):
            raise ValueError("S must be a nonzero vector [C]")
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        self.dropout = dropout

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        s = self.scale.view(1, -1, *([1] * (a.ndim - 2))).to(a.dtype)
        return self.dropout(a / s)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, |S| in [{self.scale.abs().min():.3g}, {self.scale.abs().max():.3g}]"


# ---- the math (pure) -----------------------------------------------------------------------------------------

def standardize_groups(e: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    """ẽ: e [N, C] standardized inside each of ``num_groups`` channel groups (GroupNorm without its affine, in
    float32). Equals the code's (GN(e) − β)/γ without dividing by γ, which may be 0. With C/groups = 1 it is 0."""
    return F.group_norm(e.float().reshape(*e.shape[:2], 1), num_groups, eps=eps).reshape(e.shape)


def code_factor(e_tilde: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Released-code S [C] from ẽ [N, C]: γ_c · mean_n max(ẽ_n,c, 1), then max(·, 1) before γ (spec A.2 steps 3-5).
    The code averages over passes and keeps batch slot 0; every calibration sample counts here (same estimator)."""
    return gamma.float() * e_tilde.clamp_min(1.).mean(0).clamp_min(1.)


def paper_factor(e_tilde: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Paper S [C] for additive-embedding ResBlocks: (1/T) Σ_t |ẽ_t · α| with α = γ (spec A.2, [2nd])."""
    return (e_tilde * gamma.float()).abs().mean(0)


def paper_factor_scale_shift(scale: torch.Tensor) -> torch.Tensor:
    """Paper S [C] for FiLM ResBlocks (``use_scale_shift_norm``): (1/T) Σ_t |1 + scale_t| (spec A.2, [2nd])."""
    return (1. + scale.float()).abs().mean(0)


def floor_magnitude(s: torch.Tensor, min_scale: float) -> torch.Tensor:
    """sign(S) · max(|S|, min_scale), with sign(0) = +1: keeps the division finite and bounded."""
    sign = torch.where(s < 0, -1., 1.).to(s)
    return sign * s.abs().clamp_min(min_scale)


# ---- computing S from a UNet ---------------------------------------------------------------------------------

def _unet(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, QuantModel) else model


def _specials(model: nn.Module, specials: QuantSpecials | None) -> QuantSpecials:
    if specials is not None:
        return specials
    if isinstance(model, QuantModel):
        return model.specials
    raise ValueError("smoothing a bare UNet needs its model family's specials: pass "
                     "specials=family.quant_specials() (or smooth the QuantModel, which carries them)")


def sites(model: nn.Module, specials: QuantSpecials | None = None) -> list[tuple[str, nn.Module, SmoothingSite]]:
    """Every smoothing site of the UNet (a UNet or a QuantModel), (UNet-relative name, block, its site), in module
    order. ``specials``: the family's (default: the QuantModel's own)."""
    sp = _specials(model, specials)
    found = ((n, m, site_of(m, sp)) for n, m in _unet(model).named_modules())
    return [(n, m, site) for n, m, site in found if site is not None]


def site_of(module: nn.Module, specials: QuantSpecials) -> SmoothingSite | None:
    """The first of the family's smoothing sites ``module`` is an instance of (None when it is none)."""
    return next((s for s in specials.smoothing_sites if isinstance(module, s.block_type) and s.applies(module)), None)


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    """``root.<path> = module`` for a dotted submodule path (a Sequential index included: the child keeps its slot)."""
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def resblocks(model: nn.Module, specials: QuantSpecials | None = None) -> list[tuple[str, nn.Module]]:
    """Every residual block QNCD smooths (``sites``), with its UNet-relative name."""
    return [(n, m) for n, m, _ in sites(model, specials)]


def _timesteps(calibration) -> torch.Tensor:
    """The timesteps [N] of a calibration set: a tensor or sequence of timesteps, a CalibrationData-like object
    (``.t``), or an iterable of (x_t, t, c) batches."""
    if isinstance(calibration, torch.Tensor):
        return calibration.reshape(-1).long()
    if isinstance(getattr(calibration, "t", None), torch.Tensor):
        return calibration.t.reshape(-1).long()
    items = list(calibration)
    if items and isinstance(items[0], (tuple, list)):
        return torch.cat([torch.as_tensor(b[1]).reshape(-1).cpu() for b in items]).long()
    return torch.as_tensor(items).reshape(-1).long()


@torch.no_grad()
def embedding_outputs(model: nn.Module, t: torch.Tensor,
                      specials: QuantSpecials | None = None) -> dict[str, torch.Tensor]:
    """e [N, C_out or 2 C_out] of every smoothed block (an LDM ResBlock: emb_layers(emb(t))), as the FP UNet
    computes it through the family's ``SmoothingSite`` functions. Exact without a forward pass: the embedding depends
    on t alone (a site refuses a UNet where it does not, e.g. one with class embedding)."""
    unet, found = _unet(model), sites(model, specials)
    # S describes the FP embeddings: quantization off in the layers involved, each restored as it was
    layers = [m for m in unet.modules() if isinstance(m, QuantLayer)]
    flags = [(m.weight_quant, m.act_quant) for m in layers]
    for m in layers:
        m.weight_quant = m.act_quant = False
    try:
        t = t.to(next(unet.parameters()).device)
        shared: dict[SmoothingSite, torch.Tensor] = {}   # the UNet's embedding, once per kind of site
        out = {}
        for name, block, site in found:
            if site not in shared:
                shared[site] = site.time_embedding(unet, t)
            out[name] = site.block_embedding(block, shared[site]).float()
        return out
    finally:
        for m, (w, a) in zip(layers, flags, strict=True):
            m.weight_quant, m.act_quant = w, a


@torch.no_grad()
def smoothing_factors(model: nn.Module, calibration, formula: Formula = Formula.CODE,
                      min_scale: float = MIN_SCALE, specials: QuantSpecials | None = None) -> dict[str, torch.Tensor]:
    """S [C] (float32, CPU) per ResBlock name from the FP embeddings over the calibration timesteps (spec A.2).

    ``calibration``: the timesteps, a CalibrationData, or batches (x_t, t, c) (only t is used: every sample counts
    once, so the weighting over t is the calibration set's). |S| is floored at ``min_scale``. ``specials``: the
    family's (default: the QuantModel's own)."""
    formula = Formula(formula)
    t = _timesteps(calibration)
    if t.numel() == 0:
        raise ValueError("no calibration timesteps")
    out = {}
    emb = embedding_outputs(model, t, specials)
    for name, block, site in sites(model, specials):
        norm = block.get_submodule(site.norm)
        e = emb[name]
        if site.scale_shift(block):
            scale = e.chunk(2, dim=1)[0]  # h·(1 + scale) + shift: the scale half carries the outliers
            s = (paper_factor_scale_shift(scale) if formula is Formula.PAPER else
                 code_factor(standardize_groups(scale, norm.num_groups, norm.eps), norm.weight))
        elif formula is Formula.PAPER and norm.num_channels == norm.num_groups:
            # one channel per group: ẽ ≡ 0 carries no information and the paper's S would be 0 (every channel
            # blown up by 1/min_scale); such a block is left unsmoothed. (The code's formula gives S = γ there.)
            continue
        else:
            e_tilde = standardize_groups(e, norm.num_groups, norm.eps)
            s = (paper_factor if formula is Formula.PAPER else code_factor)(e_tilde, norm.weight)
        out[name] = floor_magnitude(s.detach().float().cpu(), min_scale)
    return out


# ---- applying, persisting --------------------------------------------------------------------------------------

def is_smoothed(block: nn.Module, site: SmoothingSite) -> bool:
    return isinstance(block.get_submodule(site.slot), ChannelSmoothing)


def _block(model: nn.Module, name: str, specials: QuantSpecials) -> tuple[nn.Module, SmoothingSite]:
    try:
        block = _unet(model).get_submodule(name)
    except AttributeError:
        block = None
    site = None if block is None else site_of(block, specials)
    if site is None:
        raise ValueError(f"smoothing factors name {name!r}, which is not a ResBlock of this UNet (another model?)")
    return block, site


@torch.no_grad()
def apply_smoothing_(model: nn.Module, factors: dict[str, torch.Tensor], fold_weights: bool = True,
                     specials: QuantSpecials | None = None) -> nn.Module:
    """Smooth the named ResBlocks in place: out_layers[2] becomes ``ChannelSmoothing(S)`` (a ↦ a / S) and S is
    multiplied into the master weight of out_layers[3] along its input channels, W[:, c] ← W[:, c] · S_c.

    Works on a UNetModel or a QuantModel. Must run before the weight quantizers are initialized (Δ_w, z_w and
    AdaRound's α are chosen on W · S), so a QuantLayer whose weight qparams exist is refused. A QuantLayer's weight
    is its module's Parameter: a QuantModel built with ``copy_model=False`` shares it with the FP UNet, which is
    smoothed alongside (same object), never half-smoothed. ``fold_weights=False`` only inserts the division, for
    weights that already carry S (a state_dict saved from a smoothed model). ``specials``: the family's (default:
    the QuantModel's own); they say which part of a block is "out_layers[2]" and "out_layers[3]"."""
    sp = _specials(model, specials)
    blocks = {name: _block(model, name, sp) for name in factors}
    for name, (block, site) in blocks.items():  # check everything before changing anything
        if is_smoothed(block, site):
            raise ValueError(f"{name} is already smoothed; smoothing twice would fold S twice")
        conv, s = block.get_submodule(site.conv), factors[name]
        if isinstance(conv, QuantLayer) and (conv.w_ready or conv.alpha is not None or conv.round_up is not None):
            raise RuntimeError(f"{name}'s second conv already has weight quantizers: apply smoothing before "
                               f"init_weights_() (Δ_w must be chosen on W·S)")
        if s.ndim != 1 or s.numel() != conv.weight.shape[1]:
            raise ValueError(f"{name}: S has shape {tuple(s.shape)}, the conv has {conv.weight.shape[1]} input "
                             f"channels")
    for name, (block, site) in blocks.items():
        s = factors[name].detach().to(torch.float32)
        w = block.get_submodule(site.conv).weight
        if fold_weights:
            w.mul_(s.to(w).view(1, -1, *([1] * (w.ndim - 2))))
        _set_path(block, site.slot, ChannelSmoothing(s.to(w.device), block.get_submodule(site.slot)))
    return model


def smooth_(qm: QuantModel, calibration, formula: Formula = Formula.CODE) -> dict[str, torch.Tensor]:
    """QNCD's smoothing of a QuantModel, in one verb: S from the FP embeddings over the ``calibration`` timesteps
    (``smoothing_factors``), folded in (``apply_smoothing_``) before the weight ranges are chosen. Returns S."""
    factors = smoothing_factors(qm, calibration, formula)
    apply_smoothing_(qm, factors)
    return factors


def smoothing_state(model: nn.Module, specials: QuantSpecials | None = None) -> dict:
    """The factors of every smoothed ResBlock, as plain tensors (``torch.load(weights_only=True)``-safe). The folded
    weights are not included: the FP weights come from the model checkpoint and ``load_smoothing_`` re-folds."""
    factors = {n: b.get_submodule(site.slot).scale.detach().cpu().clone()
               for n, b, site in sites(model, specials) if is_smoothed(b, site)}
    return {"format": FORMAT, "version": VERSION, "factors": factors}


def load_smoothing_(model: nn.Module, state: dict, fold_weights: bool = True,
                    specials: QuantSpecials | None = None) -> nn.Module:
    """Restore smoothing from ``smoothing_state`` onto a model holding the checkpoint's (unsmoothed) weights: the same
    float32 S times the same W gives bit-identical folded weights. Run it before ``load_quant_state_dict_``."""
    got = state.get("format") if isinstance(state, dict) else type(state).__name__
    if got != FORMAT:
        raise ValueError(f"not a smoothing state (format {got!r}); pass what smoothing_state() returned")
    if state.get("version") != VERSION:
        raise ValueError(f"smoothing state version {state.get('version')}, this code reads {VERSION}")
    return apply_smoothing_(model, dict(state["factors"]), fold_weights=fold_weights, specials=specials)


@torch.no_grad()
def conv_input_ranges(model: nn.Module, batches: Iterable[tuple],
                      specials: QuantSpecials | None = None) -> dict[str, tuple[float, float]]:
    """(min, max) of the input of every ResBlock's second conv over ``batches`` of (x_t, t, c), in the model's
    current quantization state: the range a per-tensor activation quantizer must cover (QNCD's target)."""
    seen: dict[str, list[float]] = {}

    def hook(module, args, name):
        a = args[0]
        lo, hi = seen.get(name, (float("inf"), float("-inf")))
        seen[name] = (min(lo, float(a.min())), max(hi, float(a.max())))

    forward_batches(model, batches, [b.get_submodule(site.conv).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n))
                                     for n, b, site in sites(model, specials)])
    return seen


def _conv_sqnr_db(y: torch.Tensor, y_q: torch.Tensor) -> float:
    return float(10 * torch.log10(y.pow(2).sum() / (y - y_q).pow(2).sum().clamp_min(1e-30)))


def _fake_quant(x: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    return fake_quant(x, *choose_qparams(x, scheme), scheme.qmin, scheme.qmax)


@torch.no_grad()
def smoothing_effect(unet: nn.Module, factors: dict[str, torch.Tensor], batches: Iterable[tuple],
                     a_bits: Iterable[int] = (8, 6), w_bits: int = 4,
                     granularity: PerTensor | PerChannel = PerTensor(),
                     specials: QuantSpecials | None = None) -> dict[str, dict]:
    """What smoothing does to each smoothed ResBlock's second conv, on the FP ``unet`` (unsmoothed) over ``batches``
    of (x_t, t, c): the numbers behind QNCD's claim (spec A.2), measured rather than assumed.

    Per block name: ``range`` (max − min of the conv input a, before and after a ↦ a/S), and the SQNR (dB) of the
    conv output y = conv(a; W) when only one side is quantized, per-tensor asymmetric with MSE-searched ranges over
    all of ``batches`` (as the activation quantizers are initialized):
      ``act_sqnr_db[bits]``: conv(q(a); W) before vs conv(q(a/S); W·S) after;
      ``weight_sqnr_db``:    conv(a; q(W)) before vs conv(a/S; q(W·S)) after (``granularity``: PerChannel(0) gives one
                             range per output channel, as ``--channel_wise``).
    A range ratio alone would mislead: dividing every channel by 2 halves the range but not the relative error, and
    S moves difficulty from a into W. Values are (before, after) pairs. Holds every block's conv inputs in memory:
    pass a few hundred small-latent inputs, not thousands at 64×64. ``specials``: the family's."""
    blocks = {n: (b, site) for n, b, site in sites(unet, specials)}
    for name in factors:
        if name not in blocks:
            raise ValueError(f"smoothing factors name {name!r}, which is not a ResBlock of this UNet (another model?)")
    if isinstance(unet, QuantModel) or any(is_smoothed(*blocks[n]) for n in factors):
        raise ValueError("smoothing_effect compares against the unsmoothed FP UNet: pass the checkpoint's UNet")
    convs = {n: blocks[n][0].get_submodule(blocks[n][1].conv) for n in factors}
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in factors}
    forward_batches(unet, batches, [convs[n].register_forward_pre_hook(
        lambda m, a, n=n: inputs[n].append(a[0].detach().float().cpu())) for n in factors])
    w_scheme = QScheme(w_bits, granularity=granularity)
    out = {}
    for name, s in factors.items():
        conv = convs[name]
        a = torch.cat(inputs.pop(name))                              # [N, C, H, W]
        w = conv.weight.detach().float().cpu()                       # [C_out, C, k, k]
        bias = None if conv.bias is None else conv.bias.detach().float().cpu()
        s_in = s.float().view(1, -1, *([1] * (a.ndim - 2)))          # broadcast over a's channels and W's inputs
        a_s, w_s = a / s_in, w * s_in

        def y(inp, weight):
            return conv._conv_forward(inp, weight, bias)

        ref = y(a, w)
        out[name] = {
            "range": (float(a.max() - a.min()), float(a_s.max() - a_s.min())),
            "act_sqnr_db": {int(b): (_conv_sqnr_db(ref, y(_fake_quant(a, QScheme(int(b))), w)),
                                     _conv_sqnr_db(ref, y(_fake_quant(a_s, QScheme(int(b))), w_s)))
                            for b in a_bits},
            "weight_sqnr_db": (_conv_sqnr_db(ref, y(a, _fake_quant(w, w_scheme))),
                               _conv_sqnr_db(ref, y(a_s, _fake_quant(w_s, w_scheme)))),
        }
    return out
