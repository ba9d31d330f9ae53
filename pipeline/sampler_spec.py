"""Typed sampler specs: what ``--sampler`` names, as values. The CLI names parse here, and only here, and print
back from the spec (``str(SamplerSpec.parse(name)) == name`` for every accepted name).

    fp32          the full-precision model
    none          the quantized UNet, uncorrected
    ptqd          PTQD: correlated-noise, bias and variance-schedule correction (PTQD §4)
    sd2-tensor    S-D², one Gaussian per timestep (D²-DPM Eqs. 11-14)
    dd2-tensor    D-D², one Gaussian per timestep (D²-DPM Eqs. 15-18, Algorithm 1)
    sd2-channel   S-D², one Gaussian per timestep and latent channel
    dd2-channel   D-D², per channel (the seed's default)
    qncd          QNCD's runtime noise estimation: a probe every R = 10 steps (no fit)
    qncd+<base>   the probe on top of a quantized base correction (residual bias): qncd+dd2-channel, qncd+ptqd, ...
    qncd-r5[+<base>]   the same with a probe every 5 steps (any R ≥ 1 other than the default 10)
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from correction.gaussian import Granularity
from correction.qncd import DEFAULT_INTERVAL
from ldm.util import UserFacingError


class Method(enum.Enum):
    """The correction applied to the quantized model's ε (FP32: the FP model, nothing quantized)."""

    FP32 = "fp32"
    NONE = "none"
    PTQD = "ptqd"
    SD2 = "sd2"   # stochastic dual denoising
    DD2 = "dd2"   # deterministic dual denoising


_DESCRIPTION = {Method.FP32: "full-precision model", Method.NONE: "quantized, uncorrected",
                Method.PTQD: "quantized + PTQD (CNC + BC + VSC)", Method.SD2: "quantized + S-D²",
                Method.DD2: "quantized + D-D²"}


class FitKind(enum.Enum):
    """Which step-5 artifact a correction reads."""

    GAUSSIAN = "gaussian"
    PTQD = "ptqd"


class UnknownSampler(UserFacingError):
    pass


@dataclass(frozen=True)
class SamplerSpec:
    """``method``; ``granularity`` of a D² fit (TENSOR or CHANNEL; None otherwise); ``probe``: the QNCD probe period
    R on top of the method (None: no probe; the method is then the probe's base)."""

    method: Method
    granularity: Granularity | None = None
    probe: int | None = None

    def __post_init__(self):
        d2 = self.method in (Method.SD2, Method.DD2)
        if d2 != (self.granularity is not None):
            raise ValueError(f"{self.method.value}: a granularity is {'required' if d2 else 'meaningless'}")
        if self.probe is not None and (self.method is Method.FP32 or self.probe < 1):
            raise ValueError("the QNCD probe needs a quantized method and a period R >= 1")

    # ---- names --------------------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, name: str) -> "SamplerSpec":
        """The spec of a CLI name; ``UnknownSampler`` (one line listing the valid names) otherwise."""
        m, spec = _NAME.fullmatch(name), None
        if m:
            base = BASES.get(m.group("base") or "none")
            if not m.group("qncd"):
                spec = base if m.group("base") else None
            elif base is not None and base.quantized and m.group("base") != "none" and \
                    m.group("interval") != str(DEFAULT_INTERVAL):  # one spelling each: qncd, not qncd+none/-r10
                spec = base.with_probe(int(m.group("interval") or DEFAULT_INTERVAL))
        if spec is None:
            bases = ", ".join(n for n, s in BASES.items() if s.quantized and n != "none")
            raise UnknownSampler(f"unknown sampler '{name}'; choose one of {', '.join(LISTED)}, or "
                                 f"qncd[-rR]+<one of {bases}>")
        return spec

    def __str__(self) -> str:
        base = self.method.value + ("" if self.granularity is None else f"-{self.granularity.value}")
        if self.probe is None:
            return base
        head = "qncd" if self.probe == DEFAULT_INTERVAL else f"qncd-r{self.probe}"
        return head if self.method is Method.NONE else f"{head}+{base}"

    def with_probe(self, interval: int = DEFAULT_INTERVAL) -> "SamplerSpec":
        """This sampler with QNCD's probe every ``interval`` steps (``--sample_reverse --reverse_interval R``)."""
        if not self.quantized or self.probe is not None:
            raise UnknownSampler(f"--sample_reverse adds QNCD's probe to a quantized sampler; '{self}' "
                                 f"is not one (choose one of {', '.join(n for n, s in BASES.items() if s.quantized)})")
        if interval < 1:
            raise UnknownSampler(f"--reverse_interval must be >= 1, got {interval}")
        return SamplerSpec(self.method, self.granularity, interval)

    # ---- what it needs ------------------------------------------------------------------------------------------

    @property
    def quantized(self) -> bool:
        return self.method is not Method.FP32

    @property
    def fit(self) -> FitKind | None:
        if self.method is Method.PTQD:
            return FitKind.PTQD
        return FitKind.GAUSSIAN if self.granularity is not None else None

    @property
    def needs_generator(self) -> bool:
        """Whether its correction draws noise (S-D², the probe) from a generator of its own."""
        return self.method is Method.SD2 or self.probe is not None

    @property
    def description(self) -> str:
        what = _DESCRIPTION[self.method] + ("" if self.granularity is None else f", {self.granularity.value}-wise")
        if self.probe is None:
            return what
        if self.method is Method.NONE:
            return f"QNCD runtime noise estimation (R = {self.probe})"
        what = f"{what} + QNCD probe on the residual"
        return f"{what} (R = {self.probe})"


# the seven probe-free samplers, by name
BASES: dict[str, SamplerSpec] = {str(s): s for s in (
    SamplerSpec(Method.FP32), SamplerSpec(Method.NONE), SamplerSpec(Method.PTQD),
    *(SamplerSpec(m, g) for g in (Granularity.TENSOR, Granularity.CHANNEL) for m in (Method.SD2, Method.DD2)))}
# the names the scripts list: every base, and the probe alone and on the channel-wise D² corrections (any
# qncd[-rR]+<base> is accepted too)
LISTED: tuple[str, ...] = (*BASES, "qncd", "qncd+dd2-channel", "qncd+sd2-channel")
_NAME = re.compile(r"(?P<qncd>qncd(?:-r(?P<interval>[1-9]\d*))?)?(?:(?(qncd)\+)(?P<base>[a-z0-9-]+))?")
