"""What a model family tells quantization about its network: BRECQ's / Q-Diffusion's model-specific "specials".

BRECQ (Li et al. 2021, §3.2) reconstructs block by block, so it must know which module classes are blocks;
Q-Diffusion (Li et al. 2023, §3.3) splits the decoder shortcut convs' input [h ; skip], so it must know where h ends;
QNCD (Chu et al. 2024, spec qncd_ptqd.md §A.2) smooths the second conv of residual blocks that add a time embedding,
so it must know those blocks' parts and how their embedding is computed; D²-DPM's layer policy (spec d2dpm.md §3.2)
names layers; Q-Diffusion's attention quantization wraps the family's attention modules. All of that is knowledge
of one model family. Here it is only *shape*: a family (``pipeline/families/<name>.py``) fills a ``QuantSpecials``
and hands it to ``quant.api.quantize``; nothing in ``quant/`` names a family, a block class or a layer.

    specials = QuantSpecials(unit_types=(MyBlock,), smoothing_sites=(SmoothingSite(MyBlock, ...),),
                             shortcut_splits=my_splits, policies={"all": quantize_all_policy, ...})
    qm = quantize(unet, config, "all", specials=specials)     # qm.specials: find_units and smoothing read it
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, ContextManager, Mapping

import torch
import torch.nn as nn

from quant.attention import AttentionWrapper
from quant.policy import LayerFilter, quantize_all_policy


def no_shortcut_splits(unet: nn.Module) -> dict[str, int]:
    """A network without concatenated skip inputs: nothing to split."""
    return {}


def _always(block: nn.Module) -> bool:
    return True


def _never(block: nn.Module) -> bool:
    return False


@dataclass(frozen=True)
class SmoothingSite:
    """One kind of residual block whose time embedding e is added to the features before a GroupNorm → activation →
    Dropout → conv tail: the conv's input is what QNCD smooths. Paths are relative to the block.

    ``time_embedding(unet, t)``: the embedding shared by all blocks, from timesteps t [N] (float32 or the UNet's
    dtype; may raise ValueError for a UNet whose embedding needs more than t). ``block_embedding(block, emb)``: this
    block's e [N, C] (or [N, 2C] for a FiLM block, ``scale_shift``: h·(1 + scale) + shift, the scale half first).
    ``applies(block)``: whether an instance of ``block_type`` is a site (e.g. only blocks with an embedding).
    A description only: ``quant.smoothing`` finds the sites and does the work."""

    block_type: type[nn.Module]
    norm: str    # the GroupNorm in front of the conv
    conv: str    # the conv whose input is smoothed
    slot: str    # the Dropout right before the conv: ChannelSmoothing takes its place, so the conv keeps its name
    time_embedding: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    block_embedding: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    applies: Callable[[nn.Module], bool] = _always
    scale_shift: Callable[[nn.Module], bool] = _never


@dataclass(frozen=True)
class QuantSpecials:
    """A model family's specials for quantization (the defaults are pure mechanism: no blocks, so every quantized
    layer is its own reconstruction unit; no smoothing sites; no shortcut splits; only the quantize-all policy).

    ``unit_types``: module classes reconstructed as one BRECQ block when they hold a quantized layer (walking the
    UNet in module order, a unit's children are not searched further; loose quantized layers are layer units).
    ``smoothing_sites``: the residual blocks QNCD's smoothing applies to (the first matching site describes a block).
    ``shortcut_splits(unet)``: {fqn of a conv whose input is [h ; skip]: channels of h}, computed on the FP UNet.
    ``policies``: the layer policies by name ("d2dpm", "all", "qncd-sd"; ``quant.policy.POLICIES``), each a
    predicate over this family's layer names. ``attention``: {attention module class: its quantizing wrapper
    (``quant.attention.AttentionWrapper``)}, what ``sm_abit`` wraps (Q-Diffusion's attention matmul quantization);
    empty: the family's attention cannot be quantized that way. ``keep_activations(unit)``: a context in which the
    unit's backward keeps its forward activations instead of recomputing them (the family's gradient
    checkpointing switched off), yielding whether it recomputed before; None: its blocks never recompute.
    Reconstruction uses it for the units whose activations fit ``ReconConfig.recompute_above``."""

    unit_types: tuple[type[nn.Module], ...] = ()
    smoothing_sites: tuple[SmoothingSite, ...] = ()
    shortcut_splits: Callable[[nn.Module], dict[str, int]] = no_shortcut_splits
    policies: Mapping[str, LayerFilter] = field(default_factory=lambda: {"all": quantize_all_policy})
    attention: Mapping[type, AttentionWrapper] = field(default_factory=dict)
    keep_activations: Callable[[nn.Module], ContextManager[bool]] | None = None

    def __post_init__(self):
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in self.unit_types):
            raise TypeError(f"unit_types must be nn.Module classes, got {self.unit_types!r}")
        if not all(isinstance(s, SmoothingSite) for s in self.smoothing_sites):
            raise TypeError("smoothing_sites must be SmoothingSite instances")
        # a read-only view: specials are shared by every model of a family
        object.__setattr__(self, "policies", MappingProxyType(dict(self.policies)))
        object.__setattr__(self, "attention", MappingProxyType(dict(self.attention)))

    # one immutable description shared by every model of the family: a deep-copied QuantModel shares it too, and
    # pickling rebuilds it from a plain dict (a mappingproxy does not pickle)
    def __copy__(self) -> "QuantSpecials":
        return self

    def __deepcopy__(self, memo: dict) -> "QuantSpecials":
        return self

    def __reduce__(self):
        return QuantSpecials, (self.unit_types, self.smoothing_sites, self.shortcut_splits, dict(self.policies),
                               dict(self.attention), self.keep_activations)

    def policy(self, policy: str | LayerFilter) -> LayerFilter:
        """A layer filter: ``policy`` itself when it is one, else this family's predicate of that name."""
        if callable(policy):
            return policy
        if policy not in self.policies:
            raise ValueError(f"unknown layer policy {policy!r}; this model family knows {sorted(self.policies)}")
        return self.policies[policy]

    @property
    def has_shortcut_splits(self) -> bool:
        """Whether the family's network has convs over concatenated skip inputs at all (Q-Diffusion's split)."""
        return self.shortcut_splits is not no_shortcut_splits

    def is_unit(self, module: nn.Module) -> bool:
        return isinstance(module, self.unit_types)
