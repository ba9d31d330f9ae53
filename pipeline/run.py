"""Typed runs: what a pipeline step is given instead of parsed flags. Built once at the edge (``pipeline.cli`` from
a script's flags, or directly by code that composes steps), frozen, checked on construction where the check is
cheap, and read by the steps, which never see argparse.

    ModelSource     which model: config + checkpoint (+ prompts for a text model), the preset that names the run
                    folder; its family (from the yaml alone) and its meta, loaded on demand
    Run             a model with its SamplingSettings, output folder, device and --force: the RunLayout, the meta
                    every artifact of the run records, the loaded model
    SamplerChoice   a sampler spec with how it runs: execution (fake | compiled | integer), a packed file, the
                    precision

The run-independent helpers (paths, presets, devices) are in ``pipeline.basics``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ldm.data.prompts import load_prompts
from ldm.fileio import file_fingerprint
from ldm.precision import Precision
from ldm.util import CheckpointError, UserFacingError, download_hint, load_config, parse_device
from pipeline.basics import disable_grad_checkpointing, load_preset, pick_device, resolve
from pipeline.families import ModelFamily, family_for
from pipeline.layout import RunLayout
from pipeline.packed import Execution
from pipeline.sampler_spec import SamplerSpec
from pipeline.settings import SamplingSettings, grid_name

# ---- the model ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """Which model: ``config`` and ``ckpt`` as given (``resolve`` finds them; the meta records ``config`` as given),
    ``preset`` (a preset's name, or "custom": it names the run folder), ``trust`` (full unpickling of a checkpoint
    weights_only refuses), a text model's prompts (a file, or a list given on the command line) and
    ``grad_ckpt`` (False: --no_grad_ckpt)."""

    config: str
    ckpt: str
    preset: str = "custom"
    trust: bool = False
    prompts: str | None = None
    prompt_list: tuple[str, ...] | None = None
    grad_ckpt: bool = True

    @cached_property
    def unbound(self) -> tuple[Any, ModelFamily]:
        """The config and its family from the yaml alone (cheap checks; a text family without its prompts)."""
        config = load_config(resolve(self.config))
        return config, family_for(config, f"config {self.config}")

    @property
    def config_yaml(self) -> Any:
        return self.unbound[0]

    @cached_property
    def family(self) -> ModelFamily:
        """The model family, a text family bound to the run's prompts (``prompt_list``, else the ``prompts`` file)."""
        family = self.unbound[1]
        if not family.takes_prompts:
            if self.prompts is not None:
                raise UserFacingError(f"--prompts applies to text-to-image models; {self.config} is a {family.name} "
                                      f"model: drop --prompts")
            return family
        if self.prompt_list:
            return family.with_prompts(list(self.prompt_list), "the command line")
        if self.prompts is None:
            raise UserFacingError(f"config {self.config} is a text-to-image model: pass --prompts FILE (one prompt "
                                  f"per line; condition i is line i; txt2img: --from_file FILE or --prompt TEXT)")
        return family.with_prompts(load_prompts(resolve(self.prompts)), str(self.prompts))

    def meta(self) -> dict:
        """What identifies the model in every artifact's meta: the config as given and the checkpoint's
        fingerprint (a missing checkpoint stops here with where to get it)."""
        ckpt = resolve(self.ckpt)
        if not ckpt.is_file():
            released = str(self.ckpt).startswith("released:")
            hint = (f"fetch it (MD5-checked) with: python -m ldm.modules.diffusionmodules.ddim_checkpoint "
                    f"{str(self.ckpt).removeprefix('released:')}" if released else download_hint(Path(self.ckpt)))
            raise CheckpointError(f"checkpoint not found: {ckpt}; {hint}")
        return {"model": str(self.config), "ckpt": file_fingerprint(ckpt)}

    def load(self, device: torch.device, without_unet: bool = False) -> Any:
        """The checkpoint loaded strictly into the family's model, in eval mode on ``device`` (``without_unet``: a
        packed file brings the UNet)."""
        model = self.family.load(self.config_yaml, resolve(self.ckpt), device=device, trust=self.trust,
                                 config_name=f"config {self.config}", without_unet=without_unet)
        if not self.grad_ckpt:
            disable_grad_checkpointing(model)
        return model


# ---- a run ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """A model sampled with ``sampling``: its artifacts live under ``outdir`` (``layout``), it computes on
    ``device`` ("auto": CUDA when present), and ``force`` redoes a step whose artifact is current."""

    model: ModelSource
    sampling: SamplingSettings
    outdir: Path = Path("outputs")
    device: str = "auto"
    force: bool = False

    def __post_init__(self):
        object.__setattr__(self, "outdir", Path(self.outdir))

    @property
    def family(self) -> ModelFamily:
        return self.model.family

    @property
    def preset(self) -> str:
        return self.model.preset

    @cached_property
    def layout(self) -> RunLayout:
        """Where every artifact of this run lives (outputs/<preset>/scale{s}_eta{η}_steps{S}/...)."""
        s = self.sampling
        return RunLayout(self.outdir, self.model.preset, s.steps, float(s.eta), float(s.scale), s.grid, s.plms)

    def check(self) -> "Run":
        """The settings against the model's family, from the yaml alone (the step-count limit is the family's
        grid's); returns the run."""
        config, family = self.model.unbound
        family.check_steps(config, self.sampling.steps, self.sampling.grid)
        return self

    def meta(self) -> dict:
        """What identifies the model and sampler settings in every artifact's meta (checked before anything
        loads)."""
        return {**self.model.meta(), **self.sampling.meta()}

    def torch_device(self) -> torch.device:
        return pick_device(self.device)

    def load(self, device: torch.device, without_unet: bool = False) -> tuple[ModelFamily, Any]:
        """(family, model) on ``device``, the sampling settings checked against the model's timesteps."""
        model = self.model.load(device, without_unet=without_unet)
        self.sampling.check_num_timesteps(model.num_timesteps)
        return self.family, model


@dataclass(frozen=True)
class Preset:
    """A named bundle of a model and its defaults (``configs/presets/<name>.yaml``): what a script's flags left
    unset take (``pipeline.cli.apply_preset``), and what code that composes steps builds its ``Run`` and step
    settings from (``preset.run(outdir)``, ``preset["weight_iters"]``)."""

    name: str
    values: dict

    @classmethod
    def load(cls, name: str) -> "Preset":
        return cls(name, load_preset(name))

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def source(self, **changes: Any) -> ModelSource:
        """The preset's model (its prompt file for a text model); ``changes``: other ModelSource fields."""
        return ModelSource(self.values["config"], self.values["ckpt"], self.name, prompts=self.values.get("prompts"),
                           **changes)

    def sampling(self, **changes: Any) -> SamplingSettings:
        """The preset's sampling settings, ``changes`` (steps, eta, scale, grid, plms) applied."""
        v = self.values
        base = dict(steps=v["steps"], eta=v["eta"], scale=v["scale"],
                    grid=grid_name(v.get("skip_type"), bool(v.get("corrected_grid"))), plms=bool(v.get("plms")))
        return SamplingSettings(**{**base, **changes})

    def run(self, outdir: str | os.PathLike = "outputs", device: str = "auto", force: bool = False,
            **sampling: Any) -> Run:
        """A checked ``Run`` of the preset's model under ``outdir`` (``sampling``: changes to its settings)."""
        return Run(self.source(), self.sampling(**sampling), Path(outdir), device, force).check()


# ---- how a sampler runs ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerChoice:
    """A sampler spec and how it runs: ``execution`` (fake-quant emulation or int8 kernels), ``packed`` (the
    quantized UNet from a packed export instead of the quant artifact and the checkpoint's UNet weights) and the
    float ``precision`` of the UNet and decoder. Checked on construction, before anything loads."""

    spec: SamplerSpec
    execution: Execution = Execution.FAKE
    packed: Path | None = None
    precision: Precision = Precision.FP32

    def __post_init__(self):
        if self.packed is not None:
            object.__setattr__(self, "packed", Path(self.packed))
            if not self.packed.is_file():
                raise UserFacingError(f"--packed {self.packed}: no such file; write it with "
                                      f"quant_scripts/export_packed.py")
        if self.precision is not Precision.FP32 and self.execution is Execution.INTEGER:
            raise UserFacingError(f"--precision {self.precision.value} sets the arithmetic of float layers; "
                                  f"--execution integer computes the quantized ones in int8: drop one of them")

    def check(self, compare: bool = False) -> "SamplerChoice":
        """What the run's samplers allow (``compare``: step 6's rows, FP32 among them): a packed file replaces the
        checkpoint's UNet, so it needs a quantized sampler alone; integer kernels need a quantized sampler to run.
        Returns the choice."""
        if self.packed is not None and (compare or not self.spec.quantized):
            raise UserFacingError("--packed replaces the checkpoint's UNet weights, so no FP32 sampler can run beside "
                                  "it; drop --compare / use a quantized --sampler, or drop --packed")
        if self.execution is not Execution.FAKE and not self.spec.quantized and not compare:
            how = "in int8" if self.execution is Execution.INTEGER else "with compiled fake-quant kernels"
            raise UserFacingError(f"--execution {self.execution.value} runs a quantized model's layers {how}, and "
                                  f"--sampler {self.spec} is the FP32 model: nothing would run that way; pick a "
                                  f"quantized --sampler or drop --execution {self.execution.value}")
        return self

    def check_device(self, device_name: str) -> None:
        if self.precision is Precision.TF32:
            self.precision.check_device(parse_device(device_name))

    @property
    def name(self) -> str:
        return str(self.spec)

    @property
    def suffix(self) -> str:
        """What a step-6/7 file or folder name adds for how it ran: -packed, -compiled / -int, -tf32 / -bf16."""
        execution = {Execution.FAKE: "", Execution.COMPILED: "-compiled", Execution.INTEGER: "-int"}[self.execution]
        return ("-packed" if self.packed else "") + execution + self.precision.suffix
