"""One way to save, load and reuse every pipeline artifact: ``{"meta": {...}, **payload}``, written atomically
(``ldm.fileio``), read with ``weights_only=True``, and checked against what the next step asks for.

``meta`` holds everything that decides the payload (model fingerprint, sampler settings, bits, hyper-parameters,
seeds, the fingerprints of the artifacts it was made from), so ``is_current`` can tell whether a step may skip.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch

from ldm.fileio import check_output_file, file_fingerprint, remove_stale_temporaries, save_atomic, write_json_atomic
from ldm.util import UserFacingError

FORMAT_VERSION = 1
CHECKSUM_KEY = "tensors_sha256"   # meta key: SHA-256 of every tensor of the payload (verified on load, then dropped)


class ArtifactMismatch(UserFacingError):
    """One line naming the artifact, what differs and how to fix it; ``key`` is the meta key that differs (None
    when the file is missing, unreadable or of another kind)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def tensors_digest(payload: Any) -> str:
    """SHA-256 over every tensor of ``payload`` (its key path, dtype, shape and bytes) and its plain values, in a fixed
    order: what a flipped byte inside a tensor changes (``torch.load`` itself does not check the zip's CRCs)."""
    h = hashlib.sha256()

    def walk(key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{t.dtype}:{tuple(value.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(f"{key}/{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{key}[{i}]", v)
        else:
            h.update(f"{key}={value!r};".encode())
    walk("", payload)
    return h.hexdigest()


def save_artifact(path: str | os.PathLike, kind: str, meta: dict[str, Any], payload: dict[str, Any], *,
                  timing: dict[str, Any] | None = None, replaces: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``{"meta": meta + kind + checksum, **payload}`` to ``path`` atomically, then (the step's finish, in one
    call) ``timing`` beside it (``timing_path``: wall times stay out of the artifact, so reruns are byte-identical)
    and remove what it ``replaces`` (a progress checkpoint), with the temporaries killed writes of them left."""
    if "meta" in payload:
        raise ValueError("payload must not have a 'meta' key")
    path = Path(path)
    meta = {"format": kind, "version": FORMAT_VERSION, **{k: v for k, v in meta.items() if k != CHECKSUM_KEY},
            CHECKSUM_KEY: tensors_digest(payload)}
    timing_file = timing_path(path)
    remove_stale_temporaries(path.parent, path.name)  # what a killed earlier write of it left
    save_atomic({"meta": meta, **payload}, path)
    if timing is not None:
        write_json_atomic(timing_file, timing)
    for old in map(Path, replaces):
        old.unlink(missing_ok=True)
        remove_stale_temporaries(old.parent, old.name)
    return path


def artifact_kind(path: str | os.PathLike) -> str | None:
    """The kind (meta format) of the pipeline artifact at ``path``: None when it is not a torch file at all (a PNG,
    a text file), "unreadable" when it is a torch file this code cannot read, "<type>" for a torch file of no kind."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:   # a zip of another format (an .npz of samples) is no torch file
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in z.namelist()):
            return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return "unreadable"
    meta = obj.get("meta") if isinstance(obj, dict) else None
    return str(meta.get("format")) if isinstance(meta, dict) else type(obj).__name__


def check_output_path(path: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike | None] = (),
                      flag: str = "the output") -> Path:
    """The one check of a file a step is about to make, before any work: not a directory, not one of its
    ``inputs``, not an existing file of another kind (a model, a PNG, another artifact: never "redone" over).
    A file of this kind, current or not, is the step's to redo (``is_current`` decides)."""
    got = artifact_kind(path) if Path(path).is_file() else kind
    path = check_output_file(path, inputs, flag)   # (first: "is also an input" says more than its kind)
    if got != kind and got != "unreadable":
        what = f"a '{got}' artifact" if got else "not a pipeline artifact"
        raise UserFacingError(f"{flag} {path} is {what}, and this step writes a '{kind}' artifact there; it is "
                              f"not overwritten: pass another {flag}, or remove the file yourself")
    return path


def timing_path(path: str | os.PathLike) -> Path:
    """Where an artifact's wall times go: beside it, outside its content, so that same-seed reruns write
    byte-identical artifacts (and every later fingerprint of them agrees)."""
    path = Path(path)
    return path.with_name(path.stem + ".timing.json")


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
    stored = meta.pop(CHECKSUM_KEY, None)   # (files written before the checksum have none: nothing to verify)
    if stored is not None and stored != tensors_digest({k: v for k, v in obj.items() if k != "meta"}):
        raise ArtifactMismatch(f"{path} is damaged: its tensors do not match the checksum written with them; "
                               f"rerun {produced_by} (or copy the file again)")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise ArtifactMismatch(f"{path} was made with {key}={meta.get(key)!r}, but {key}={want!r} is asked for; "
                                   f"rerun {produced_by} with matching settings or pass matching flags", key)
    return obj


def load_progress(path: str | os.PathLike, kind: str, meta: dict[str, Any], needs: Iterable[str] = ()) -> dict | None:
    """The progress checkpoint an interrupted run left at ``path``, to resume from: its content when it is a
    ``kind`` artifact whose meta agrees with ``meta`` on every key and that holds every key in ``needs``; else
    None, saying why a file there is ignored (other settings, damaged by a killed write, or older). The one reader
    of resume checkpoints (steps 2-4)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        obj = load_artifact(path, kind, meta)
    except ArtifactMismatch as e:   # a damaged file (no differing key) is not "other settings"
        print(f"ignoring {path}: " + (f"its {e.key} differs" if e.key else "it cannot be read (an interrupted write?)")
              + "; starting over")
        return None
    missing = [k for k in needs if k not in obj]
    if missing:
        print(f"ignoring {path}: it holds no {', '.join(missing)} (written by an older version); starting over")
        return None
    return obj


def is_current(path: str | os.PathLike, kind: str, meta: dict[str, Any], force: bool = False,
               what: str | None = "this result") -> bool:
    """The one "is this artifact up to date?" check of the pipeline steps: True (and says so) when ``path`` holds
    a ``kind`` artifact whose meta agrees with ``meta`` on every key, so the step may skip; False (saying why when
    a file is there) when it must be made: absent, made with other settings, or ``force``. ``what=None``: silent."""
    path = Path(path)
    problem = None
    if not force and path.is_file():
        try:
            load_artifact(path, kind, meta)
        except ArtifactMismatch as e:
            problem = e
    check_output_path(path, kind)   # (a directory, or a file of another kind: refused, not redone)
    if force or not path.is_file():
        return False
    if problem is not None:
        if what is not None:  # a damaged file (no differing key) is not "other settings"
            print(f"{path} was made with other settings ({problem.key} differs); redoing it" if problem.key else
                  f"{path} cannot be used ({problem}); redoing it")
        return False
    if what is not None:
        print(f"{path} already holds {what}; skipping (--force to redo)")
    return True


__all__ = ["FORMAT_VERSION", "ArtifactMismatch", "save_artifact", "load_artifact", "load_progress", "is_current",
           "file_fingerprint", "timing_path", "check_output_path", "artifact_kind", "tensors_digest", "CHECKSUM_KEY"]
