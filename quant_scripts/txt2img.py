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
from pathlib import Path

from ldm.precision import Precision
from ldm.util import ArgumentParser, UserFacingError, run_cli
from pipeline import cli
from pipeline.layout import QuantTag
from pipeline.packed import Execution
from pipeline.quantize import CacheSettings, adopt_quant_artifact
from pipeline.run import ModelSource, Preset, Run, SamplerChoice
from pipeline.sampler_spec import SamplerSpec
from pipeline.sampling import quant_expect
from pipeline.settings import SamplingSettings
from pipeline.steps import calibrate, evaluation_samples, quantize_activations, quantize_weights, txt2img
from quant.api import QuantConfig
from quant.calibration import strided_steps
from quant.policy import POLICIES
from quant.quantizer import PerChannel

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
# flags that act on the quantized model only (dest: its default): without --ptq they would do nothing (issue 32)
PTQ_ONLY = {"sample_reverse": False, "cali_ckpt": None, "packed": None, "execution": "fake", "quant_act": False,
            "weight_bit": 8, "act_bit": 8, "scale_split_static": False, "split": False, "running_stat": False,
            "rs_sm_only": False, "sm_abit": None, "cali_st": None, "cali_batch_size": None, "cali_iters": None,
            "cali_iters_a": None, "cali_lr": None, "cali_p": None, "reverse_interval": None}


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
    q.add_argument("--execution", choices=("fake", "compiled", "integer"), default="fake",
                   help="fake-quant; compiled: the same numbers with compiled fake-quant kernels (torch.compile); "
                        "or int8 kernels where exact (quant.integer)")
    q.add_argument("--sample_reverse", action="store_true", help="QNCD runtime noise estimation")
    q.add_argument("--reverse_interval", type=int, default=None, help="its period R (default 10)")
    q.add_argument("-l", "--logdir", default="outputs", help="where the pipeline's artifacts go")
    return p.parse_args(argv)


def precision_flag(text: str):
    """--precision: ours (fp32, tf32, bf16) or CompVis' (full, autocast), parsed by the pipeline's parser."""
    return cli.precision_arg(COMPVIS_PRECISION.get(str(text).strip().lower(), text))


def check_flags(args: argparse.Namespace) -> None:
    """Every flag alone and in combination, before anything is written."""
    for name, minimum in MINIMUM.items():
        cli.check_positive(args, name, minimum=minimum)
    cli.check_positive(args, "cali_lr", "cali_p", minimum=1e-12)
    given = [f"--{name}" for name, default in PTQ_ONLY.items() if getattr(args, name) != default]
    if not args.ptq and given:
        one = len(given) == 1
        raise UserFacingError(f"{', '.join(given)} {'acts' if one else 'act'} on a quantized model, and without --ptq "
                              f"the FP32 model is sampled: add --ptq, or drop {'it' if one else 'them'}")
    if args.packed and args.cali_ckpt:
        raise UserFacingError("--packed and --cali_ckpt both name the quantized model; pass one")
    if args.prompt is not None and args.eval is not None:
        raise UserFacingError("--eval samples a prompt list; use --from_file (or the preset's prompts), not --prompt")
    if args.eval is not None and args.ptq and not args.quant_act:
        raise UserFacingError("--eval samples W{b}A{b} models (step 7); add --quant_act")
    if args.ptq and args.packed is None and args.cali_ckpt is None and args.prompt is not None:
        raise UserFacingError("--ptq calibrates on a prompt list: pass --from_file FILE (or use the preset's "
                              "prompts) instead of --prompt")

# ---- the typed objects, built once from the flags ------------------------------------------------------------------

def is_custom(args: argparse.Namespace) -> bool:
    """--config/--ckpt without --preset: a custom model (its run folder is "custom"; the preset gives only its
    defaults, and CompVis txt2img's --ddim_steps and --scale apply)."""
    return args.preset is None and (args.config is not None or args.ckpt is not None)


def model_of(args: argparse.Namespace, preset: Preset) -> ModelSource:
    """--preset / --config --ckpt, --trust_checkpoint, --from_file or --prompt, --no_grad_ckpt."""
    custom = is_custom(args)
    if custom and (args.config is None or args.ckpt is None):
        raise UserFacingError("a custom model needs both --config and --ckpt (or pick a --preset)")
    prompts = args.from_file if args.from_file is not None or custom else preset.get("prompts")
    return ModelSource(str(args.config or preset["config"]), str(args.ckpt or preset["ckpt"]),
                       "custom" if custom else preset.name, trust=args.trust_checkpoint, prompts=prompts,
                       prompt_list=(args.prompt,) if args.prompt is not None else None,
                       grad_ckpt=not args.no_grad_ckpt)


def sampling_of(args: argparse.Namespace, preset: Preset) -> SamplingSettings:
    """--ddim_steps, --ddim_eta, --scale, --plms / --ddim over the preset's (a custom model: CompVis' steps and
    scale); the grid is the preset's."""
    custom = is_custom(args)
    steps = CUSTOM_STEPS if custom and args.steps is None else args.steps
    scale = CUSTOM_SCALE if custom and args.scale is None else args.scale
    given = {"steps": steps, "eta": args.eta, "scale": scale, "plms": args.plms}
    return preset.sampling(**{k: v for k, v in given.items() if v is not None})


def sampler_of(args: argparse.Namespace) -> SamplerChoice:
    """The FP32 sampler, or (--ptq) the quantized one with QNCD's probe (--sample_reverse, --reverse_interval), how
    it runs (--execution, --packed) and --precision; checked (tf32 off CUDA refused here, before steps 1-3)."""
    spec = SamplerSpec.parse("none" if args.ptq else "fp32")
    if args.sample_reverse:
        spec = spec.with_probe() if args.reverse_interval is None else spec.with_probe(args.reverse_interval)
    choice = SamplerChoice(spec, Execution(args.execution), args.packed, args.precision)
    choice.check_device(args.device)
    return choice.check()


def sm_abit_of(args: argparse.Namespace) -> int | None:
    """--sm_abit reaches the model only where attention is quantized: under qncd-sd the transformer blocks run in FP,
    as in QNCD's released SD code, whose attention matmuls are never quantized (the flag is accepted, as there)."""
    if not args.sm_abit or not args.quant_act or args.policy == "qncd-sd":
        return None
    if not 2 <= args.sm_abit <= 16:
        raise UserFacingError(f"--sm_abit must be in 2..16, got {args.sm_abit}")
    return args.sm_abit


def quant_config_of(args: argparse.Namespace) -> QuantConfig:
    """QNCD's released SD path (spec qncd_ptqd.md §A.4): per-channel weights, every layer but the transformer blocks
    (--policy qncd-sd), --split, --scale_split_static smoothing; W--weight_bit, and A--act_bit with --quant_act.
    --quant_mode only names the branch: each feature is its own flag, as in QNCD."""
    a_bits = args.act_bit if args.ptq and args.quant_act else None
    return QuantConfig(args.weight_bit, a_bits, PerChannel(0), sm_abit_of(args) if args.ptq else None, args.split,
                       args.policy, "code" if args.scale_split_static else None)


def cache_of(preset: Preset) -> CacheSettings:
    """The reconstruction caches as the preset sizes them (else float32 and the default cache pass)."""
    dtype, batch_size = preset.get("cache_dtype"), preset.get("cache_batch_size")
    return CacheSettings(CacheSettings.dtype if dtype is None else dtype,
                         CacheSettings.batch_size if batch_size is None else batch_size)


def calibration_of(args: argparse.Namespace, n_prompts: int, steps: int, batch_size: int
                   ) -> calibrate.CalibrationSettings:
    """Step 1 with QNCD's counts: --cali_n latents at each of the --cali_st strided steps, each with its prompt's and
    the empty prompt's embedding, from trajectories of the first --cali_n prompts (+ 1/8 more for held-out rows)."""
    k = len(strided_steps(steps, args.cali_st))
    held = max(1, args.cali_n // 8)
    traj = args.cali_n + held
    return calibrate.CalibrationSettings(n=2 * k * args.cali_n, n_holdout=2 * k * held,
                                         trajectories_per_condition=math.ceil(traj / n_prompts),
                                         batch_size=batch_size, classes=tuple(range(min(n_prompts, traj))),
                                         cali_st=args.cali_st)


def quantize(args: argparse.Namespace, run: Run, preset: Preset, config: QuantConfig) -> None:
    """Steps 1-3: W8 round-to-nearest, W4 BRECQ/AdaRound (--cali_iters); activations from their initial ranges
    (+ --running_stat EMA at batch --cali_batch_size), no step-size learning unless --cali_iters_a is given."""
    cal = calibration_of(args, len(run.family.prompts), run.sampling.steps, preset["batch_size"])
    calibrate.run(run, cal)
    iters = args.cali_iters if args.cali_iters is not None else 0 if args.weight_bit == 8 else \
        preset.get("weight_iters")
    quantize_weights.run(run, config, quantize_weights.WeightSettings(iters, cache=cache_of(preset)))
    if not args.quant_act:
        return
    defaults = quantize_activations.ActivationSettings
    acts = defaults(iters=args.cali_iters_a or 0, init_samples=min(cal.n, 256),
                    lr=defaults.lr if args.cali_lr is None else args.cali_lr,
                    p=defaults.p if args.cali_p is None else args.cali_p,
                    running_stat="softmax" if args.rs_sm_only else "all" if args.running_stat else None,
                    rs_batch_size=args.cali_batch_size or defaults.rs_batch_size, cache=cache_of(preset))
    quantize_activations.run(run, config, acts)


def adopt_cali_ckpt(args: argparse.Namespace, run: Run, tag: QuantTag) -> None:
    """Put ``--cali_ckpt`` where this run's sampling looks for it, once it is known to be this run's model."""
    want = (args.weight_bit, args.act_bit if args.quant_act else None)
    adopt_quant_artifact(args.cali_ckpt, run.layout.quant(tag), quant_expect(run.meta(), tag), want,
                         f"W{want[0]}A{want[1]} is asked for (--weight_bit, --quant_act --act_bit)")


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.flag_names(RENAMED):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Every check first (one line, nothing written), then steps 1-3 (unless --packed / --cali_ckpt), the images,
    and --eval's step 7."""
    check_flags(args)
    preset = Preset.load(args.preset or PRESET)
    job = Run(model_of(args, preset), sampling_of(args, preset), Path(args.logdir), args.device).check()
    sampler = sampler_of(args)
    family = job.family   # the prompts are read (one-line errors) before any work
    if not family.takes_prompts:
        raise UserFacingError(f"txt2img needs a text-to-image model (cond stage FrozenCLIPEmbedder); "
                              f"{job.model.config} is a {family.name} model: sample it with "
                              f"quant_scripts/sample_fp32_imagenet.py")
    steps = job.sampling.steps
    if sampler.spec.probe is not None:
        cli.check_probe_fires(sampler.spec.probe, steps)
    calibrates = args.ptq and args.packed is None and args.cali_ckpt is None
    if calibrates:
        args.cali_st = min(CALI_ST, steps) if args.cali_st is None else args.cali_st
        if args.cali_st > steps:
            raise UserFacingError(f"--cali_st {args.cali_st} must be at most the {steps} sampling steps "
                                  f"(--ddim_steps)")
    config = quant_config_of(args)
    tag = QuantTag.of(config)
    images = txt2img.ImageSettings(Path(args.outdir), args.seed, N_SAMPLES if args.n_samples is None else
                                   args.n_samples, args.n_iter, args.n_rows, single=args.prompt is not None,
                                   size=(args.C, args.H, args.W, args.f), skip_grid=args.skip_grid,
                                   skip_save=args.skip_save, progress=not args.no_progress)
    ev = None
    if args.eval is not None:   # step 7's plan and checkpoint, checked before any image is written
        ev = evaluation_samples.EvalSettings(args.eval, args.seed, preset["batch_size"], flag="--eval")
        with cli.flag_names({"--n_samples": "--eval"}):
            evaluation_samples.preflight(job, ev)
    if args.ptq and args.cali_ckpt is not None and args.packed is None:
        adopt_cali_ckpt(args, job, tag)
    elif calibrates:
        quantize(args, job, preset, config)
    txt2img.run(job, images, sampler, tag)
    if ev is not None:
        with cli.flag_names({"--n_samples": "--eval"}):
            evaluation_samples.torchrun_protocol(lambda: evaluation_samples.generate(job, ev, sampler, tag))


if __name__ == "__main__":
    run_cli(main)
