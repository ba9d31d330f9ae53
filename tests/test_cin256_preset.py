"""The cin256 preset's full-size settings are the ones benchmarks/cin256_rehearsal.py showed are needed, and every
script's CUDA device gets exact FP32 numerics.

The rehearsal (docs/cin256.md, "Full-size rehearsal") measured on cin256-v2: step 2 peaks at 6.4 GiB of host memory
with 8 calibration rows (the model, its quantized weights and masks, the cache forward), and a no-grad forward holds
~52 MiB more per row. At the paper's 1,024 rows the largest reconstruction unit, output_blocks.9.0, caches its
inputs and FP outputs: 12.0 GiB in float32, 6.0 GiB in the preset's float16. The budget of steps 2-3 is 16 GiB of
host memory (a 24 GB-GPU workstation's RAM minus the OS and page cache): float16 caches and 32-row cache passes
fit it; float32 caches (or 128-row passes) would not. The cache bytes are recomputed here from the unit shapes on
the meta device (no weights, no compute), so a change to the preset, the policy, the units or the cache layout that
breaks the budget fails here.
"""
from __future__ import annotations


import pytest
import torch

from conftest import REPO, load_script

GiB = 2 ** 30
PAPER_ROWS = 1024
# What the rehearsal measured besides the caches: step 2's peak at 8 rows (6.4 GiB), rounded up, and the forward
# memory per row of a cache pass; the host budget of steps 2-3.
BUDGET_BYTES = 16 * GiB
REST_BYTES = 7 * GiB
FORWARD_BYTES_PER_ROW = 52 * 2 ** 20


def parsed(script: str, *argv: str):
    """The reconstruction caches a step script's flags and preset give (``pipeline.cli.cache_of``)."""
    from pipeline import cli
    mod = load_script(REPO / "quant_scripts" / f"{script}.py")
    args = mod.parse_args(list(argv))
    cli.apply_preset(args, mod.PRESET)
    return cli.cache_of(args)


@pytest.mark.parametrize("script", ["quantize_weight", "quantize_weight_activation"])
def test_cin256_caches_are_float16_in_batches_of_32_and_fashion_keeps_the_defaults(script):
    cin = parsed(script, "--preset", "cin256")
    assert (cin.dtype, cin.batch_size) == ("float16", 32)
    for cache in (parsed(script, "--preset", "fashion"), parsed(script)):   # (fashion is the default preset)
        assert (cache.dtype, cache.batch_size) == ("float32", 128)
    flags = parsed(script, "--preset", "cin256", "--cache_dtype", "float32", "--cache_batch_size", "8")
    assert (flags.dtype, flags.batch_size) == ("float32", 8)     # flags win


def unit_cache_elements() -> dict[str, int]:
    """Per reconstruction unit of cin256-v2 under the default policy: elements of one row of its input and output
    caches (what RowCache holds per calibration input), from a forward on the meta device."""
    from ldm.util import instantiate_from_config, load_config
    from pipeline.families.compvis_ldm import ClassConditionalLDM
    from quant.api import QuantConfig, quantize
    from quant.reconstruction import _bind, find_units
    cfg = load_config(REPO / "configs" / "latent-diffusion" / "cin256-v2.yaml").model.params.unet_config
    with torch.device("meta"):
        qm = quantize(instantiate_from_config(cfg).eval(), QuantConfig(w_bits=4, a_bits=8),
                      specials=ClassConditionalLDM().quant_specials())
    units, sizes = find_units(qm), {}

    def hook(name):
        def record(module, args, kwargs, out):
            inputs = [v for v in _bind(module, args, kwargs) if isinstance(v, torch.Tensor)]
            sizes[name] = sum(v[0].numel() for v in inputs) + out[0].numel()
        return record

    handles = [u.module.register_forward_hook(hook(u.name), with_kwargs=True) for u in units]
    with torch.no_grad(), torch.device("meta"):
        qm(torch.zeros(1, 3, 64, 64), torch.zeros(1, dtype=torch.long), context=torch.zeros(1, 1, 512))
    for h in handles:
        h.remove()
    assert len(sizes) == len(units) == 74
    return sizes


def test_largest_unit_cache_at_paper_counts_fits_with_the_preset_dtype():
    sizes = unit_cache_elements()
    largest = max(sizes, key=sizes.get)
    assert largest == "output_blocks.9.0"
    cache = parsed("quantize_weight", "--preset", "cin256")

    def peak(cache_dtype: str, cache_batch_size: int) -> float:
        per_row = sizes[largest] * torch.empty((), dtype=getattr(torch, cache_dtype)).element_size()
        return REST_BYTES + PAPER_ROWS * per_row + FORWARD_BYTES_PER_ROW * cache_batch_size

    assert peak(cache.dtype, cache.batch_size) <= BUDGET_BYTES
    # and each setting is needed, not a precaution
    assert peak("float32", cache.batch_size) > BUDGET_BYTES
    assert peak(cache.dtype, 128) > BUDGET_BYTES


def test_cuda_device_gets_exact_fp32_numerics(monkeypatch):
    from pipeline import cli
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.allow_tf32 = True   # PyTorch's default for convolutions
    try:
        assert cli.pick_device("cuda") == torch.device("cuda")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.benchmark) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
    assert cli.pick_device("cpu") == torch.device("cpu")
