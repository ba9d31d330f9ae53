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

The methods are the entries of ``pipeline.corrections`` (a registered method is parsed, printed and listed here
with no change to this module); the QNCD probe is a modifier of any quantized method.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from correction.gaussian import Granularity
from correction.qncd import DEFAULT_INTERVAL
from ldm.util import UserFacingError
from pipeline.corrections import METHODS, FitKind, Method


class UnknownSampler(UserFacingError):
    pass


@dataclass(frozen=True)
class SamplerSpec:
    """``method`` (a ``pipeline.corrections`` entry); ``granularity`` of a method fitted per granularity (D²: TENSOR
    or CHANNEL; None otherwise); ``probe``: the QNCD probe period R on top of the method (None: no probe; the method
    is then the probe's base)."""

    method: Method
    granularity: Granularity | None = None
    probe: int | None = None

    def __post_init__(self):
        per = self.method.granularities   # a method fitted per granularity names one (D²: tensor or channel)
        if bool(per) != (self.granularity is not None) or (per and self.granularity not in per):
            raise ValueError(f"{self.method.name}: a granularity is {'required' if per else 'meaningless'}")
        if self.probe is not None and (not self.method.quantized or self.probe < 1):
            raise ValueError("the QNCD probe needs a quantized method and a period R >= 1")

    # ---- names --------------------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, name: str) -> "SamplerSpec":
        """The spec of a CLI name; ``UnknownSampler`` (one line listing the valid names) otherwise."""
        m, spec = _NAME.fullmatch(name), None
        if m:
            base = base_specs().get(m.group("base") or "none")
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
        base = self.method.name + ("" if self.granularity is None else f"-{self.granularity.value}")
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
        return self.method.quantized

    @property
    def fit(self) -> FitKind | None:
        return self.method.fit

    @property
    def needs_generator(self) -> bool:
        """Whether its correction draws noise (S-D², the probe) from a generator of its own."""
        return self.method.draws_noise or self.probe is not None

    @property
    def description(self) -> str:
        what = self.method.description + ("" if self.granularity is None else f", {self.granularity.value}-wise")
        if self.probe is None:
            return what
        if self.method is Method.NONE:
            return f"QNCD runtime noise estimation (R = {self.probe})"
        what = f"{what} + QNCD probe on the residual"
        return f"{what} (R = {self.probe})"


def base_specs() -> dict[str, SamplerSpec]:
    """The probe-free samplers by name, from the registry (``pipeline.corrections``): the methods without a
    granularity in registration order, then for each granularity the methods fitted per granularity (fp32, none,
    ptqd, sd2-tensor, dd2-tensor, sd2-channel, dd2-channel)."""
    methods = list(METHODS.values())
    specs = [SamplerSpec(m) for m in methods if not m.granularities]
    specs += [SamplerSpec(m, g) for g in Granularity for m in methods if g in m.granularities]
    return {str(s): s for s in specs}


def listed_names() -> tuple[str, ...]:
    """The names the scripts list: every base, and the probe alone and on the channel-wise D² corrections (any
    qncd[-rR]+<base> is accepted too)."""
    return (*base_specs(), "qncd", "qncd+dd2-channel", "qncd+sd2-channel")


class _Bases(Mapping):
    """``base_specs()`` as a read-only mapping that follows the registry (a method registered later is in it)."""

    def __getitem__(self, name: str) -> SamplerSpec:
        return base_specs()[name]

    def __iter__(self):
        return iter(base_specs())

    def __len__(self) -> int:
        return len(base_specs())


class _Listed(Sequence):
    """``listed_names()`` as a read-only sequence that follows the registry."""

    def __getitem__(self, i):
        return listed_names()[i]

    def __len__(self) -> int:
        return len(listed_names())


BASES: Mapping[str, SamplerSpec] = _Bases()
LISTED: Sequence[str] = _Listed()
_NAME = re.compile(r"(?P<qncd>qncd(?:-r(?P<interval>[1-9]\d*))?)?(?:(?(qncd)\+)(?P<base>[a-z0-9-]+))?")
