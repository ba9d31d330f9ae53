"""Packed quantized UNets as pipeline artifacts, and how a quantized UNet is executed.

Artifact ``packed`` (``w{b}a{b}/packed_w{b}a{b}.pt``, ``quant_scripts/export_packed.py``): meta = the quant
artifact's meta (model, ckpt, bits, policy, granularity, smoothing, sampler settings, timesteps, calibration,
SQNRs) + ``quant`` (the fingerprint of the quant artifact it was packed from, so the fits made on that model accept
it) + ``fp32_unet_bytes`` (the FP32 UNet's size as torch.save writes it, for the ratio); payload
``quant.export.pack_quant_model``'s. It replaces the FP32 UNet weights *and* the quant artifact: ``--packed FILE``
builds the UNet from its config and fills it from the file (the first stage and the conditioning encoder still come
from the checkpoint).

``Execution``: FAKE runs the fake-quant emulation (the research code's arithmetic); COMPILED the same arithmetic
with every activation quantize-dequantize one ``torch.compile``'d kernel (the same values as FAKE's passes, one read
and one write of the activation instead of four); INTEGER converts every layer an integer kernel takes exactly to
``quant.integer.IntegerLayer`` (int8 weights, uint8 inputs, int32 sums).
"""
from __future__ import annotations

import enum
import io
import os
from pathlib import Path
from typing import Any

import torch

from ldm.fileio import file_fingerprint
from ldm.util import UserFacingError
from pipeline.artifacts import ArtifactMismatch, load_artifact, save_artifact
from pipeline.families.base import ModelFamily
from pipeline.quantize import QUANT_KIND, QUANT_SCRIPT, load_quant_model, quant_config
from quant.export import load_packed, pack_quant_model
from quant.integer import layer_summary, to_integer_
from quant.model import QuantModel
from quant.quantizer import FakeQuantKernel, check_compiled_fake_quant

PACKED_KIND = "packed"
EXPORT_SCRIPT = "quant_scripts/export_packed.py"


class Execution(enum.Enum):
    FAKE = "fake"          # float ops on fake-quantized weights and inputs
    COMPILED = "compiled"  # FAKE, each activation fake-quant one compiled kernel (same values, less memory traffic)
    INTEGER = "integer"    # int8 kernels where they are exact (quant.integer), the rest as FAKE


def state_bytes(state: dict) -> int:
    """Bytes of ``state`` as torch.save writes it (the FP32 UNet's file size, without writing it)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()


def export_packed(unet: torch.nn.Module, quant_path: Path, out_path: Path, expect: dict[str, Any], *,
                  family: ModelFamily) -> dict:
    """Pack the quantized model of ``quant_path`` (checked against ``expect``) over ``family``'s FP ``unet`` and
    write it to ``out_path`` atomically; returns the meta written."""
    qm, qmeta = load_quant_model(unet, quant_path, expect, QUANT_SCRIPT, family=family)
    payload = pack_quant_model(qm)
    meta = {**{k: v for k, v in qmeta.items() if k not in ("format", "version")},
            "quant": file_fingerprint(quant_path), "fp32_unet_bytes": state_bytes(unet.state_dict())}
    save_artifact(out_path, PACKED_KIND, meta, payload)
    return meta


def load_packed_model(unet: torch.nn.Module, path: str | os.PathLike, expect: dict[str, Any], *,
                      family: ModelFamily) -> tuple[QuantModel, dict]:
    """The quantized UNet of a packed file, built over ``family``'s ``unet`` (same structure, any weights: they
    are all replaced), meta checked against ``expect`` like the quant artifact's."""
    obj = load_artifact(path, PACKED_KIND, expect, EXPORT_SCRIPT)
    meta = obj["meta"]
    cfg, filter_fn = quant_config(meta, family)
    try:
        qm = load_packed(unet, obj, cfg, filter_fn, specials=family.quant_specials())
    except (ValueError, KeyError) as e:
        raise ArtifactMismatch(f"{path}: {e}") from None
    return qm.to(next(unet.parameters()).device), meta


def apply_execution(qm: QuantModel, execution: Execution, quiet: bool = False) -> dict[str, str] | None:
    """Switch ``qm`` to ``execution`` in place; for INTEGER, returns {layer: how it runs} and prints the summary.
    COMPILED builds its kernel here, once, checks it, and refuses in one line where torch.compile cannot build it
    (no C++ compiler) or what it built is wrong."""
    if execution is Execution.FAKE:
        return None
    if execution is Execution.COMPILED:
        device = next(qm.parameters()).device
        try:
            check_compiled_fake_quant(device)
        except RuntimeError as e:   # (cannot build it, or it computes other values: the message says which)
            raise UserFacingError(f"--execution compiled: {e}") from None
        qm.use_kernel_(FakeQuantKernel.COMPILED)
        return None
    report = to_integer_(qm)
    if not quiet:
        summary = ", ".join(f"{n} {how}" for how, n in sorted(layer_summary(report).items(), key=lambda x: -x[1]))
        print(f"integer execution: {len(report)} quantized layers: {summary}")
    return report


__all__ = ["PACKED_KIND", "EXPORT_SCRIPT", "Execution", "export_packed", "load_packed_model", "apply_execution",
           "state_bytes", "QUANT_KIND"]
