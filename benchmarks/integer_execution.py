"""Real low-bit models, measured side by side in one run: integer (int8) execution vs FP32 vs fake-quant, model
memory in each form, and packed-file sizes.

    python benchmarks/integer_execution.py                         # everything, CPU (about 10 minutes on 2 cores)
    python benchmarks/integer_execution.py --parts layers sizes    # a part alone
    python benchmarks/integer_execution.py --json out.json

Parts (``--parts``):
- ``layers``: the largest Conv/Linear shapes of cin256-v2 (inputs recorded at the latent size, batch ``--batch``),
  each timed as FP32, fake-quant W4A8, and int8 at W4A8 and W8A8 (``quant.integer``), ratios to FP32;
- ``unet``: the whole cin256-v2 UNet forward (random weights, seed 0): FP32 (NCHW and channels_last), W4A8 and
  W8A8 fake-quant and integer;
- ``embedded``: the same on the embedded Fashion default's real quantized models (``--run_dir``, made by the
  pipeline's steps 1-3; skipped with a line when absent);
- ``memory``: bytes of every tensor each form of the cin256-v2 UNet holds after a forward (parameters, buffers,
  the fake-quant weight cache, int8 codes and the backend's prepacked copies);
- ``device`` (not in the default set): W8A8 on ``--device`` (on CUDA through ``torch._int_mm``,
  ``Backend.INT_MM``): the cin256-v2 feed-forward Linear and 1×1 conv shapes and the whole UNet, timed against
  FP32, TF32 and bf16 autocast and fake-quant W8A8 with CUDA events (medians), each integer output checked against
  fake-quant (benchmarks/gpu_check.py runs it);
- ``sizes``: packed files (``quant.export``) of cin256-v2 at W4 and W8 (weights only, per tensor; the D²-DPM policy
  and Q-Diffusion's quantize-all policy) vs the FP32 UNet, as torch.save writes them.

Weights and inputs are random where the part says so; arithmetic cost does not depend on their values. The models
alternate within each repeat; medians are compared. Ranges use the min-max search (timing does not depend on them).
On CPUs without VNNI (AVX2), 8-bit weights × 8-bit inputs cannot run in oneDNN's u8×s8 kernels exactly (int16 pair
sums saturate), so those layers run as float (``float: ...`` in the layer report); the ``int8 kernel`` column times
the raw kernel anyway, to show what a VNNI machine would get.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from ldm.util import ArgumentParser, at_least, instantiate_from_config, load_config  # noqa: E402
from pipeline.families.compvis_ldm import ClassConditionalLDM  # noqa: E402
from pipeline.packed import state_bytes  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from quant.export import pack_quant_model  # noqa: E402
from quant.integer import Backend, IntegerLayer, layer_summary, onednn_int8_exact, to_integer_  # noqa: E402
from quant.layers import QuantLayer  # noqa: E402
from quant.model import QuantModel  # noqa: E402
from quant.quantizer import QScheme, ScaleSearch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CIN256 = REPO / "configs/latent-diffusion/cin256-v2.yaml"
SPECIALS = ClassConditionalLDM().quant_specials()   # cin256-v2 and the embedded default: CompVis class LDMs
d2dpm_policy = SPECIALS.policy("d2dpm")


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def alternate(fns: dict, repeats: int, device: torch.device | None = None) -> dict[str, float]:
    """Median seconds of each fn, the fns alternating within each repeat (after one warm-up call each): CUDA events
    on a GPU (the kernels' time, not the launch's), perf_counter on a CPU."""
    cuda = device is not None and device.type == "cuda"
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[k].append(start.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def build_cin256(seed: int = 0, config: Path = CIN256) -> tuple[nn.Module, dict]:
    cfg = load_config(config)
    torch.manual_seed(seed)
    unet = instantiate_from_config(cfg.model.params.unet_config).eval()
    return unet, dict(cfg.model.params.unet_config.params)


def unet_inputs(p: dict, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, p["in_channels"], p["image_size"], p["image_size"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    c = torch.randn(batch, 1, p["context_dim"], generator=g) if p.get("context_dim") else None
    return x, t, c


def quant_model(unet: nn.Module, w_bits: int, a_bits: int, inputs, copy_model: bool = True) -> QuantModel:
    """W{w}A{a} with the D²-DPM policy, per-tensor min-max ranges, activation ranges from ``inputs``."""
    qm = QuantModel(unet, QuantConfig(w_bits, a_bits, policy="d2dpm"), search=ScaleSearch.MAX, copy_model=copy_model,
                    specials=SPECIALS).eval().init_weights_()
    qm.calibrate_activations_([inputs])
    return qm.set_quant_state(weight=True, act=True)


# ---- (a) layers ---------------------------------------------------------------------------------------------------

def largest_layers(unet: nn.Module, p: dict, batch: int, k: int, device: str = "cpu") -> list[dict]:
    """The k distinct Conv2d shapes and k/2 Linear shapes of the UNet's quantized layers with the most
    multiply-adds in one forward."""
    seen = {}

    def hook(m, args, out, name):
        w = m.weight
        key = (type(m).__name__, tuple(w.shape), tuple(args[0].shape), getattr(m, "stride", None),
               getattr(m, "padding", None))
        macs = out.numel() * (w[0].numel())
        if key not in seen:
            seen[key] = {"name": name, "module": m, "input": tuple(args[0].shape), "macs": macs, "count": 0}
        seen[key]["count"] += 1

    hooks = [m.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n, m in unet.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear)) and d2dpm_policy(n, m).value == "target"]
    with torch.inference_mode():
        x, t, c = (None if v is None else v.to(device) for v in unet_inputs(p, batch))
        unet(x, t, context=c)
    for h in hooks:
        h.remove()
    ranked = sorted(seen.values(), key=lambda r: -r["macs"])
    convs = [r for r in ranked if isinstance(r["module"], nn.Conv2d)][:k]
    return convs + [r for r in ranked if isinstance(r["module"], nn.Linear)][:max(1, k // 2)]


def time_layer(layer: dict, repeats: int) -> dict:
    module = layer["module"]
    torch.manual_seed(0)
    x = torch.randn(layer["input"]) + 0.5
    ql = {}
    for w_bits in (4, 8):
        q = QuantLayer(copy.deepcopy(module), QScheme(w_bits, search=ScaleSearch.MAX),
                       QScheme(8, search=ScaleSearch.MAX))
        q.init_weight_qparams_()
        q.init_act_qparams_(x)
        q.weight_quant = q.act_quant = True
        ql[w_bits] = q
    fns = {"fp32": lambda: module(x), "fake W4A8": lambda: ql[4](x)}
    exact = {}
    for w_bits in (4, 8):
        wrapper = nn.Sequential(copy.deepcopy(ql[w_bits]))
        how = to_integer_(wrapper, Backend.ONEDNN)["0"]
        exact[w_bits] = how
        fns[f"int W{w_bits}A8"] = (lambda m=wrapper[0]: m(x))
        # the raw oneDNN kernel, whether or not it is exact on this CPU (what a VNNI machine would run)
        raw = IntegerLayer.from_quant(ql[w_bits], ql[w_bits].weight_codes(), Backend.ONEDNN)
        fns[f"int8 kernel W{w_bits}A8"] = (lambda m=raw: m(x))
    t = alternate(fns, repeats)
    return {"name": layer["name"], "kind": type(module).__name__, "weight": list(module.weight.shape),
            "input": list(layer["input"]), "calls_per_forward": layer["count"], "median_s": t,
            "speedup_vs_fp32": {k: t["fp32"] / v for k, v in t.items()}, "execution": exact}


def part_layers(args) -> dict:
    unet, p = build_cin256()
    rows = [time_layer(layer, args.repeats) for layer in largest_layers(unet, p, args.batch, args.top)]
    print(f"\n(a) cin256-v2 layers, batch {args.batch} (inputs at the latent size {p['image_size']}): median ms "
          f"(speed-up vs FP32)")
    cols = ["fp32", "fake W4A8", "int W4A8", "int W8A8", "int8 kernel W8A8"]
    print(f"{'layer':44s} {'weight':>18s} " + " ".join(f"{c:>18s}" for c in cols))
    for r in rows:
        cells = [f"{1e3 * r['median_s'][c]:8.2f} ({r['speedup_vs_fp32'][c]:4.2f}x)" for c in cols]
        print(f"{r['name'][:44]:44s} {str(r['weight']):>18s} " + " ".join(f"{c:>18s}" for c in cells))
    w8 = rows[0]["execution"][8] if rows else ""
    print(f"W8A8 int path on this CPU: {w8}")
    return {"batch": args.batch, "rows": rows}


# ---- (b) whole UNet -----------------------------------------------------------------------------------------------

def forms(unet: nn.Module, inputs, bits: list[tuple[int, int]]) -> tuple[dict, dict]:
    """{form: module} (FP32, FP32 channels_last, fake and integer per bits) and the integer layer reports."""
    out = {"fp32": unet}
    cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    out["fp32 channels_last"] = cl
    reports = {}
    for w, a in bits:
        fake = quant_model(unet, w, a, inputs)
        integer = copy.deepcopy(fake)
        reports[f"W{w}A{a}"] = to_integer_(integer)
        out[f"fake W{w}A{a}"], out[f"int W{w}A{a}"] = fake, integer
    return out, reports


def time_forms(models: dict, inputs, repeats: int) -> dict[str, float]:
    x, t, c = inputs
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fns = {k: (lambda m=m, xx=(x_cl if "channels_last" in k else x): m(xx, t, context=c)) for k, m in models.items()}
    return alternate(fns, repeats)


def print_forms(title: str, times: dict, reports: dict) -> None:
    print(f"\n{title}")
    print(f"{'form':22s} {'median ms':>10s} {'vs FP32':>8s} {'speed-up':>9s}")
    for k, v in times.items():
        print(f"{k:22s} {1e3 * v:10.1f} {v / times['fp32']:8.2f} {times['fp32'] / v:8.2f}x")
    for bits, rep in reports.items():
        summary = ", ".join(f"{n} {how}" for how, n in sorted(layer_summary(rep).items(), key=lambda x: -x[1]))
        print(f"  {bits} integer layers: {summary}")


def part_unet(args) -> dict:
    unet, p = build_cin256()
    inputs = unet_inputs(p, args.batch)
    models, reports = forms(unet, inputs, [(4, 8), (8, 8)])
    times = time_forms(models, inputs, args.repeats)
    print_forms(f"(b) cin256-v2 UNet forward, batch {args.batch}, latent {p['in_channels']}x{p['image_size']}^2, "
                f"random weights", times, reports)
    return {"batch": args.batch, "median_s": times, "layers": {b: layer_summary(r) for b, r in reports.items()}}


def part_embedded(args) -> dict | None:
    from pipeline.cli import load_preset
    from pipeline.families import family_for
    from pipeline.layout import QuantTag
    from pipeline.packed import Execution, apply_execution
    from pipeline.quantize import load_quant_model
    run = Path(args.run_dir)
    paths = {b: run / str(QuantTag(*b)) / f"quant_{QuantTag(*b)}.pt" for b in ((4, 8), (8, 8))}
    if not all(p.is_file() for p in paths.values()):
        print(f"\n(b') embedded default: no quantized models in {run} (run steps 1-3 there first); skipped")
        return None
    preset = load_preset("fashion")
    cfg = load_config(REPO / preset["config"])
    family = family_for(cfg)
    model = family.load(cfg, REPO / preset["ckpt"], device=torch.device("cpu"))
    unet = family.unet(model)
    batch = 2 * int(preset["batch_size"])     # guided: conditional and unconditional halves in one call
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *family.latent_shape(model), generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    c = model.get_learned_conditioning({model.cond_stage_key: torch.arange(batch) % 10})
    models = {"fp32": unet, "fp32 channels_last": copy.deepcopy(unet).to(memory_format=torch.channels_last)}
    reports = {}
    for b, path in paths.items():
        fake, _ = load_quant_model(unet, path, {}, family=family)
        integer = copy.deepcopy(fake)
        reports[f"W{b[0]}A{b[1]}"] = apply_execution(integer, Execution.INTEGER, quiet=True)
        models[f"fake W{b[0]}A{b[1]}"], models[f"int W{b[0]}A{b[1]}"] = fake, integer
    times = time_forms(models, (x, t, c), args.repeats)
    print_forms(f"(b') embedded Fashion default UNet forward, batch {batch} (guided sampling batch), its W4A8/W8A8 "
                f"models from {run}", times, reports)
    return {"batch": batch, "median_s": times, "layers": {b: layer_summary(r) for b, r in reports.items()}}


# ---- (c) memory, (d) sizes ------------------------------------------------------------------------------------------

def held_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds: parameters, buffers, fake-quant weight caches, int8 codes and the
    backend's prepacked weights (oneDNN's opaque tensors report nbytes)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.nbytes if t.is_mkldnn else t.untyped_storage().nbytes()
        elif isinstance(t, (tuple, list)):
            for u in t:
                add(u)

    for m in model.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            add(t)
        for attr in ("_wq", "_packed", "_float_weight"):
            add(getattr(m, attr, None))
    return total


def part_memory(args) -> dict:
    unet, p = build_cin256()
    inputs = unet_inputs(p, 1)
    out = {"fp32": held_bytes(unet)}
    for w in (4, 8):
        fake = quant_model(unet, w, 8, inputs)
        with torch.inference_mode():
            fake(*inputs[:2], context=inputs[2])       # the fake-quant weight cache fills on the first call
        out[f"fake W{w}A8"] = held_bytes(fake)
        to_integer_(fake)
        with torch.inference_mode():
            fake(*inputs[:2], context=inputs[2])       # prepacking happens on the first call
        out[f"int W{w}A8"] = held_bytes(fake)
        del fake
    print("\n(c) memory held by the cin256-v2 UNet in each form (after one forward)")
    for k, v in out.items():
        print(f"{k:14s} {v / 2**20:9.1f} MiB  {out['fp32'] / v:5.2f}x smaller than FP32")
    return {"bytes": out}


def part_sizes(args) -> dict:
    unet, _ = build_cin256()
    out = {"fp32": state_bytes(unet.state_dict())}
    for policy in ("d2dpm", "all"):
        for w in (4, 8):
            qm = QuantModel(unet, QuantConfig(w, None), search=ScaleSearch.MAX, specials=SPECIALS,
                            filter_fn=policy).init_weights_()
            out[f"W{w} {policy}"] = state_bytes(pack_quant_model(qm))
            del qm
    n = sum(t.numel() for t in unet.parameters())
    kept = sum(m.weight.numel() for name, m in unet.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d)) and d2dpm_policy(name, m).value == "fp32")
    print(f"\n(d) packed files of cin256-v2 ({n / 1e6:.1f} M parameters; {kept / 1e6:.1f} M in the skip and "
          f"Downsample convs the D²-DPM policy keeps FP32; 'all' = Q-Diffusion's policy, every Conv/Linear quantized)")
    for k, v in out.items():
        print(f"{k:9s} {v / 2**20:9.1f} MiB  {out['fp32'] / v:5.2f}x smaller than FP32")
    return {"bytes": out, "parameters": n, "fp32_policy_weights": kept}


# ---- (e) W8A8 on a device: torch._int_mm on CUDA -------------------------------------------------------------------

def precision_forms(fn, device: torch.device) -> dict:
    """FP32 (TF32 off: what the pipeline's exact_cuda_numerics sets), TF32 (CUDA only) and bf16 autocast of one
    float callable."""
    def with_tf32(on: bool):
        def run():
            old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
            try:
                return fn()
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        return run

    def bf16():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()

    forms = {"fp32": with_tf32(False)}
    if device.type == "cuda":
        forms["tf32"] = with_tf32(True)
    forms["bf16"] = bf16
    return forms


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def device_layer(layer: dict, device: torch.device, repeats: int) -> dict:
    """One layer shape at W8A8: the float forms, fake-quant and the integer layer on Backend.INT_MM (the CUDA
    kernel; on a CPU the same code path), ok when it ran on int_mm and equals fake-quant up to float summation."""
    module = copy.deepcopy(layer["module"]).to(device)
    torch.manual_seed(0)
    x = (torch.randn(layer["input"]) + 0.5).to(device)
    q = QuantLayer(copy.deepcopy(module), QScheme(8, search=ScaleSearch.MAX), QScheme(8, search=ScaleSearch.MAX))
    q.init_weight_qparams_()
    q.init_act_qparams_(x)
    q.weight_quant = q.act_quant = True
    wrapper = nn.Sequential(copy.deepcopy(q))
    how = to_integer_(wrapper, Backend.INT_MM)["0"]
    fns = {**precision_forms(lambda: module(x), device), "fake W8A8": lambda: q(x), "int W8A8": lambda: wrapper(x)}
    t = alternate(fns, repeats, device)
    with torch.inference_mode():
        err = rel_error(wrapper(x), q(x))
    return {"name": layer["name"], "kind": type(layer["module"]).__name__, "weight": list(module.weight.shape),
            "input": list(layer["input"]), "execution": how, "rel_error_vs_fake": err, "median_s": t,
            "ratio_vs_fp32": {k: v / t["fp32"] for k, v in t.items()},
            "ok": how == Backend.INT_MM.value and err < 1e-3}


def teacher_forced_error(fake: QuantModel, integer: QuantModel, run) -> float:
    """Relative difference between the integer model's output and the fake-quant model's when fed, layer by layer,
    the integer model's own layer inputs: float rounding only, whatever activation codes flipped at rounding ties
    upstream (the check of tests/integer_checks.py, reduced to its number)."""
    names = [n for n, m in fake.model.named_modules() if isinstance(m, QuantLayer)]
    seen = {}
    hooks = [integer.model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, a[0])) for n in names]
    with torch.inference_mode():
        y_int = run(integer)
    for h in hooks:
        h.remove()
    hooks = [fake.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: (seen[n],)) for n in names]
    with torch.inference_mode():
        y_forced = run(fake)
    for h in hooks:
        h.remove()
    return rel_error(y_forced, y_int)


def device_unet(unet: nn.Module, inputs, device: torch.device, repeats: int) -> dict:
    """The whole UNet at W8A8: float forms, fake-quant, integer (to_integer_ on the device: torch._int_mm for its
    Linear and 1×1 convs); ok when layers ran on torch._int_mm and the fake model fed the integer model's layer
    inputs reproduces its output to float rounding (end to end, codes flipped at rounding ties propagate, so the
    plain difference to fake-quant is reported, not judged)."""
    x, t, c = (None if v is None else v.to(device) for v in inputs)
    unet = unet.to(device)
    fake = quant_model(unet, 8, 8, (x, t, c))
    integer = copy.deepcopy(fake)
    report = to_integer_(integer, Backend.INT_MM)
    fns = {**precision_forms(lambda: unet(x, t, context=c), device), "fake W8A8": lambda: fake(x, t, context=c),
           "int W8A8": lambda: integer(x, t, context=c)}
    times = alternate(fns, repeats, device)
    with torch.inference_mode():
        ref, y_fake, y_int = unet(x, t, context=c), fake(x, t, context=c), integer(x, t, context=c)
    err, q_err = rel_error(y_int, y_fake), rel_error(ref, y_fake)
    forced = teacher_forced_error(fake, integer, lambda m: m(x, t, context=c))
    summary = layer_summary(report)
    return {"batch": len(x), "median_s": times, "ratio_vs_fp32": {k: v / times["fp32"] for k, v in times.items()},
            "rel_error_int_vs_fake": err, "rel_error_fp_vs_fake": q_err, "rel_error_teacher_forced": forced,
            "layers": summary, "ok": summary.get(Backend.INT_MM.value, 0) > 0 and forced < 1e-4}


def part_device(args) -> dict:
    """(e) W8A8 on ``--device``: the largest Linear and 1×1 conv shapes, and the whole UNet."""
    from pipeline.cli import pick_device
    device = pick_device(args.device)    # (CUDA: TF32 off, as every pipeline step runs)
    unet, p = build_cin256(config=Path(args.config))
    for m in unet.modules():   # CompVis zero-initialises the output convs: ε ≡ 0 would hide every error
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not m.weight.any():
            m.reset_parameters()
    unet = unet.to(device)   # (the shape-recording forward too: cin256 at batch 32 is slow on a CPU)
    seen = largest_layers(unet, p, args.batch, 1000, device)
    linear = next(r for r in seen if isinstance(r["module"], nn.Linear))
    one_by_one = [r for r in seen if isinstance(r["module"], nn.Conv2d) and r["module"].kernel_size == (1, 1)]
    rows = [device_layer(r, device, args.repeats) for r in [linear] + one_by_one[:1]]
    whole = device_unet(unet, unet_inputs(p, args.batch), device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n(e) W8A8 on {device} ({name}), batch {args.batch}: median ms (x FP32 time)")
    cols = list(rows[0]["median_s"])
    print(f"{'layer':40s} {'weight':>14s} " + " ".join(f"{c:>16s}" for c in cols) + "  int vs fake")
    for r in rows:
        cells = [f"{1e3 * r['median_s'][c]:7.3f} ({r['ratio_vs_fp32'][c]:4.2f}x)" for c in cols]
        print(f"{r['name'][:40]:40s} {str(r['weight']):>14s} " + " ".join(f"{c:>16s}" for c in cells)
              + f"  {r['rel_error_vs_fake']:.1e} {r['execution']}")
    cells = [f"{1e3 * whole['median_s'][c]:7.2f} ({whole['ratio_vs_fp32'][c]:4.2f}x)" for c in cols]
    print(f"{'whole UNet':40s} {'':14s} " + " ".join(f"{c:>16s}" for c in cells)
          + f"  {whole['rel_error_int_vs_fake']:.1e} (fp vs fake {whole['rel_error_fp_vs_fake']:.1e}; teacher-forced "
            f"{whole['rel_error_teacher_forced']:.1e})")
    print(f"  integer layers: {whole['layers']}")
    return {"device": str(device), "name": name, "batch": args.batch, "layers": rows, "unet": whole}


PARTS = {"layers": part_layers, "unet": part_unet, "embedded": part_embedded, "memory": part_memory,
         "sizes": part_sizes, "device": part_device}
DEFAULT_PARTS = ["layers", "unet", "embedded", "memory", "sizes"]   # (device: on a GPU, gpu_check runs it)


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every count checked by the parser (one line, before any part runs)."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=DEFAULT_PARTS)
    p.add_argument("--device", default="cuda", help="the device part's device (cuda: torch._int_mm; cpu: the same "
                                                    "kernel path, slowly, as a check)")
    p.add_argument("--config", default=str(CIN256), help="the device part's UNet config (default cin256-v2)")
    p.add_argument("--batch", type=at_least(1), default=2, help="cin256-v2 batch (guided sampling of one image: 2)")
    p.add_argument("--top", type=at_least(1), default=8,
                   help="how many of the largest conv shapes to time (and half as many Linear shapes)")
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--run_dir", default=str(REPO / "outputs/fashion/scale3_eta0_steps20"),
                   help="the embedded default's run folder holding w4a8/ and w8a8/")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "onednn_int8_exact_at_8_bits": onednn_int8_exact()}
    print(f"machine: {machine}")
    results = {"machine": machine, "repeats": args.repeats}
    for name in args.parts:
        results[name] = PARTS[name](args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
