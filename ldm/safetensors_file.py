"""A reader of the safetensors format (huggingface/safetensors, "Format" in its README) without the package.

A file is: an unsigned little-endian 64-bit header length N, N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw little-endian tensor bytes, offsets counted
from the end of the header. Nothing in it is executed, so unlike a pickle it needs no trust. Used for
diffusers-format weights (``diffusion_pytorch_model.safetensors``) where the ``safetensors`` package is absent.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import torch

from ldm.errors import UserFacingError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 1024 * 1024   # the format's own limit on the JSON header


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header JSON, byte offset where the tensor data starts); one line for a file that is not safetensors."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserFacingError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n > os.path.getsize(path) - 8:
            raise UserFacingError(f"{path} is not a safetensors file (header length {n} is impossible); "
                                  f"download it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserFacingError(f"{path}: the safetensors header is not valid JSON ({e}); download it again") \
                from None
    if not isinstance(header, dict):
        raise UserFacingError(f"{path}: the safetensors header is not a JSON object; download it again")
    return header, 8 + n


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (CPU), in the header's order. The bytes are read once; each tensor is a
    view of that buffer (no second copy). Offsets and sizes are checked against the declared dtype and shape."""
    if sys.byteorder != "little":   # the format stores little-endian data; no byte swapping implemented
        raise UserFacingError("reading safetensors without the package needs a little-endian machine; "
                              "pip install safetensors")
    path = Path(path)
    header, start = read_header(path)
    size = os.path.getsize(path) - start
    buffer = bytearray(size)
    with open(path, "rb") as f:
        f.seek(start)
        if f.readinto(buffer) != size:
            raise UserFacingError(f"{path} is truncated; download it again")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserFacingError(f"{path}: tensor {name!r} has an unreadable header entry {entry}; "
                                  f"download it again") from None
        count = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= size or end - begin != count * itemsize:
            raise UserFacingError(f"{path}: tensor {name!r} ({entry['dtype']} {shape}) has data offsets "
                                  f"[{begin}, {end}) that do not fit the file; it is damaged, download it again")
        flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=begin) if count else \
            torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(shape)
    return out
