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


def idx_bytes(arr) -> bytes:
    """An uint8 array in the IDX format of the Fashion-MNIST files (magic 0x0803/0x0801, big-endian sizes)."""
    import struct
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.astype("uint8").tobytes()


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """Tests that pin torch to one thread (tiny tensors) must not change the float summation order of the tests
    after them: the count is restored after every test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster and immune to a loaded machine (the count is restored after the test)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def compiled_kernels():
    """``--execution compiled`` needs torch.compile to build its C++ kernel: tests of it skip, with the one-line
    reason the project itself gives, on a machine without a C++ compiler. A kernel that builds but computes other
    values fails them (the check raises): that is a fault to see, not a reason to skip."""
    from quant.quantizer import CompileUnavailable, check_compiled_fake_quant
    try:
        check_compiled_fake_quant(torch.device("cpu"))
    except CompileUnavailable as e:
        pytest.skip(str(e))


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


def load_script(path: Path, name: str | None = None):
    """A script (quant_scripts/*.py, evaluator.py) as a module, so tests call its main(argv) in this process."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name or f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    import sys
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_main(main, args, capsys):
    """main(argv) through pipeline.cli.run_cli, as the script runs it: a CompletedProcess-like record with the exit
    code and the captured stdout / stderr (no interpreter start-up)."""
    import subprocess
    from pipeline.cli import run_cli
    capsys.readouterr()
    try:
        run_cli(lambda: main([str(a) for a in args]))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def error_line(proc) -> str:
    """The one stderr line of a script that stopped on bad input (exit status 2), asserted to be just that."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(config, checkpoint) files of a tiny random class-conditional LDM ("cond") and an unconditional one
    ("uncond"), written once per test module."""
    import tiny_models
    d = tmp_path_factory.mktemp("models")
    cond = tiny_models.config(tiny_models.CLASS_COND)
    uncond = tiny_models.config(tiny_models.UNCOND_KL)
    return {"cond": tiny_models.write(cond, tiny_models.build(cond), d, "cond"),
            "uncond": tiny_models.write(uncond, tiny_models.build(uncond), d, "uncond")}
