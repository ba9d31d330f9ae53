"""Fashion-MNIST (Xiao et al. 2017) for the embedded default model: IDX reading, lookup, verified download, datasets.

Images are padded from 28×28 to 32×32 with background (0) and scaled to [-1, 1]; samples are CompVis-style dicts
``{"image": [32, 32, 1] float (channels last), "class_label": int}``, plus ``"txt"`` (a caption from the class
name and a template) with ``captions=True``, for the text-to-image default.

Where the files are looked for, in order:
1. a directory the user gives (``root=`` / ``--data_dir``), or the environment variable ``FASHION_MNIST_DIR``;
2. ``/usr/share/datasets/fashion-mnist/`` (Debian package ``dataset-fashion-mnist``);
3. a previous download in ``~/.cache/ldm-ptq/fashion-mnist``, else the official URLs (only when ``download=True``).
Every file is checked against the SHA-256 of its decompressed content, whatever its source.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.util import UserFacingError

ENV_VAR = "FASHION_MNIST_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm-ptq" / "fashion-mnist"
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# SHA-256 of the decompressed IDX payloads (the same for the official .gz files and Debian's recompressed ones).
SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
NUM_CLASSES = 10
# Captions of the embedded text-to-image default: a template filled with the class noun (training picks one of the
# templates at random per image; the evaluation prompts use PROMPT_TEMPLATE).
CLASS_NOUNS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
CAPTION_TEMPLATES = ("a photo of a {}", "a {} on a dark background", "a grayscale photo of a {}",
                     "a picture of a {}", "a {}", "a product photo of a {}", "a small photo of the {}")
PROMPT_TEMPLATE = CAPTION_TEMPLATES[0]


def class_prompt(label: int, template: str = PROMPT_TEMPLATE) -> str:
    return template.format(CLASS_NOUNS[label])
HELDOUT = 5000  # the last 5,000 training images (in file order) are held out: the real-data FID floor


class DatasetNotFound(UserFacingError):
    pass


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, name: str = "<idx>") -> np.ndarray:
    """IDX bytes -> array. Header: two zero bytes, a dtype code, the number of dims, then big-endian int32 sizes."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetNotFound(f"{name} is not an IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)) * dtype.itemsize:
        raise DatasetNotFound(f"{name} is truncated: header says {shape}, payload has {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).copy()


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DatasetNotFound(f"cannot read {path} ({e}); delete it and fetch it again") from None


def read_idx(path: str | os.PathLike, sha256: str | None = None) -> np.ndarray:
    """Read an IDX file (gzipped or raw); with ``sha256``, verify the decompressed content first."""
    path = Path(path)
    data = _read_bytes(path)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DatasetNotFound(f"{path} has the wrong content (SHA-256 mismatch); delete it and fetch it again")
    return parse_idx(data, str(path))


def _locate(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / name[:-3]):  # .gz or already decompressed
        if candidate.is_file():
            return candidate
    return None


def _has_split(directory: Path, split: str) -> bool:
    return all(_locate(directory, n) is not None for n in FILES[split])


def download(directory: Path, url: str = URL, names=None, hashes: dict | None = None) -> None:
    """Fetch the files into ``directory`` (atomically, each checked against its SHA-256)."""
    hashes = SHA256 if hashes is None else hashes
    directory.mkdir(parents=True, exist_ok=True)
    for name in names or [n for pair in FILES.values() for n in pair]:
        if _locate(directory, name):
            continue
        tmp = directory / f".{name}.part"
        try:
            with urllib.request.urlopen(url + name, timeout=60) as r, open(tmp, "wb") as f:
                f.write(r.read())
            read_idx(tmp, hashes[name])
            os.replace(tmp, directory / name)
        except (OSError, ValueError, DatasetNotFound) as e:
            reason = "wrong content, SHA-256 mismatch" if isinstance(e, DatasetNotFound) else str(e)
            raise DatasetNotFound(f"download of {url + name} failed ({reason})") from None
        finally:
            tmp.unlink(missing_ok=True)


def find_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train", download_ok: bool = False,
                       url: str = URL) -> Path:
    """The directory holding the ``split`` files (see the module docstring for the search order)."""
    given = root if root is not None else os.environ.get(ENV_VAR)
    if given:
        given = Path(given)
        if not _has_split(given, split):
            raise DatasetNotFound(f"Fashion-MNIST {split} files ({', '.join(FILES[split])}) not found in {given}")
        return given
    for candidate in (DEBIAN_DIR, CACHE_DIR):
        if _has_split(candidate, split):
            return candidate
    if download_ok:
        download(CACHE_DIR, url)
        return CACHE_DIR
    raise DatasetNotFound(
        f"Fashion-MNIST not found: pass --data_dir DIR (or set {ENV_VAR}), install the Debian package "
        f"(apt-get install dataset-fashion-mnist -> {DEBIAN_DIR}), or allow the download from {URL} (--download)")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, download_ok: bool = False,
                       verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of ``split`` ('train' or 'test')."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = find_fashion_mnist(root, split, download_ok)
    img_name, lbl_name = FILES[split]
    images = read_idx(_locate(directory, img_name), SHA256[img_name] if verify else None)
    labels = read_idx(_locate(directory, lbl_name), SHA256[lbl_name] if verify else None).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetNotFound(f"{directory}: images {images.shape} and labels {labels.shape} do not pair up")
    return images, labels


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> uint8 [N, 32, 32], 2 px of background on every side."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))


def to_model_range(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] -> float [N, H, W, 1] in [-1, 1] (channels last, the CompVis data convention)."""
    return torch.from_numpy(images_u8).float().div(127.5).sub(1.0)[..., None]


class FashionMNIST(Dataset):
    """``subset``: 'train' (first 55,000 training images), 'heldout' (last 5,000), 'train_all' (60,000), 'test'."""

    def __init__(self, subset: str = "train", root: str | None = None, download: bool = False, flip: bool = False,
                 captions: bool = False, caption_dropout: float = 0.0):
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.captions, self.caption_dropout = captions, caption_dropout
        split = "test" if subset == "test" else "train"
        images, labels = load_fashion_mnist(split, root, download)
        n_train = max(len(images) - HELDOUT, 0)
        sel = {"train": slice(0, n_train), "heldout": slice(n_train, None),
               "train_all": slice(None), "test": slice(None)}
        if subset not in sel:
            raise ValueError(f"subset must be one of {sorted(sel)}, got {subset!r}")
        self.images = to_model_range(pad_to_32(images[sel[subset]]))
        self.labels = torch.from_numpy(labels[sel[subset]])
        self.flip = flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        img = self.images[i]
        if self.flip and torch.rand(()) < 0.5:
            img = img.flip(1)  # horizontal: W is dim 1 in [H, W, C]
        item = {"image": img, "class_label": self.labels[i]}
        if self.captions:  # "txt": a templated caption, or "" (the unconditional prompt) with caption_dropout
            drop = self.caption_dropout > 0 and torch.rand(()) < self.caption_dropout
            template = CAPTION_TEMPLATES[int(torch.randint(len(CAPTION_TEMPLATES), ()))]
            item["txt"] = "" if drop else class_prompt(int(self.labels[i]), template)
        return item


class FashionDataModule:
    """Train/validation loaders for Lightning (duck-typed DataModule: ``train_dataloader``/``val_dataloader``)."""

    def __init__(self, batch_size: int = 128, num_workers: int = 0, root: str | None = None,
                 download: bool = False, flip: bool = True, val_subset: str = "heldout", val_size: int = 1000,
                 captions: bool = False, caption_dropout: float = 0.0):
        self.captions, self.caption_dropout = captions, caption_dropout
        self.batch_size, self.num_workers = batch_size, num_workers
        self.root, self.download, self.flip = root, download, flip
        self.val_subset, self.val_size = val_subset, val_size

    def train_dataloader(self):
        ds = FashionMNIST("train", self.root, self.download, flip=self.flip, captions=self.captions,
                          caption_dropout=self.caption_dropout)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                           num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        ds = FashionMNIST(self.val_subset, self.root, self.download, captions=self.captions)
        ds = torch.utils.data.Subset(ds, range(min(self.val_size, len(ds))))
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers)
