"""Packed export of a quantized model (after step 2 or 3): integer weight codes and everything else the UNet needs,
in one file that ``--packed`` loads without the FP32 UNet weights (``pipeline.packed``, ``quant.export``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ldm.fileio import file_fingerprint
from ldm.util import UserFacingError
from pipeline import cli
from pipeline.artifacts import check_output_path, is_current
from pipeline.packed import PACKED_KIND, export_packed
from pipeline.quantize import QUANT_SCRIPT
from pipeline.sampling import quant_expect


def run(args: argparse.Namespace) -> None:
    cli.check_sampling_args(args)
    cli.check_bits(args)
    base = cli.model_meta(args)
    layout, tag = cli.layout(args), cli.quant_tag(args, weights_only=args.weights_only)
    qpath = layout.quant(tag)
    if not qpath.is_file():
        raise UserFacingError(f"{tag.title()} quantized model not found: {qpath}{layout.elsewhere(qpath)}; run "
                              f"{QUANT_SCRIPT if tag.a_bits else 'quant_scripts/quantize_weight.py'} "
                              f"{tag.flags} with these settings first")
    out = Path(args.out) if args.out else layout.packed(tag)
    check_output_path(out, PACKED_KIND, inputs=(qpath, cli.resolve(args.ckpt), cli.resolve(args.config)),
                      flag="--out")   # (before anything loads: never over the quant artifact or the model)
    want = quant_expect(base, tag)
    if is_current(out, PACKED_KIND, {**want, "quant": file_fingerprint(qpath)}, args.force):
        return
    device = cli.pick_device(args.device)
    family, model = cli.load_model(args, device)
    with family.ema_scope(model):
        meta = export_packed(family.unet(model), qpath, out, want)
    fp32, packed = meta["fp32_unet_bytes"], out.stat().st_size
    print(f"[{args.preset_used}] {tag.title()} ({meta['policy']}): wrote {out}: {packed / 2**20:.2f} MiB, "
          f"{fp32 / packed:.2f}x smaller than the FP32 UNet ({fp32 / 2**20:.2f} MiB)")
