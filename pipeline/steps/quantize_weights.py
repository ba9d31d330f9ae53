"""Step 2: weight quantization by BRECQ block reconstruction with AdaRound (W4 or W8), QNCD's smoothing first when
asked, resumable after every unit."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.fileio import file_fingerprint
from ldm.util import UserFacingError
from pipeline.artifacts import is_current, load_artifact, load_progress
from pipeline.basics import check_at_least, pick_device
from pipeline.families import ModelFamily
from pipeline.layout import QuantTag, partial_path
from pipeline.quantize import (CALIBRATION_KIND, CALIBRATION_SCRIPT, PARTIAL_KIND, QUANT_KIND, RESUME_KEYS,
                               CacheSettings, Stopwatch, calibration_data, make_quant_model, resumable_reconstruct,
                               save_quant_state)
from pipeline.run import Run
from pipeline.sampling import ddim_timesteps
from quant.api import QuantConfig
from quant.reconstruction import Phase, ReconConfig, sqnr_db
from quant.smoothing import Formula, smooth_


@dataclass(frozen=True)
class WeightSettings:
    """Step 2's reconstruction (BRECQ + AdaRound, D²-DPM §4.1): ``iters`` AdaRound iterations per unit (0: round to
    nearest, QNCD's W8), mini-batches of ``batch_size``, rounding regulariser λ ``round_weight``, ``seed``, and
    where the unit caches live."""

    iters: int
    batch_size: int = 8
    round_weight: float = 0.01
    seed: int = 0
    cache: CacheSettings = CacheSettings()

    def __post_init__(self):
        check_at_least("weight_iters", self.iters, minimum=0)   # 0: no reconstruction
        check_at_least("round_weight", self.round_weight, minimum=0)
        check_at_least("recon_batch_size", self.batch_size)

    def meta(self) -> dict:
        return {"weight_iters": self.iters, "recon_batch_size": self.batch_size, "round_weight": self.round_weight,
                "seed": self.seed, "cache_dtype": self.cache.dtype,
                # recorded when not the default (artifacts made before the option stay current)
                **self.cache.meta("cache_batch_size")}


def weight_meta(base: dict, config: QuantConfig) -> dict:
    """What identifies a step-2 model: the run's meta and its quantization config (weights only)."""
    return {**base, **config.weights_only.meta()}


def check_specials(family: ModelFamily, config: QuantConfig) -> None:
    """Options that would do nothing on this family's network are refused in one line: QNCD's smoothing needs
    residual blocks that add a time embedding before a conv, Q-Diffusion's split needs concatenated skip inputs."""
    specials = family.quant_specials()
    if config.smoothing and not specials.smoothing_sites:
        raise UserFacingError(f"--scale_split_static (or --quant_mode qncd): QNCD's smoothing acts on residual blocks "
                              f"that add a time embedding before a conv, and the {family.name} family has none; drop "
                              f"it (--quant_mode brecq)")
    if config.split_shortcut and not specials.has_shortcut_splits:
        raise UserFacingError(f"--split: Q-Diffusion's shortcut split acts on convs whose input concatenates a skip "
                              f"connection, and the {family.name} family has none; drop --split")


def run(run: Run, config: QuantConfig, weights: WeightSettings) -> Path:
    """Quantize the run's UNet weights as ``config`` says (its activation bits are step 3's): QNCD's smoothing when
    asked (before the weight ranges are chosen: they must see W·S), the weight ranges, AdaRound unit by unit
    (resumable), the SQNRs, then the artifact and its timings. Returns the quant artifact's path (reused when
    current, resumed after an interruption)."""
    config = config.weights_only
    base = run.meta()
    check_specials(run.family, config)   # (a config of no known family stops here too, before anything is written)
    layout = run.layout
    out, cal_path = layout.quant(QuantTag.of(config)), layout.calibration
    meta = {**weight_meta(base, config), "calibration": file_fingerprint(cal_path) if cal_path.is_file() else None,
            **weights.meta()}
    if is_current(out, QUANT_KIND, meta, run.force, "this quantized model"):   # (refuses an output it cannot write)
        return out
    # the inputs first, before the model loads: the calibration set, and an interrupted run's checkpoint of these
    # settings to build the model from and go on (its timesteps follow from the settings already compared)
    calibration = load_artifact(cal_path, CALIBRATION_KIND, base, CALIBRATION_SCRIPT)
    resume = load_progress(partial_path(out), PARTIAL_KIND, meta, needs=RESUME_KEYS) if weights.iters else None
    device = pick_device(run.device)
    family, model = run.load(device)
    meta["timesteps"] = timesteps = ddim_timesteps(model, run.sampling)
    data, held = calibration_data(calibration, cal_path, timesteps, device)
    held = held or data
    cfg = ReconConfig(iters=weights.iters, batch_size=weights.batch_size, round_weight=weights.round_weight,
                      seed=weights.seed, **weights.cache.recon_fields())
    torch.manual_seed(weights.seed)
    t0 = time.time()
    # the model's own UNet is quantized (no copy): the EMA weights, if any, stay swapped in until the step ends
    with family.ema_scope(model):
        # resumed: the checkpoint's smoothing and quantized state, as any quant artifact restores them
        qm = make_quant_model(family.unet(model), meta, resume, partial_path(out), copy=False,
                              family=family).to(device)
        init, sqnr = Stopwatch(), Stopwatch()
        if resume is None:
            if config.smoothing:  # QNCD: before the weight ranges are chosen (they must see W·S)
                factors = smooth_(qm, data, Formula(config.smoothing))
                print(f"QNCD smoothing ({config.smoothing} formula) of {len(factors)} ResBlocks; S in "
                      f"[{min(float(f.abs().min()) for f in factors.values()):.3g}, "
                      f"{max(float(f.abs().max()) for f in factors.values()):.3g}]")
            init.wrap(qm.init_weights_)()
            measured = {"sqnr_nearest_db": sqnr.wrap(sqnr_db)(qm, held)}   # (what a resumed run reads back)
        else:
            measured = resume["measured"]
        sqnr_nearest = measured["sqnr_nearest_db"]
        granularity = "per-channel" if meta["channel_wise"] else "per-tensor"
        print(f"[{run.preset}] W{config.w_bits} ({config.policy}, {granularity}): round-to-nearest SQNR "
              f"{sqnr_nearest:.2f} dB on {len(held)} held-out inputs; " +
              (f"reconstructing with {weights.iters} AdaRound iterations per unit, batch {weights.batch_size}, "
               f"on {device}" if weights.iters else "no reconstruction (--weight_iters 0: QNCD's W8)"))
        units: list[dict] = []
        summaries = resumable_reconstruct(qm, data, Phase.WEIGHT, cfg, out, meta, resume, measured,
                                          timings=units) if weights.iters else []
        sqnr_ada = sqnr.wrap(sqnr_db)(qm, held)
        meta.update(sqnr_nearest_db=sqnr_nearest, sqnr_adaround_db=sqnr_ada)
        # the timings: the parts a full-size run scales differently (benchmarks/cin256_rehearsal.py projects them)
        save_quant_state(out, QUANT_KIND, meta, qm, {"summaries": summaries},
                         timing=dict(seconds=time.time() - t0, init_weights_s=init.seconds, sqnr_s=sqnr.seconds,
                                     held_out=len(held), units=units, resumed=resume is not None),
                         replaces=[partial_path(out)])
    after = f" -> AdaRound {sqnr_ada:.2f} dB ({len(summaries)} units" if summaries else " (no reconstruction"
    print(f"W{config.w_bits} SQNR on held-out inputs: nearest {sqnr_nearest:.2f} dB{after}, "
          f"{time.time() - t0:.0f} s); wrote {out}")
    return out
