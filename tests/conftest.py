"""Shared test fixtures. Reference data lives in ../shared (beside the checkout in CI); tests that need it skip
themselves with the reason when it is absent (a user's clone has no ../shared)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LDMQ_SHARED", REPO.parent / "shared"))
LDM_REF = SHARED / "fixtures" / "ldm_reference"
SMALL = LDM_REF / "small"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data {path} not found: CI puts ../shared beside the checkout "
                    f"(set LDMQ_SHARED=/path/to/shared to use another location)")
    return path


@pytest.fixture(scope="session")
def small_dir() -> Path:
    return require_shared(SMALL)


@pytest.fixture(scope="session")
def small_model(small_dir):
    from ldm.util import load_config, load_model_from_config
    torch.manual_seed(0)
    return load_model_from_config(load_config(small_dir / "config.yaml"), small_dir / "state_dict.pt")


@pytest.fixture(scope="session")
def small_io(small_dir):
    inputs = torch.load(small_dir / "inputs.pt", map_location="cpu", weights_only=True)
    outputs = torch.load(small_dir / "outputs.pt", map_location="cpu", weights_only=True)
    return inputs, outputs


def assert_close_ref(ours, ref, name: str = "") -> None:
    """The fixture README's tolerance: integers exactly, floats within 1e-4 · max(1, max|ref|)."""
    ours = torch.as_tensor(ours).detach().cpu()
    ref = torch.as_tensor(ref).detach().cpu()
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if not ref.is_floating_point():
        assert torch.equal(ours.to(ref.dtype), ref), f"{name}: integer values differ"
        return
    err = (ours.double() - ref.double()).abs().max().item()
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    assert err <= tol, f"{name}: max |ours - ref| = {err:.3e} > {tol:.3e}"
