"""Typed sampler specs (pipeline.sampler_spec): every name the CLIs accept parses to a spec and prints back to the
same name; unknown names are one line listing the valid ones."""
from __future__ import annotations

import pytest

from conftest import REPO, error_line, load_script, run_main
from correction.gaussian import Granularity
from pipeline.sampler_spec import BASES, LISTED, FitKind, Method, SamplerSpec, UnknownSampler


def accepted_names() -> list[str]:
    """The listed names, and the probe (R = 10 and others) on top of every quantized base."""
    quantized = [n for n, s in BASES.items() if s.quantized]
    probed = [f"{head}{'' if b == 'none' else '+' + b}" for b in quantized for head in ("qncd", "qncd-r1", "qncd-r5",
                                                                                        "qncd-r25")]
    return list(dict.fromkeys([*LISTED, *probed]))


@pytest.mark.parametrize("name", accepted_names())
def test_every_accepted_name_round_trips(name):
    spec = SamplerSpec.parse(name)
    assert str(spec) == name and SamplerSpec.parse(str(spec)) == spec
    assert spec.quantized == (name != "fp32")


def test_specs_are_values_not_strings():
    s = SamplerSpec.parse("qncd-r5+dd2-channel")
    assert (s.method, s.granularity, s.probe) == (Method.DD2, Granularity.CHANNEL, 5)
    assert s.fit is FitKind.GAUSSIAN and s.needs_generator and "R = 5" in s.description
    assert SamplerSpec.parse("ptqd").fit is FitKind.PTQD and not SamplerSpec.parse("ptqd").needs_generator
    assert SamplerSpec.parse("sd2-tensor").needs_generator and SamplerSpec.parse("none").fit is None
    assert SamplerSpec.parse("dd2-channel").with_probe(7) == SamplerSpec(Method.DD2, Granularity.CHANNEL, 7)
    with pytest.raises(ValueError):
        SamplerSpec(Method.SD2)            # a D² method needs its granularity
    with pytest.raises(ValueError):
        SamplerSpec(Method.FP32, probe=10)  # nothing to probe


@pytest.mark.parametrize("name", ["", "fp16", "dd2", "dd2-pixel", "qncd+none", "qncd+fp32", "qncd-r0", "qncd-r10",
                                  "qncd+qncd", "qncdx", "qncd+", "+dd2-channel", "QNCD", "none+qncd"])
def test_unknown_names_are_one_line_listing_the_valid_ones(name):
    with pytest.raises(UnknownSampler) as e:
        SamplerSpec.parse(name)
    msg = str(e.value)
    assert "\n" not in msg and f"unknown sampler '{name}'" in msg
    assert all(n in msg for n in LISTED) and "qncd[-rR]+<" in msg


def test_scripts_print_the_one_line(capsys):
    module = load_script(REPO / "quant_scripts" / "generate_evaluation_samples_dist.py")
    line = error_line(run_main(module.main, ["--sampler", "dd2-pixel", "--n_samples", "10"], capsys))
    assert "unknown sampler 'dd2-pixel'" in line and "dd2-channel" in line
