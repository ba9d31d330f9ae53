"""The demo's stage list for every mode builds without running anything (no checkpoint read, nothing written) and
names the stages the argument-list demo named (tests/demo_stages.json: its build_stages before the typed step API);
every stage calls a pipeline step or an evaluation library function with typed settings, never a script."""
from __future__ import annotations

import json
from functools import partial

import pytest

from conftest import REPO

EXPECTED = json.loads((REPO / "tests" / "demo_stages.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_every_mode_builds_the_stages_it_always_had(mode):
    from quant_scripts import demo
    assert demo.stage_names(EXPECTED[mode]["argv"]) == EXPECTED[mode]["stages"]


def test_stages_call_steps_with_typed_settings():
    from quant_scripts import demo
    from pipeline.run import Run
    args, m, run = demo.setup(["--quick", "--qncd", "--smooth", "--preset", "fashion-txt2img"])
    assert isinstance(run, Run) and str(run.outdir) == "outputs/quick-smooth"
    for stage in demo.build_stages(args, run, m):
        assert isinstance(stage.work, partial), stage.name
        assert stage.work.func.__module__.split(".")[0] in ("pipeline", "evaluation"), stage.name
        assert not any(isinstance(a, (list, str)) and str(a).startswith("--") for a in stage.work.args), stage.name
    weights = next(s for s in demo.build_stages(args, run, m) if s.name.startswith("W4 weights"))
    _, config, settings = weights.work.args
    assert config.smoothing == "code" and settings.iters == demo.MODES["quick"]["weight_iters"]


def test_list_prints_the_stages_and_writes_nothing(tmp_path, capsys):
    from quant_scripts import demo
    demo.main(["--quick", "--list", "--outdir", str(tmp_path / "out")])
    assert capsys.readouterr().out.splitlines() == EXPECTED["quick"]["stages"]
    assert not (tmp_path / "out").exists()
