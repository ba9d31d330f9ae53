"""Reading reference and sample batches (``.npz``, the OpenAI evaluator's layout; spec evaluator.md §3).

``arr_0`` holds the images: NHWC, RGB, integers on the 0..255 scale (``np.savez(path, uint8_images[, labels])``, as
the pipeline and guided-diffusion's samplers write them). A reference batch may also hold precomputed statistics
``mu/sigma`` (pool) and ``mu_s/sigma_s`` (spatial) and, in this project, ``feature_network`` (which network made
them). ``open_batch`` checks the headers and small arrays, then (``verify_pixels``) reads arr_0 once for integrity
and range, all before any feature is computed; ``ImageBatch.iter_images`` streams ``arr_0`` in row batches straight
from the zip member, so a 50k × 256² sample file (10 GB) is never held in memory. Every problem is a
``BatchError``: one line naming the file and the fix.
"""
from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from ldm.util import UserFacingError

IMAGE_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CHANNELS = 3               # RGB: what Inception's graph takes; the Fashion reference repeats gray to RGB too
MIN_IMAGES = 4             # k = 3 nearest neighbours plus the point itself (precision/recall radii)
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, RuntimeError)


class BatchError(UserFacingError):
    """A reference or sample batch that cannot be evaluated as it is."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@dataclass(frozen=True)
class ImageBatch:
    """A validated batch file: the header of ``arr_0`` and whatever small arrays came with it."""
    path: Path
    role: str                                   # "reference" or "sample" (for messages)
    shape: tuple[int, int, int, int]            # N, H, W, C of arr_0
    dtype: np.dtype
    stats: dict[str, np.ndarray] | None = None  # mu, sigma, mu_s, sigma_s when stored
    feature_network: str | None = None          # which network made the stored statistics (this project's batches)
    _member: str = field(default=IMAGE_KEY + ".npy", repr=False)

    @property
    def n(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def describe(self) -> str:
        return f"{self.role} batch {self.path}"

    def iter_images(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 [≤ batch_size, H, W, 3] chunks of arr_0 in file order (the order decides the IS splits)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for chunk in self._iter_raw(batch_size):
            # the range was checked in open_batch, so the cast is exact; float and bool arrays never get here
            yield chunk if chunk.dtype == np.uint8 else chunk.astype(np.uint8)

    def read_images(self) -> np.ndarray:
        """All of arr_0 as uint8 (small batches, tests)."""
        return np.concatenate(list(self.iter_images(max(self.n, 1))), axis=0)

    def _iter_raw(self, rows: int) -> Iterator[np.ndarray]:
        """arr_0 in chunks of ``rows`` images, in its stored dtype, read straight from the zip member."""
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self._member) as f:
                shape, fortran, dtype = _read_header(f)
                if tuple(shape) != self.shape or dtype != self.dtype:
                    raise ValueError("arr_0 changed since the file was opened")
                if fortran:  # rare (a Fortran-ordered array was saved): rows are not contiguous, load it whole
                    images = np.ascontiguousarray(np.lib.format.read_array(f, allow_pickle=False))
                    for i in range(0, self.n, rows):
                        yield images[i:i + rows]
                    return
                row_bytes = int(np.prod(self.shape[1:])) * dtype.itemsize
                for i in range(0, self.n, rows):
                    n = min(rows, self.n - i)
                    buf = f.read(n * row_bytes)
                    if len(buf) != n * row_bytes:
                        raise EOFError(f"arr_0 ends after {i + len(buf) // row_bytes} of {self.n} images")
                    # bytearray: a writable buffer (torch warns on read-only arrays)
                    yield np.frombuffer(bytearray(buf), dtype=dtype).reshape((n,) + self.shape[1:])
        except _READ_ERRORS as e:
            raise BatchError(f"{self.describe()} is corrupt: arr_0 could not be read ({_one_line(e)}); "
                             f"write the file again") from None


def _read_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    major, _ = np.lib.format.read_magic(f)
    if major == 1:
        return np.lib.format.read_array_header_1_0(f)
    if major == 2:
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {major}")


def _member_names(zf: zipfile.ZipFile) -> dict[str, str]:
    """npz key -> zip member name (np.savez appends .npy; np.load accepts either)."""
    return {name[:-4] if name.endswith(".npy") else name: name for name in zf.namelist()}


def _read_small(zf: zipfile.ZipFile, member: str) -> np.ndarray:
    with zf.open(member) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _check_images_header(where: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype.kind == "f":
        raise BatchError(f"{where}: arr_0 holds float images ({dtype}); the evaluator takes integer pixels on the "
                         f"0..255 scale (uint8), e.g. evaluation.images.to_uint8 of [-1, 1] model outputs")
    if dtype.kind not in "ui":
        raise BatchError(f"{where}: arr_0 has dtype {dtype}; save the images as uint8 on the 0..255 scale")
    if len(shape) != 4:
        raise BatchError(f"{where}: arr_0 has shape {tuple(shape)}; expected images [N, H, W, 3] (NHWC, RGB)")
    n, h, w, c = shape
    if c != CHANNELS:
        hint = (" (this looks like NCHW: transpose to NHWC with x.transpose(0, 2, 3, 1))" if shape[1] == CHANNELS
                else " (repeat a gray channel to RGB: np.repeat(x, 3, axis=3))" if c == 1 else "")
        raise BatchError(f"{where}: arr_0 has {c} channels, shape {tuple(shape)}; the feature networks take RGB "
                         f"images [N, H, W, 3]{hint}")
    if n < MIN_IMAGES:
        raise BatchError(f"{where}: arr_0 holds {n} images; at least {MIN_IMAGES} are needed (precision/recall "
                         f"use each point's 3rd nearest neighbour)")
    if h < 1 or w < 1:
        raise BatchError(f"{where}: arr_0 has empty images, shape {tuple(shape)}")


def _check_stats(where: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    present = [k for k in STAT_KEYS if k in arrays]
    if not present:
        return None
    missing = [k for k in STAT_KEYS if k not in arrays]
    if missing:
        # the reference switches to stored statistics on 'mu' and then needs all four (spec §3)
        raise BatchError(f"{where}: stored statistics are incomplete (has {present}, lacks {missing}); store all of "
                         f"{list(STAT_KEYS)} or none")
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        mu, sigma = arrays[mu_key], arrays[sigma_key]
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise BatchError(f"{where}: {mu_key} {mu.shape} / {sigma_key} {sigma.shape} are not a mean [D] and a "
                             f"covariance [D, D]")
        for key, a in ((mu_key, mu), (sigma_key, sigma)):
            if a.dtype.kind not in "fiu" or not np.isfinite(a).all():
                raise BatchError(f"{where}: {key} is not a finite numeric array (dtype {a.dtype})")
    return {k: arrays[k] for k in STAT_KEYS}


def verify_pixels(batch: ImageBatch) -> dict[str, int]:
    """One pass over arr_0 before any compute: every byte is read (the zip CRC is checked at the end of the
    member), so a damaged file fails here and not halfway through feature extraction; and non-uint8 integer
    images must already lie in 0..255 (the reference casts to float32 without rescaling, so 16-bit or signed
    pixels would silently give meaningless features). Returns the counts of degenerate images seen on the way:
    {"constant_images": one value everywhere, "black_images": all 0 (what NaN samples become), "n"}."""
    lo = hi = None
    constant = black = 0
    for chunk in batch._iter_raw(256):
        if chunk.dtype != np.uint8:
            lo = chunk.min() if lo is None else min(lo, chunk.min())
            hi = chunk.max() if hi is None else max(hi, chunk.max())
        flat = chunk.reshape(len(chunk), -1)
        lows, highs = flat.min(axis=1), flat.max(axis=1)
        constant += int(np.count_nonzero(lows == highs))
        black += int(np.count_nonzero(highs == 0))
    if lo is not None and (lo < 0 or hi > 255):
        raise BatchError(f"{batch.describe()}: arr_0 values span {lo}..{hi}, outside 0..255; the evaluator takes "
                         f"8-bit pixels (uint8), not rescaled or 16-bit data")
    return {"constant_images": constant, "black_images": black, "n": batch.n}


def degenerate_warning(batch: ImageBatch, counts: dict[str, int]) -> str | None:
    """One line when a batch holds constant images (a model that produced NaN or inf decodes to all-black ones)."""
    if not counts["constant_images"]:
        return None
    return (f"{counts['constant_images']} of {counts['n']} images of the {batch.describe()} are constant "
            f"({counts['black_images']} all black, what NaN or inf samples become): its metrics describe a broken "
            f"batch; check the sampler's settings and output")


def open_batch(path: str | Path, role: str, verify: bool = True) -> ImageBatch:
    """Open and validate a batch: a readable npz with ``arr_0`` uint8-like [N ≥ 4, H, W, 3] images, complete and
    well-shaped stored statistics if any. With ``verify`` the pixels are read once (integrity, 0..255 range),
    which costs seconds where the feature network costs minutes; without it only headers and small arrays are
    read (and a damaged arr_0 is reported when ``iter_images`` reaches it)."""
    path = Path(path)
    where = f"{role} batch {path}"
    if not path.is_file():
        raise BatchError(f"{where} not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with zipfile.ZipFile(path) as zf:
            members = _member_names(zf)
            if IMAGE_KEY not in members:
                raise BatchError(f"{where} has no '{IMAGE_KEY}' (keys: {sorted(members) or 'none'}); save the "
                                 f"images first, as np.savez(path, images_uint8_NHWC)")
            with zf.open(members[IMAGE_KEY]) as f:
                shape, _, dtype = _read_header(f)
            small = {k: _read_small(zf, members[k]) for k in (*STAT_KEYS, "feature_network") if k in members}
    except BatchError:
        raise
    except _READ_ERRORS as e:
        raise BatchError(f"{where} is not a readable .npz ({_one_line(e)}); write the file again with np.savez")\
            from None
    _check_images_header(where, tuple(shape), dtype)
    stats = _check_stats(where, small)
    network = small.get("feature_network")
    batch = ImageBatch(path, role, tuple(int(s) for s in shape), dtype, stats,
                       None if network is None else str(np.asarray(network).reshape(-1)[0]),
                       members[IMAGE_KEY])
    if verify or dtype != np.uint8:
        verify_pixels(batch)
    return batch


def check_pair(ref: ImageBatch, sample: ImageBatch) -> None:
    """Reference and samples must have the same image size: metrics across resolutions compare different
    things (the Inception graph would resize both silently), so a mismatch is nearly always a wrong file."""
    if ref.image_size != sample.image_size:
        (rh, rw), (sh, sw) = ref.image_size, sample.image_size
        raise BatchError(f"image sizes differ: reference {ref.path} has {rh}×{rw}, samples {sample.path} have "
                         f"{sh}×{sw}; evaluate samples against the reference batch of their resolution")
