"""Step 2: weight quantization by BRECQ block reconstruction with AdaRound (W4 or W8), QNCD's smoothing first when
asked, resumable after every unit."""
from __future__ import annotations

import argparse
import time

import torch

from ldm.fileio import file_fingerprint
from pipeline import cli
from pipeline.artifacts import is_current, save_artifact, save_timing
from pipeline.quantize import (QUANT_KIND, Stopwatch, finish_partial, load_calibration, make_quant_model,
                               resumable_reconstruct)
from pipeline.sampling import ddim_timesteps
from quant.api import quantized_state
from quant.reconstruction import Phase, ReconConfig, sqnr_db
from quant.smoothing import Formula, apply_smoothing_, smoothing_factors


def weight_meta(args: argparse.Namespace, base: dict) -> dict:
    """What identifies a step-2 model: the run's meta, the QuantConfig's flags and every reconstruction setting."""
    return {**base, "w_bits": args.w_bits, "a_bits": None, "policy": args.policy, "channel_wise": args.channel_wise,
            "split_shortcut": args.split_shortcut or None, "smoothing": args.smoothing}


def run(args: argparse.Namespace) -> None:
    cli.check_sampling_args(args)
    cli.check_quant_args(args)
    base = cli.model_meta(args)
    cli.model_family(args)  # a config of no known family stops here, before anything is written
    layout, tag = cli.layout(args), cli.quant_tag(args, weights_only=True)
    out, cal_path = layout.quant(tag), layout.calibration
    meta = {**weight_meta(args, base), "calibration": file_fingerprint(cal_path) if cal_path.is_file() else None,
            "weight_iters": args.weight_iters, "recon_batch_size": args.recon_batch_size,
            "round_weight": args.round_weight, "seed": args.seed, "cache_dtype": args.cache_dtype,
            # recorded when not the default (artifacts made before the option stay current)
            **({"cache_batch_size": args.cache_batch_size} if args.cache_batch_size != cli.CACHE_BATCH_SIZE else {})}
    if is_current(out, QUANT_KIND, meta, args.force, "this quantized model"):
        return
    cli.ensure_writable_dir(out.parent)
    device = cli.pick_device(args.device)
    family, model = cli.load_model(args, device)
    timesteps = ddim_timesteps(model, args.steps, args.eta)
    data, held, _ = load_calibration(cal_path, base, timesteps, device)
    meta["timesteps"] = timesteps
    torch.manual_seed(args.seed)

    t0 = time.time()
    # the model's own UNet is quantized (no copy): the EMA weights, if any, stay swapped in until the step ends
    with family.ema_scope(model):
        quantize_and_save(args, meta, family.unet(model), data, held, out, t0, device)


def quantize_and_save(args: argparse.Namespace, meta: dict, unet: torch.nn.Module, data, held, out, t0: float,
                      device: torch.device) -> None:
    """Smoothing (QNCD), weight ranges, AdaRound unit by unit, the SQNRs, then the artifact and its timings."""
    qm = make_quant_model(unet, meta, copy=False).to(device)
    if args.smoothing:  # QNCD: before the weight ranges are chosen (they must see W·S)
        factors = smoothing_factors(qm, data, Formula(args.smoothing))
        apply_smoothing_(qm, factors)
        print(f"QNCD smoothing ({args.smoothing} formula) of {len(factors)} ResBlocks; S in "
              f"[{min(float(f.abs().min()) for f in factors.values()):.3g}, "
              f"{max(float(f.abs().max()) for f in factors.values()):.3g}]")
    init, sqnr = Stopwatch(), Stopwatch()
    init.wrap(qm.init_weights_)()
    held = held or data
    sqnr_nearest = sqnr.wrap(sqnr_db)(qm, held)
    granularity = "per-channel" if args.channel_wise else "per-tensor"
    print(f"[{args.preset_used}] W{args.w_bits} ({args.policy}, {granularity}): round-to-nearest SQNR "
          f"{sqnr_nearest:.2f} dB on {len(held)} held-out inputs; " +
          (f"reconstructing with {args.weight_iters} AdaRound iterations per unit, batch {args.recon_batch_size}, "
           f"on {device}" if args.weight_iters else "no reconstruction (--weight_iters 0: QNCD's W8)"))
    cfg = ReconConfig(iters=args.weight_iters, batch_size=args.recon_batch_size, round_weight=args.round_weight,
                      cache=cli.cache_spec(args), cache_batch_size=args.cache_batch_size, seed=args.seed)
    units: list[dict] = []
    summaries = resumable_reconstruct(qm, data, Phase.WEIGHT, cfg, out, meta, timings=units) \
        if args.weight_iters else []
    sqnr_ada = sqnr.wrap(sqnr_db)(qm, held)
    meta.update(sqnr_nearest_db=sqnr_nearest, sqnr_adaround_db=sqnr_ada)
    state = quantized_state(qm, bool(args.smoothing))
    save_artifact(out, QUANT_KIND, meta, {"quant_state": state.pop("quant_state"), "summaries": summaries, **state})
    # the parts a full-size run scales differently (benchmarks/cin256_rehearsal.py projects each from here)
    save_timing(out, seconds=time.time() - t0, init_weights_s=init.seconds, sqnr_s=sqnr.seconds, held_out=len(held),
                units=units)
    finish_partial(out)
    after = f" -> AdaRound {sqnr_ada:.2f} dB ({len(summaries)} units" if summaries else " (no reconstruction"
    print(f"W{args.w_bits} SQNR on held-out inputs: nearest {sqnr_nearest:.2f} dB{after}, {time.time() - t0:.0f} s); "
          f"wrote {out}")
