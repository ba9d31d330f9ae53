"""One pipeline stage in its own process, measured: wall time, model-load time, peak host memory (ru_maxrss) and, on
CUDA, peak GPU memory. Shared by the full-size rehearsals (benchmarks/cin256_rehearsal.py, cifar10_rehearsal.py).

    run_stage(name, script, argv, work, log)   # runs `python stage_probe.py RECORD SCRIPT ARGV...`, returns the record

Records are kept in ``work/records/<name>.json``: a rerun with the same work folder reuses finished stages.
"""
from __future__ import annotations

import json
import re
import resource
import runpy
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 2 ** 30


def fmt_s(s: float) -> str:
    """Seconds as the rehearsals print them: s below 2 min, min below 2 h, then h."""
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def probe_main(record: Path, script: str, argv: list[str]) -> int:
    """Run ``script`` as __main__ with ``argv``; write wall time, model-load time and peak memory to ``record``."""
    import torch

    from pipeline.run import Run
    load_s = []
    real_load = Run.load

    def timed_load(*a, **k):  # the one model load of every step: timed so projections can leave it out
        t0 = time.perf_counter()
        out = real_load(*a, **k)
        load_s.append(time.perf_counter() - t0)
        return out

    Run.load = timed_load
    sys.argv = [script, *argv]
    t0, code = time.perf_counter(), 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    wall = time.perf_counter() - t0
    gpu = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized()
           else None)
    record.write_text(json.dumps({"wall_s": wall, "load_s": sum(load_s), "exit": code,
                                  "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                  "peak_gpu_bytes": gpu}))
    return code



def run_stage(name: str, script: str, argv: list[str], work: Path, log) -> dict:
    record = work / "records" / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".json")
    record.parent.mkdir(parents=True, exist_ok=True)
    if record.is_file():  # a finished stage of an earlier run in this --workdir (--fresh to redo everything)
        print(f"\n=== {name}: measured earlier ({record})", flush=True)
        return json.loads(record.read_text())
    cmd = [sys.executable, str(Path(__file__).resolve()), str(record), script, *argv]
    print(f"\n=== {name}: python {script} {' '.join(argv)}", flush=True)
    log.write(f"\n=== {name}: {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not record.is_file():
        raise SystemExit(f"error: stage {name} failed (exit {proc.returncode}); see {log.name}")
    rec = json.loads(record.read_text())
    print(f"    {rec['wall_s']:.1f} s (model load {rec['load_s']:.1f} s), peak host "
          f"{rec['peak_host_bytes'] / GiB:.2f} GiB", flush=True)
    return rec


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(probe_main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:]))
