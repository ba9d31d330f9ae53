"""UNet forward time of an LDM architecture with random weights (default: cin256-v2 at batch 2).

    python benchmarks/unet_forward.py                       # CPU, and CUDA too when present
    python benchmarks/unet_forward.py --batch 2 8 --repeats 5 --json out.json

The reference point for later fake-quantization overhead: every variant is timed in the same run and reported as
a ratio to the FP32 row of its device and batch. Conditioning is a random context of the config's width and
random timesteps; weights are random (timing does not depend on their values).
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.util import ArgumentParser, at_least, instantiate_from_config, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_unet(config_path: Path) -> tuple[torch.nn.Module, dict]:
    cfg = load_config(config_path)
    unet_cfg = cfg.model.params.unet_config
    torch.manual_seed(0)
    unet = instantiate_from_config(unet_cfg).eval()
    return unet, dict(unet_cfg.params)


def time_forward(unet, params: dict, batch: int, device: torch.device, repeats: int, warmup: int) -> list[float]:
    size = params["image_size"]
    x = torch.randn(batch, params["in_channels"], size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    ctx = params.get("context_dim")
    context = torch.randn(batch, 1, ctx, device=device) if ctx else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for k in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            unet(x, t, context=context)
            sync()
            if k >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def parse_args(argv=None):
    """The flags, every count checked by the parser (one line, before the UNet is built)."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/latent-diffusion/cin256-v2.yaml"))
    p.add_argument("--batch", type=at_least(1), nargs="+", default=[2])
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--warmup", type=at_least(0), default=1)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    unet, params = build_unet(Path(args.config))
    n_params = sum(q.numel() for q in unet.parameters())
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(f"UNet of {args.config}: {n_params / 1e6:.1f} M parameters, latent "
          f"{params['in_channels']}x{params['image_size']}x{params['image_size']}")
    print(f"machine: {machine}")
    variants = {"fp32": lambda m: m}  # later issues add fake-quantized variants here, timed side by side
    rows = []
    for dev in devices:
        device = torch.device(dev)
        for name, make in variants.items():
            model = make(unet).to(device)
            for b in args.batch:
                ts = time_forward(model, params, b, device, args.repeats, args.warmup)
                rows.append({"device": dev, "variant": name, "batch": b, "median_s": statistics.median(ts),
                             "min_s": min(ts), "repeats": len(ts)})
        unet.to("cpu")
    base = {(r["device"], r["batch"]): r["median_s"] for r in rows if r["variant"] == "fp32"}
    print(f"\n{'device':8s} {'variant':10s} {'batch':>5s} {'median ms':>10s} {'min ms':>9s} {'ms/sample':>10s} "
          f"{'vs fp32':>8s}")
    for r in rows:
        r["ratio_vs_fp32"] = r["median_s"] / base[(r["device"], r["batch"])]
        print(f"{r['device']:8s} {r['variant']:10s} {r['batch']:5d} {1e3 * r['median_s']:10.1f} "
              f"{1e3 * r['min_s']:9.1f} {1e3 * r['median_s'] / r['batch']:10.1f} {r['ratio_vs_fp32']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "parameters": n_params, "machine": machine,
                                               "warmup": args.warmup, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
