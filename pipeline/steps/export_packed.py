"""Packed export of a quantized model (after step 2 or 3): integer weight codes and everything else the UNet needs,
in one file that ``--packed`` loads without the FP32 UNet weights (``pipeline.packed``, ``quant.export``)."""
from __future__ import annotations

from pathlib import Path

from ldm.fileio import file_fingerprint
from ldm.util import UserFacingError
from pipeline.artifacts import check_output_path, is_current
from pipeline.basics import resolve
from pipeline.layout import QuantTag
from pipeline.packed import PACKED_KIND, export_packed
from pipeline.quantize import QUANT_SCRIPT
from pipeline.run import Run
from pipeline.sampling import quant_expect


def run(run: Run, tag: QuantTag, out: Path | None = None) -> Path:
    """Pack the quantized model ``tag`` (a weights-only tag: step 2's) into ``out`` (default: the run's packed
    path); returns the file's path."""
    base = run.meta()
    layout = run.layout
    qpath = layout.quant(tag)
    if not qpath.is_file():
        raise UserFacingError(f"{tag.title()} quantized model not found: {qpath}{layout.elsewhere(qpath)}; run "
                              f"{QUANT_SCRIPT if tag.a_bits else 'quant_scripts/quantize_weight.py'} "
                              f"{tag.flags} with these settings first")
    out = Path(out) if out else layout.packed(tag)
    check_output_path(out, PACKED_KIND, inputs=(qpath, resolve(run.model.ckpt), resolve(run.model.config)),
                      flag="--out")   # (before anything loads: never over the quant artifact or the model)
    want = quant_expect(base, tag)
    if is_current(out, PACKED_KIND, {**want, "quant": file_fingerprint(qpath)}, run.force):
        return out
    device = run.torch_device()
    family, model = run.load(device)
    with family.ema_scope(model):
        meta = export_packed(family.unet(model), qpath, out, want, family=family)
    fp32, packed = meta["fp32_unet_bytes"], out.stat().st_size
    print(f"[{run.preset}] {tag.title()} ({meta['policy']}): wrote {out}: {packed / 2**20:.2f} MiB, "
          f"{fp32 / packed:.2f}x smaller than the FP32 UNet ({fp32 / 2**20:.2f} MiB)")
    return out
