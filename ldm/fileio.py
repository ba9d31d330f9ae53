"""The project's one atomic write and its file fingerprints (the bottom layer: every package may import this).

A file is written to a temporary name beside its target, then renamed over it (``os.replace`` is atomic on POSIX
and Windows), so a reader sees the old file or the whole new one, never half of one. Temporary names are
``.<name>.tmp<pid><suffix>`` (the suffix keeps writers that choose a format by extension, e.g. ``np.savez``, from
adding their own); ``remove_stale_temporaries`` deletes those an interrupted writer left behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from ldm.errors import UserFacingError

TMP_MARK = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception it becomes ``path``.
    On any exception the temporary file is removed and ``path`` is untouched. ``keep_suffix``: the temporary name
    ends with ``path``'s suffix (for writers that append a suffix otherwise, e.g. ``np.savez``)."""
    path = Path(path)
    if path.is_dir():   # (os.replace would fail only after the work; steps check first: check_output_path)
        raise IsADirectoryError(f"{path} is a directory, not a file that can be written")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}{path.suffix if keep_suffix else ''}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any], keep_suffix: bool = False) -> Path:
    """``write(tmp)`` then rename to ``path``: the one atomic write every artifact, image and record goes through."""
    with atomic_path(path, keep_suffix) as tmp:
        write(tmp)
    return Path(path)


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike, record: Any) -> Path:
    return write_text_atomic(path, json.dumps(record, indent=1) + "\n")


def write_numbered(folder: str | os.PathLike, name: Callable[[int], str], write: Callable[[Path], Any],
                   start: int = 0) -> Path:
    """``write(tmp)``, then publish it under the first free ``name(i)``, i >= ``start``, without ever replacing a
    file: the name is claimed by ``os.link`` (atomic, fails if the name exists), so concurrent runs numbering files
    in one folder cannot overwrite each other's (CompVis' ``len(os.listdir())`` numbering races). Returns the path.
    Where hard links are not supported the name is reserved with an exclusive create, then replaced."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = Path(name(start)).suffix
    tmp = folder / f".{name(start)}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        write(tmp)
        i = start
        while True:
            target = folder / name(i)
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                i += 1
            except OSError:   # no hard links here: claim the name exclusively, then move the file onto it
                try:
                    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    i += 1
                    continue
                os.replace(tmp, target)
                return target
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(directory: str | os.PathLike, name: str = "*") -> int:
    """Delete the temporary files that interrupted writes of ``name`` (a glob) left in ``directory``; returns how
    many. Only our own pattern ``.<name>.tmp*`` is touched."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    stale = list(directory.glob(f".{name}{TMP_MARK}*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a whole file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a whole file (reference batches, feature networks: what a reader can check with sha256sum)."""
    return file_digest(path, "sha256")


def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a whole file: what published datasets and checkpoints state (checked, never used to identify)."""
    return file_digest(path, "md5")


def file_fingerprint(path: str | os.PathLike, n_bytes: int = 1 << 24) -> str:
    """SHA-256 (first 16 hex digits) of a file's first 16 MiB and its size: cheap on multi-GB checkpoints, and
    enough to tell models and pipeline artifacts apart."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(n_bytes))
    h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                      flag: str = "the output") -> Path:
    """Before any work is spent: ``path`` can be written as a file. Refused with one line (``UserFacingError``)
    when it is a directory, when it is one of ``inputs`` (the step would overwrite what it reads), or when its
    nearest existing folder is not writable."""
    path = Path(path)
    if path.is_dir():
        raise UserFacingError(f"{flag} {path} is a directory; pass the path of a file (in it or elsewhere)")
    for src in inputs:
        if src is not None and Path(src).exists() and path.exists() and os.path.samefile(path, src):
            raise UserFacingError(f"{flag} {path} is also an input of this step; it would be overwritten by what is "
                                  f"made from it: pass another {flag}")
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "a file is in the way" if probe.exists() and not probe.is_dir() else "permission denied"
        raise UserFacingError(f"{flag} {path} cannot be written ({why} at {probe}); pass another {flag}")
    return path
