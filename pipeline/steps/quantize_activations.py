"""Step 3: activation quantization (A8 or A6, optionally the attention matmuls with --sm_abit) on step 2's weights:
initial ranges by the L2.4 clipping search, step sizes learned unit by unit (LSQ-style, resumable), and QNCD's
running-stat EMA ranges when asked."""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from ldm.fileio import file_fingerprint
from ldm.util import UserFacingError
from pipeline import cli
from pipeline.artifacts import ArtifactMismatch, is_current, load_artifact, save_artifact, save_timing
from pipeline.quantize import (QUANT_KIND, WEIGHT_SCRIPT, Stopwatch, finish_partial, load_calibration,
                               make_quant_model, resumable_reconstruct)
from pipeline.sampling import ddim_timesteps
from pipeline.steps.quantize_weights import weight_meta
from quant.reconstruction import Phase, ReconConfig, sqnr_db

RS_MOMENTUM = 0.95        # Q-Diffusion / QNCD's EMA momentum
RS_BATCH = 64             # their LDM chunk size for the EMA pass


def check_args(args: argparse.Namespace) -> None:
    cli.check_sampling_args(args)
    cli.check_quant_args(args)
    if args.running_stat == "softmax" and not args.sm_abit:
        raise UserFacingError("--rs_sm_only updates the attention-softmax quantizers, which exist only with "
                              "--sm_abit; add --sm_abit 8 (or 16), or use --running_stat")


def activation_meta(args: argparse.Namespace, w_meta: dict, w_path) -> dict:
    """Step 2's meta plus every setting of this step (what an up-to-date step-3 artifact must match)."""
    meta = {**w_meta, "a_bits": args.a_bits, "sm_abit": args.sm_abit, "weights": file_fingerprint(w_path),
            "act_iters": args.act_iters, "act_init_samples": args.act_init_samples, "act_cache_dtype": args.cache_dtype,
            "act_batch_size": args.recon_batch_size, "act_lr": args.lr, "act_p": args.p, "act_seed": args.seed,
            "running_stat": args.running_stat, **({"rs_momentum": RS_MOMENTUM} if args.running_stat else {}),
            # (only when not the default, so artifacts made before the flag keep their keys)
            **({"rs_batch_size": args.rs_batch_size} if args.running_stat and args.rs_batch_size != RS_BATCH
               else {}),
            # recorded when not D²-DPM's FP inputs / the default cache pass (earlier artifacts stay current)
            **({"act_inputs": args.act_inputs} if args.act_inputs != "fp" else {}),
            **({"act_cache_batch_size": args.cache_batch_size}
               if args.cache_batch_size != cli.CACHE_BATCH_SIZE else {})}
    for k in ("format", "version", "seconds"):
        meta.pop(k, None)
    return meta


def running_stat_(qm, data, args: argparse.Namespace) -> None:
    """QNCD's --running_stat: EMA ranges over the calibration set streamed through the fully quantized model."""
    # shuffled: the set is ordered by timestep, and an EMA over ordered data would keep the last timesteps' ranges
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed + 1))
    shuffled = data.rows(order)
    qm.set_quant_state(weight=True, act=True)
    qm.ema_activation_ranges_(tqdm(shuffled.batches(args.rs_batch_size), total=-(-len(data) // args.rs_batch_size),
                                   desc="running stat", unit="batch"),
                              momentum=RS_MOMENTUM, softmax_only=args.running_stat == "softmax")


def run(args: argparse.Namespace) -> None:
    check_args(args)
    base = cli.model_meta(args)
    cli.model_family(args)
    layout, tag = cli.layout(args), cli.quant_tag(args)
    w_path, out, cal_path = layout.quant(tag.weights), layout.quant(tag), layout.calibration
    w_obj = load_artifact(w_path, QUANT_KIND, weight_meta(args, base), f"{WEIGHT_SCRIPT} --w_bits {args.w_bits}")
    meta = activation_meta(args, w_obj["meta"], w_path)
    if is_current(out, QUANT_KIND, {k: v for k, v in meta.items() if not k.startswith("sqnr")}, args.force,
                  "this quantized model"):
        return
    cli.ensure_writable_dir(out.parent)
    device = cli.pick_device(args.device)
    family, model = cli.load_model(args, device)
    data, held, _ = load_calibration(cal_path, base, ddim_timesteps(model, args.steps, args.eta), device)
    if meta.get("calibration") != file_fingerprint(cal_path):
        raise ArtifactMismatch(f"{w_path} was reconstructed on another calibration set than {cal_path}; rerun "
                               f"{WEIGHT_SCRIPT} --w_bits {args.w_bits}")
    if args.act_init_samples > len(data):
        raise UserFacingError(f"--act_init_samples {args.act_init_samples} exceeds the {len(data)} calibration "
                              f"inputs; lower it")
    torch.manual_seed(args.seed)

    t0 = time.time()
    # the model's own UNet is quantized (no copy): the EMA weights, if any, stay swapped in until the step ends
    with family.ema_scope(model):
        calibrate_and_save(args, meta, w_obj, w_path, family.unet(model), data, held, out, t0, device)


def calibrate_and_save(args: argparse.Namespace, meta: dict, w_obj: dict, w_path, unet: torch.nn.Module, data,
                       held, out, t0: float, device: torch.device) -> None:
    """Activation ranges, step-size learning unit by unit (and QNCD's running stat), the SQNRs, the artifact."""
    tag = cli.quant_tag(args)
    qm = make_quant_model(unet, meta, w_obj, w_path, copy=False).to(device)
    held = held or data
    init, sqnr = Stopwatch(), Stopwatch()
    sqnr_w = sqnr.wrap(sqnr_db)(qm, held, weight=True, act=False)
    # initial ranges from a seeded random spread of calibration inputs (the set is ordered by timestep)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.act_init_samples]
    qm.set_quant_state(weight=True)
    # (batches of at most 64, fewer where the preset's cache pass is smaller: cin256's per-row activations are large)
    init.wrap(qm.calibrate_activations_)(data.rows(pick).batches(min(64, args.cache_batch_size)))
    sqnr_init = sqnr.wrap(sqnr_db)(qm, held, weight=True, act=True)
    stages = [f"step-size learning ({args.act_iters} iterations per unit)"] if args.act_iters else []
    stages += [f"running stat ({args.running_stat})"] if args.running_stat else []
    what = " + ".join(stages) or "initial ranges only"
    print(f"[{args.preset_used}] {tag.title()}: SQNR W only {sqnr_w:.2f} dB, with initial activation ranges "
          f"{sqnr_init:.2f} dB; now {what}, on {device}")
    cfg = ReconConfig.activation_defaults(iters=args.act_iters, batch_size=args.recon_batch_size, lr=args.lr,
                                          p=args.p, cache=cli.cache_spec(args), seed=args.seed,
                                          cache_batch_size=args.cache_batch_size,
                                          asym=args.act_inputs == "quantized")
    units: list[dict] = []
    summaries = resumable_reconstruct(qm, data, Phase.ACTIVATION, cfg, out, meta, timings=units) \
        if args.act_iters else []
    if args.running_stat:
        meta["sqnr_before_running_stat_db"] = sqnr.wrap(sqnr_db)(qm, held, weight=True, act=True)
        running_stat_(qm, data, args)
    sqnr_final = sqnr.wrap(sqnr_db)(qm, held, weight=True, act=True)
    meta.update(sqnr_weight_only_db=sqnr_w, sqnr_act_init_db=sqnr_init, sqnr_db=sqnr_final)
    payload = {"quant_state": qm.quant_state_dict(), "summaries": summaries}
    if meta.get("smoothing"):
        payload["smoothing"] = w_obj["smoothing"]
    save_artifact(out, QUANT_KIND, meta, payload)
    save_timing(out, act_seconds=time.time() - t0, calibrate_activations_s=init.seconds,
                act_init_samples=len(pick), sqnr_s=sqnr.seconds, held_out=len(held), units=units)
    finish_partial(out)
    print(f"{tag.title()} SQNR on held-out inputs: {sqnr_init:.2f} dB -> {sqnr_final:.2f} dB after {what} "
          f"({time.time() - t0:.0f} s); wrote {out}")
