"""The quantization config: what a quantized UNet is, apart from its calibrated values and the model family's
specials. One frozen value object, validated once; a quant artifact's meta is this config serialized (``meta`` /
``from_meta``), and ``quant.model.QuantModel`` is built from it alone."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from quant.quantizer import PerChannel, PerTensor


@dataclass(frozen=True)
class QuantConfig:
    """What a quantized UNet is, apart from its layer filter and its calibrated values.

    ``w_bits``: e.g. 4 or 8 (the paper's W4 / W8), 3; ``a_bits``: None (weights only, step 2), 8, 6 or 4. ``granularity``:
    of the weight ranges. ``sm_abit``: also quantize the attention matmuls, the softmax output at this many bits
    (Q-Diffusion; needs ``a_bits``). ``split_shortcut``: Q-Diffusion's separate ranges for the [h ; skip] halves of
    the decoder skip convs' input."""

    w_bits: int
    a_bits: int | None = None
    granularity: PerTensor | PerChannel = PerTensor()
    sm_abit: int | None = None
    split_shortcut: bool = False
    policy: str = "d2dpm"            # the layer policy's name (the family's specials hold the predicate)
    smoothing: str | None = None     # QNCD's smoothing formula folded in before the weight ranges: code | paper

    def __post_init__(self):
        if self.smoothing not in (None, "code", "paper"):
            raise ValueError(f"smoothing must be None, 'code' or 'paper', got {self.smoothing!r}")
        if not 2 <= self.w_bits <= 16:
            raise ValueError(f"w_bits must be in 2..16, got {self.w_bits}")
        if self.a_bits is not None and not 2 <= self.a_bits <= 16:
            raise ValueError(f"a_bits must be in 2..16 or None, got {self.a_bits}")
        if self.sm_abit is not None and (self.a_bits is None or not 2 <= self.sm_abit <= 16):
            raise ValueError(f"sm_abit must be in 2..16 and needs a_bits, got sm_abit={self.sm_abit}, "
                             f"a_bits={self.a_bits}")
        if not isinstance(self.granularity, (PerTensor, PerChannel)):
            raise TypeError(f"granularity must be PerTensor() or PerChannel(axis), got {self.granularity!r}")

    # ---- the artifact's meta is this config, serialized -----------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """The config as a quant artifact's meta records it (the keys and order every artifact has had:
        ``channel_wise`` for the granularity, ``split_shortcut`` True or None; ``sm_abit`` only with ``a_bits``)."""
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "policy": self.policy,
                "channel_wise": isinstance(self.granularity, PerChannel), "split_shortcut": self.split_shortcut or None,
                "smoothing": self.smoothing, **({"sm_abit": self.sm_abit} if self.a_bits is not None else {})}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "QuantConfig":
        """The config a quant artifact's meta (or a request shaped like one) records."""
        a_bits = meta.get("a_bits")
        return cls(w_bits=meta["w_bits"], a_bits=a_bits,
                   granularity=PerChannel(0) if meta["channel_wise"] else PerTensor(),
                   sm_abit=meta.get("sm_abit") if a_bits else None, split_shortcut=bool(meta.get("split_shortcut")),
                   policy=meta["policy"], smoothing=meta.get("smoothing"))

    @property
    def weights_only(self) -> "QuantConfig":
        """Step 2's config of this model: the weights alone."""
        return replace(self, a_bits=None, sm_abit=None)
