"""The console scripts (``[project.scripts]`` in pyproject.toml): one entry per pipeline step and tool, each the
script's own ``main`` under ``run_cli`` (a ``UserFacingError`` is one line and exit status 2). The seed-named
scripts (``python quant_scripts/<name>.py``) stay and do the same."""
from __future__ import annotations

from importlib import import_module
from typing import Callable

from ldm.util import run_cli

# console name (after "ldm-ptq-") -> the module whose main it runs
SCRIPTS = {
    "sample-fp32": "quant_scripts.sample_fp32_imagenet",                 # step 0
    "calibrate": "quant_scripts.collect_imagenet_calibration_set",       # step 1
    "quantize-weights": "quant_scripts.quantize_weight",                 # step 2
    "quantize-activations": "quant_scripts.quantize_weight_activation",  # step 3
    "noise-statistics": "quant_scripts.collect_timestep_aware_statistics",   # step 4
    "fit-noise": "quant_scripts.gaussian_modeling",                      # step 5
    "sample": "quant_scripts.sample_quantized_ldm_imagenet",             # step 6
    "generate": "quant_scripts.generate_evaluation_samples_dist",        # step 7
    "export-packed": "quant_scripts.export_packed",
    "txt2img": "quant_scripts.txt2img",
    "sample-ddim": "quant_scripts.sample_diffusion_ddim",
    "demo": "quant_scripts.demo",
    "fidelity": "evaluation.fidelity",
    "clip-score": "evaluation.clip_score",
}


def _entry(module: str) -> Callable[[], None]:
    def entry() -> None:
        run_cli(import_module(module).main)
    entry.__doc__ = f"{module}.main as a console script"
    return entry


sample_fp32, calibrate, quantize_weights, quantize_activations, noise_statistics, fit_noise, sample, generate, \
    export_packed, txt2img, sample_ddim, demo, fidelity, clip_score = (_entry(m) for m in SCRIPTS.values())
