"""QNCD's / CompVis' txt2img: text-to-image sampling, FP or post-training quantized, on Stable Diffusion v1 or any
model of its structure, offline and on CPU or CUDA.

    # the embedded text default (no download): FP32, then QNCD's W8A8 recipe
    python quant_scripts/txt2img.py --prompt "a photo of a bag" --n_samples 4
    python quant_scripts/txt2img.py --plms --cond --weight_bit 8 --quant_mode qncd --quant_act --act_bit 8 \\
        --cali_st 25 --cali_batch_size 1 --cali_n 128 --no_grad_ckpt --ptq --scale_split_static --sample_reverse \\
        --reverse_interval 10 --running_stat --sm_abit 16 --from_file configs/prompts/fashion.txt --n_samples 2 \\
        --ddim_steps 50      # (the preset samples 20 steps; --cali_st 25 needs at least 25)
    # QNCD's README command on SD v1.4 (bring sd-v1-4.ckpt and the MS-COCO caption file):
    python quant_scripts/txt2img.py --preset sd-v1 --ckpt sd-v1-4.ckpt --plms --cond --weight_bit 8 \\
        --quant_mode qncd --quant_act --act_bit 8 --cali_st 25 --cali_batch_size 1 --cali_n 128 --no_grad_ckpt \\
        --ptq --scale_split_static --sample_reverse --reverse_interval 10 --running_stat --sm_abit 16 \\
        --from_file val_ann.txt --n_samples 2

QNCD's script cannot run as shipped (a missing package, a hard-coded checkpoint path, ``.to('cuda')``, a safety
checker downloaded at import). Here every flag of its README command maps onto the pipeline (steps 1-3 in this
process; each skips what a matching artifact already holds, so a rerun resumes):

* ``--ptq``: step 1 records FP trajectories (``--plms`` or DDIM, guidance ``--scale``) for the first ``--cali_n``
  prompts and keeps ``--cali_n`` latents × ``--cali_st`` steps (0, S//K, 2S//K, …) × (prompt, empty prompt), with
  their text embeddings; step 2 quantizes the weights (W``--weight_bit``, BRECQ/AdaRound, ``--cali_iters``); with
  ``--quant_act`` step 3 the activations (A``--act_bit``, ``--cali_iters_a``, ``--cali_lr``, ``--cali_p``;
  ``--sm_abit`` the attention matmuls; ``--running_stat`` / ``--rs_sm_only`` EMA ranges). ``--quant_mode qncd`` is
  QNCD's recipe (smoothing + running statistics), ``--scale_split_static`` the smoothing alone, ``--split``
  Q-Diffusion's shortcut split, ``--cali_batch_size`` the reconstruction batch, ``--no_grad_ckpt`` no activation
  recomputation; ``--cali_ckpt FILE`` uses a quantized model made earlier. ``--cond`` is accepted (text models
  always calibrate with their prompts).
* ``--sample_reverse`` (``--reverse_interval R``): QNCD's runtime noise estimation while sampling.
* Output: PNGs in ``--outdir``/samples and a grid per run; ``--eval N`` also writes N evaluation samples (prompt
  j mod P for sample j; sharded over torchrun, resumable) as step 7's samples.npz, for ``evaluator.py`` (FID) and
  ``python -m evaluation.clip_score``.
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path


from ldm.fileio import atomic_path  # noqa: E402
from ldm.precision import Precision  # noqa: E402
from ldm.util import ArgumentParser, UserFacingError, run_cli  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.artifacts import load_artifact  # noqa: E402
from pipeline.sampling import quant_expect  # noqa: E402
from pipeline.steps import evaluation_samples, txt2img  # noqa: E402
from quant.calibration import strided_steps  # noqa: E402
from quant.policy import POLICIES  # noqa: E402
from quant_scripts import (collect_imagenet_calibration_set, generate_evaluation_samples_dist,  # noqa: E402
                           quantize_weight, quantize_weight_activation)

PRESET = "fashion-txt2img"
N_SAMPLES = 3   # images per batch (CompVis)
CALI_ST, CALI_N = 25, 128   # QNCD's README for SD: 128 latents at 25 steps (x 2: prompt and empty prompt)
COMPVIS_PRECISION = {"full": "fp32", "autocast": "bf16"}   # CompVis txt2img's --precision names
CUSTOM_STEPS, CUSTOM_SCALE = 50, 7.5   # CompVis / QNCD txt2img's defaults for --config/--ckpt (DDIM unless --plms)
RENAMED = {"--steps": "--ddim_steps", "--eta": "--ddim_eta", "--w_bits": "--weight_bit", "--a_bits": "--act_bit",
           "--prompts": "--from_file"}   # the step scripts' flags -> this script's (messages name what was typed)
# numeric flags (dest: minimum, checked before anything runs): 0 is honoured only where it means "none"
MINIMUM = {"n_samples": 1, "n_iter": 1, "n_rows": 0, "eval": 1, "seed": 0, "H": 1, "W": 1, "C": 1, "f": 1,
           "cali_st": 1, "cali_n": 1, "cali_batch_size": 1, "cali_iters": 0, "cali_iters_a": 0,
           "reverse_interval": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    m = p.add_argument_group("model")
    m.add_argument("--preset", default=None, choices=cli.preset_names(),
                   help=f"model and defaults (default: {PRESET}; sd-v1: Stable Diffusion v1 at "
                        f"models/ldm/stable-diffusion-v1/model.ckpt)")
    m.add_argument("--config", default=None, help="CompVis config (configs/stable-diffusion/v1-inference.yaml)")
    m.add_argument("--ckpt", default=None, help="checkpoint (sd-v1-4.ckpt, v1-5 files; read weights-only)")
    m.add_argument("--trust_checkpoint", action="store_true", help="allow full unpickling (trusted files only)")
    m.add_argument("--device", default="auto")
    t = p.add_argument_group("prompts and sampling")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="one prompt; each batch holds --n_samples images of it")
    src.add_argument("--from_file", default=None, help="a prompt per line (MS-COCO captions: QNCD's val_ann.txt)")
    t.add_argument("--outdir", default="outputs/txt2img-samples", help="PNGs go to OUTDIR/samples, grids to OUTDIR")
    t.add_argument("--ddim_steps", dest="steps", type=int, default=None,
                   help=f"sampling steps (default: the preset's; {CUSTOM_STEPS} for a --config/--ckpt model)")
    t.add_argument("--plms", action="store_const", const=True, default=None, help="PLMS instead of DDIM")
    t.add_argument("--ddim", dest="plms", action="store_const", const=False, help="DDIM where the preset says PLMS")
    t.add_argument("--ddim_eta", dest="eta", type=float, default=None)
    t.add_argument("--scale", type=float, default=None, help=f"guidance scale against the empty prompt (default: "
                                                              f"the preset's; {CUSTOM_SCALE} for --config/--ckpt)")
    t.add_argument("--n_samples", type=int, default=None, help=f"batch size (default {N_SAMPLES})")
    t.add_argument("--n_iter", type=int, default=1, help="passes over the prompts")
    t.add_argument("--n_rows", type=int, default=0, help="grid row length (default --n_samples)")
    for flag in ("--H", "--W", "--C", "--f"):
        t.add_argument(flag, type=int, default=None, help="checked against the model's size (default: it)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--precision", type=precision_flag, default=Precision.FP32, metavar="{fp32,tf32,bf16}",
                   help="arithmetic of the UNet and decoder while sampling (calibration stays fp32): fp32 exact, tf32 "
                        "(CUDA), bf16 autocast; CompVis' names are accepted: full = fp32, autocast = bf16 (CompVis "
                        "autocasts to float16 on CUDA; bfloat16 keeps float32's range)")
    t.add_argument("--skip_grid", action="store_true")
    t.add_argument("--skip_save", action="store_true")
    t.add_argument("--no_progress", action="store_true")
    t.add_argument("--eval", type=int, default=None, metavar="N",
                   help="also write N evaluation samples (step 7: samples.npz, sharded and resumable)")
    q = p.add_argument_group("quantization (QNCD)")
    q.add_argument("--ptq", action="store_true", help="quantize (without it: FP32 sampling)")
    q.add_argument("--weight_bit", type=int, default=8, choices=cli.W_BITS)
    q.add_argument("--quant_act", action="store_true", help="quantize the activations too (at --act_bit)")
    q.add_argument("--act_bit", type=int, default=8, choices=cli.A_BITS)
    q.add_argument("--quant_mode", default="qncd", choices=("qncd", "brecq", "qdiff", "linear", "symmetric"),
                   help="accepted, as QNCD's branch name: smoothing and running statistics are their own flags "
                        "(--scale_split_static, --running_stat) there and here")
    q.add_argument("--scale_split_static", action="store_true", help="QNCD embedding-derived smoothing")
    q.add_argument("--split", action="store_true", help="Q-Diffusion shortcut splitting")
    q.add_argument("--running_stat", action="store_true", help="EMA activation ranges over the calibration set")
    q.add_argument("--rs_sm_only", action="store_true", help="--running_stat for the softmax quantizers only")
    q.add_argument("--sm_abit", type=int, default=None, help="bits of the attention matmuls (QNCD README: 16)")
    q.add_argument("--cond", action="store_true", help="accepted: text models calibrate with their prompts")
    q.add_argument("--no_grad_ckpt", action="store_true", help="no gradient checkpointing in reconstruction")
    q.add_argument("--cali_st", type=int, default=None, help=f"calibration timesteps K: every (S//K)-th step "
                                                               f"(default {CALI_ST}, at most the steps)")
    q.add_argument("--cali_n", type=int, default=CALI_N, help="calibration latents per timestep (QNCD SD: 128)")
    q.add_argument("--cali_batch_size", type=int, default=None, help="batch of the --running_stat pass (QNCD: 1)")
    q.add_argument("--policy", default="qncd-sd", choices=sorted(POLICIES),
                   help="layers quantized: qncd-sd (QNCD's SD code: all but the transformer blocks), all, d2dpm")
    q.add_argument("--cali_iters", type=int, default=None, help="AdaRound iterations per unit (default: none at W8, "
                                                                 "as QNCD's W8A8; the preset's at W4)")
    q.add_argument("--cali_iters_a", type=int, default=None, help="activation step-size iterations per unit "
                                                                   "(default 0: QNCD's SD code has them off)")
    q.add_argument("--cali_lr", type=float, default=None, help="activation-step learning rate (QNCD: 4e-4)")
    q.add_argument("--cali_p", type=float, default=None, help="L_p of the reconstruction loss (QNCD: 2.4)")
    q.add_argument("--cali_ckpt", default=None, help="a quantized model from an earlier run (skips steps 1-3)")
    q.add_argument("--packed", default=None, metavar="FILE",
                   help="the quantized UNet from a packed file alone (quant_scripts/export_packed.py; skips steps 1-3 "
                        "and the checkpoint's UNet weights)")
    q.add_argument("--execution", choices=("fake", "integer"), default="fake",
                   help="fake-quant, or int8 kernels where exact (quant.integer)")
    q.add_argument("--sample_reverse", action="store_true", help="QNCD runtime noise estimation")
    q.add_argument("--reverse_interval", type=int, default=None, help="its period R (default 10)")
    q.add_argument("-l", "--logdir", default="outputs", help="where the pipeline's artifacts go")
    return p.parse_args(argv)


def precision_flag(text: str):
    """--precision: ours (fp32, tf32, bf16) or CompVis' (full, autocast), parsed by the pipeline's parser."""
    return cli.precision_arg(COMPVIS_PRECISION.get(str(text).strip().lower(), text))


def common_flags(args: argparse.Namespace) -> list[str]:
    """Model, prompts and sampler settings, as every step script takes them."""
    flags = ["--outdir", args.logdir, "--device", args.device]
    if args.preset is None and args.config is None and args.ckpt is None:
        flags += ["--preset", PRESET]   # the step scripts' own default preset is the class model
    for flag, value in (("--preset", args.preset), ("--config", args.config), ("--ckpt", args.ckpt),
                        ("--prompts", args.from_file), ("--steps", args.steps), ("--eta", args.eta),
                        ("--scale", args.scale)):
        if value is not None:
            flags += [flag, str(value)]
    loop = {True: ["--plms"], False: ["--ddim"], None: []}[args.plms]
    return flags + loop + (["--trust_checkpoint"] if args.trust_checkpoint else [])


def calibrate(args: argparse.Namespace, common: list[str], n_prompts: int, steps: int) -> None:
    """Step 1 with QNCD's counts: --cali_n latents at each of the --cali_st strided steps, each with its prompt's and
    the empty prompt's embedding, from trajectories of the first --cali_n prompts (+ 1/8 more for held-out rows)."""
    k = len(strided_steps(steps, args.cali_st))
    held = max(1, args.cali_n // 8)
    traj = args.cali_n + held
    cal = common + ["--calibration_classes", *map(str, range(min(n_prompts, traj))),
                    "--calibration_trajectories_per_class", str(math.ceil(traj / n_prompts)),
                    "--n", str(2 * k * args.cali_n), "--n_holdout", str(2 * k * held), "--cali_st", str(args.cali_st)]
    collect_imagenet_calibration_set.main(cal)


def quantize(args: argparse.Namespace, common: list[str], n_prompts: int, steps: int) -> None:
    """QNCD's released SD path (spec qncd_ptqd.md §A.4): per-channel weights, every layer but the transformer blocks
    (policy qncd-sd); W8 round-to-nearest, W4 BRECQ/AdaRound (--cali_iters); activations from their initial ranges
    (+ --running_stat EMA at batch --cali_batch_size), no step-size learning unless --cali_iters_a is given;
    --scale_split_static smoothing. --quant_mode only names the branch: each feature is its own flag, as in QNCD."""
    base = ["--policy", args.policy, "--channel_wise", "--quant_mode", "brecq"] + \
        (["--split"] if args.split else []) + (["--scale_split_static"] if args.scale_split_static else []) + \
        (["--no_grad_ckpt"] if args.no_grad_ckpt else [])
    calibrate(args, common, n_prompts, steps)
    iters = args.cali_iters if args.cali_iters is not None else 0 if args.weight_bit == 8 else None
    quantize_weight.main(common + ["--w_bits", str(args.weight_bit)] + base +
                         (["--weight_iters", str(iters)] if iters is not None else []))
    if not args.quant_act:
        return
    act = ["--a_bits", str(args.act_bit), "--act_iters", str(args.cali_iters_a or 0)] + sm_abit_flags(args) + \
        (["--running_stat"] if args.running_stat else []) + (["--rs_sm_only"] if args.rs_sm_only else []) + \
        (["--rs_batch_size", str(args.cali_batch_size)] if args.cali_batch_size is not None else []) + \
        ["--act_init_samples", str(min(2 * len(strided_steps(steps, args.cali_st)) * args.cali_n, 256))]
    for flag, value in (("--lr", args.cali_lr), ("--p", args.cali_p)):
        if value is not None:
            act += [flag, str(value)]
    quantize_weight_activation.main(common + ["--w_bits", str(args.weight_bit)] + base + act)


def sm_abit_flags(args: argparse.Namespace) -> list[str]:
    """--sm_abit reaches the model only where attention is quantized: under qncd-sd the transformer blocks run in FP,
    as in QNCD's released SD code, whose attention matmuls are never quantized (the flag is accepted, as there)."""
    if not args.sm_abit or not args.quant_act or args.policy == "qncd-sd":
        return []
    return ["--sm_abit", str(args.sm_abit)]


def place_cali_ckpt(args: argparse.Namespace, ns: argparse.Namespace) -> None:
    """Put ``--cali_ckpt`` where this run's sampling looks for it (its metadata is checked when it loads)."""
    from pipeline.quantize import QUANT_KIND
    src = Path(args.cali_ckpt)
    meta = load_artifact(src, QUANT_KIND, {}, "quant_scripts/quantize_weight_activation.py")["meta"]
    want = (args.weight_bit, args.act_bit if args.quant_act else None)
    if (meta.get("w_bits"), meta.get("a_bits")) != want:
        raise UserFacingError(f"--cali_ckpt {src} is W{meta.get('w_bits')}A{meta.get('a_bits')}, but W{want[0]}"
                              f"A{want[1]} is asked for (--weight_bit, --quant_act --act_bit)")
    tag = cli.quant_tag(ns, weights_only=not args.quant_act)
    load_artifact(src, QUANT_KIND, quant_expect(cli.model_meta(ns), tag),
                  "quant_scripts/quantize_weight_activation.py")
    dest = cli.layout(ns).quant(tag)   # (checked against this run before it is copied in)
    if dest.resolve() != src.resolve():
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        print(f"--cali_ckpt: using {src} as {dest}")


def sampling_namespace(args: argparse.Namespace, common: list[str]) -> argparse.Namespace:
    """The txt2img step's flags: the common ones parsed as a step script parses them (``--outdir`` there is the
    artifact root, ``-l``), the preset applied, plus the images' own flags."""
    p = cli.script_parser(__doc__, PRESET)
    cli.add_sampler_args(p, "none" if args.ptq else "fp32", args.weight_bit, args.act_bit)
    cli.add_output_args(p, seed=args.seed, force=None)
    sampler = ["--sample_reverse"] + (["--reverse_interval", str(args.reverse_interval)]
                                      if args.reverse_interval is not None else []) if args.sample_reverse else []
    cli.add_execution_args(p)
    cli.add_precision_args(p)
    run_flags = ["--execution", args.execution, "--precision", args.precision.value] + \
        (["--packed", args.packed] if args.packed else [])
    ns = p.parse_args(common + sampler + (sm_abit_flags(args) if args.ptq else []) + run_flags)
    cli.apply_preset(ns, PRESET)
    ns.n_samples = N_SAMPLES if args.n_samples is None else args.n_samples
    if args.prompt is not None:
        ns.prompt_list = (args.prompt,)
    ns.a_bits = args.act_bit if args.ptq and args.quant_act else None
    return ns


def check_flags(args: argparse.Namespace) -> None:
    """Every flag alone and in combination, before anything is written."""
    for name, minimum in MINIMUM.items():
        cli.check_positive(args, name, minimum=minimum)
    cli.check_positive(args, "cali_lr", "cali_p", minimum=1e-12)
    if not args.ptq and (args.sample_reverse or args.cali_ckpt or args.packed or args.execution != "fake"):
        raise UserFacingError("--sample_reverse, --cali_ckpt, --packed and --execution act on a quantized model; "
                              "add --ptq")
    if args.packed and args.cali_ckpt:
        raise UserFacingError("--packed and --cali_ckpt both name the quantized model; pass one")
    if args.prompt is not None and args.eval is not None:
        raise UserFacingError("--eval samples a prompt list; use --from_file (or the preset's prompts), not --prompt")
    if args.eval is not None and args.ptq and not args.quant_act:
        raise UserFacingError("--eval samples W{b}A{b} models (step 7); add --quant_act")
    if args.ptq and args.packed is None and args.cali_ckpt is None and args.prompt is not None:
        raise UserFacingError("--ptq calibrates on a prompt list: pass --from_file FILE (or use the preset's "
                              "prompts) instead of --prompt")


def eval_flags(args: argparse.Namespace, common: list[str]) -> list[str]:
    """Step 7's flags for --eval N."""
    flags = common + (["--w_bits", str(args.weight_bit), "--a_bits", str(args.act_bit), "--sampler", "none"]
                      if args.ptq else ["--sampler", "fp32"])
    flags += (sm_abit_flags(args) + ["--execution", args.execution] +
              (["--packed", args.packed] if args.packed else [])) if args.ptq else []
    if args.sample_reverse:
        flags += ["--sample_reverse"] + (["--reverse_interval", str(args.reverse_interval)]
                                         if args.reverse_interval is not None else [])
    return flags + ["--n_samples", str(args.eval), "--seed", str(args.seed), "--precision", args.precision.value]


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.flag_names(RENAMED):
        run(args)


def run(args: argparse.Namespace) -> None:
    check_flags(args)
    if args.preset is None and (args.config or args.ckpt):   # a custom model: CompVis txt2img's defaults
        args.steps = CUSTOM_STEPS if args.steps is None else args.steps
        args.scale = CUSTOM_SCALE if args.scale is None else args.scale
    common = common_flags(args)
    ns = sampling_namespace(args, common)
    cli.check_sampling_args(ns)
    cli.check_precision_args(ns)   # (tf32 off CUDA: refused before steps 1-3 write anything)
    _, family = cli.model_family(ns)   # the prompts are read (one-line errors) before any work
    if not family.takes_prompts:
        raise UserFacingError(f"txt2img needs a text-to-image model (cond stage FrozenCLIPEmbedder); {ns.config} is "
                              f"a {family.name} model: sample it with quant_scripts/sample_fp32_imagenet.py")
    steps = ns.settings.steps
    if args.sample_reverse:
        cli.check_probe_fires(args.reverse_interval or 10, steps)
    if args.ptq and args.packed is None and args.cali_ckpt is None:
        args.cali_st = min(CALI_ST, steps) if args.cali_st is None else args.cali_st
        if args.cali_st > steps:
            raise UserFacingError(f"--cali_st {args.cali_st} must be at most the {steps} sampling steps "
                                  f"(--ddim_steps)")
    if args.eval is not None:   # step 7's flags and plan, checked before any image is written
        with cli.flag_names({"--n_samples": "--eval"}):
            generate_evaluation_samples_dist.preflight(
                generate_evaluation_samples_dist.parse_args(eval_flags(args, common)))
    if args.ptq and args.cali_ckpt is not None and args.packed is None:
        place_cali_ckpt(args, ns)
    elif args.ptq and args.packed is None:
        quantize(args, common, len(family.prompts), steps)
    images = txt2img.ImageSettings(Path(args.outdir), args.seed, ns.n_samples, args.n_iter, args.n_rows,
                                   single=args.prompt is not None, size=(args.C, args.H, args.W, args.f),
                                   skip_grid=args.skip_grid, skip_save=args.skip_save, progress=not args.no_progress)
    run_ = cli.run_of(ns)
    txt2img.run(run_, images, cli.sampler_of(ns, run_.sampling.steps), cli.quant_tag(ns, weights_only=ns.a_bits is None))
    if args.eval is not None:
        with cli.flag_names({"--n_samples": "--eval"}):
            generate_evaluation_samples_dist.main(eval_flags(args, common))


if __name__ == "__main__":
    run_cli(main)
