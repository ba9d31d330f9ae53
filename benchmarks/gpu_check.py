"""One command that tells a person with one GPU whether every CUDA path of this repository works, and how fast.

    python benchmarks/gpu_check.py --device cuda --json gpu_check.json    # at most 8 minutes on one H100 / H200
    make gpu-check                                                       # the same, JSON in outputs/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --tiny                   # the smoke run tests/test_gpu_check.py makes

Why one command: every user runs this on a CUDA GPU, and a CPU test suite cannot see what breaks only there (a
tensor made on the default device, a summary that reads a GPU peak a CPU-only stage never has). Each check is the
repository's own script or function, at small counts, in its own process with its own time budget, so one failure
is one FAIL row with its one-line error and the rest still runs. No download: the three embedded defaults and
random-weight cin256-v2 are all it needs.

Rows (the small counts of ``--device cuda``; ``--tiny`` takes the smallest counts and the tests' tiny
class-conditional model in place of cin256-v2):

- ``pipeline <preset>`` for ``fashion`` (class LDM), ``fashion-ddim`` (pixel DDPM), ``fashion-txt2img`` (text to
  image): steps 1-7 on the device (calibration, W4 weights, W4A8 activations, noise statistics, Gaussian fits, a
  D-D² grid, FP32 and D-D² evaluation samples); key number: the W4A8 ε SQNR on the held-out inputs.
- ``packed+integer <preset>``: packed export of the W4A8 model, step 7 from the file alone (``--packed``, must equal
  the fake-quant samples bit for bit) and with ``--execution integer`` (int8 kernels; must stay within a quarter of
  the quantization error, the rule of tests/test_pipeline_correction.py).
- ``sqnr vs cpu <preset>``: steps 1-3 again on the CPU (in the background, while the GPU works), their SQNRs (W4
  nearest, W4 AdaRound, W4A8) against the device's: |difference| <= ``SQNR_TOLERANCE_DB`` each. The two runs share
  seeds and inputs; only float summation order differs, which moves an SQNR by hundredths of a dB, while a device
  bug (a wrong range, a lost rounding) moves it by dB. With ``--device cpu`` this is a rerun: it must repeat itself.
- ``fidelity cli``: ``python -m evaluation.fidelity`` on the fashion FP32 and W4A8 D-D² samples (PSNR to FP).
- ``cin256 rehearsal``: benchmarks/cin256_rehearsal.py at small counts; key numbers: steps 1-3 projected to the
  paper's counts (GPU-hours), step 7's 50,000 samples projected from one batch of 16, the largest GPU peak projected.
- ``DiT-XL/2 rehearsal``: benchmarks/dit_rehearsal.py at small counts, all 28 blocks of a random-weight DiT-XL/2
  (256×256) with a random sd-vae-ft-ema; key numbers: steps 1-3 and step 7's 10,000 samples projected to PTQ4DiT's
  250-step protocol, the largest GPU peak projected.
- ``fake-quant ratio``: benchmarks/fake_quant_overhead.py --compiled, W4A8 fake-quant / FP32 guided sampling time
  (issue 29's goal 1.10x on a GPU), with the passes (fake sampling's pick on this device) and with the compiled
  kernels (``--execution compiled``); fails only if the compiled kernels change the samples.
- ``fake-quant kernel``: benchmarks/fake_quant_kernel.py, the activation fake-quant against a copy of its input for
  every kernel (passes, fused, compiled, auto) at batch 32 (goal 1.5x); fails if the compiled kernel's codes differ.
- ``integer W8A8``: benchmarks/integer_execution.py ``--parts device``: the cin256 feed-forward Linear and 1x1 conv
  shapes and the whole UNet, FP32 / TF32 / bf16 / fake W8A8 / integer W8A8 (torch._int_mm on CUDA), CUDA-event
  medians; ok when the integer path ran on the int8 kernel and matches fake-quant.

It ends with a table (path, ok/FAIL, seconds, key number) and writes every row, with its details, as JSON.

On a machine whose torch is preinstalled (a CUDA image), bring only what it lacks, as wheels, and run from the
repository root: omegaconf 2.4.0, ftfy 6.3.1 and wcwidth (in .whl/); numpy, scipy, pytorch-lightning, einops, tqdm,
pillow, matplotlib, pyyaml, regex and transformers are the image's:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py --device cuda --json gpu_check.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_check_parts import PARTS, SQNR_TOLERANCE_DB, Row, compare_sqnr  # noqa: E402

PRESETS = ("fashion", "fashion-ddim", "fashion-txt2img")
BUDGET_S = 8 * 60          # the whole check on one H100 / H200 (--budget)
# seconds each part may take before it is stopped (a FAIL row), and never past the whole check's budget; --tiny:
# the CPU smoke run's (no overall budget: a shared CPU's speed varies too much)
BUDGETS = {"pipeline": 120, "cpu": 240, "fidelity": 60, "cin256": 240, "dit": 240, "fake_quant": 120,
           "fq_kernel": 45, "integer": 90}
TINY_BUDGETS = {"pipeline": 600, "cpu": 600, "fidelity": 120, "cin256": 600, "dit": 300, "fake_quant": 120,
                "fq_kernel": 120, "integer": 120}
RESERVE_S = 10             # kept back from the budget for the table and the JSON


def child_env(threads: int | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def part_cmd(args, part: str, record: Path, device: str, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--_part", part, "--_record", str(record), "--device",
            device, "--workdir", str(args.workdir), *(["--tiny"] if args.tiny else []), *extra]


def log_tail(log: Path, n: int = 1) -> list[str]:
    """The last ``n`` non-empty lines of a part's log (n = 1: a traceback's exception line, a script's error)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [ln.rstrip()[:300] for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-n:] if lines else ["no output"]


def collect(name: str, proc: subprocess.Popen, record: Path, log: Path, t0: float, budget: float) -> list[Row]:
    """Wait for a part's process (stopping it, and what it started, at its budget) and read its rows; a crash or a
    timeout is one FAIL row, and its log's last lines are printed (the one place a remote run's error shows)."""
    try:
        code = proc.wait(timeout=max(1.0, budget - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)     # (its own session: the rehearsal's stage processes too)
        proc.wait()
        code = None
    seconds = time.perf_counter() - t0
    if code == 0 and record.is_file():
        return [Row(**r) for r in json.loads(record.read_text())]
    print("\n".join(f"    | {ln}" for ln in log_tail(log, 15)), flush=True)
    why = f"stopped at its {budget:.0f} s budget" if code is None else f"exit {code}: {log_tail(log)[0]}"
    return [Row(name, False, seconds, why, {"log": str(log)})]


class Runner:
    """Starts parts as processes (in the foreground, or in the background for the CPU reruns), keeps the rows and
    writes the JSON after every row (a run stopped from outside still leaves what it measured)."""

    def __init__(self, args):
        self.args, self.rows, self.t0 = args, [], time.perf_counter()
        self.budgets = TINY_BUDGETS if args.tiny else BUDGETS
        self.meta: dict = {}
        (args.workdir / "logs").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return float("inf") if self.args.tiny else self.args.budget - RESERVE_S - (time.perf_counter() - self.t0)

    def start(self, name: str, part: str, device: str, *extra: str, threads: int | None = None):
        stem = name.replace(" ", "_").replace("+", "_")
        record, log = self.args.workdir / "logs" / f"{stem}.json", self.args.workdir / "logs" / f"{stem}.log"
        record.unlink(missing_ok=True)
        with open(log, "w") as f:
            proc = subprocess.Popen(part_cmd(self.args, part, record, device, *extra), cwd=REPO, stdout=f,
                                    stderr=subprocess.STDOUT, env=child_env(threads), start_new_session=True)
        return name, proc, record, log, time.perf_counter(), min(self.budgets[part], max(self.left(), 1.0))

    def run(self, name: str, part: str, *extra: str) -> list[Row]:
        if self.left() < 30:
            return self.add([Row(name, False, 0.0, f"not run: the {self.args.budget / 60:.0f}-min budget is spent")])
        print(f"--- {name} ...", flush=True)
        return self.add(collect(*self.start(name, part, self.args.device, *extra)))

    def add(self, rows: list[Row]) -> list[Row]:
        for r in rows:
            print(f"    {r.line()}", flush=True)
        self.rows += rows
        self.write()
        return rows

    def write(self) -> None:
        if self.args.json:
            out = Path(self.args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**self.meta, "total_s": time.perf_counter() - self.t0,
                                       "ok": all(r.ok for r in self.rows),
                                       "rows": [r.asdict() for r in self.rows]}, indent=1, default=str))


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; --budget checked by the parser (one line, before any part starts)."""
    from ldm.util import ArgumentParser
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="the device under test (cuda, cuda:1, cpu)")
    ap.add_argument("--tiny", action="store_true", help="the smallest counts and a tiny model (the test suite's run)")
    ap.add_argument("--workdir", default=None, help="work files here and keep them (default: a temporary folder, "
                                                    "removed at the end; the parts' logs are copied beside --json)")
    ap.add_argument("--json", default=None, help="write every row and its details here (after every row)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check (not --tiny)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("pipeline", "cpu", "fidelity", "cin256", "dit",
                                                              "fake_quant", "fq_kernel", "integer"),
                    help="parts to leave out")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS,
                    help="embedded defaults to run through the pipeline (the fidelity row reads the first one's)")
    ap.add_argument("--_part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_record", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.budget > 0:   # (NaN too)
        ap.error(f"argument --budget: must be a number of seconds > 0, got {args.budget}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    keep = args.workdir is not None
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    if args._part:     # one part, in this (child) process
        rows = PARTS[args._part](args)
        Path(args._record).write_text(json.dumps([r.asdict() for r in rows], default=str))
        return 0
    try:
        return check(args)
    finally:
        if args.json and (args.workdir / "logs").is_dir():   # the logs (not the artifacts) beside the JSON
            dest = Path(args.json).parent / (Path(args.json).stem + "_logs")
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(args.workdir / "logs", dest)
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


def check(args) -> int:
    import torch
    on_cpu = args.device == "cpu"
    if not on_cpu and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: CUDA is not available here (torch {torch.__version__}); "
                         f"pass --device cpu --tiny for the CPU smoke run")
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if not on_cpu else None
    print(f"gpu_check on {args.device}{' (' + gpu + ')' if gpu else ''}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs{', tiny counts' if args.tiny else f', budget {args.budget / 60:.0f} min'}; "
          f"work files in {args.workdir}", flush=True)
    run = Runner(args)
    run.meta = {"device": args.device, "gpu": gpu, "torch": torch.__version__, "cpus": os.cpu_count(),
                "platform": platform.platform(), "tiny": args.tiny, "budget_s": None if args.tiny else args.budget,
                "sqnr_tolerance_db": SQNR_TOLERANCE_DB}
    if "pipeline" in args.skip:
        args.skip = list(set(args.skip) | {"cpu", "fidelity"})   # (both read the pipeline's outputs)
    rerun = "cpu" not in args.skip
    # the CPU reruns of steps 1-3: on a GPU machine in the background from the start, a few threads each, while the
    # GPU works; on a CPU under test they would compete with it, so one at a time after it
    threads = max(1, (os.cpu_count() or 4) // 4)
    jobs = {p: run.start(f"sqnr vs cpu {p}", "cpu", "cpu", "--preset", p, threads=threads)
            for p in args.presets} if rerun and not on_cpu else {}
    if "pipeline" not in args.skip:
        for p in args.presets:
            run.run(f"pipeline {p}", "pipeline", "--preset", p)
    for p in args.presets if rerun else ():
        print(f"--- sqnr vs cpu {p} ...", flush=True)
        job = jobs.get(p) or run.start(f"sqnr vs cpu {p}", "cpu", "cpu", "--preset", p)
        run.add([compare_sqnr(f"sqnr vs cpu {p}", run.rows, p, collect(*job))])
    for part, name in (("fidelity", "fidelity cli"), ("integer", "integer W8A8"), ("fake_quant", "fake-quant ratio"),
                       ("fq_kernel", "fake-quant kernel"), ("cin256", "cin256 rehearsal"),
                       ("dit", "DiT-XL/2 rehearsal")):
        if part not in args.skip:
            run.run(name, part, *(["--preset", args.presets[0]] if part == "fidelity" else []))
    print_table(run.rows, time.perf_counter() - run.t0, args)
    run.write()
    if args.json:
        print(f"wrote {args.json}")
    return 0 if all(r.ok for r in run.rows) else 1


def print_table(rows: list[Row], total: float, args) -> None:
    print(f"\n{'path':34s} {'':4s} {'seconds':>8s}  key number")
    for r in rows:
        print(r.line())
    bad = [r.path for r in rows if not r.ok]
    budget = "" if args.tiny else f" (budget {args.budget / 60:.0f} min)"
    print(f"\n{len(rows) - len(bad)}/{len(rows)} ok in {total / 60:.1f} min{budget}"
          + (f"; FAIL: {', '.join(bad)}" if bad else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
