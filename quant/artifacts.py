"""One way to save and load every pipeline artifact: ``{"meta": {...}, **payload}``, written atomically, read with
``weights_only=True``, and checked against what the next step asks for."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ldm.util import UserFacingError, save_atomic

FORMAT_VERSION = 1


class ArtifactMismatch(UserFacingError):
    pass


def file_fingerprint(path: str | os.PathLike, n_bytes: int = 1 << 24) -> str:
    """SHA-256 (first 16 hex digits) of a file's first 16 MiB and its size: cheap, and enough to tell models apart."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(n_bytes))
    h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]


def save_artifact(path: str | os.PathLike, kind: str, meta: dict[str, Any], payload: dict[str, Any]) -> Path:
    if "meta" in payload:
        raise ValueError("payload must not have a 'meta' key")
    save_atomic({"meta": {"format": kind, "version": FORMAT_VERSION, **meta}, **payload}, path)
    return Path(path)


def load_artifact(path: str | os.PathLike, kind: str, expect: dict[str, Any] | None = None,
                  produced_by: str = "the previous pipeline step") -> dict:
    """Load and check: the format, its version and every ``expect`` key must match, or a one-line error says which
    value differs and how to fix it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactMismatch(f"{kind} artifact not found: {path}; run {produced_by} first")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or unsafe: either way not ours
        raise ArtifactMismatch(f"cannot read {path} ({type(e).__name__}); rerun {produced_by}") from None
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != kind:
        got = meta.get("format") if isinstance(meta, dict) else type(obj).__name__
        raise ArtifactMismatch(f"{path} is a '{got}' artifact, expected '{kind}'; pass the right file")
    if meta.get("version") != FORMAT_VERSION:
        raise ArtifactMismatch(f"{path} has format version {meta.get('version')}, this code reads {FORMAT_VERSION}; "
                               f"rerun {produced_by}")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise ArtifactMismatch(f"{path} was made with {key}={meta.get(key)!r}, but {key}={want!r} is asked for; "
                                   f"rerun {produced_by} with matching settings or pass matching flags")
    return obj
