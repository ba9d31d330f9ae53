"""Issue 32's survey, reproducible: run every bad or edge input of benchmarks/bad_input_cases.py against one tree and
classify what each command did.

    # the tree under test and the quick-demo outputs its own code made (make demo QUICK=1 -> outputs/quick)
    OMP_NUM_THREADS=1 python benchmarks/bad_input_survey.py --repo . --artifacts outputs/quick --json survey.json
    python benchmarks/bad_input_survey.py --repo /work/old --artifacts /work/old/outputs/quick --only i-txt2img-eta5

Each case runs in its own temporary folder (a copy of the artifacts when it needs them), with the working directory
at ``--repo`` and ``PYTHONPATH=--repo`` so that tree's packages are the ones imported (checked before the first case:
an editable install of another checkout must not win), one thread, no GPU, no progress bars. What a case is expected
to do is in the case list; the outcome is measured, never asked of the tool:

* every file under the case's folder and every existing file named on its command line is hashed (SHA-256) before
  and after; a watched file (an input, an existing artifact) that changed or vanished is **data loss**;
* a non-zero exit with "Traceback" on stderr is a **traceback**; a refusal that left files behind is a **late
  refusal**; a refusal whose last line does not name the flag the user typed is **wording**; a refusal whose last
  line does not say "error" is **unclear**; otherwise a **clean refusal**;
* exit 0 where a refusal was expected is a **silent exit 0**; a refusal where the input is valid is a **false
  refusal**; exit 0 without the expected outputs is **missing output** (**data loss** for concurrent runs: one
  overwrote the other's files); otherwise **correct** (``warned`` for an option that does nothing, named in the
  output of a run that went ahead);
* a command still running after ``--timeout`` seconds is a **timeout**; a script the tree does not have is
  **absent** (not counted). Files the case wrote into the tree under test are reported as ``tree_writes``.

Prints a table and the totals by outcome (and by issue kind), and with ``--json`` writes every case's record.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_cases import CASES, Case  # noqa: E402

RUN = "fashion/scale3_eta0_steps20"   # the quick demo's run folder (preset fashion, 20 steps, η 0, scale 3)
PLACES = {"out": "{tmp}/out", "run": "{tmp}/out/" + RUN,
          "fp": "{tmp}/out/" + RUN + "/fp32/samples_fp32_n30_seed0/samples.npz",
          "q": "{tmp}/out/" + RUN + "/w4a8/samples_none_n30_seed0/samples.npz",
          "ptqd": "{tmp}/out/" + RUN + "/w4a8/samples_ptqd_n30_seed0/samples.npz",
          "quant": "{tmp}/out/" + RUN + "/w4a8/quant_w4a8.pt",
          "packed": "{tmp}/out/" + RUN + "/w4a8/packed_w4a8.pt"}
NEEDS_ARTIFACTS = tuple("{" + k + "}" for k in PLACES)
GOOD = ("clean refusal", "correct", "warned")
SKIP_COPY = ("export", "evaluator_cache")   # the demo's FP32/packed exports: large, and no case reads them


# ---- the tree under test -------------------------------------------------------------------------------------------

def case_env(repo: Path) -> dict:
    """One thread, no GPU, the tree's own packages first, no bytecode written into the tree, no progress bars."""
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONDONTWRITEBYTECODE="1", TQDM_DISABLE="1")
    env.pop("PYTHONSTARTUP", None)
    return env


def check_imports(python: str, repo: Path) -> dict:
    """Which files the case commands import the packages from: every one must lie in ``repo`` (an editable install of
    another checkout would otherwise win silently)."""
    code = ("import json, ldm, quant, correction, evaluation, pipeline; "
            "print(json.dumps({m.__name__: m.__file__ for m in (ldm, quant, correction, evaluation, pipeline)}))")
    proc = subprocess.run([python, "-c", code], cwd=repo, env=case_env(repo), capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        sys.exit(f"error: the tree's packages do not import: {proc.stderr.strip().splitlines()[-1:]}")
    where = json.loads(proc.stdout.strip().splitlines()[-1])
    stray = {k: v for k, v in where.items() if not Path(v).resolve().is_relative_to(repo)}
    if stray:
        sys.exit(f"error: packages imported from outside {repo}: {stray}")
    return where


def tree_state(repo: Path) -> str:
    """The commit and whether the working tree differs from it (the survey measures the files as they are)."""
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def tree_writes(repo: Path, since: float) -> list[str]:
    """Files under the tree modified after ``since`` (outside .git and .venv): what a case wrote into the tree."""
    found = []
    for root, dirs, files in os.walk(repo):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__", ".pytest_cache")]
        for name in files:
            path = Path(root, name)
            try:
                if path.stat().st_mtime > since:
                    found.append(str(path.relative_to(repo)))
            except OSError:
                continue
    return found


# ---- setup ---------------------------------------------------------------------------------------------------------

def expand(text: str, tmp: Path) -> str:
    """The case's placeholders: {tmp} and the artifact places of PLACES."""
    for key, value in PLACES.items():
        text = text.replace("{" + key + "}", value)
    return text.replace("{tmp}", str(tmp))


def needs_artifacts(case: Case) -> bool:
    """Whether the case names a place in the copied quick-demo outputs."""
    fields = (*case.argv, *case.setup, *case.watch, *case.produces, *case.also)
    return any(p in f for f in fields for p in NEEDS_ARTIFACTS) or "packed" in case.setup


def copy_artifacts(artifacts: Path, dest: Path) -> None:
    """The quick demo's run folder (without its large exports) under dest/out."""
    target = dest / "out" / RUN
    shutil.copytree(artifacts / RUN, target, ignore=lambda d, names: [n for n in names if n in SKIP_COPY])


def build_packed(python: str, repo: Path, artifacts: Path, cache: Path) -> Path:
    """The W4A8 packed file, made once by the tree's own export_packed.py on a copy of the artifacts."""
    packed = cache / "packed" / "out" / RUN / "w4a8" / "packed_w4a8.pt"
    if not packed.exists():
        copy_artifacts(artifacts, cache / "packed")
        proc = subprocess.run([python, "quant_scripts/export_packed.py", "--outdir", str(cache / "packed" / "out")],
                              cwd=repo, env=case_env(repo), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not packed.exists():
            raise RuntimeError(f"export_packed.py failed: {proc.stderr.strip().splitlines()[-1:]}")
    return packed


def member_span(path: Path) -> tuple[int, int] | None:
    """(offset, size) of the largest stored member's data in a zip file (a torch .pt or an .npz), else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.compress_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
    return info.header_offset + 30 + int(name_len) + int(extra_len), info.compress_size


def corrupt(path: Path) -> None:
    """64 bytes inverted inside the largest tensor (or array) of the file, as a damaged disk or copy would: the zip
    directory still reads, only that member's bytes (and its CRC) disagree."""
    data = bytearray(path.read_bytes())
    start, size = member_span(path) or (0, len(data))
    at = start + max(0, size // 2 - 32)
    data[at:at + 64] = bytes(255 - b for b in data[at:at + 64])
    path.write_bytes(bytes(data))


def write_npz(path: Path, kind: str) -> None:
    """Sample batches a user might hand over: no images, float images, ten images with no manifest."""
    rng = np.random.default_rng(0)
    arrays = {"empty": {"arr_0": np.zeros((0, 32, 32, 3), np.uint8)},
              "float": {"arr_0": rng.random((4, 32, 32, 3), np.float32)},
              "ten": {"arr_0": rng.integers(0, 255, (10, 32, 32, 3), np.uint8), "arr_1": np.arange(10)}}[kind]
    np.savez(path, **arrays)


def make_readonly(path: Path, locked: list[Path]) -> None:
    """A folder nobody may write into, root included (chmod, plus the immutable flag where we are root)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        locked.append(path)


def run_setup(op: str, tmp: Path, repo: Path, packed: callable, locked: list[Path]) -> None:
    """One setup operation of the case list's small language (op:argument)."""
    name, _, arg = expand(op, tmp).partition(":")
    if name == "packed":
        target = Path(expand("{packed}", tmp))
        shutil.copyfile(packed(), target)
    elif name == "dir":
        Path(arg).mkdir(parents=True, exist_ok=True)
    elif name == "readonly":
        make_readonly(Path(arg), locked)
    elif name == "text":
        where, _, content = arg.partition("=")
        Path(where).parent.mkdir(parents=True, exist_ok=True)
        Path(where).write_text(content.replace("\\n", "\n"))
    elif name == "copy":
        src, _, dst = arg.partition(">")
        shutil.copyfile(repo / src if not os.path.isabs(src) else src, dst)
    elif name == "corrupt":
        corrupt(Path(arg))
    elif name == "truncate":
        data = Path(arg).read_bytes()
        Path(arg).write_bytes(data[:len(data) // 2])
    elif name == "npz":
        where, _, kind = arg.partition("=")
        write_npz(Path(where), kind)
    else:
        raise ValueError(f"unknown setup operation {op!r}")


# ---- snapshots and the run -----------------------------------------------------------------------------------------

def digest(path: Path) -> str:
    """SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(folder: Path, extra: list[Path]) -> dict[str, str]:
    """SHA-256 of every file under the case's folder and of the extra (watched) files that exist."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = Path(root, name)
            if p.is_file() and not p.is_symlink():
                found[str(p)] = digest(p)
    for p in extra:
        if p.is_file():
            found[str(p)] = digest(p)
    return found


def watched(case: Case, argv: list[str], tmp: Path, repo: Path) -> list[Path]:
    """The files that must not change: the case's watch list and every existing file named on its command lines."""
    named = [*argv, *(expand(a, tmp) for a in case.also)]
    paths = [Path(expand(w, tmp)) for w in case.watch]
    for token in named:
        p = Path(token) if os.path.isabs(token) else repo / token
        if token and not token.startswith("-") and p.is_file():
            paths.append(p)
    return list(dict.fromkeys(p.resolve() for p in paths))


def execute(python: str, repo: Path, commands: list[list[str]], timeout: float) -> tuple[int | None, str, str]:
    """Run the command(s) at once (concurrent runs on one folder); (exit code or None on timeout, stdout, stderr)."""
    procs = [subprocess.Popen([python, *argv], cwd=repo, env=case_env(repo), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for argv in commands]
    deadline, outs, code = time.monotonic() + timeout, [], 0
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
            out, err = proc.communicate()
            code = None
        outs.append((out, err))
        if code is not None and proc.returncode != 0:
            code = proc.returncode
    return code, "".join(o for o, _ in outs), "".join(e for _, e in outs)


def last_line(stdout: str, stderr: str) -> str:
    """The last non-empty line of stderr (else stdout): what a user reads when the command stops."""
    for text in (stderr, stdout):
        lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""


# ---- classification ------------------------------------------------------------------------------------------------

def produced(case: Case, tmp: Path) -> list[str]:
    """The expected outputs that are missing (``glob#N``: exactly N files)."""
    missing = []
    for spec in case.produces:
        pattern, _, count = expand(spec, tmp).partition("#")
        hits = glob.glob(pattern, recursive=True)
        if (int(count) != len(hits)) if count else not hits:
            missing.append(f"{spec} ({len(hits)} found)")
    return missing


def mentioned(case: Case, text: str) -> bool:
    """Whether the text names what the user typed: ``mentions`` (alternatives separated by "|"), if any."""
    return not case.mentions or any(m in text for m in case.mentions.split("|"))


def classify(case: Case, code: int | None, stdout: str, stderr: str, changes: dict, missing: list[str]) -> str:
    """The outcome of one case from what was measured (see the module docstring)."""
    if code is None:
        return "timeout"
    if changes["watched"]:
        return "data loss"
    line = last_line(stdout, stderr)
    if code != 0:
        if "Traceback (most recent call last)" in stderr:
            return "traceback"
        if case.expect == "accept":
            return "false refusal"
        if changes["written"]:
            return "late refusal"
        if "error" not in line.lower():
            return "unclear refusal"
        if not mentioned(case, line):
            return "wording"
        return "clean refusal"
    if case.expect == "refuse":
        return "silent exit 0"
    if case.expect == "say":
        return "warned" if case.mentions and mentioned(case, stdout + stderr) else "silent exit 0"
    if missing and case.also:   # concurrent runs that each reported their files: the missing ones were overwritten
        return "data loss"
    return "missing output" if missing else "correct"


def diff(before: dict, after: dict, watch: list[Path]) -> dict:
    """Watched files changed or gone; other files written, changed or removed."""
    keys = {str(p) for p in watch}
    changed = sorted(k for k in before if after.get(k) != before[k])
    new = sorted(k for k in after if k not in before)
    return {"watched": [k for k in changed if k in keys], "written": [k for k in new + changed if k not in keys]}


def run_case(case: Case, ctx: dict) -> dict:
    """Set the case up in its own folder, run it, compare the snapshots, classify; the folder is removed after."""
    repo, python = ctx["repo"], ctx["python"]
    script = repo / (case.script.replace(".", "/") + ".py" if case.argv[0] == "-m" else case.script)
    record = {"id": case.id, "kind": case.kind, "expect": case.expect, "issue": case.issue,
              "argv": list(case.argv), "setup": list(case.setup)}
    if not script.exists():
        return {**record, "outcome": "absent", "seconds": 0.0, "line": f"{case.script} is not in this tree"}
    tmp, locked = Path(tempfile.mkdtemp(prefix=f"{case.id[:40]}-", dir=ctx["root"])), []
    try:
        if needs_artifacts(case):
            copy_artifacts(ctx["artifacts"], tmp)
        for op in case.setup:
            run_setup(op, tmp, repo, ctx["packed"], locked)
        argv = [expand(a, tmp) for a in case.argv]
        commands = [argv] + ([[expand(a, tmp) for a in case.also]] if case.also else [])
        watch = watched(case, argv, tmp, repo)
        before, started = snapshot(tmp, watch), time.time()
        code, stdout, stderr = execute(python, repo, commands, ctx["timeout"])
        seconds = time.time() - started
        changes = diff(before, snapshot(tmp, watch), watch)
        missing = produced(case, tmp) if code == 0 else []
        outcome = classify(case, code, stdout, stderr, changes, missing)
        return {**record, "outcome": outcome, "exit": code, "seconds": round(seconds, 1),
                "line": last_line(stdout, stderr)[:400], "changed": changes, "missing": missing,
                "tree_writes": tree_writes(repo, max(started - 1, ctx["since"])), "stderr_tail": stderr[-1500:]}
    finally:
        for path in locked:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        for root, dirs, _ in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        if not ctx["keep"]:
            shutil.rmtree(tmp, ignore_errors=True)


# ---- report --------------------------------------------------------------------------------------------------------

def table(records: list[dict]) -> str:
    """One row per case: id, issue kind, expected, outcome, seconds, the last line the user saw."""
    rows = [f"{'case':44} {'kind':14} {'expect':7} {'outcome':16} {'s':>5}  last line"]
    for r in records:
        mark = "*" if r["outcome"] not in GOOD + ("absent",) else " "
        rows.append(f"{r['id'][:44]:44} {r['kind']:14} {r['expect']:7} {mark}{r['outcome']:15} "
                    f"{r.get('seconds', 0):5.1f}  {r['line'][:110]}")
    return "\n".join(rows)


def totals(records: list[dict]) -> dict:
    """Counts by outcome, over all cases and over the issue's own; good / bad overall."""
    present = [r for r in records if r["outcome"] != "absent"]
    return {"cases": len(records), "run": len(present), "absent": len(records) - len(present),
            "good": sum(r["outcome"] in GOOD for r in present),
            "bad": sum(r["outcome"] not in GOOD for r in present),
            "by_outcome": dict(Counter(r["outcome"] for r in records).most_common()),
            "issue_cases_by_outcome": dict(Counter(r["outcome"] for r in records if r["issue"]).most_common()),
            "by_kind": {k: dict(Counter(r["outcome"] for r in records if r["kind"] == k))
                        for k in sorted({r["kind"] for r in records})},
            "tree_writes": sorted({w for r in records for w in r.get("tree_writes", [])})}


def compare(before_path: str, after_path: str) -> dict:
    """Two survey records of the same case list side by side: the totals by outcome, and each case that was bad
    before and is good after (the issue's acceptance), good before and bad after, bad in both."""
    before, after = (json.loads(Path(p).read_text()) for p in (before_path, after_path))
    old = {r["id"]: r for r in before["cases"]}
    rows = {"fixed": [], "regressed": [], "still bad": [], "new here": []}
    for r in after["cases"]:
        o = old.get(r["id"])
        good_now, good_then = r["outcome"] in GOOD, o is not None and o["outcome"] in GOOD + ("absent",)
        key = ("new here" if o is None else "fixed" if good_now and not good_then else
               "regressed" if not good_now and good_then and r["outcome"] != "absent" else
               "still bad" if not good_now and r["outcome"] != "absent" else None)
        if key:
            rows[key].append((r["id"], o["outcome"] if o else "-", r["outcome"], r["line"][:100]))
    outcomes = sorted({r["outcome"] for r in before["cases"] + after["cases"]})
    print(f"{'outcome':16} {'before':>7} {'after':>7}    ({before['tree']} -> {after['tree']})")
    counts = [r["totals"]["by_outcome"] for r in (before, after)]
    for name in outcomes:
        print(f"{name:16} {counts[0].get(name, 0):7} {counts[1].get(name, 0):7}")
    for key, items in rows.items():
        print(f"\n{key} ({len(items)}):")
        for case_id, was, now, line in items:
            print(f"  {case_id:44} {was:15} -> {now:15} {line}")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    """The survey's flags (its own parser: it must run against trees whose ldm.util differs)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=".", help="the tree under test (its scripts run with cwd and PYTHONPATH here)")
    p.add_argument("--artifacts", default=None, help="that tree's quick-demo outputs (default: REPO/outputs/quick)")
    p.add_argument("--only", nargs="+", default=None, metavar="ID", help="run only these case ids (or id prefixes)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per case (default 180)")
    p.add_argument("--json", default=None, help="write every case's record and the totals here")
    p.add_argument("--python", default=sys.executable, help="the interpreter the cases run under")
    p.add_argument("--keep", action="store_true", help="keep each case's folder (printed) for a look")
    p.add_argument("--list", action="store_true", help="print the case list and exit")
    p.add_argument("--compare", nargs=2, default=None, metavar=("BEFORE", "AFTER"),
                   help="compare two --json records (fixed / regressed / still bad) and exit")
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error(f"argument --timeout: must be > 0, got {args.timeout}")
    return args


def select(only: list[str] | None) -> list[Case]:
    """The cases asked for: all, or those whose id equals or starts with one of --only."""
    if not only:
        return list(CASES)
    chosen = [c for c in CASES if any(c.id == o or c.id.startswith(o) for o in only)]
    if not chosen:
        sys.exit(f"error: --only {' '.join(only)} matches no case id")
    return chosen


def main(argv=None) -> dict:
    """Check the tree's imports, run the selected cases one after another, print the table and totals, write the
    JSON record; the record."""
    args = parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    cases = select(args.only)
    if args.list:
        for c in cases:
            print(f"{c.id:44} {c.kind:14} {c.expect:7} {' '.join(c.argv)}")
        return {}
    repo = Path(args.repo).resolve()
    artifacts = Path(args.artifacts or repo / "outputs" / "quick").resolve()
    if not (artifacts / RUN / "w4a8" / "quant_w4a8.pt").is_file():
        sys.exit(f"error: --artifacts {artifacts} holds no quick-demo run {RUN} (make demo QUICK=1 in that tree)")
    where = check_imports(args.python, repo)
    root = Path(tempfile.mkdtemp(prefix="bad-input-survey-"))
    ctx = {"repo": repo, "python": args.python, "artifacts": artifacts, "root": root, "timeout": args.timeout,
           "keep": args.keep, "since": time.time(), "packed": lambda: build_packed(args.python, repo, artifacts, root / "cache")}
    records, started = [], time.time()
    try:
        from tqdm import tqdm
        bar = tqdm(cases, desc="cases", unit="case", file=sys.stderr, dynamic_ncols=True)
        for case in bar:
            bar.set_postfix_str(case.id[:40])
            records.append(run_case(case, ctx))
            bar.write(f"{case.id}: {records[-1]['outcome']} ({records[-1].get('seconds', 0):.1f} s)", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary = totals(records)
    print(table(records))
    print(json.dumps({k: summary[k] for k in ("cases", "run", "absent", "good", "bad", "by_outcome",
                                              "issue_cases_by_outcome")}, indent=1))
    if summary["tree_writes"]:
        print(f"files written into the tree under test: {summary['tree_writes']}")
    result = {"repo": str(repo), "tree": tree_state(repo), "artifacts": str(artifacts), "imports": where,
              "python": args.python, "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS=1",
              "seconds": round(time.time() - started, 1), "totals": summary, "cases": records}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
