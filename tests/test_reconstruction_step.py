"""benchmarks/reconstruction_step.py (issue 29): its kernel count is right on known programs, and one tiny
measurement of every unit kind and phase runs (the numbers themselves are the benchmark's, not asserted)."""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from conftest import REPO, load_script

sys.path.insert(0, str(REPO / "benchmarks"))
bench = load_script(REPO / "benchmarks" / "reconstruction_step.py", "reconstruction_step_bench")


def kernels_of(fn) -> tuple[int, int]:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return bench.count_kernels(prof.events())


def test_kernel_count_knows_launches_from_metadata_and_wrapped_numbers():
    a, b = torch.randn(64), torch.randn(64)
    assert kernels_of(lambda: a + b) == (1, 0)
    assert kernels_of(lambda: a * 2.0) == (1, 0)                    # the number is an argument, not a copy
    assert kernels_of(lambda: a.view(8, 8).t().unsqueeze(0)) == (0, 0)   # views only
    assert kernels_of(lambda: a.view(8, 8).t().reshape(-1)) == (1, 0)   # a reshape that must copy
    assert kernels_of(lambda: a.to(torch.float64)) == (1, 0)         # a real copy
    assert kernels_of(lambda: torch.nn.functional.linear(a[None], torch.randn(3, 64))[0, 0].item())[1] == 1
    x = torch.randn(8, requires_grad=True)
    n_forward, _ = kernels_of(lambda: (x.sigmoid() * 3).sum())
    n_both, _ = kernels_of(lambda: (x.sigmoid() * 3).sum().backward())
    assert n_forward == 3 and n_both > n_forward                    # the backward's launches count too


def test_one_tiny_measurement_of_every_unit_kind_and_phase():
    out = bench.measure("fashion", n=8, iters=1, profile_iters=1, device=torch.device("cpu"))
    assert set(out) == {f"{p}/{k}" for p in ("weight", "activation") for k in bench.KINDS}
    assert all(r["s_per_iter"] > 0 and r["ops"] > 10 and r["syncs"] >= 0 for r in out.values())
    assert out["weight/BasicTransformerBlock"]["ops"] > out["weight/layer"]["ops"]
