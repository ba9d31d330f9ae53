"""Where every artifact of a run lives: one object, so no script builds a path by hand.

    <outdir>/<preset>/scale{s}_eta{η}_steps{S}/          one run: a model and its sampler settings
        calibration.pt                                     step 1
        w{b}/quant_w{b}.pt                                 step 2 (weights only); quant_w{b}.partial.pt while running
        w{b}a{b}[sm{b}]/quant_w{b}a{b}[sm{b}].pt           step 3; sm{b}: attention matmuls quantized (--sm_abit)
        w{b}a{b}[sm{b}]/noise_stats.pt                     step 4 (+ noise_stats.partial.pt, noise_stats_spill/)
        w{b}a{b}[sm{b}]/gaussian_{tensor,channel}.pt       step 5 (+ ptqd.pt, noise_stats.png): one file per fit kind
                                                           (and granularity) of pipeline.corrections
        w{b}a{b}[sm{b}]/samples/                           step 6 grids
        <w{b}a{b}[sm{b}]|fp32>/samples_<sampler>_n{N}_seed{S}/   step 7 (evaluation protocol: shards/, manifest.json,
                                                           samples.npz); -packed / -compiled / -int /
                                                           -bf16 / -tf32 after the sampler name for how it ran

QNCD's smoothing is a property of the quantized model recorded in its meta, not of the path: runs with and without
it use separate ``outdir``s (``make demo SMOOTH=1`` writes outputs-smooth/), and a mismatch is refused on load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from correction.gaussian import Granularity
from pipeline.corrections import FitKind


@dataclass(frozen=True)
class QuantTag:
    """The bits of a quantized model, as its folder names them: w4, w4a8, w4a8sm8."""

    w_bits: int
    a_bits: int | None = None
    sm_abit: int | None = None

    def __post_init__(self):
        if self.sm_abit is not None and self.a_bits is None:
            raise ValueError("sm_abit (attention quantization) needs a_bits")

    def __str__(self) -> str:
        a = "" if self.a_bits is None else f"a{self.a_bits}"
        return f"w{self.w_bits}{a}" + ("" if self.sm_abit is None else f"sm{self.sm_abit}")

    @classmethod
    def of(cls, config) -> "QuantTag":
        """The tag of a ``quant.api.QuantConfig`` (its bits)."""
        return cls(config.w_bits, config.a_bits, config.sm_abit)

    @property
    def weights(self) -> "QuantTag":
        """The step-2 model this one's weights come from."""
        return QuantTag(self.w_bits)

    @property
    def flags(self) -> str:
        """The command-line flags that select this model."""
        out = f"--w_bits {self.w_bits}" + ("" if self.a_bits is None else f" --a_bits {self.a_bits}")
        return out + ("" if self.sm_abit is None else f" --sm_abit {self.sm_abit}")

    def title(self) -> str:
        """W4A8, W4A8 (softmax A8) for reports."""
        head = f"W{self.w_bits}" + ("" if self.a_bits is None else f"A{self.a_bits}")
        return head + ("" if self.sm_abit is None else f" (attention, softmax A{self.sm_abit})")


FP32 = "fp32"  # the folder of the full-precision model's evaluation samples

_RUN_NAME = re.compile(r"scale(?P<scale>.+)_eta(?P<eta>.+)_steps(?P<steps>\d+)(?:_(?!plms$)(?P<grid>[a-z-]+))?"
                       r"(?P<plms>_plms)?")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run: ``outdir``/``preset``/scale{s}_eta{η}_steps{S}."""

    outdir: Path
    preset: str
    steps: int
    eta: float
    scale: float
    grid: str | None = None   # a timestep grid other than the family's default adds _<grid> (e.g. _quad)
    plms: bool = False        # PLMS sampling adds _plms

    @property
    def run_dir(self) -> Path:
        grid = ("" if self.grid is None else f"_{self.grid}") + ("_plms" if self.plms else "")
        return Path(self.outdir) / self.preset / f"scale{self.scale:g}_eta{self.eta:g}_steps{self.steps}{grid}"

    @property
    def calibration(self) -> Path:
        return self.run_dir / "calibration.pt"

    def model_dir(self, tag: QuantTag | str) -> Path:
        return self.run_dir / str(tag)

    def quant(self, tag: QuantTag) -> Path:
        return self.model_dir(tag) / f"quant_{tag}.pt"

    def noise_stats(self, tag: QuantTag) -> Path:
        return self.model_dir(tag) / "noise_stats.pt"

    def noise_stats_spill(self, tag: QuantTag) -> Path:
        """Step 4's float32 spill of the (ε̂, ε_fp) values for the outlier filter (removed after step 4 by default)."""
        return self.model_dir(tag) / "noise_stats_spill"

    def noise_plot(self, tag: QuantTag) -> Path:
        return self.model_dir(tag) / "noise_stats.png"

    def fit(self, tag: QuantTag, kind: FitKind, granularity: Granularity | str | None = None) -> Path:
        """A step-5 fit of ``kind``; its file name is the registry's (``pipeline.corrections``)."""
        return self.model_dir(tag) / kind.file_name(granularity)

    def gaussian(self, tag: QuantTag, granularity: Granularity | str) -> Path:
        return self.fit(tag, FitKind.GAUSSIAN, granularity)

    def ptqd(self, tag: QuantTag) -> Path:
        return self.fit(tag, FitKind.PTQD)

    def grids(self, tag: QuantTag | str) -> Path:
        return self.model_dir(tag) / "samples"

    def packed(self, tag: QuantTag) -> Path:
        """The packed (integer-coded) export of ``quant(tag)`` (``quant_scripts/export_packed.py``)."""
        return self.model_dir(tag) / f"packed_{tag}.pt"

    def eval_samples(self, tag: QuantTag | str, sampler: str, n: int, seed: int,
                     classes: tuple[int, ...] | None = None, variant: str = "") -> Path:
        """Step 7's folder (the evaluation protocol: N class-balanced samples from one base seed; a class subset,
        not comparable with the full protocol, is named in the folder; ``variant``: how the quantized UNet was
        loaded and run, e.g. ``-int`` for integer kernels, ``-compiled`` for compiled fake-quant kernels, ``-packed``
        from a packed file, ``-bf16`` / ``-tf32`` for a sampling --precision other than exact FP32)."""
        subset = "" if classes is None else "_classes" + "-".join(str(c) for c in classes)
        return self.model_dir(tag) / f"samples_{sampler}{variant}_n{n}_seed{seed}{subset}"

    def elsewhere(self, path: Path) -> str:
        """' (it exists for other settings: sample with --steps 20 --eta 0 --scale 3)' when the same file exists in
        another run of the preset (another sampler setting); '' otherwise."""
        rel = Path(path).relative_to(self.run_dir)
        found = []
        for p in sorted(self.run_dir.parent.glob(f"*/{rel}")):
            m = _RUN_NAME.fullmatch(p.relative_to(self.run_dir.parent).parts[0])
            if m and m.group(0) != self.run_dir.name:
                grid = f" --skip_type {m.group('grid')}".replace("-corrected", " --corrected_grid") \
                    if m.group("grid") else ""
                grid += " --plms" if m.group("plms") else ""
                found.append(f"--steps {m.group('steps')} --eta {m.group('eta')} --scale {m.group('scale')}{grid}")
        return f" (it exists for other settings: sample with {' or '.join(found[:3])})" if found else ""


def partial_path(path: str | Path) -> Path:
    """The resume checkpoint of an artifact being made: quant_w4.pt -> quant_w4.partial.pt."""
    path = Path(path)
    return path.with_name(path.stem + ".partial.pt")
