"""Step 3 of the pipeline: activation quantization (A8 or A6) on top of step 2's weights, step sizes learned LSQ-style.

    python quant_scripts/quantize_weight_activation.py                      # fashion preset, W4A8
    python quant_scripts/quantize_weight_activation.py --w_bits 8 --a_bits 8
    python quant_scripts/quantize_weight_activation.py --preset cin256      # the paper: 5k iterations, batch 16

Reads .../w{b}/quant_w{b}.pt (step 2) and calibration.pt (step 1); writes .../w{b}a{b}/quant_w{b}a{b}.pt, the
artifact every later step loads. Each layer's input is quantized with one per-tensor asymmetric range shared by all
timesteps and both guidance branches: initialised by the L2.4 clipping search over ACT_INIT_SAMPLES calibration
inputs (weights quantized), then the step sizes Δ_a are trained unit by unit (Adam 4e-4, cosine decay, L2.4 loss, FP
unit inputs). Resumable after every unit like step 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm.models.diffusion.ddim import DDIMSchedule  # noqa: E402
from ldm.util import UserFacingError  # noqa: E402
from quant.artifacts import ArtifactMismatch, file_fingerprint, load_artifact, save_artifact  # noqa: E402
from quant.pipeline import (QUANT_KIND, finish_partial, load_calibration, restore_quant_model,  # noqa: E402
                            resumable_reconstruct)
from quant.reconstruction import Phase, ReconConfig, sqnr_db  # noqa: E402
from quant_scripts.common import (add_model_args, add_quant_args, add_sampling_args, apply_preset,  # noqa: E402
                                  cache_spec, check_quant_args, check_sampling_args, ensure_writable_dir, load_ldm,
                                  model_meta, pick_device, run_cli, run_dir)

# ---- defaults (edit here or override with flags) ---------------------------------------------------------------
PRESET = "fashion"
W_BITS = 4
A_BITS = 8
SM_ABIT = None            # attention-matmul quantization (Q-Diffusion --sm_abit); None: off, as in D²-DPM
POLICY = "d2dpm"
CHANNEL_WISE = False
ACT_ITERS = None          # step-size iterations per unit (None: the preset's; paper 5,000)
ACT_INIT_SAMPLES = None   # calibration inputs for the initial ranges (None: the preset's; paper 32)
RECON_BATCH_SIZE = 16     # D²-DPM: 16
LR = 4e-4
P_NORM = 2.4
SEED = 0
RUNNING_STAT = None       # Q-Diffusion/QNCD --running_stat: None (off), "all" or "softmax" (--rs_sm_only)
RS_MOMENTUM = 0.95        # their EMA momentum
RS_BATCH = 64             # their LDM chunk size for the EMA pass
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, PRESET)
    add_sampling_args(p)
    add_quant_args(p, W_BITS, POLICY, CHANNEL_WISE)
    p.add_argument("--a_bits", type=int, default=A_BITS, choices=(6, 8), help="activation bits")
    p.add_argument("--sm_abit", type=int, default=SM_ABIT,
                   help="also quantize the attention matmuls: q, k, v at --a_bits and the softmax output at this many "
                        "bits (Q-Diffusion; 16 for SD). Default: attention matmuls stay FP (D²-DPM)")
    p.add_argument("--act_iters", type=int, default=ACT_ITERS,
                   help="step-size iterations per unit; 0 skips step learning (QNCD's released flow: initial "
                        "ranges, then --running_stat)")
    p.add_argument("--running_stat", action="store_const", const="all", default=RUNNING_STAT,
                   help="after step learning, EMA (momentum 0.95) activation ranges over the whole calibration set, "
                        "streamed through the quantized model in shuffled chunks of 64 (Q-Diffusion / QNCD)")
    p.add_argument("--rs_sm_only", dest="running_stat", action="store_const", const="softmax",
                   help="--running_stat for the attention-softmax quantizers only (needs --sm_abit)")
    p.add_argument("--act_init_samples", type=int, default=ACT_INIT_SAMPLES)
    p.add_argument("--recon_batch_size", type=int, default=RECON_BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--p", type=float, default=P_NORM, help="L_p exponent of the reconstruction loss")
    p.add_argument("--seed", type=int, default=SEED)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_preset(args, PRESET)
    check_sampling_args(args)
    check_quant_args(args)
    if args.running_stat == "softmax" and not args.sm_abit:
        raise UserFacingError("--rs_sm_only updates the attention-softmax quantizers, which exist only with --sm_abit; "
                              "add --sm_abit 8 (or 16), or use --running_stat")
    base = model_meta(args)
    rdir = run_dir(args)
    w_path = rdir / f"w{args.w_bits}" / f"quant_w{args.w_bits}.pt"
    tag = f"w{args.w_bits}a{args.a_bits}" + (f"sm{args.sm_abit}" if args.sm_abit else "")
    out = ensure_writable_dir(rdir / tag) / f"quant_{tag}.pt"
    cal_path = rdir / "calibration.pt"
    want_w = {**base, "w_bits": args.w_bits, "a_bits": None, "policy": args.policy,
              "channel_wise": args.channel_wise, "split_shortcut": args.split_shortcut or None,
              "smoothing": args.smoothing}
    w_obj = load_artifact(w_path, QUANT_KIND, want_w, f"quant_scripts/quantize_weight.py --w_bits {args.w_bits}")
    meta = {**w_obj["meta"], "a_bits": args.a_bits, "sm_abit": args.sm_abit, "weights": file_fingerprint(w_path),
            "act_iters": args.act_iters,
            "act_init_samples": args.act_init_samples, "act_batch_size": args.recon_batch_size, "act_lr": args.lr,
            "act_p": args.p, "act_seed": args.seed,
            "running_stat": args.running_stat, **({"rs_momentum": RS_MOMENTUM} if args.running_stat else {})}
    for k in ("format", "version", "seconds"):
        meta.pop(k, None)
    if out.exists() and not args.force:
        try:
            load_artifact(out, QUANT_KIND, {k: v for k, v in meta.items() if not k.startswith("sqnr")})
            print(f"{out} already holds this quantized model; skipping (--force to redo)")
            return
        except ArtifactMismatch:
            print(f"{out} was made with other settings; redoing it")
    device = pick_device(args.device)
    _, model = load_ldm(args, device)
    timesteps = DDIMSchedule.make(model.alphas_cumprod, args.steps, args.eta).timesteps.tolist()
    data, held, _ = load_calibration(cal_path, base, timesteps, device)
    if meta.get("calibration") != file_fingerprint(cal_path):
        raise ArtifactMismatch(f"{w_path} was reconstructed on another calibration set than {cal_path}; rerun "
                               f"quant_scripts/quantize_weight.py --w_bits {args.w_bits}")
    if args.act_init_samples > len(data):
        raise UserFacingError(f"--act_init_samples {args.act_init_samples} exceeds the {len(data)} calibration "
                              f"inputs; lower it")
    torch.manual_seed(args.seed)

    t0 = time.time()
    with model.ema_scope():
        qm = restore_quant_model(model.model.diffusion_model, meta, w_obj, w_path).to(device)
    held = held or data
    sqnr_w = sqnr_db(qm, held, weight=True, act=False)
    # initial ranges from a seeded random spread of calibration inputs (the set is ordered by timestep)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.act_init_samples]
    init = data.rows(pick)
    qm.set_quant_state(weight=True)
    qm.calibrate_activations_(init.batches(64))
    sqnr_init = sqnr_db(qm, held, weight=True, act=True)
    stages = [f"step-size learning ({args.act_iters} iterations per unit)"] if args.act_iters else []
    stages += [f"running stat ({args.running_stat})"] if args.running_stat else []
    what = " + ".join(stages) or "initial ranges only"
    print(f"[{args.preset_used}] W{args.w_bits}A{args.a_bits}: SQNR W only {sqnr_w:.2f} dB, with initial activation "
          f"ranges {sqnr_init:.2f} dB; now {what}, on {device}")
    cfg = ReconConfig.activation_defaults(iters=args.act_iters, batch_size=args.recon_batch_size, lr=args.lr,
                                          p=args.p, cache=cache_spec(args), seed=args.seed)
    summaries = resumable_reconstruct(qm, data, Phase.ACTIVATION, cfg, out, meta) if args.act_iters else []
    if args.running_stat:
        sqnr_learned = sqnr_db(qm, held, weight=True, act=True)
        # shuffled: the set is ordered by timestep, and an EMA over ordered data would keep the last timesteps' ranges
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed + 1))
        shuffled = data.rows(order)
        qm.set_quant_state(weight=True, act=True)  # the original streams through the fully quantized model
        qm.ema_activation_ranges_(tqdm(shuffled.batches(RS_BATCH), total=-(-len(data) // RS_BATCH),
                                       desc="running stat", unit="batch"),
                                  momentum=RS_MOMENTUM, softmax_only=args.running_stat == "softmax")
        meta["sqnr_before_running_stat_db"] = sqnr_learned
    sqnr_final = sqnr_db(qm, held, weight=True, act=True)
    meta.update(sqnr_weight_only_db=sqnr_w, sqnr_act_init_db=sqnr_init, sqnr_db=sqnr_final,
                act_seconds=time.time() - t0)
    payload = {"quant_state": qm.quant_state_dict(), "summaries": summaries}
    if meta.get("smoothing"):
        payload["smoothing"] = w_obj["smoothing"]
    save_artifact(out, QUANT_KIND, meta, payload)
    finish_partial(out)
    print(f"W{args.w_bits}A{args.a_bits} SQNR on held-out inputs: {sqnr_init:.2f} dB -> {sqnr_final:.2f} dB after "
          f"{what} ({time.time() - t0:.0f} s); wrote {out}")


if __name__ == "__main__":
    run_cli(main)
