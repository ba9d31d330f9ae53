"""Evaluation samples (pipeline step 7): the sampling plan, one shard file per batch, the merge into samples.npz.

The plan fixes everything that decides an image before anything runs, so the result depends neither on how many
processes make it nor on how often it was interrupted:

* labels are class-balanced and tied to the global sample index: sample i has class ``i mod C`` (N = k·C; the
  D²-DPM/PTQD scripts drew unseeded labels, the same ones on every rank, spec d2dpm.md §3.7);
* batch b holds samples [b·B, (b+1)·B) and has its own seeds, derived from the base seed and b alone (never from
  the rank): one for x_T and the DDIM noise, one for the correction's generator (S-D² draws from it);
* ranks take the unfinished batches round-robin; each finished batch is one shard file written atomically, so a
  rerun only makes the missing ones;
* rank 0 merges the shards in index order into the OpenAI evaluator's layout: ``arr_0`` uint8 [N, H, W, 3] (pixels
  converted once, by ``evaluation.images.to_uint8``; gray repeated to RGB) and ``arr_1`` int64 labels. The merge
  streams shard by shard into the zip member, so 50k × 256² images (10 GB) never sit in memory.

A ``manifest.json`` beside the shards records the settings that made them; a rerun with other settings stops (or,
asked to, discards the old shards) instead of mixing them.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ldm.fileio import remove_stale_temporaries, write_atomic, write_text_atomic
from ldm.util import UserFacingError

MANIFEST = "manifest.json"
SHARDS = "shards"
SAMPLES = "samples.npz"
MANIFEST_FORMAT = "eval-samples/1"
LABEL_RULE = "class = global index mod classes"
# the barrier after sampling waits for the slowest rank's last batch; generous, and torchrun ends the other ranks
# anyway when one fails
BARRIER_TIMEOUT = timedelta(hours=2)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)   # fixed member timestamps: the same samples give a byte-identical file


class GenerationError(UserFacingError):
    """Settings or files that would make an evaluation batch wrong (one line, with the fix)."""


# ---- the plan -----------------------------------------------------------------------------------------------------

def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """int64 [n]: sample i gets class i mod C, so every class has n / C samples and every run agrees."""
    check_balanced(n, num_classes)
    return np.arange(n, dtype=np.int64) % num_classes


def check_balanced(n: int, num_classes: int) -> None:
    """``GenerationError`` unless n samples split evenly over the classes (checked without building the labels)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if n < 1 or n % num_classes:
        lower, upper = (n // num_classes) * num_classes, (n // num_classes + 1) * num_classes
        hint = f"e.g. {lower} or {upper}" if lower else f"e.g. {upper}"
        raise GenerationError(f"{n} samples cannot be split evenly over {num_classes} classes; class-balanced "
                              f"labels need a multiple of {num_classes} ({hint})")


def batch_seeds(base_seed: int, index: int) -> tuple[int, int]:
    """Two independent 63-bit seeds for batch ``index``: (x_T and DDIM noise, correction). A function of the base
    seed and the batch index only (numpy SeedSequence), so any world size draws the same numbers."""
    words = np.random.SeedSequence([base_seed, index]).generate_state(2, dtype=np.uint64)
    return int(words[0] >> np.uint64(1)), int(words[1] >> np.uint64(1))


@dataclass(frozen=True)
class Batch:
    index: int
    indices: np.ndarray          # int64 global sample indices
    labels: np.ndarray | None    # int64 classes, None for an unconditional model
    seed: int                    # x_T and the DDIM noise
    correction_seed: int         # the correction's generator

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class Plan:
    """N samples in batches of ``batch_size`` by global index; ``num_classes`` None means unconditional.
    ``class_ids``: sample only these classes (sample i has class_ids[i mod K], K = len(class_ids) = num_classes),
    for quick runs of a many-class model; None means classes 0..C−1."""

    n: int
    batch_size: int
    seed: int
    num_classes: int | None = None
    class_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise GenerationError(f"the seed must be >= 0, got {self.seed}")
        if self.num_classes is None and self.n < 1:
            raise GenerationError(f"the number of samples must be >= 1, got {self.n}")
        if self.num_classes is not None:
            check_balanced(self.n, self.num_classes)  # (a plan costs memory independent of N: no label array)
        if self.class_ids is not None and len(self.class_ids) != self.num_classes:
            raise ValueError(f"class_ids holds {len(self.class_ids)} ids but num_classes is {self.num_classes}")

    def _classes(self, indices: np.ndarray) -> np.ndarray:
        k = indices % self.num_classes
        return k if self.class_ids is None else np.asarray(self.class_ids, dtype=np.int64)[k]

    @property
    def num_batches(self) -> int:
        return -(-self.n // self.batch_size)

    @property
    def labels(self) -> np.ndarray | None:
        return None if self.num_classes is None else self._classes(balanced_labels(self.n, self.num_classes))

    def batch(self, index: int) -> Batch:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} out of range 0..{self.num_batches - 1}")
        start, stop = index * self.batch_size, min((index + 1) * self.batch_size, self.n)
        indices = np.arange(start, stop, dtype=np.int64)
        labels = None if self.num_classes is None else self._classes(indices)
        return Batch(index, indices, labels, *batch_seeds(self.seed, index))


def assign(pending: list[int], rank: int, world: int) -> list[int]:
    """The unfinished batches rank ``rank`` of ``world`` makes: every world-th one, starting at its rank."""
    return list(pending[rank::world])


# ---- the sample directory: manifest and shards -------------------------------------------------------------------

def shard_path(directory: str | os.PathLike, index: int) -> Path:
    return Path(directory) / SHARDS / f"batch_{index:06d}.npz"


def _normalise(settings: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(settings, sort_keys=True))


def _first_difference(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}={json.dumps(old.get(key))}, but {key}={json.dumps(new.get(key))} is asked for"
    return "identical settings"


def prepare_dir(directory: str | os.PathLike, settings: dict[str, Any], *, force: bool = False) -> None:
    """Make ``directory`` hold shards of exactly ``settings``: check (or write) its manifest. Shards made with other
    settings are a ``GenerationError``, or are deleted with ``force``. Leftover temporary files are removed."""
    directory = Path(directory)
    shards = directory / SHARDS
    manifest = directory / MANIFEST
    want = {"format": MANIFEST_FORMAT, **_normalise(settings)}
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = {"format": "unreadable manifest"}
        if old != want:
            if not force:
                raise GenerationError(f"{directory} holds samples made with {_first_difference(old, want)}; rerun "
                                      f"with the same settings to resume, or add --force to discard them")
            _discard(directory)
    elif shards.is_dir() and any(shards.iterdir()):
        if not force:
            raise GenerationError(f"{shards} holds shards but {manifest} is missing, so their settings are "
                                  f"unknown; add --force to discard them")
        _discard(directory)
    shards.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(shards)   # an interrupted write; its batch is still pending
    if not manifest.exists():
        write_text_atomic(manifest, json.dumps(want, indent=1, sort_keys=True) + "\n")


def _discard(directory: Path) -> None:
    shutil.rmtree(directory / SHARDS, ignore_errors=True)
    for name in (MANIFEST, SAMPLES):
        (directory / name).unlink(missing_ok=True)


def _shard_complete(path: Path) -> bool:
    """Cheap check (the zip's directory, not the pixels): the merge reads and checks every shard in full."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {"images.npy", "labels.npy", "indices.npy"} <= set(zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def pending_batches(directory: str | os.PathLike, plan: Plan) -> list[int]:
    """Batch indices whose shard is missing or unreadable."""
    return [b for b in range(plan.num_batches) if not _shard_complete(shard_path(directory, b))]


def write_shard(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None,
                indices: np.ndarray) -> Path:
    """One finished batch: uint8 images [B, H, W, 3], int64 labels (-1 when unconditional), int64 global indices.
    Written to a temporary file and renamed, so a shard either exists whole or not at all."""
    path = Path(path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(indices):
        raise ValueError(f"shard images must be uint8 [{len(indices)}, H, W, 3], got {images.dtype} "
                         f"{tuple(images.shape)}")
    labels = np.full(len(indices), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, indices=np.asarray(indices, dtype=np.int64))
    return write_atomic(path, write)


def read_shard(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in ("images", "labels", "indices")}


# ---- the merge ----------------------------------------------------------------------------------------------------

def _checked_shard(directory: Path, plan: Plan, index: int, hw: tuple[int, int] | None) -> np.ndarray:
    path = shard_path(directory, index)
    batch = plan.batch(index)
    try:
        shard = read_shard(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise GenerationError(f"shard {path} cannot be read ({type(e).__name__}); delete it and rerun to make "
                              f"it again") from None
    images, want_labels = shard["images"], (np.full(len(batch), -1) if batch.labels is None else batch.labels)
    shape_ok = (images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] == len(batch)
                and images.shape[-1] == 3 and (hw is None or images.shape[1:3] == hw))
    if not shape_ok or not np.array_equal(shard["indices"], batch.indices) \
            or not np.array_equal(shard["labels"], want_labels):
        raise GenerationError(f"shard {path} does not hold batch {index} of this plan (indices, labels or image "
                              f"shape differ); delete it and rerun to make it again")
    return images


def _write_npy_member(zf: zipfile.ZipFile, key: str, shape: tuple[int, ...], dtype: np.dtype,
                      chunks: Iterable[np.ndarray]) -> None:
    """An ``np.savez``-compatible member ``key``.npy written chunk by chunk (C order, along axis 0)."""
    info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    written = 0
    with zf.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": tuple(shape)})
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            f.write(chunk.tobytes())
            written += len(chunk)
    if written != shape[0]:
        raise ValueError(f"{key}: wrote {written} rows, the header says {shape[0]}")


def merge_shards(directory: str | os.PathLike, plan: Plan, out: str | os.PathLike | None = None) -> Path:
    """All shards, in global-index order, into ``out`` (default directory/samples.npz), atomically:
    ``arr_0`` uint8 [N, H, W, 3], and ``arr_1`` int64 labels for a class-conditional plan."""
    directory = Path(directory)
    out = Path(out) if out is not None else directory / SAMPLES
    missing = pending_batches(directory, plan)
    if missing:
        raise GenerationError(f"{len(missing)} of {plan.num_batches} shards are missing in {directory / SHARDS} "
                              f"(first: batch {missing[0]}); rerun to make them before merging")
    first = _checked_shard(directory, plan, 0, None)
    hw = first.shape[1:3]
    chunks = (first if b == 0 else _checked_shard(directory, plan, b, hw) for b in range(plan.num_batches))
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npy_member(zf, "arr_0", (plan.n, *hw, 3), np.dtype(np.uint8), chunks)
            if plan.labels is not None:
                _write_npy_member(zf, "arr_1", (plan.n,), np.dtype(np.int64), [plan.labels])
    return write_atomic(out, write)


# ---- torch.distributed --------------------------------------------------------------------------------------------

def env_rank() -> int:
    """This process's rank under torchrun (0 for a plain process)."""
    return int(os.environ.get("RANK", "0"))


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun each rank takes its own GPU (cuda:LOCAL_RANK, made the current device before anything is
    loaded); CPU stays CPU. A launcher that shows each rank fewer GPUs than ranks per node gets one line."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        local, visible = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= visible:
            raise GenerationError(f"rank with LOCAL_RANK {local} sees only {visible} GPU(s); start one process per "
                                  f"visible GPU (torchrun --nproc_per_node {visible}) or make every GPU visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return device


class PeerFailed(Exception):
    """Rank 0 stopped with an error it reports itself; the other ranks just exit."""


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and hand its result to every rank. A UserFacingError there stops the others too
        (``PeerFailed``), so no rank waits for a partner that has left."""
        if not self.active:
            return fn()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except UserFacingError:
                torch.distributed.broadcast_object_list([("error", None)], src=0)
                raise
        torch.distributed.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status != "ok":
            raise PeerFailed
        return value

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1; else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # device_id binds NCCL to this rank's GPU (barriers and broadcasts then need no guess)
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                         timeout=BARRIER_TIMEOUT,
                                         **({"device_id": device} if device.type == "cuda" else {}))
    return DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size())


__all__ = ["GenerationError", "balanced_labels", "batch_seeds", "Batch", "Plan", "assign",
           "shard_path", "prepare_dir", "pending_batches", "write_shard", "read_shard", "merge_shards",
           "env_rank", "rank_device", "PeerFailed", "DistContext", "init_distributed",
           "MANIFEST", "SHARDS", "SAMPLES"]
