"""DiT (Peebles & Xie 2023): the class-conditional latent diffusion transformer as a pipeline model family, sampled
with DDIM over DiT's respaced timesteps (``ldm.models.dit_diffusion``), guided against the null class
``num_classes``, decoded by DiT's VAE (a diffusers sd-vae-ft-ema/-mse folder) or a CompVis first stage (the VQ-f4 of
an LDM export, the embedded Fashion DiT's).

The config (``configs/dit/ptq-*.yaml``)::

    model:
      target: ldm.models.dit_diffusion.DiTDiffusion     # what makes a config this family's
      params:
        num_timesteps: 1000                             # DiT's create_diffusion: linear β 1e-4 … 0.02
        dit_config: {target: ldm.modules.dit.DiT, params: {...}}    # or ldm.modules.dit.named_dit
        first_stage: {vae: stabilityai/sd-vae-ft-ema}   # or {ldm: models/ldm/fashion-ldm-vq-4}

The checkpoint (``--ckpt``) holds the DiT alone: a released plain state_dict (DiT-XL-2-256x256.pt) or a ``train.py``
checkpoint (its EMA weights), read by ``ldm.models.dit_checkpoint`` (weights-only, strict).

Guidance. The pipeline guides with ``ldm.models.diffusion.ddim.cfg_eps`` on the ε this family's denoiser returns:
**every** latent channel (4 for DiT-XL/2). DiT's own ``forward_with_cfg`` guides only channels 0-2 (hard-coded 3
in the original) and leaves ε channel 3 conditional. At scale 1 both are the conditional ε; above 1 they differ in
channel 3 only (tests/test_dit_family.py checks both). The variance half v of the DiT's output is not used: DDIM.

Quantization specials (``DIT_SPECIALS``):

* BRECQ units: the ``DiTBlock``s (attention, MLP and adaLN modulation of one block reconstructed together);
  the patch embedding, the timestep MLP and the final layer's two Linears are layer units.
* No smoothing sites: QNCD's embedding-derived smoothing divides the input of a ResBlock's second conv by factors
  computed from the time embedding added before its GroupNorm; a DiT block has no such conv (its conditioning is
  adaLN's shift/scale/gate), so there is nothing to smooth.
* No shortcut splits: no concatenated skip inputs.
* Layer policies (``quant.policy.POLICIES``), over the names of ``DiTDenoiser`` (``dit.`` + the DiT's names).
  Every block Linear -- qkv, proj, fc1, fc2 and the adaLN modulation -- is at the target bits under ``d2dpm`` and
  ``all``, as PTQ4DiT (Wu et al. 2024) and Q-DiT (Chen et al. 2024) quantize DiT blocks. Outside the blocks:

  - ``all``: every Conv/Linear at the target bits (Q-Diffusion's policy; PTQ4DiT's released code also
    reconstructs the final layer as a quantized block).
  - ``d2dpm``: D²-DPM's roles mapped onto the DiT. The first timestep Linear (``t_embedder.mlp.0``, CompVis'
    ``time_embed.0``) and the output layer (``final_layer.linear``, the output conv) run at W8A8. The rest is at
    the target bits. **One deviation**: the patch embedding (``x_embedder.proj``, the input conv D²-DPM keeps at
    W8A8) stays FP32, as Q-DiT keeps it. Its input is x_t itself, and at small t ε is read off the tiny noise part
    of x_t (ε = (x_t − √ᾱ x̂0)/√(1 − ᾱ), √(1 − ᾱ_0) = 0.01), below the step of an 8-bit per-tensor range over
    all timesteps (|x_t| up to ~5). Measured on a partly trained Fashion DiT (ε SQNR on held-out calibration
    inputs, 20 steps, scale 1.5, weights rounded to nearest): W8A8 32.9 dB with the patch embedding FP32, 21.7 dB
    with it at W8A8; the patch embedding alone at W8A8 leaves 4.2 dB at t = 0 and 39 dB above t = 400. Each other
    outer layer costs ≤ 0.3 dB at W8A8. A DiT has no skip or Downsample convs, so nothing else stays FP32.
  - ``qncd-sd``: QNCD's "all but the transformer blocks", taken literally: every DiT block stays FP, and only the
    embeddings and the final layer are quantized.

  The label table is an ``nn.Embedding``, FP under every policy (a lookup, no matmul).
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ldm.models.diffusion.ddim import ModelFn
from ldm.models.diffusers_vae import load_diffusers_vae
from ldm.models.dit_checkpoint import load_dit_state
from ldm.models.dit_diffusion import DiTDiffusion, FirstStage, check_dit_steps
from ldm.dit_sample import load_ldm_first_stage
from ldm.modules.dit import DiT, DiTBlock, dit_config
from ldm.sample import Conditioner, decode_latents
from ldm.util import ConfigError, UserFacingError
from pipeline.basics import resolve
from pipeline.families.base import ModelFamily, config_target
from quant.policy import D2DPMPolicy, ExcludeParts, quantize_all_policy
from quant.specials import QuantSpecials

DIT_TARGET = "ldm.models.dit_diffusion.DiTDiffusion"
DIT_CLASSES = {"ldm.modules.dit.DiT", "ldm.modules.dit.named_dit"}
FIRST_STAGES = {"vae": "a diffusers AutoencoderKL folder (DiT's sd-vae-ft-ema / -mse)",
                "ldm": "a CompVis LDM export folder (config.yaml + model.ckpt) whose first stage decodes"}

# D²-DPM's W8A8 roles under DiTDenoiser's names: the first time-embedding Linear and the output layer; its input
# conv, the patch embedding, stays FP32 (measured: at W8A8 its 8-bit input x_t alone costs 11.5 dB of ε SQNR)
D2DPM_EIGHT_BIT = ("dit.t_embedder.mlp.0", "dit.final_layer.linear")
D2DPM_FP32 = ("dit.x_embedder.proj",)
DIT_SPECIALS = QuantSpecials(
    unit_types=(DiTBlock,),
    smoothing_sites=(),
    policies={"d2dpm": D2DPMPolicy(eight_bit=D2DPM_EIGHT_BIT, fp32_parts=(), fp32_suffixes=D2DPM_FP32),
              "all": quantize_all_policy,
              "qncd-sd": ExcludeParts(("blocks",))})


def _params(config: Any) -> Mapping:
    params = config.model.get("params") if hasattr(config.model, "get") else None
    return params if hasattr(params, "get") else {}


def dit_arguments(spec: Any, where: str = "config") -> dict[str, Any]:
    """The DiT constructor arguments a ``dit_config`` entry names (``ldm.modules.dit.DiT`` with its defaults
    filled in, or ``named_dit``'s named size), without building anything."""
    target = str(spec.get("target", "")) if hasattr(spec, "get") else ""
    params = dict(spec.get("params") or {}) if hasattr(spec, "get") else {}
    if target == "ldm.modules.dit.named_dit":
        return dit_config(**params)
    if target != "ldm.modules.dit.DiT":
        raise ConfigError(f"{where}: model.params.dit_config.target must be one of {sorted(DIT_CLASSES)}, got "
                          f"{target or 'none'}")
    defaults = {k: p.default for k, p in inspect.signature(DiT).parameters.items()}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(f"{where}: unknown DiT argument(s) {unknown} in model.params.dit_config; known: "
                          f"{sorted(defaults)}")
    return {**defaults, **params}


def first_stage_source(params: Mapping, where: str = "config") -> tuple[str, str]:
    """(kind, folder) of ``model.params.first_stage``: exactly one of ``vae`` / ``ldm``."""
    spec = params.get("first_stage")
    given = [k for k in FIRST_STAGES if hasattr(spec, "get") and spec.get(k)]
    extra = sorted(set(spec) - set(FIRST_STAGES)) if hasattr(spec, "keys") else []
    if len(given) != 1 or extra:
        kinds = "; ".join(f"{k}: {v}" for k, v in FIRST_STAGES.items())
        raise ConfigError(f"{where}: model.params.first_stage needs exactly one of vae / ldm ({kinds})")
    return given[0], str(spec[given[0]])


def load_first_stage(kind: str, folder: str, device: torch.device) -> FirstStage:
    if kind == "vae":
        return load_diffusers_vae(resolve(folder), device)
    return load_ldm_first_stage(resolve(folder), device)


def load_dit(dit_args: dict[str, Any], ckpt: str | os.PathLike) -> DiT:
    """A DiT of ``dit_args`` with the checkpoint's weights (released or train.py: ``load_dit_state``, strict); built on
    the meta device first, so no random initialisation is spent on a model every tensor of which is replaced."""
    with torch.device("meta"):
        dit = DiT(**dit_args)
    return load_dit_state(dit.to_empty(device="cpu"), ckpt)


class DiTFamily(ModelFamily):
    name = "dit"
    description = "DiT (Peebles & Xie 2023), class-conditional latent transformer; DDIM on DiT's respaced grid"

    def matches(self, config: Any) -> bool:
        return config_target(config) == DIT_TARGET

    def check_config(self, config: Any, config_name: str) -> None:
        params = _params(config)
        try:
            dit_arguments(params.get("dit_config"), config_name)
        except TypeError as e:
            raise ConfigError(f"{config_name}: model.params.dit_config: {e}") from None
        first_stage_source(params, config_name)
        timesteps = params.get("num_timesteps", 1000)
        if not isinstance(timesteps, int) or timesteps < 2:
            raise ConfigError(f"{config_name}: model.params.num_timesteps must be an integer >= 2, got {timesteps}")

    def num_classes(self, config: Any) -> int | None:
        return int(dit_arguments(_params(config).get("dit_config"))["num_classes"])

    def load(self, config: Any, ckpt: str | os.PathLike | None, *, device: torch.device, trust: bool = False,
             config_name: str = "config", without_unet: bool = False) -> nn.Module:
        """The DiT (weights from ``ckpt``, or random when a packed file brings them: ``without_unet``) with its
        first stage, in eval mode on ``device``. DiT checkpoints are tensors only: ``trust`` is refused."""
        if trust:
            raise UserFacingError("DiT checkpoints load weights-only (train.py's args included); drop "
                                  "--trust_checkpoint")
        params = _params(config)
        args = dit_arguments(params.get("dit_config"), config_name)
        try:
            if without_unet:
                dit = DiT(**args)
            elif ckpt is None:
                raise ConfigError(f"{config_name}: a DiT needs its checkpoint (--ckpt: a released file or a "
                                  f"train.py checkpoint)")
            else:
                dit = load_dit(args, ckpt)
        except (TypeError, ValueError) as e:   # values the modules refuse (hidden size vs heads, patch size...)
            raise ConfigError(f"{config_name} does not fit the DiT code: {' '.join(str(e).split())}") from None
        stage = load_first_stage(*first_stage_source(params, config_name), device)
        latent = stage.model.post_quant_conv.in_channels
        if latent != dit.in_channels:
            raise ConfigError(f"{config_name}: the first stage's latents have {latent} channels, the DiT takes "
                              f"{dit.in_channels}; pair the DiT with the first stage it was trained on")
        return DiTDiffusion(dit, stage, int(params.get("num_timesteps", 1000))).eval().to(device)

    def unet(self, model: nn.Module) -> nn.Module:
        """The DiT behind the UNet signature (``DiTDenoiser``: ``(x, t, context=y) -> ε``)."""
        return model.model

    def quant_specials(self) -> QuantSpecials:
        return DIT_SPECIALS

    def unet_model_fn(self, model: nn.Module, unet: nn.Module) -> ModelFn:
        def model_fn(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            return unet(x, t, context=cond)   # cond: class labels [B] (the null class for the unguided half)
        return model_fn

    def model_fn(self, model: nn.Module) -> ModelFn:
        return model.apply_model

    # ---- conditioning --------------------------------------------------------------------------------------------

    def conditions(self, model: nn.Module, per_condition: int) -> list[int]:
        return [c for c in range(model.dit.num_classes) for _ in range(per_condition)]

    def null_condition(self, model: nn.Module) -> int:
        return model.dit.null_class   # num_classes; one line when the label table has no null row

    def conditioner(self, model: nn.Module, scale: float, uncond: Any = None) -> Conditioner:
        """Labels -> (y, y_null): the labels as a long tensor, and for guidance (scale ≠ 1) the null class (or
        ``uncond``) for every row."""
        null = None if scale == 1.0 else (self.null_condition(model) if uncond is None else int(uncond))

        def condition(labels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
            y = torch.as_tensor(list(labels), dtype=torch.long, device=model.betas.device)
            return y, None if null is None else torch.full_like(y, null)
        return condition

    def check_conditions(self, model: nn.Module, conditions: Sequence[Any], uncond: Any = None) -> None:
        k = model.dit.num_classes
        rows = model.dit.y_embedder.embedding_table.num_embeddings   # k + 1 with the null row
        bad = sorted({c for c in conditions if not 0 <= c < k} |
                     ({uncond} - set(range(rows)) if uncond is not None else set()))
        if bad:
            null = f"; {k} is the null class" if rows > k else "; this DiT has no null class"
            raise UserFacingError(f"class ids {bad} out of range for a DiT with {k} classes (0..{k - 1}{null})")

    def describe(self, conditions: Sequence[Any] | None, n: int, noun: str = "samples") -> str:
        return f"{len(conditions or ())} class-conditional {noun} over {len(set(conditions or ()))} classes"

    # ---- sampling, decoding ----------------------------------------------------------------------------------------

    def check_steps(self, config: Any, steps: int, grid: str | None) -> None:
        """DiT's respacing: any S from 1 to T on its default grid; ``uniform`` (DiT's ddimS) where an integer
        stride gives exactly S steps."""
        check_dit_steps(steps, grid, int(_params(config).get("num_timesteps", 1000)))

    def decode(self, model: nn.Module, z: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images in [-1, 1] (clamped, as DiT saves them with value_range (-1, 1)); a grayscale first stage's single
        channel stays single (``evaluation.images.to_uint8`` repeats it)."""
        return decode_latents(model, z, batch_size=batch_size)


FAMILIES = (DiTFamily(),)
