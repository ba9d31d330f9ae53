"""Build a CIFAR-10 reference batch in the OpenAI layout from the standard CIFAR-10 python archive.

    python -m evaluation.cifar10_reference cifar-10-python.tar.gz          # -> models/eval/cifar10_train_reference.npz
    python -m evaluation.cifar10_reference cifar-10-batches-py/ --split test

The archive is the one published at https://www.cs.toronto.edu/~kriz/cifar.html (``cifar-10-python.tar.gz``, MD5
below; nothing is downloaded here), or the folder it unpacks to. The training split (50,000 images) is the
reference FID on CIFAR-10 is usually computed against (Q-Diffusion, PTQ4DM, QNCD). Output: ``arr_0`` uint8 NHWC
[N, 32, 32, 3], ``arr_1`` int64 labels; the evaluator computes the Inception statistics from ``arr_0``.

The batches are Python pickles. They are read with an unpickler that can only build dicts, lists, numbers, bytes and
numpy arrays: a file that asks for anything else is refused with one line, never executed.
"""
from __future__ import annotations

import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np

from ldm.fileio import file_md5, write_atomic
from ldm.util import ArgumentParser, UserFacingError, run_cli

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "models" / "eval" / "cifar10_train_reference.npz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # cifar-10-python.tar.gz as published
FOLDER = "cifar-10-batches-py"
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGES_PER_BATCH = 10_000
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # (bytes in a protocol-2 pickle)


class ArchiveError(UserFacingError):
    """One line: what is wrong with the archive and what to pass instead."""


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise ArchiveError(f"the batch asks to load {module}.{name}, which a CIFAR-10 batch never does; "
                               f"refusing to unpickle it (pass the archive from the CIFAR-10 site)")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def parse_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 NHWC [n, 32, 32, 3], int64 [n]); rows are R(1024) G(1024) B(1024) row-major."""
    try:
        d = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except ArchiveError:
        raise
    except Exception as e:  # a truncated or foreign file: any unpickling failure means "not a CIFAR batch"
        raise ArchiveError(f"{name} is not a CIFAR-10 python batch ({type(e).__name__}); pass the archive from the "
                           f"CIFAR-10 site") from None
    data = d.get(b"data") if isinstance(d, dict) else None
    labels = d.get(b"labels") if isinstance(d, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or labels is None or len(labels) != len(data):
        raise ArchiveError(f"{name} does not hold b'data' uint8 [n, 3072] with one b'labels' entry per row; it is "
                           f"not a CIFAR-10 python batch")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ArchiveError(f"{name} has labels outside 0..9; it is not a CIFAR-10 batch")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_batches(source: Path, split: str, check_md5: bool = True) -> dict[str, bytes]:
    """The raw batch files of ``split`` from the .tar.gz or the unpacked folder (the folder itself or its parent)."""
    names = SPLITS[split]
    if source.is_dir():
        folder = source if (source / names[0]).is_file() else source / FOLDER
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ArchiveError(f"{source} has no {', '.join(missing)}; pass cifar-10-python.tar.gz or the "
                               f"{FOLDER}/ folder it unpacks to")
        return {n: (folder / n).read_bytes() for n in names}
    if not source.is_file():
        raise ArchiveError(f"{source} not found; download cifar-10-python.tar.gz from "
                           f"https://www.cs.toronto.edu/~kriz/cifar.html")
    if check_md5 and (got := file_md5(source)) != ARCHIVE_MD5:
        raise ArchiveError(f"{source} has MD5 {got}, the published archive {ARCHIVE_MD5}: a corrupt or different "
                           f"download; fetch it again (or pass --skip_md5 for a repacked copy)")
    try:
        with tarfile.open(source, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise ArchiveError(f"{source} holds no {', '.join(missing)}; it is not the CIFAR-10 python archive")
            return {n: tar.extractfile(members[n]).read() for n in names}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArchiveError(f"{source} is not a readable tar archive ({type(e).__name__}); pass "
                           f"cifar-10-python.tar.gz") from None


def build_reference(source: Path, out: Path, split: str = "train", check_md5: bool = True) -> dict:
    parts = [parse_batch(raw, name) for name, raw in read_batches(source, split, check_md5).items()]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    write_atomic(out, lambda tmp: np.savez(tmp, arr_0=images, arr_1=labels), keep_suffix=True)
    return {"n": len(images), "per_class": np.bincount(labels, minlength=10).tolist()}


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="cifar-10-python.tar.gz, or the cifar-10-batches-py/ folder")
    p.add_argument("--split", default="train", choices=tuple(SPLITS))
    p.add_argument("--out", default=None, help="default: models/eval/cifar10_<split>_reference.npz")
    p.add_argument("--skip_md5", action="store_true", help="accept a .tar.gz whose MD5 is not the published one")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else DEFAULT_OUT.with_name(f"cifar10_{args.split}_reference.npz")
    info = build_reference(Path(args.source), out, args.split, check_md5=not args.skip_md5)
    print(f"wrote {out}: {info['n']} images, {info['per_class']} per class", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
