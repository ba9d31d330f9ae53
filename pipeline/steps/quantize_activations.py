"""Step 3: activation quantization (A8 or A6, optionally the attention matmuls with --sm_abit) on step 2's weights:
initial ranges by the L2.4 clipping search, step sizes learned unit by unit (LSQ-style, resumable), and QNCD's
running-stat EMA ranges when asked."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ldm.fileio import file_fingerprint
from ldm.util import UserFacingError
from pipeline.artifacts import ArtifactMismatch, is_current, load_artifact, load_progress
from pipeline.basics import check_at_least, ensure_writable_dir
from pipeline.families import ModelFamily
from pipeline.layout import QuantTag, partial_path
from pipeline.quantize import (CALIBRATION_KIND, CALIBRATION_SCRIPT, PARTIAL_KIND, QUANT_KIND, RESUME_KEYS,
                               WEIGHT_SCRIPT, CacheSettings, Stopwatch, calibration_data, make_quant_model,
                               resumable_reconstruct, save_quant_state)
from pipeline.run import Run
from pipeline.sampling import ddim_timesteps
from pipeline.steps.quantize_weights import weight_meta
from quant.api import QuantConfig
from quant.reconstruction import Phase, ReconConfig, sqnr_db

RS_MOMENTUM = 0.95        # Q-Diffusion / QNCD's EMA momentum
RS_BATCH = 64             # their LDM chunk size for the EMA pass


@dataclass(frozen=True)
class ActivationSettings:
    """Step 3's calibration: initial ranges from ``init_samples`` calibration inputs (the L2.4 clipping search),
    then ``iters`` step-size iterations per unit (LSQ-style, D²-DPM §4.1: batch ``batch_size``, Adam ``lr``, L_p
    loss ``p``; each unit's inputs from the FP model or, ``inputs`` "quantized", the quantized prefix), then QNCD's
    ``running_stat`` EMA ranges (None, "all" or "softmax") in chunks of ``rs_batch_size``; ``seed``; the caches."""

    iters: int
    init_samples: int
    batch_size: int = 16
    lr: float = 4e-4
    p: float = 2.4
    seed: int = 0
    inputs: str = "fp"
    running_stat: str | None = None
    rs_batch_size: int = RS_BATCH
    cache: CacheSettings = CacheSettings()

    def __post_init__(self):
        check_at_least("act_init_samples", self.init_samples)
        check_at_least("recon_batch_size", self.batch_size)
        check_at_least("rs_batch_size", self.rs_batch_size)
        check_at_least("act_iters", self.iters, minimum=0)   # 0: initial ranges only
        check_at_least("lr", self.lr, minimum=1e-12)
        check_at_least("p", self.p, minimum=1e-12)
        if self.inputs not in ("fp", "quantized"):
            raise UserFacingError(f"--act_inputs must be fp or quantized, got {self.inputs}")
        if self.running_stat not in (None, "all", "softmax"):
            raise UserFacingError(f"running_stat must be None, all or softmax, got {self.running_stat}")


def activation_meta(acts: ActivationSettings, config: QuantConfig, w_meta: dict, w_path) -> dict:
    """Step 2's meta plus every setting of this step (what an up-to-date step-3 artifact must match)."""
    rs = acts.running_stat
    meta = {**w_meta, "a_bits": config.a_bits, "sm_abit": config.sm_abit, "weights": file_fingerprint(w_path),
            "act_iters": acts.iters, "act_init_samples": acts.init_samples, "act_cache_dtype": acts.cache.dtype,
            "act_batch_size": acts.batch_size, "act_lr": acts.lr, "act_p": acts.p, "act_seed": acts.seed,
            "running_stat": rs, **({"rs_momentum": RS_MOMENTUM} if rs else {}),
            # (only when not the default, so artifacts made before the flag keep their keys)
            **({"rs_batch_size": acts.rs_batch_size} if rs and acts.rs_batch_size != RS_BATCH else {}),
            # recorded when not D²-DPM's FP inputs / the default cache pass (earlier artifacts stay current)
            **({"act_inputs": acts.inputs} if acts.inputs != "fp" else {}),
            **acts.cache.meta("act_cache_batch_size")}
    for k in ("format", "version", "seconds"):
        meta.pop(k, None)
    return meta


def running_stat_(qm, data, acts: ActivationSettings) -> None:
    """QNCD's --running_stat: EMA ranges over the calibration set streamed through the fully quantized model."""
    # shuffled: the set is ordered by timestep, and an EMA over ordered data would keep the last timesteps' ranges
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(acts.seed + 1))
    shuffled = data.rows(order)
    qm.set_quant_state(weight=True, act=True)
    qm.ema_activation_ranges_(tqdm(shuffled.batches(acts.rs_batch_size), total=-(-len(data) // acts.rs_batch_size),
                                   desc="running stat", unit="batch"),
                              momentum=RS_MOMENTUM, softmax_only=acts.running_stat == "softmax")


def run(run: Run, config: QuantConfig, acts: ActivationSettings) -> Path:
    """Quantize the activations of step 2's model (``config`` with its ``a_bits``, ``sm_abit``); returns the quant
    artifact's path (reused when current, resumed after an interruption)."""
    if acts.running_stat == "softmax" and not config.sm_abit:
        raise UserFacingError("--rs_sm_only updates the attention-softmax quantizers, which exist only with "
                              "--sm_abit; add --sm_abit 8 (or 16), or use --running_stat")
    base = run.meta()
    run.family   # noqa: B018  (a config of no known family stops here)
    layout, tag = run.layout, QuantTag.of(config)
    w_path, out, cal_path = layout.quant(tag.weights), layout.quant(tag), layout.calibration
    w_obj = load_artifact(w_path, QUANT_KIND, weight_meta(base, config), f"{WEIGHT_SCRIPT} --w_bits {config.w_bits}")
    meta = activation_meta(acts, config, w_obj["meta"], w_path)
    if is_current(out, QUANT_KIND, {k: v for k, v in meta.items() if not k.startswith("sqnr")}, run.force,
                  "this quantized model"):
        return out
    ensure_writable_dir(out.parent)
    calibration = load_artifact(cal_path, CALIBRATION_KIND, base, CALIBRATION_SCRIPT)   # (before the model loads)
    if meta.get("calibration") != file_fingerprint(cal_path):
        raise ArtifactMismatch(f"{w_path} was reconstructed on another calibration set than {cal_path}; rerun "
                               f"{WEIGHT_SCRIPT} --w_bits {config.w_bits}")
    if acts.init_samples > len(calibration["x"]):
        raise UserFacingError(f"--act_init_samples {acts.init_samples} exceeds the {len(calibration['x'])} "
                              f"calibration inputs; lower it")
    device = run.torch_device()
    family, model = run.load(device)
    data, held = calibration_data(calibration, cal_path, ddim_timesteps(model, run.sampling), device)
    torch.manual_seed(acts.seed)

    t0 = time.time()
    # the model's own UNet is quantized (no copy): the EMA weights, if any, stay swapped in until the step ends
    with family.ema_scope(model):
        calibrate_and_save(run, tag, acts, meta, w_obj, w_path, family.unet(model), data, held, out, t0, device,
                           family)
    return out


def first_ranges(qm, acts: ActivationSettings, data, held, init: Stopwatch, sqnr: Stopwatch) -> dict[str, float]:
    """A fresh model's activation ranges from a seeded random spread of ``acts.init_samples`` calibration inputs
    (the set is ordered by timestep), with the SQNRs before and after (what a resumed run reads back)."""
    sqnr_w = sqnr.wrap(sqnr_db)(qm, held, weight=True, act=False)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(acts.seed))[:acts.init_samples]
    qm.set_quant_state(weight=True)
    # (batches of at most 64, fewer where the preset's cache pass is smaller: cin256's per-row activations are large)
    init.wrap(qm.calibrate_activations_)(data.rows(pick).batches(min(64, acts.cache.batch_size)))
    return {"sqnr_weight_only_db": sqnr_w, "sqnr_act_init_db": sqnr.wrap(sqnr_db)(qm, held, weight=True, act=True)}


def calibrate_and_save(run: Run, tag: QuantTag, acts: ActivationSettings, meta: dict, w_obj: dict, w_path,
                       unet: torch.nn.Module, data, held, out, t0: float, device: torch.device,
                       family: ModelFamily) -> None:
    """Activation ranges, step-size learning unit by unit (and QNCD's running stat), the SQNRs, the artifact."""
    # an interrupted run's checkpoint of these settings, to build the model from and go on
    resume = load_progress(partial_path(out), PARTIAL_KIND, meta, needs=RESUME_KEYS) if acts.iters else None
    # resumed: the checkpoint's state (step 2's weights, the ranges, the steps learned so far), as any quant artifact
    qm = make_quant_model(unet, meta, resume or w_obj, partial_path(out) if resume else w_path, copy=False,
                          family=family).to(device)
    held = held or data
    init, sqnr = Stopwatch(), Stopwatch()
    measured = resume["measured"] if resume is not None else first_ranges(qm, acts, data, held, init, sqnr)
    sqnr_w, sqnr_init = measured["sqnr_weight_only_db"], measured["sqnr_act_init_db"]
    stages = [f"step-size learning ({acts.iters} iterations per unit)"] if acts.iters else []
    stages += [f"running stat ({acts.running_stat})"] if acts.running_stat else []
    what = " + ".join(stages) or "initial ranges only"
    print(f"[{run.preset}] {tag.title()}: SQNR W only {sqnr_w:.2f} dB, with initial activation ranges "
          f"{sqnr_init:.2f} dB; now {what}, on {device}")
    cfg = ReconConfig.activation_defaults(iters=acts.iters, batch_size=acts.batch_size, lr=acts.lr, p=acts.p,
                                          seed=acts.seed, asym=acts.inputs == "quantized", **acts.cache.recon_fields())
    units: list[dict] = []
    summaries = resumable_reconstruct(qm, data, Phase.ACTIVATION, cfg, out, meta, resume, measured,
                                      timings=units) if acts.iters else []
    if acts.running_stat:
        meta["sqnr_before_running_stat_db"] = sqnr.wrap(sqnr_db)(qm, held, weight=True, act=True)
        running_stat_(qm, data, acts)
    sqnr_final = sqnr.wrap(sqnr_db)(qm, held, weight=True, act=True)
    meta.update(sqnr_weight_only_db=sqnr_w, sqnr_act_init_db=sqnr_init, sqnr_db=sqnr_final)
    save_quant_state(out, QUANT_KIND, meta, qm, {"summaries": summaries}, w_obj.get("smoothing"),
                     replaces=[partial_path(out)],
                     timing=dict(act_seconds=time.time() - t0, calibrate_activations_s=init.seconds,
                                 act_init_samples=acts.init_samples, sqnr_s=sqnr.seconds, held_out=len(held),
                                 units=units, resumed=resume is not None))
    print(f"{tag.title()} SQNR on held-out inputs: {sqnr_init:.2f} dB -> {sqnr_final:.2f} dB after {what} "
          f"({time.time() - t0:.0f} s); wrote {out}")
