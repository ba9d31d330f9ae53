"""Issue 30: the steps are functions of typed objects; argparse lives at the edge only (pipeline/cli.py and the
scripts); the console scripts resolve; the typed objects refuse bad values on construction."""
from __future__ import annotations

import ast
import dataclasses
import tomllib
from importlib import import_module
from pathlib import Path

import pytest

from conftest import REPO

PIPELINE = REPO / "pipeline"
EDGE = PIPELINE / "cli.py"


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_pipeline_function_outside_the_edge_takes_parsed_flags():
    offenders = []
    for path in sorted(PIPELINE.rglob("*.py")):
        if path == EDGE:
            continue
        for fn in _functions(path):
            params = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
            annotations = [ast.unparse(p.annotation) for p in params if p.annotation is not None]
            if any(p.arg == "args" for p in params) or any("Namespace" in a for a in annotations):
                offenders.append(f"{path.relative_to(REPO)}:{fn.lineno} {fn.name}")
    assert offenders == []


def test_argparse_and_the_edge_are_imported_by_no_other_pipeline_module():
    offenders = []
    for path in sorted(PIPELINE.rglob("*.py")):
        if path == EDGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            module = node.module if isinstance(node, ast.ImportFrom) else None
            imported = names + ([module] if module else [])
            if isinstance(node, ast.ImportFrom) and module == "pipeline":
                imported += [f"pipeline.{a.name}" for a in node.names]
            if any(m == "argparse" or m == "pipeline.cli" for m in imported):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_no_installed_script_edits_sys_path():
    for path in sorted((REPO / "quant_scripts").glob("*.py")):
        assert "sys.path.insert" not in path.read_text(), path.name


def test_every_console_script_runs_a_scripts_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 12 and all(name.startswith("ldm-ptq-") for name in scripts)
    from quant_scripts import console
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        entry = getattr(import_module(module), attr)
        assert callable(entry), name
        wrapped = console.SCRIPTS[name.removeprefix("ldm-ptq-")]
        assert entry.__doc__.startswith(wrapped) and callable(import_module(wrapped).main), name


def test_a_console_script_refuses_bad_input_in_one_line(capsys):
    from quant_scripts import console
    import sys
    argv, sys.argv = sys.argv, ["ldm-ptq-calibrate", "--steps", "0"]
    try:
        with pytest.raises(SystemExit) as e:
            console.calibrate()
    finally:
        sys.argv = argv
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --steps must be >= 1, got 0"]


def test_the_typed_objects_are_frozen_and_refuse_bad_values():
    from ldm.util import UserFacingError
    from pipeline.quantize import CacheSettings
    from pipeline.run import Preset
    from pipeline.steps.calibrate import CalibrationSettings
    from pipeline.steps.noise_statistics import StatisticsSettings
    from pipeline.steps.quantize_activations import ActivationSettings
    from pipeline.steps.quantize_weights import WeightSettings

    run = Preset.load("fashion").run("outputs")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.force = True
    for make, message in ((lambda: CalibrationSettings(n=0), "--n and"),
                          (lambda: WeightSettings(iters=-1), "--weight_iters must be >= 0"),
                          (lambda: ActivationSettings(iters=1, init_samples=0), "--act_init_samples must be >= 1"),
                          (lambda: ActivationSettings(iters=1, init_samples=8, lr=float("nan")), "a finite number"),
                          (lambda: StatisticsSettings(n=4, batch_size=2, save_every=0), "--save_every must be >= 1"),
                          (lambda: CacheSettings(dtype="float8"), "--cache_dtype")):
        with pytest.raises(UserFacingError, match=message):
            make()


def test_the_quant_config_is_the_artifacts_meta():
    from quant.api import QuantConfig
    from quant.quantizer import PerChannel
    config = QuantConfig(4, 8, PerChannel(0), sm_abit=8, split_shortcut=True, policy="all", smoothing="code")
    meta = config.meta()
    assert list(meta) == ["w_bits", "a_bits", "policy", "channel_wise", "split_shortcut", "smoothing", "sm_abit"]
    assert QuantConfig.from_meta(meta) == config
    weights = config.weights_only
    assert (weights.a_bits, weights.sm_abit) == (None, None) and "sm_abit" not in weights.meta()
    with pytest.raises(ValueError, match="smoothing"):
        QuantConfig(4, smoothing="both")


def test_a_preset_run_matches_the_scripts_run(tmp_path):
    """The Run code that composes steps builds (Preset.run) is the one a script's flags give (cli.run_of)."""
    from pipeline import cli
    from pipeline.run import Preset
    from quant_scripts import collect_imagenet_calibration_set as step1
    args = step1.parse_args(["--outdir", str(tmp_path)])
    cli.apply_preset(args, step1.PRESET)
    assert cli.run_of(args) == Preset.load("fashion").run(tmp_path)
    args = step1.parse_args(["--outdir", str(tmp_path), "--steps", "10", "--eta", "1"])
    cli.apply_preset(args, step1.PRESET)
    assert cli.run_of(args) == Preset.load("fashion").run(tmp_path, steps=10, eta=1.0)
