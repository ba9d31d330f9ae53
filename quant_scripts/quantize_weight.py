"""Step 2 of the pipeline: weight quantization by BRECQ block reconstruction with AdaRound (W4 or W8).

    python quant_scripts/quantize_weight.py                     # fashion preset, W4
    python quant_scripts/quantize_weight.py --w_bits 8
    python quant_scripts/quantize_weight.py --preset cin256     # the paper: 10k iterations per unit, batch 8

Reads outputs/<preset>/scale{s}_eta{η}_steps{S}/calibration.pt (step 1), writes .../w{b}/quant_w{b}.pt. A checkpoint
is written after every reconstruction unit (quant_w{b}.partial.pt): rerun the same command after an interruption and
it resumes at the next unit. The UNet ε SQNR on held-out calibration inputs is printed for round-to-nearest and for
AdaRound and stored in the artifact's meta.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.models.diffusion.ddim import DDIMSchedule  # noqa: E402
from quant.artifacts import ArtifactMismatch, file_fingerprint, load_artifact, save_artifact  # noqa: E402
from quant.pipeline import (QUANT_KIND, build_quant_model, finish_partial, load_calibration,  # noqa: E402
                            resumable_reconstruct)
from quant.reconstruction import Phase, ReconConfig, sqnr_db  # noqa: E402
from quant.smoothing import Formula, apply_smoothing_, smoothing_factors, smoothing_state  # noqa: E402
from quant_scripts.common import (add_model_args, add_quant_args, add_sampling_args, apply_preset,  # noqa: E402
                                  cache_spec, check_quant_args, check_sampling_args, ensure_writable_dir, load_ldm,
                                  model_meta, pick_device, run_cli, run_dir)

# ---- defaults (edit here or override with flags) ---------------------------------------------------------------
PRESET = "fashion"
W_BITS = 4
POLICY = "d2dpm"          # D²-DPM's layer policy; "all" quantizes every Conv/Linear (Q-Diffusion)
CHANNEL_WISE = False      # D²-DPM: per-tensor weight scales
WEIGHT_ITERS = None       # AdaRound iterations per unit (None: the preset's; paper 10,000)
RECON_BATCH_SIZE = 8      # D²-DPM: 8
ROUND_WEIGHT = 0.01       # λ of the rounding regulariser
SEED = 0
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, PRESET)
    add_sampling_args(p)
    add_quant_args(p, W_BITS, POLICY, CHANNEL_WISE)
    p.add_argument("--weight_iters", type=int, default=WEIGHT_ITERS)
    p.add_argument("--recon_batch_size", type=int, default=RECON_BATCH_SIZE)
    p.add_argument("--round_weight", type=float, default=ROUND_WEIGHT)
    p.add_argument("--seed", type=int, default=SEED)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_preset(args, PRESET)
    check_sampling_args(args)
    check_quant_args(args)
    base = model_meta(args)
    rdir = run_dir(args)
    out = ensure_writable_dir(rdir / f"w{args.w_bits}") / f"quant_w{args.w_bits}.pt"
    cal_path = rdir / "calibration.pt"
    meta = {**base, "w_bits": args.w_bits, "a_bits": None, "policy": args.policy, "channel_wise": args.channel_wise,
            "split_shortcut": args.split_shortcut or None, "smoothing": args.smoothing,
            "calibration": file_fingerprint(cal_path) if cal_path.is_file() else None,
            "weight_iters": args.weight_iters, "recon_batch_size": args.recon_batch_size,
            "round_weight": args.round_weight, "seed": args.seed}
    if out.exists() and not args.force:
        try:
            load_artifact(out, QUANT_KIND, meta)
            print(f"{out} already holds this quantized model; skipping (--force to redo)")
            return
        except ArtifactMismatch:
            print(f"{out} was made with other settings; redoing it")
    device = pick_device(args.device)
    _, model = load_ldm(args, device)
    timesteps = DDIMSchedule.make(model.alphas_cumprod, args.steps, args.eta).timesteps.tolist()
    data, held, _ = load_calibration(cal_path, base, timesteps, device)
    meta["timesteps"] = timesteps
    torch.manual_seed(args.seed)

    t0 = time.time()
    with model.ema_scope():
        qm = build_quant_model(model.model.diffusion_model, meta).to(device)
    if args.smoothing:  # QNCD: before the weight ranges are chosen (they must see W·S)
        factors = smoothing_factors(qm, data, Formula(args.smoothing))
        apply_smoothing_(qm, factors)
        print(f"QNCD smoothing ({args.smoothing} formula) of {len(factors)} ResBlocks; S in "
              f"[{min(float(f.abs().min()) for f in factors.values()):.3g}, "
              f"{max(float(f.abs().max()) for f in factors.values()):.3g}]")
    qm.init_weights_()
    held = held or data
    sqnr_nearest = sqnr_db(qm, held)
    granularity = "per-channel" if args.channel_wise else "per-tensor"
    print(f"[{args.preset_used}] W{args.w_bits} ({args.policy}, {granularity}): round-to-nearest SQNR "
          f"{sqnr_nearest:.2f} dB on {len(held)} held-out inputs; reconstructing with "
          f"{args.weight_iters} AdaRound iterations per unit, batch {args.recon_batch_size}, on {device}")
    cfg = ReconConfig(iters=args.weight_iters, batch_size=args.recon_batch_size, round_weight=args.round_weight,
                      cache=cache_spec(args), seed=args.seed)
    summaries = resumable_reconstruct(qm, data, Phase.WEIGHT, cfg, out, meta)
    sqnr_ada = sqnr_db(qm, held)
    meta.update(sqnr_nearest_db=sqnr_nearest, sqnr_adaround_db=sqnr_ada, seconds=time.time() - t0)
    payload = {"quant_state": qm.quant_state_dict(), "summaries": summaries}
    if args.smoothing:
        payload["smoothing"] = smoothing_state(qm)
    save_artifact(out, QUANT_KIND, meta, payload)
    finish_partial(out)
    print(f"W{args.w_bits} SQNR on held-out inputs: nearest {sqnr_nearest:.2f} dB -> AdaRound {sqnr_ada:.2f} dB "
          f"({len(summaries)} units, {time.time() - t0:.0f} s); wrote {out}")


if __name__ == "__main__":
    run_cli(main)
