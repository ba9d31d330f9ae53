"""The case list of benchmarks/bad_input_survey.py (issue 32): bad or edge inputs a new user tries on every CLI.

Each case is the argv of one command, run with the working directory at the tree under test, an optional setup and
the behaviour a correct tool shows:

* ``refuse``: a non-zero exit, the last stderr line one clear line (no Python traceback), nothing written or changed;
  ``mentions`` (when given; alternatives separated by "|") must appear in that line: the flag the user typed.
* ``accept``: exit 0 and every ``produces`` glob present (``glob#N``: exactly N files).
* ``say``: an option that would do nothing: a clean refusal, or exit 0 with ``mentions`` named in the output.

Placeholders in argv, setup and produces: ``{tmp}`` the case's own folder; ``{out}`` a copy of the quick-demo outputs
(``--outdir``); ``{run}`` its run folder (fashion, 20 steps, η 0, scale 3); ``{fp}``, ``{q}``, ``{ptqd}`` step 7's
FP32, W4A8-uncorrected and W4A8-PTQD samples there; ``{quant}`` the W4A8 model of step 3; ``{packed}`` its packed
file (setup ``packed`` makes it). Setup operations (``op:argument``) are carried out by the survey: ``packed``,
``dir:P``, ``readonly:P``, ``text:P=content``, ``copy:SRC>DST`` (SRC relative to the tree unless templated),
``corrupt:P`` (64 bytes inverted inside the largest tensor or array), ``truncate:P`` (the first half kept),
``npz:P=KIND`` (empty, float, ten images without a manifest). Every existing file named on a command line is watched
too (it must not change).

The cases the issue names have ids starting with ``i-`` and keep its command lines (paths moved to the case's copy
of the artifacts; cheap counts added); every other case is a new one of the same kinds on the other CLIs. Costs stay
at seconds: the quick-demo artifacts, 1-2 samples, 2-5 steps (the 600- and 1000-step pixel cases sample one image,
the concurrent-runs case 100 steps so that the two runs overlap).
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("data-loss", "silent-wrong", "traceback", "late-refusal", "false-refusal", "wording", "other")
EXPECTS = ("refuse", "accept", "say")


@dataclass(frozen=True)
class Case:
    """One bad or edge input: the command (argv after the interpreter; a script path relative to the tree, or
    ``-m module``), what a correct tool does with it, and what is set up first."""

    id: str
    kind: str
    argv: tuple[str, ...]
    expect: str = "refuse"
    setup: tuple[str, ...] = ()
    mentions: str | None = None
    produces: tuple[str, ...] = ()
    watch: tuple[str, ...] = ()     # files that must not change even when the command succeeds
    also: tuple[str, ...] = ()      # a second command run at the same time (concurrent runs on one folder)
    note: str = ""

    @property
    def issue(self) -> bool:
        """Named in issue 32's text."""
        return self.id.startswith("i-")

    @property
    def script(self) -> str:
        """The script (or module) the case runs."""
        return self.argv[1] if self.argv[0] == "-m" else self.argv[0]


CASES: list[Case] = []


def case(id: str, kind: str, argv, expect: str = "refuse", **kw) -> None:
    """Add one case (argv as a sequence of strings; numbers are turned into strings)."""
    CASES.append(Case(id, kind, tuple(map(str, argv)), expect, **{k: tuple(v) if isinstance(v, list) else v
                                                                    for k, v in kw.items()}))


def family(prefix: str, base, kind: str, rows, **kw) -> None:
    """Cases that add a few flags to one base command: rows of (id suffix, extra argv, mentions)."""
    for suffix, extra, mentions in rows:
        case(f"{prefix}-{suffix}", kind, [*base, *extra], mentions=mentions, **kw)


# ---- base commands (cheap settings; a case's own flags come last and win) -------------------------------------------
PROMPT = ("--prompt", "a photo of a bag")
T2I = ("quant_scripts/txt2img.py", "--outdir", "{tmp}/img", "-l", "{tmp}/runs", "--ddim_steps", "4", "--no_progress")
T2I_1 = (*T2I, *PROMPT, "--n_samples", "1")
T2I_PTQ = ("--ptq", "--quant_act", "--cali_n", "2")
DDIM = ("quant_scripts/sample_diffusion_ddim.py", "--preset", "fashion-ddim", "-l", "{tmp}/runs", "--max_images", "2",
        "--batch_size", "2", "--timesteps", "5")
DDIM_PTQ = ("--ptq", "--quant_mode", "brecq", "--cali_n", "8", "--cali_trajectories", "28", "--cali_iters", "0",
            "--cali_iters_a", "0")
EXPORT = ("quant_scripts/export_packed.py", "--outdir", "{out}")
S0 = ("quant_scripts/sample_fp32_imagenet.py", "--outdir", "{tmp}/o", "--classes", "0", "--n_samples_per_class", "1",
      "--steps", "4")
S1 = ("quant_scripts/collect_imagenet_calibration_set.py", "--outdir", "{tmp}/o", "--steps", "4", "--n", "8",
      "--n_holdout", "2", "--calibration_trajectories_per_class", "1")
S2 = ("quant_scripts/quantize_weight.py", "--outdir", "{out}", "--weight_iters", "4")
S3 = ("quant_scripts/quantize_weight_activation.py", "--outdir", "{out}", "--act_iters", "2", "--act_init_samples",
      "32")
S4 = ("quant_scripts/collect_timestep_aware_statistics.py", "--outdir", "{out}", "--n", "20", "--no_progress")
S5 = ("quant_scripts/gaussian_modeling.py", "--outdir", "{out}")
S6 = ("quant_scripts/sample_quantized_ldm_imagenet.py", "--outdir", "{out}", "--classes", "0", "1",
      "--n_samples_per_class", "1", "--no_progress")
S7 = ("quant_scripts/generate_evaluation_samples_dist.py", "--outdir", "{out}", "--n_samples", "10", "--batch_size",
      "10")
EVAL = ("evaluator.py", "models/eval/fashion_test_reference.npz")
FID = ("-m", "evaluation.fidelity")
FID_CHEAP = ("--bootstrap", "20", "--fid_bootstrap", "0")
DIT = ("quant_scripts/sample_dit.py", "--num-sampling-steps", "2", "--class-labels", "0", "1", "--out", "{tmp}/g.png")
READONLY = "readonly:{tmp}/ro"
A_FILE = "text:{tmp}/file.txt=keep me"
A_DIR = "dir:{tmp}/adir"
RUNS_PNGS = "{tmp}/img/samples/*.png"

# ---- the issue's cases, as written there ----------------------------------------------------------------------------
# data loss
case("i-export-out-over-quant", "data-loss", [*EXPORT, "--w_bits", 4, "--a_bits", 8, "--out", "{quant}"],
     mentions="--out", watch=["{quant}"])
case("i-fidelity-json-over-samples", "data-loss", [*FID, "{fp}", "{q}", "--json", "{q}", *FID_CHEAP],
     mentions="--json", watch=["{q}"])
# (100 steps: each batch takes long enough that both runs number their files before either has written one)
RACE = ("--n_samples", "4", "--n_iter", "3", "--ddim_steps", "100", "--skip_grid")
case("i-txt2img-concurrent-samples", "data-loss", [*T2I, *RACE, "--prompt", "a photo of a bag", "--seed", 1],
     "accept", also=(*T2I, *RACE, "--prompt", "a photo of a coat", "--seed", "2"),
     produces=[f"{RUNS_PNGS}#24"], note="two runs at once on one --outdir: 12 PNGs each, none lost")
case("t2i-concurrent-grids", "data-loss", [*T2I, "--n_samples", 2, "--prompt", "a photo of a bag", "--seed", 1,
                                          "--skip_save"], "accept",
     also=(*T2I, "--n_samples", "2", "--prompt", "a photo of a coat", "--seed", "2", "--skip_save"),
     produces=["{tmp}/img/grid-*.png#2"], note="the grids of two concurrent runs (a race of milliseconds: seldom hit)")
# silent wrong results
case("i-txt2img-eta5", "silent-wrong", [*T2I_1, "--ddim_eta", 5], mentions="--ddim_eta")
case("i-txt2img-n_samples0", "silent-wrong", [*T2I, *PROMPT, "--n_samples", 0], mentions="--n_samples")
case("i-ddim-sample_reverse100-5steps", "silent-wrong", [*DDIM, *DDIM_PTQ, "--sample_reverse", 100, "--timesteps", 5],
     mentions="--sample_reverse")
case("i-step6-fp32-integer", "silent-wrong", [*S6, "--sampler", "fp32", "--execution", "integer"],
     mentions="--execution")
case("step6-fp32-compiled", "silent-wrong", [*S6, "--sampler", "fp32", "--execution", "compiled"],
     mentions="--execution")
case("i-step6-packed-damaged", "silent-wrong", [*S6, "--sampler", "none", "--packed", "{packed}"],
     setup=["packed", "corrupt:{packed}"], mentions="packed_w4a8.pt")
case("i-fidelity-swapped", "silent-wrong", [*FID, "{q}", "{fp}", *FID_CHEAP])
# tracebacks
case("i-txt2img-n_rows-1", "traceback", [*T2I, *PROMPT, "--n_samples", 2, "--n_rows", -1], mentions="--n_rows")
case("i-export-out-directory", "traceback", [*EXPORT, "--out", "{tmp}/adir"], setup=[A_DIR], mentions="--out")
case("i-fidelity-json-readonly", "traceback", [*FID, "{fp}", "{q}", "--json", "{tmp}/ro/f.json", *FID_CHEAP],
     setup=[READONLY], mentions="--json")
case("i-bench-correction_overhead-n0", "traceback",
     ["benchmarks/correction_overhead.py", "--n", 0, "--outdir", "{out}"],
     mentions="--n")
case("i-bench-unet_forward-batch0", "traceback", ["benchmarks/unet_forward.py", "--batch", 0], mentions="--batch")
# late refusals
case("i-txt2img-eval0", "late-refusal", [*T2I, "--n_samples", 1, "--eval", 0], mentions="--eval")
case("i-txt2img-eval3", "late-refusal", [*T2I, "--n_samples", 1, "--eval", 3], mentions="--eval")
case("i-ddim-foreign-cali_ckpt", "late-refusal",
     [*DDIM, "--ptq", "--weight_bit", 4, "--act_bit", 8, "--timesteps", 10, "--cali_ckpt", "{quant}"],
     mentions="--cali_ckpt|quant_w4a8.pt", watch=["{quant}"])
# false refusals: the pixel DDPM's grids have no +1 offset (every S in 1..1000)
case("i-ddim-timesteps3", "false-refusal", [*DDIM, "--timesteps", 3], "accept", produces=["{tmp}/runs/**/samples.npz"])
case("i-ddim-timesteps600-uniform", "false-refusal",
     [*DDIM, "--max_images", 1, "--batch_size", 1, "--timesteps", 600, "--skip_type", "uniform"], "accept",
     produces=["{tmp}/runs/**/samples.npz"])
case("i-ddim-timesteps1000", "false-refusal", [*DDIM, "--max_images", 1, "--batch_size", 1, "--timesteps", 1000],
     "accept", produces=["{tmp}/runs/**/samples.npz"])
case("i-ddim-timesteps501", "false-refusal", [*DDIM, "--max_images", 1, "--batch_size", 1, "--timesteps", 501],
     "accept", produces=["{tmp}/runs/**/samples.npz"], note="every S from 501 to 1000 was refused")
# wording: the message names the flag that was typed
case("i-txt2img-ddim_steps-named", "wording", [*T2I_1, "--ddim_steps", 0], mentions="--ddim_steps")
case("i-ddim-timesteps-named", "wording", [*DDIM, "--timesteps", 0], mentions="--timesteps")
case("i-ddim-sample_reverse-named", "wording", [*DDIM, *DDIM_PTQ, "--sample_reverse", 0], mentions="--sample_reverse")
case("i-ddim-cali_n-named", "wording", [*DDIM, *DDIM_PTQ, "--cali_n", 0], mentions="--cali_n")
case("i-txt2img-seed-1", "wording", [*T2I_1, "--seed", -1], mentions="--seed")
case("i-ddim-seed-1", "wording", [*DDIM, "--seed", -1], mentions="--seed")

# ---- txt2img: new cases of the same kinds ---------------------------------------------------------------------------
family("t2i", T2I_1, "silent-wrong", [
    ("eta1.5", ["--ddim_eta", 1.5], "--ddim_eta"), ("eta-0.5", ["--ddim_eta", -0.5], "--ddim_eta"),
    ("eta-nan", ["--ddim_eta", "nan"], "--ddim_eta"), ("eta-inf", ["--ddim_eta", "inf"], "--ddim_eta"),
    ("scale-nan", ["--scale", "nan"], "--scale"), ("scale-neg", ["--scale", -2], "--scale"),
    ("plms-eta", ["--plms", "--ddim_eta", 0.5], "--ddim_eta"), ("n_iter0", ["--n_iter", 0], "--n_iter"),
    ("n_iter-1", ["--n_iter", -1], "--n_iter"), ("n_samples-2", ["--n_samples", -2], "--n_samples"),
    ("H0", ["--H", 0], "--H"), ("W-8", ["--W", -8], "--W"), ("H-wrong", ["--H", 48], "--H"),
    ("f0", ["--f", 0], "--f"), ("C0", ["--C", 0], "--C")])
family("t2i", T2I_1, "wording", [
    ("ddim_steps-too-many", ["--ddim_steps", 2000], "--ddim_steps"),
    ("ddim_steps3-offset", ["--ddim_steps", 3], "--ddim_steps"),
    ("ddim_steps-x", ["--ddim_steps", "x"], "--ddim_steps")])
family("t2i", T2I, "late-refusal", [
    ("eval-split", ["--n_samples", 1, "--eval", 15], "--eval"),
    ("eval-neg", ["--n_samples", 1, "--eval", -10], "--eval"),
    ("eval-prompt", [*PROMPT, "--eval", 10], "--eval"),
    ("eval-fp-ptq-noact", ["--n_samples", 1, "--eval", 10, "--ptq", "--cali_n", 2], "--quant_act"),
    ("cali_st-too-many", ["--n_samples", 1, *T2I_PTQ, "--cali_st", 9], "--cali_st"),
    ("cali_st0", ["--n_samples", 1, *T2I_PTQ, "--cali_st", 0], "--cali_st"),
    ("cali_n0", ["--n_samples", 1, "--ptq", "--cali_n", 0], "--cali_n"),
    ("cali_batch0", ["--n_samples", 1, *T2I_PTQ, "--running_stat", "--cali_batch_size", 0], "--cali_batch_size"),
    ("cali_iters-1", ["--n_samples", 1, *T2I_PTQ, "--cali_iters", -1], "--cali_iters"),
    ("cali_lr0", ["--n_samples", 1, *T2I_PTQ, "--cali_lr", 0], "--cali_lr"),
    ("cali_p-nan", ["--n_samples", 1, *T2I_PTQ, "--cali_p", "nan"], "--cali_p"),
    ("reverse_interval0", ["--n_samples", 1, *T2I_PTQ, "--sample_reverse", "--reverse_interval", 0],
     "--reverse_interval"),
    ("ptq-single-prompt", [*PROMPT, "--n_samples", 1, *T2I_PTQ], "--prompt")])
case("t2i-reverse_interval100", "silent-wrong", [*T2I, "--n_samples", 1, *T2I_PTQ, "--ddim_steps", 5,
                                              "--sample_reverse", "--reverse_interval", 100],
     mentions="--reverse_interval")
family("t2i", T2I_1, "silent-wrong", [
    ("packed-noptq", ["--packed", "{quant}"], "--packed"),
    ("execution-integer-noptq", ["--execution", "integer"], "--execution"),
    ("execution-compiled-noptq", ["--execution", "compiled"], "--execution"),
    ("sample_reverse-noptq", ["--sample_reverse"], "--sample_reverse"),
    ("packed-and-cali_ckpt", ["--ptq", "--quant_act", "--packed", "{quant}", "--cali_ckpt", "{quant}"], "--packed")])
family("t2i", T2I, "other", [
    ("from_file-missing", ["--from_file", "{tmp}/nope.txt", "--n_samples", 1], "nope.txt"),
    ("config-without-ckpt", [*PROMPT, "--config", "models/ldm/fashion-txt2img/config.yaml"], "--ckpt"),
    ("class-model", [*PROMPT, "--preset", "fashion"], "fashion"),
    ("precision-bogus", [*PROMPT, "--precision", "half"], "--precision"),
    ("weight_bit5", [*PROMPT, "--ptq", "--weight_bit", 5], "--weight_bit")])
case("t2i-from_file-empty", "other", [*T2I, "--from_file", "{tmp}/empty.txt", "--n_samples", 1],
     setup=["text:{tmp}/empty.txt="], mentions="empty.txt")
case("t2i-foreign-cali_ckpt", "late-refusal", [*T2I, "--n_samples", 1, "--ptq", "--quant_act", "--weight_bit", 4,
                                                "--cali_ckpt", "{quant}"],
     mentions="--cali_ckpt|quant_w4a8.pt", watch=["{quant}"])
case("t2i-cali_ckpt-missing", "other", [*T2I, "--n_samples", 1, "--ptq", "--quant_act", "--cali_ckpt",
                                         "{tmp}/nope.pt"], mentions="nope.pt")
case("t2i-packed-damaged", "silent-wrong", [*T2I, "--n_samples", 1, "--ptq", "--quant_act", "--packed",
                                             "{tmp}/garbage.pt"], setup=["text:{tmp}/garbage.pt=not a torch file"],
     mentions="garbage.pt")
case("t2i-outdir-is-file", "data-loss", [*T2I_1, "--outdir", "{tmp}/file.txt"], setup=[A_FILE], mentions="--outdir")
case("t2i-outdir-readonly", "traceback", [*T2I_1, "--outdir", "{tmp}/ro/img"], setup=[READONLY], mentions="--outdir")
case("t2i-outdir-over-quant", "data-loss", [*T2I_1, "--outdir", "{quant}"], mentions="--outdir", watch=["{quant}"])
for sid, extra, produced in (
        ("basic", [], [f"{RUNS_PNGS}#1", "{tmp}/img/grid-0000.png"]),
        ("eta1", ["--ddim_eta", 1], [RUNS_PNGS]), ("eta0-plms", ["--plms", "--ddim_eta", 0], [RUNS_PNGS]),
        ("n_rows0", ["--n_rows", 0], ["{tmp}/img/grid-0000.png"]), ("seed0", ["--seed", 0], [RUNS_PNGS]),
        ("steps1", ["--ddim_steps", 1], [RUNS_PNGS]), ("scale0", ["--scale", 0], [RUNS_PNGS]),
        ("precision-full", ["--precision", "full"], [RUNS_PNGS]),
        ("n_iter2", ["--n_iter", 2, "--n_samples", 2], [f"{RUNS_PNGS}#4"]),
        ("skip_grid", ["--skip_grid"], [f"{RUNS_PNGS}#1"])):
    case(f"t2i-ok-{sid}", "false-refusal", [*T2I_1, *extra], "accept", produces=produced)
case("t2i-ok-eval10", "false-refusal", [*T2I, "--n_samples", 1, "--eval", 10], "accept",
     produces=["{tmp}/runs/**/samples.npz"])
case("t2i-ok-ptq", "false-refusal", [*T2I, "--n_samples", 1, *T2I_PTQ], "accept",
     produces=[f"{RUNS_PNGS}#10", "{tmp}/runs/**/quant_w8a8.pt"])
case("t2i-ok-ptq-probe", "false-refusal", [*T2I, "--n_samples", 1, *T2I_PTQ, "--ddim_steps", 5, "--sample_reverse",
                                            "--reverse_interval", 2], "accept", produces=[f"{RUNS_PNGS}#10"])

# ---- sample_diffusion_ddim (QNCD's CIFAR-10 command on the embedded pixel default) ---------------------------------
family("ddim", DDIM, "silent-wrong", [
    ("eta2", ["--eta", 2], "--eta"), ("eta-1", ["--eta", -1], "--eta"), ("eta-nan", ["--eta", "nan"], "--eta"),
    ("max_images0", ["--max_images", 0], "--max_images"), ("max_images-5", ["--max_images", -5], "--max_images"),
    ("batch0", ["--batch_size", 0], "--batch_size"), ("batch-1", ["--batch_size", -1], "--batch_size"),
    ("sample_reverse-noptq", ["--sample_reverse", 4], "--sample_reverse")])
family("ddim", DDIM, "wording", [
    ("timesteps1001", ["--timesteps", 1001], "--timesteps"), ("timesteps-3", ["--timesteps", -3], "--timesteps"),
    ("sample_reverse40", [*DDIM_PTQ, "--sample_reverse", 40], "--sample_reverse"),
    ("cali_trajectories0", [*DDIM_PTQ, "--cali_trajectories", 0], "--cali_trajectories"),
    ("cali_iters-1", [*DDIM_PTQ, "--cali_iters", -1], "--cali_iters"),
    ("cali_iters_a-1", [*DDIM_PTQ, "--cali_iters_a", -1], "--cali_iters_a"),
    ("cali_n-too-many", [*DDIM_PTQ, "--cali_n", 100000], "--cali_n")])
family("ddim", ("quant_scripts/sample_diffusion_ddim.py", "-l", "{tmp}/runs", "--max_images", 1), "other", [
    ("no-model", [], "--preset"),
    ("config-missing", ["--config", "nope.yml", "--ckpt", "{tmp}/nope.pt"], "nope.yml"),
    ("ckpt-garbage", ["--config", "models/ddim/fashion-ddim/config.yml", "--ckpt", "{tmp}/garbage.pt"],
     "garbage.pt"),
    ("weight_bit5", ["--preset", "fashion-ddim", "--ptq", "--weight_bit", 5], "--weight_bit")],
    setup=["text:{tmp}/garbage.pt=not a checkpoint"])
case("ddim-outdir-is-file", "data-loss", [*DDIM, "-l", "{tmp}/file.txt"], setup=[A_FILE], mentions="file.txt")
case("ddim-outdir-readonly", "traceback", [*DDIM, "-l", "{tmp}/ro/runs"], setup=[READONLY], mentions="ro")
case("ddim-cali_ckpt-missing", "other", [*DDIM, "--ptq", "--cali_ckpt", "{tmp}/nope.pt"], mentions="nope.pt")
case("ddim-cali_n-without-ptq", "other", [*DDIM, "--cali_n", 8], "say", mentions="--cali_n")
case("ddim-weight_bit-without-ptq", "other", [*DDIM, "--weight_bit", 4], "say", mentions="--weight_bit")
for sid, extra in (("basic", []), ("eta1", ["--eta", 1]), ("timesteps1", ["--timesteps", 1]),
                   ("seed0", ["--seed", 0]), ("uniform", ["--skip_type", "uniform"]),
                   ("corrected", ["--corrected_grid"]), ("max_images1", ["--max_images", 1, "--batch_size", 1]),
                   ("timesteps999-uniform", ["--max_images", 1, "--batch_size", 1, "--timesteps", 999,
                                             "--skip_type", "uniform"])):
    case(f"ddim-ok-{sid}", "false-refusal", [*DDIM, *extra], "accept", produces=["{tmp}/runs/**/samples.npz"])
case("ddim-ok-ptq-probe", "false-refusal", [*DDIM, *DDIM_PTQ, "--sample_reverse", 2], "accept",
     produces=["{tmp}/runs/**/quant_w8a8.pt", "{tmp}/runs/**/samples.npz"])

# ---- export_packed --------------------------------------------------------------------------------------------------
for sid, target in (("calibration", "{run}/calibration.pt"), ("noise_stats", "{run}/w4a8/noise_stats.pt"),
                    ("gaussian", "{run}/w4a8/gaussian_channel.pt"), ("fp-samples", "{fp}"),
                    ("w8a8-quant", "{run}/w8a8/quant_w8a8.pt"), ("weights-only-quant", "{run}/w4/quant_w4.pt"),
                    ("png", "{run}/grids/fp32_steps20_eta0_scale3_seed42.png"), ("ckpt", "{tmp}/model.ckpt")):
    case(f"export-out-over-{sid}", "data-loss",
         [*EXPORT, "--out", target, *(["--preset", "fashion", "--ckpt", target] if sid == "ckpt" else [])],
         setup=["copy:models/ldm/fashion-ldm-vq-4/model.ckpt>{tmp}/model.ckpt"] if sid == "ckpt" else [],
         mentions="--out", watch=[target])
case("export-out-readonly", "traceback", [*EXPORT, "--out", "{tmp}/ro/p.pt"], setup=[READONLY], mentions="--out")
case("export-out-under-file", "traceback", [*EXPORT, "--out", "{tmp}/file.txt/p.pt"], setup=[A_FILE],
     mentions="--out")
case("export-out-over-text", "data-loss", [*EXPORT, "--out", "{tmp}/file.txt"], setup=[A_FILE], mentions="--out",
     watch=["{tmp}/file.txt"])
case("export-damaged-quant", "silent-wrong", EXPORT, setup=["corrupt:{quant}"], mentions="quant_w4a8.pt",
     watch=["{quant}"])
case("export-truncated-quant", "traceback", EXPORT, setup=["truncate:{quant}"], mentions="quant_w4a8.pt")
family("export", EXPORT, "other", [
    ("no-artifact", ["--w_bits", 8, "--a_bits", 4], None), ("w_bits5", ["--w_bits", 5], "--w_bits"),
    ("steps0", ["--steps", 0], "--steps"), ("eta1.5", ["--eta", 1.5], "--eta"),
    ("batch0", ["--batch_size", 0], "--batch_size"), ("steps-other-run", ["--steps", 10], None)])
case("export-ok", "false-refusal", EXPORT, "accept", produces=["{run}/w4a8/packed_w4a8.pt"])
case("export-ok-weights-only", "false-refusal", [*EXPORT, "--weights_only"], "accept",
     produces=["{run}/w4/packed_w4.pt"])
case("export-ok-out", "false-refusal", [*EXPORT, "--out", "{tmp}/p/packed.pt"], "accept",
     produces=["{tmp}/p/packed.pt"])
case("export-ok-rerun", "false-refusal", [*EXPORT, "--out", "{packed}"], "accept", setup=["packed"],
     produces=["{packed}"], note="over its own current packed file: a no-op, not a refusal")

# ---- step 6: grids from the quantized model, --packed, --execution integer ------------------------------------------
family("step6", S6, "silent-wrong", [
    ("eta1.5", ["--eta", 1.5], "--eta"), ("eta-nan", ["--eta", "nan"], "--eta"),
    ("scale-1", ["--scale", -1], "--scale"),
    ("nspc0", ["--n_samples_per_class", 0], "--n_samples_per_class"), ("seed-1", ["--seed", -1], "--seed"),
    ("class99", ["--classes", 99], "--classes"), ("class-1", ["--classes", -1], "--classes"),
    ("probe-never", ["--sampler", "qncd-r100"], "100"),
    ("fp32-packed", ["--sampler", "fp32", "--packed", "{quant}"], "--packed"),
    ("packed-is-quant", ["--sampler", "none", "--packed", "{quant}"], "--packed|quant_w4a8.pt")])
case("step6-damaged-quant", "silent-wrong", [*S6, "--sampler", "none"], setup=["corrupt:{quant}"],
     mentions="quant_w4a8.pt")
case("step6-damaged-fit", "silent-wrong", [*S6, "--sampler", "dd2-channel"],
     setup=["corrupt:{run}/w4a8/gaussian_channel.pt"], mentions="gaussian_channel.pt")
family("step6", S6, "other", [
    ("sampler-bogus", ["--sampler", "dd3"], "dd3"), ("steps0", ["--steps", 0], "--steps"),
    ("steps-no-artifact", ["--steps", 10], None), ("steps3-offset", ["--steps", 3], "--steps"),
    ("batch0", ["--batch_size", 0], "--batch_size"), ("packed-missing", ["--packed", "{tmp}/nope.pt"], "nope.pt"),
    ("packed-png", ["--packed", "{run}/grids/fp32_steps20_eta0_scale3_seed42.png"], "--packed|.png"),
    ("bits-no-artifact", ["--w_bits", 8, "--a_bits", 4], None)])
case("step6-packed-truncated", "traceback", [*S6, "--sampler", "none", "--packed", "{packed}"],
     setup=["packed", "truncate:{packed}"], mentions="packed_w4a8.pt")
case("step6-packed-damaged-integer", "silent-wrong", [*S6, "--sampler", "none", "--packed", "{packed}",
                                                      "--execution", "integer"],
     setup=["packed", "corrupt:{packed}"], mentions="packed_w4a8.pt")
case("step6-quant-truncated", "traceback", [*S6, "--sampler", "none"], setup=["truncate:{quant}"],
     mentions="quant_w4a8.pt")
case("step6-quant-garbage", "traceback", [*S6, "--sampler", "none"], setup=["text:{quant}=garbage"],
     mentions="quant_w4a8.pt")
for sid, extra in (("none", ["--sampler", "none"]), ("dd2-channel", ["--sampler", "dd2-channel"]),
                   ("ptqd", ["--sampler", "ptqd"]), ("fp32", ["--sampler", "fp32"]),
                   ("eta0-boundary", ["--sampler", "none", "--eta", 0]), ("seed0", ["--sampler", "none", "--seed", 0]),
                   ("compare", ["--compare"]), ("w8a8", ["--sampler", "none", "--w_bits", 8, "--a_bits", 8])):
    case(f"step6-ok-{sid}", "false-refusal", [*S6, *extra], "accept", produces=["{run}/**/*.png"])
for sid, extra in (("packed", []), ("packed-integer", ["--execution", "integer"])):
    case(f"step6-ok-{sid}", "false-refusal", [*S6, "--sampler", "none", "--packed", "{packed}", *extra], "accept",
         setup=["packed"], produces=["{run}/w4a8/samples/*.png"])

# ---- step 7: evaluation samples ----------------------------------------------------------------------------------
family("step7", S7, "silent-wrong", [
    ("eta1.5", ["--eta", 1.5], "--eta"), ("n0", ["--n_samples", 0], "--n_samples"),
    ("n-not-multiple", ["--n_samples", 15], "--n_samples"), ("batch0", ["--batch_size", 0], "--batch_size"),
    ("seed-1", ["--seed", -1], "--seed"), ("decode0", ["--decode_batch_size", 0], "--decode_batch_size"),
    ("class99", ["--classes", 99], "--classes"), ("steps600", ["--steps", 600], "--steps"),
    ("fp32-integer", ["--sampler", "fp32", "--execution", "integer"], "--execution"),
    ("fp32-compiled", ["--sampler", "fp32", "--execution", "compiled"], "--execution"),
    ("fp32-packed", ["--sampler", "fp32", "--packed", "{quant}"], "--packed"),
    ("probe-never", ["--sampler", "qncd-r100"], "100")])
case("step7-packed-damaged", "silent-wrong", [*S7, "--sampler", "none", "--packed", "{packed}"],
     setup=["packed", "corrupt:{packed}"], mentions="packed_w4a8.pt")
case("step7-shards-other-settings", "data-loss", [*S7, "--sampler", "none", "--n_samples", 30, "--batch_size", 10],
     mentions="--force", watch=["{run}/w4a8/samples_none_n30_seed0/shards/batch_000000.npz"],
     note="the demo's shards (batch 250) under other settings: refused without --force, nothing discarded")
for sid, extra, produced in (
        ("fp32", ["--sampler", "fp32"], "{run}/fp32/samples_fp32_n10_seed0/samples.npz"),
        ("none", ["--sampler", "none"], "{run}/w4a8/samples_none_n10_seed0/samples.npz"),
        ("dd2", ["--sampler", "dd2-channel", "--eta", 0], "{run}/w4a8/samples_dd2-channel_n10_seed0/samples.npz"),
        ("seed0-batch1", ["--sampler", "none", "--batch_size", 1, "--seed", 0],
         "{run}/w4a8/samples_none_n10_seed0/samples.npz")):
    case(f"step7-ok-{sid}", "false-refusal", [*S7, *extra], "accept", produces=[produced])
case("step7-ok-dry-run", "false-refusal", [*S7, "--sampler", "none", "--dry_run"], "accept")

# ---- steps 0-5 ----------------------------------------------------------------------------------------------------
family("step0", S0, "silent-wrong", [
    ("nspc0", ["--n_samples_per_class", 0], "--n_samples_per_class"), ("class10", ["--classes", 10], "--classes"),
    ("class-1", ["--classes", -1], "--classes"), ("eta2", ["--eta", 2], "--eta"),
    ("steps0", ["--steps", 0], "--steps"),
    ("seed-1", ["--seed", -1], "--seed"), ("batch0", ["--batch_size", 0], "--batch_size"),
    ("scale-nan", ["--scale", "nan"], "--scale"), ("steps2000", ["--steps", 2000], "--steps")])
family("step0", S0, "other", [
    ("ckpt-garbage", ["--ckpt", "{tmp}/garbage.ckpt", "--config", "models/ldm/fashion-ldm-vq-4/config.yaml"],
     "garbage.ckpt"),
    ("ckpt-missing", ["--ckpt", "{tmp}/nope.ckpt", "--config", "models/ldm/fashion-ldm-vq-4/config.yaml"],
     "nope.ckpt"),
    ("config-only", ["--config", "models/ldm/fashion-ldm-vq-4/config.yaml"], "--ckpt")],
    setup=["text:{tmp}/garbage.ckpt=garbage"])
case("step0-outdir-is-file", "data-loss", [*S0, "--outdir", "{tmp}/file.txt"], setup=[A_FILE], mentions="file.txt")
case("step0-outdir-readonly", "traceback", [*S0, "--outdir", "{tmp}/ro/o"], setup=[READONLY], mentions="ro")
case("step0-ckpt-truncated", "traceback", [*S0, "--config", "models/ldm/fashion-ldm-vq-4/config.yaml", "--ckpt",
                                           "{tmp}/model.ckpt"],
     setup=["copy:models/ldm/fashion-ldm-vq-4/model.ckpt>{tmp}/model.ckpt", "truncate:{tmp}/model.ckpt"],
     mentions="model.ckpt")
for sid, extra in (("basic", []), ("eta1", ["--eta", 1]), ("steps1", ["--steps", 1]), ("seed0", ["--seed", 0]),
                   ("scale1", ["--scale", 1])):
    case(f"step0-ok-{sid}", "false-refusal", [*S0, *extra], "accept", produces=["{tmp}/o/*.png"])
family("step1", S1, "silent-wrong", [
    ("n0", ["--n", 0], "--n"), ("n_holdout-1", ["--n_holdout", -1], "--n_holdout"),
    ("traj0", ["--calibration_trajectories_per_class", 0], "--calibration_trajectories_per_class"),
    ("cali_st0", ["--cali_st", 0], "--cali_st"), ("cali_st-too-many", ["--cali_st", 9], "--cali_st"),
    ("class99", ["--calibration_classes", 99], "--calibration_classes"), ("seed-1", ["--seed", -1], "--seed"),
    ("n-too-many", ["--n", 100000], "--n")])
case("step1-ok", "false-refusal", S1, "accept", produces=["{tmp}/o/**/calibration.pt"])
case("step1-ok-holdout0", "false-refusal", [*S1, "--n_holdout", 0], "accept",
     produces=["{tmp}/o/**/calibration.pt"])
family("step2", S2, "silent-wrong", [
    ("iters-1", ["--weight_iters", -1], "--weight_iters"), ("recon0", ["--recon_batch_size", 0], "--recon_batch_size"),
    ("round-neg", ["--round_weight", -0.5], "--round_weight"), ("w_bits5", ["--w_bits", 5], "--w_bits"),
    ("cache0", ["--cache_batch_size", 0], "--cache_batch_size")], watch=["{run}/w4/quant_w4.pt"])
case("step2-no-calibration", "other", [*S2, "--outdir", "{tmp}/empty"])
case("step2-damaged-calibration", "silent-wrong", [*S2, "--force"], setup=["corrupt:{run}/calibration.pt"],
     mentions="calibration.pt", watch=["{run}/w4/quant_w4.pt"])
case("step2-ok-current", "false-refusal", S2, "accept", watch=["{run}/w4/quant_w4.pt"],
     note="the demo's W4 model is current: a no-op")
family("step3", S3, "silent-wrong", [
    ("iters-1", ["--act_iters", -1], "--act_iters"), ("init0", ["--act_init_samples", 0], "--act_init_samples"),
    ("lr0", ["--lr", 0], "--lr"), ("p-nan", ["--p", "nan"], "--p"), ("sm_abit17", ["--sm_abit", 17], "--sm_abit"),
    ("a_bits5", ["--a_bits", 5], "--a_bits"), ("rs0", ["--rs_batch_size", 0], "--rs_batch_size")],
    watch=["{quant}"])
case("step3-no-weights", "other", [*S3, "--w_bits", 8, "--a_bits", 4, "--outdir", "{tmp}/empty"])
family("step4", S4, "silent-wrong", [
    ("n0", ["--n", 0], "--n"), ("save_every0", ["--save_every", 0], "--save_every"),
    ("outlier-1", ["--outlier_k", -1], "--outlier_k"), ("outlier-nan", ["--outlier_k", "nan"], "--outlier_k"),
    ("seed-1", ["--seed", -1], "--seed")], watch=["{run}/w4a8/noise_stats.pt"])
case("step4-no-quant", "other", [*S4, "--w_bits", 8, "--a_bits", 4])
case("step4-damaged-quant", "silent-wrong", [*S4, "--force"], setup=["corrupt:{quant}"], mentions="quant_w4a8.pt",
     watch=["{run}/w4a8/noise_stats.pt"])
case("step4-ok-current", "false-refusal", S4, "accept", watch=["{run}/w4a8/noise_stats.pt"])
family("step5", S5, "silent-wrong", [
    ("outlier-1", ["--outlier_k", -1], "--outlier_k"), ("outlier-inf", ["--outlier_k", "inf"], "--outlier_k")],
    watch=["{run}/w4a8/gaussian_channel.pt"])
case("step5-no-stats", "other", [*S5, "--w_bits", 8, "--a_bits", 8])
case("step5-damaged-stats", "silent-wrong", [*S5, "--force"], setup=["corrupt:{run}/w4a8/noise_stats.pt"],
     mentions="noise_stats.pt", watch=["{run}/w4a8/gaussian_channel.pt"])
case("step5-ok-current", "false-refusal", S5, "accept", watch=["{run}/w4a8/gaussian_channel.pt"])

# ---- evaluator.py ---------------------------------------------------------------------------------------------------
family("evaluator", (*EVAL, "{fp}"), "data-loss", [
    ("json-over-samples", ["--json", "{fp}"], "--json"), ("json-dir", ["--json", "{tmp}/adir"], "--json"),
    ("json-readonly", ["--json", "{tmp}/ro/r.json"], "--json"),
    ("json-under-file", ["--json", "{tmp}/file.txt/r.json"], "--json")],
    setup=[A_DIR, READONLY, A_FILE], watch=["{fp}", "{tmp}/file.txt"])
case("evaluator-json-over-ref", "data-loss", ["evaluator.py", "{tmp}/ref.npz", "{fp}", "--json", "{tmp}/ref.npz"],
     setup=["copy:models/eval/fashion_test_reference.npz>{tmp}/ref.npz"], mentions="--json", watch=["{tmp}/ref.npz"])
family("evaluator", EVAL, "other", [
    ("samples-missing", ["{tmp}/nope.npz"], "nope.npz"),
    ("samples-png", ["{run}/grids/fp32_steps20_eta0_scale3_seed42.png"], "png"),
    ("samples-empty", ["{tmp}/empty.npz"], "empty.npz"), ("samples-float", ["{tmp}/float.npz"], "float.npz"),
    ("batch0", ["{q}", "--batch_size", 0], "--batch_size"), ("batch-1", ["{q}", "--batch_size", -1], "--batch_size"),
    ("cache_dir-file", ["{q}", "--cache_dir", "{tmp}/file.txt"], "--cache_dir"),
    ("inception-missing", ["{q}", "--features", "inception", "--inception_graph", "{tmp}/nope.pb"], "nope.pb")],
    setup=["npz:{tmp}/empty.npz=empty", "npz:{tmp}/float.npz=float", A_FILE], watch=["{tmp}/file.txt"])
case("evaluator-samples-damaged", "silent-wrong", [*EVAL, "{fp}"], setup=["corrupt:{fp}"], mentions="samples.npz")
case("evaluator-swapped", "silent-wrong", ["evaluator.py", "{fp}", "models/eval/fashion_test_reference.npz"],
     note="the reference batch (it carries mu/sigma) given as the samples")
case("evaluator-ok", "false-refusal", [*EVAL, "{fp}", "--json", "{tmp}/r.json"], "accept", produces=["{tmp}/r.json"])
case("evaluator-ok-batch1-cache", "false-refusal", [*EVAL, "{q}", "--batch_size", 1000, "--cache_dir", "{tmp}/c",
                                                    "--json", "{tmp}/r.json"], "accept", produces=["{tmp}/r.json"])

# ---- python -m evaluation.fidelity --------------------------------------------------------------------------------
family("fidelity", (*FID, "{fp}", "{q}", *FID_CHEAP), "data-loss", [
    ("json-over-fp", ["--json", "{fp}"], "--json"), ("json-over-vs", ["--vs", "{ptqd}", "--json", "{ptqd}"], "--json"),
    ("json-dir", ["--json", "{tmp}/adir"], "--json"),
    ("json-under-file", ["--json", "{tmp}/file.txt/f.json"], "--json"),
    ("json-over-manifest", ["--json", "{run}/w4a8/samples_none_n30_seed0/manifest.json"], "--json")],
    setup=[A_DIR, A_FILE], watch=["{fp}", "{ptqd}", "{run}/w4a8/samples_none_n30_seed0/manifest.json"])
family("fidelity", FID, "other", [
    ("bootstrap0", ["{fp}", "{q}", "--bootstrap", 0], "--bootstrap"),
    ("fid_bootstrap-1", ["{fp}", "{q}", "--fid_bootstrap", -1], "--fid_bootstrap"),
    ("missing", ["{fp}", "{tmp}/nope.npz", *FID_CHEAP], "nope.npz"),
    ("png", ["{fp}", "{run}/grids/fp32_steps20_eta0_scale3_seed42.png", *FID_CHEAP], "png"),
    ("other-n", ["{fp}", "{tmp}/ten.npz", *FID_CHEAP], "ten.npz"),
    ("features-bogus", ["{fp}", "{ptqd}", "--features", "vgg"], "--features")], setup=["npz:{tmp}/ten.npz=ten"])
case("fidelity-damaged", "silent-wrong", [*FID, "{fp}", "{q}", *FID_CHEAP], setup=["corrupt:{q}"],
     mentions="samples.npz")
case("fidelity-vs-swapped", "silent-wrong", [*FID, "{q}", "{ptqd}", "--vs", "{fp}", *FID_CHEAP],
     note="the FP samples given as --vs, a variant as the FP set")
case("fidelity-ok", "false-refusal", [*FID, "{fp}", "{q}", "--json", "{tmp}/f.json", *FID_CHEAP], "accept",
     produces=["{tmp}/f.json"])
case("fidelity-ok-vs", "false-refusal", [*FID, "{fp}", "{q}", "--vs", "{ptqd}", "--bootstrap", 1,
                                         "--fid_bootstrap", 0], "accept")

# ---- sample_dit.py (new since the issue's commit) -------------------------------------------------------------------
family("dit", DIT, "silent-wrong", [
    ("eta2", ["--sampler", "ddim", "--eta", 2], "--eta"), ("eta-nan", ["--sampler", "ddim", "--eta", "nan"], "--eta"),
    ("steps0", ["--num-sampling-steps", 0], "--num-sampling-steps"), ("nrow0", ["--nrow", 0], "--nrow"),
    ("cfg0.5", ["--cfg-scale", 0.5], "--cfg-scale"), ("seed-1", ["--seed", -1], "--seed"),
    ("label99", ["--class-labels", 99], "--class-labels"), ("label-1", ["--class-labels", -1], "--class-labels"),
    ("fid0", ["--num-fid-samples", 0], "--num-fid-samples"),
    ("batch0", ["--per-proc-batch-size", 0], "--per-proc-batch-size"),
    ("packed-fp32", ["--packed", "{tmp}/nope.pt"], "--packed"),
    ("integer-fp32", ["--execution", "integer"], "--execution"),
    ("compiled-fp32", ["--execution", "compiled"], "--execution")])
case("dit-out-over-ckpt", "data-loss", [*DIT, "--config", "models/dit/fashion/config.yaml", "--ckpt", "{tmp}/model.pt",
                                        "--out", "{tmp}/model.pt"],
     setup=["copy:models/dit/fashion/model.pt>{tmp}/model.pt"], mentions="--out", watch=["{tmp}/model.pt"])
case("dit-out-dir", "traceback", [*DIT, "--out", "{tmp}/adir"], setup=[A_DIR], mentions="--out")
case("dit-out-readonly", "traceback", [*DIT, "--out", "{tmp}/ro/g.png"], setup=[READONLY], mentions="--out")
case("dit-ckpt-garbage", "other", [*DIT, "--ckpt", "{tmp}/garbage.pt"],
     setup=["text:{tmp}/garbage.pt=garbage"], mentions="garbage.pt")
case("dit-correction-no-artifacts", "other", [*DIT, "--correction", "dd2-channel", "--outdir", "{tmp}/empty"])
case("dit-ok", "false-refusal", DIT, "accept", produces=["{tmp}/g.png"])
case("dit-ok-ddim-eta1", "false-refusal", [*DIT, "--sampler", "ddim", "--eta", 1], "accept",
     produces=["{tmp}/g.png"])
case("dit-ok-fid", "false-refusal", [*DIT, "--num-fid-samples", 10, "--sample-dir", "{tmp}/s"], "accept",
     produces=["{tmp}/s/**/samples.npz"])

# ---- python -m evaluation.clip_score --------------------------------------------------------------------------------
family("clip", ("-m", "evaluation.clip_score", "{fp}", "--prompts", "configs/prompts/fashion.txt"), "other", [
    ("no-clip", ["--clip", "{tmp}/nope"], "nope"),
    ("batch0", ["--clip", "{tmp}/nope", "--batch_size", 0], "--batch_size"),
    ("resamples0", ["--clip", "{tmp}/nope", "--resamples", 0], "--resamples"),
    ("json-over-samples", ["--clip", "{tmp}/nope", "--json", "{fp}"], None)], watch=["{fp}"])

# ---- benchmarks: counts and sizes (a bad count must not start the work) ---------------------------------------------
# (benchmark, the flags that keep its work small, placed first so the case's own flag wins)
BENCH_CHEAP = {
    "unet_forward": ["--repeats", 1, "--warmup", 0], "correction_overhead": ["--n", 2, "--repeats", 1, "--warmup", 0,
                                                                            "--variants", "none", "--outdir", "{out}"],
    "correction_eps_error": ["--n", 2, "--outdir", "{out}"],
    "activation_reconstruction": ["--a_bits", 8, "--inputs", "fp", "--outdir", "{out}"],
    "fake_quant_overhead": ["--batch", 1, "--steps", 1, "--repeats", 1],
    "fashion_model_quality": ["--n", 10, "--batch_size", 10, "--steps", 2],
    "integer_execution": ["--parts", "layers", "--top", 1, "--repeats", 1, "--run_dir", "{run}"],
    "quantization_stages": ["--n", 16, "--iters", 1, "--units", 1],
    "dit_quality": ["--n", 10, "--steps", 2, "--batch_size", 10],
    "precision_fidelity": ["--n", 10, "--bootstrap", 10, "--fid_bootstrap", 0, "--no_floor", "--steps", 2],
    "qncd_probe_fp": ["--n", 10, "--intervals", 2, "--no_floor", "--steps", 4],
    "qncd_probe_variant": ["--preset", "fashion", "--outdir", "{tmp}/pv", "--n_eval", 10, "--n_cal", 16,
                           "--n_holdout", 4, "--traj", 1, "--weight_iters", 0, "--act_iters", 0, "--act_init", 4,
                           "--stats", 2, "--fp_check", 0],
}
BENCH_COUNTS = [
    ("unet_forward", ["--repeats", 0]), ("unet_forward", ["--warmup", -1]), ("unet_forward", ["--repeats", "x"]),
    ("correction_overhead", ["--repeats", 0]), ("correction_overhead", ["--threads", 0]),
    ("correction_overhead", ["--warmup", -1]), ("correction_eps_error", ["--n", 0]),
    ("activation_reconstruction", ["--act_iters", -1]), ("fake_quant_overhead", ["--batch", 0]),
    ("fake_quant_overhead", ["--steps", 0]), ("fake_quant_overhead", ["--repeats", 0]),
    ("fashion_model_quality", ["--n", 0]), ("fashion_model_quality", ["--batch_size", 0]),
    ("fashion_model_quality", ["--steps", 0]), ("fashion_model_quality", ["--eta", 3]),
    ("integer_execution", ["--batch", 0]), ("integer_execution", ["--top", 0]),
    ("integer_execution", ["--repeats", 0]), ("quantization_stages", ["--iters", 0]),
    ("quantization_stages", ["--n", 0]), ("quantization_stages", ["--units", 0]),
    ("cifar10_rehearsal", ["--trajectories", 0]), ("cifar10_rehearsal", ["--samples", 0]),
    ("cifar10_rehearsal", ["--iters", -1]), ("cin256_rehearsal", ["--classes", 0]),
    ("cin256_rehearsal", ["--n_calibration", 0]), ("dit_rehearsal", ["--steps", 0]), ("dit_rehearsal", ["--depth", 0]),
    ("dit_quality", ["--n", 5]), ("dit_quality", ["--batch_size", 0]), ("precision_fidelity", ["--n", 0]),
    ("precision_fidelity", ["--bootstrap", 0]), ("qncd_probe_fp", ["--n", 0]), ("qncd_probe_fp", ["--intervals", 0]),
    ("qncd_probe_variant", ["--n_eval", 0]), ("qncd_probe_variant", ["--traj", 0]), ("gpu_check", ["--budget", -1])]
BENCH_CHEAP["gpu_check"] = ["--device", "cpu"]   # (a CPU machine: the budget, not the missing GPU, is what is tested)
for name, extra in BENCH_COUNTS:
    flag, value = extra
    json = [] if name == "unet_forward" else ["--json", "{tmp}/bench.json"]
    case(f"bench-{name}-{flag.lstrip('-')}{value}", "traceback",
         [f"benchmarks/{name}.py", *BENCH_CHEAP.get(name, []), *extra, *json], mentions=flag)
# valid small runs of the benchmarks (a crash on good input is as bad as a silent one on bad input)
for name, argv in (
        ("correction_overhead", ["--n", 2, "--repeats", 1, "--warmup", 0, "--variants", "none", "--outdir", "{out}"]),
        ("correction_eps_error", ["--n", 2, "--outdir", "{out}"]),
        ("activation_reconstruction", ["--a_bits", 8, "--inputs", "fp", "--act_iters", 0, "--outdir", "{out}"]),
        # (the quick demo keeps 160 calibration inputs, fewer than the preset's 256 for the activation ranges)
        ("precision_fidelity", ["--n", 10, "--steps", 2, "--bootstrap", 10, "--fid_bootstrap", 0, "--no_floor"]),
        ("qncd_probe_fp", ["--n", 10, "--steps", 4, "--intervals", 2, "--no_floor"]),
        ("fashion_model_quality", ["--n", 10, "--steps", 2, "--batch_size", 10]),
        ("dit_quality", ["--n", 10, "--steps", 2, "--batch_size", 10, "--samplers", "ddim"])):
    case(f"bench-{name}-ok", "false-refusal", [f"benchmarks/{name}.py", *argv, "--json", "{tmp}/bench.json"],
         "accept", produces=["{tmp}/bench.json"])
# options that act on a quantized model only, given without --ptq (issue 32: options that do nothing say so)
for sid, extra, flag in (("quant_act", ["--quant_act"], "--quant_act"), ("cali_st", ["--cali_st", 2], "--cali_st"),
                         ("weight_bit", ["--weight_bit", 4], "--weight_bit")):
    case(f"t2i-{sid}-without-ptq", "other", [*T2I_1, *extra], "say", mentions=flag)
