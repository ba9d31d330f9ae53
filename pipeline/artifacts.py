"""One way to save, load and reuse every pipeline artifact: ``{"meta": {...}, **payload}``, written atomically
(``ldm.fileio``), read with ``weights_only=True``, and checked against what the next step asks for.

``meta`` holds everything that decides the payload (model fingerprint, sampler settings, bits, hyper-parameters,
seeds, the fingerprints of the artifacts it was made from), so ``is_current`` can tell whether a step may skip.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ldm.fileio import file_fingerprint, remove_stale_temporaries, save_atomic, write_json_atomic
from ldm.util import UserFacingError

FORMAT_VERSION = 1


class ArtifactMismatch(UserFacingError):
    """One line naming the artifact, what differs and how to fix it; ``key`` is the meta key that differs (None
    when the file is missing, unreadable or of another kind)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def save_artifact(path: str | os.PathLike, kind: str, meta: dict[str, Any], payload: dict[str, Any]) -> Path:
    if "meta" in payload:
        raise ValueError("payload must not have a 'meta' key")
    remove_stale_temporaries(Path(path).parent, Path(path).name)  # what a killed earlier write of it left
    return save_atomic({"meta": {"format": kind, "version": FORMAT_VERSION, **meta}, **payload}, path)


def timing_path(path: str | os.PathLike) -> Path:
    """Where an artifact's wall times go: beside it, outside its content, so that same-seed reruns write
    byte-identical artifacts (and every later fingerprint of them agrees)."""
    path = Path(path)
    return path.with_name(path.stem + ".timing.json")


def save_timing(path: str | os.PathLike, **seconds: float | None) -> Path:
    """Record how long the steps that made ``path`` took (``timing_path``), atomically."""
    return write_json_atomic(timing_path(path), {k: v for k, v in seconds.items()})


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
                                   f"rerun {produced_by} with matching settings or pass matching flags", key)
    return obj


def is_current(path: str | os.PathLike, kind: str, meta: dict[str, Any], force: bool = False,
               what: str | None = "this result") -> bool:
    """The one "is this artifact up to date?" check of the pipeline steps: True (and says so) when ``path`` holds
    a ``kind`` artifact whose meta agrees with ``meta`` on every key, so the step may skip; False (saying why when
    a file is there) when it must be made: absent, made with other settings, or ``force``. ``what=None``: silent."""
    path = Path(path)
    if force or not path.exists():
        return False
    try:
        load_artifact(path, kind, meta)
    except ArtifactMismatch as e:
        if what is not None:  # a damaged file (no differing key) is not "other settings"
            print(f"{path} was made with other settings ({e.key} differs); redoing it" if e.key else
                  f"{path} cannot be used ({e}); redoing it")
        return False
    if what is not None:
        print(f"{path} already holds {what}; skipping (--force to redo)")
    return True


__all__ = ["FORMAT_VERSION", "ArtifactMismatch", "save_artifact", "load_artifact", "is_current", "file_fingerprint",
           "save_timing", "timing_path"]
