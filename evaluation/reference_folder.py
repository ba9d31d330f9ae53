"""A reference batch from a folder of images (e.g. MS-COCO val2014, brought by the user) for FID of text-to-image
samples (Heusel et al. 2017): evaluator.py takes the result as its REF argument.

    python -m evaluation.reference_folder DIR OUT.npz [--size 512] [--limit N]

Every ``.png`` / ``.jpg`` / ``.jpeg`` directly in DIR (not in subfolders), in sorted file-name order (so ``--limit N``
takes the same N files on every machine), converted to RGB (COCO holds some gray JPEGs), center-cropped to a square
and resized to ``--size`` with PIL's bicubic filter, is written as ``arr_0`` uint8 [N, size, size, 3]: the OpenAI
reference-batch layout (evaluation/npz_io.py). The evaluator requires the reference and the samples to have the same
image size, so pass the samples' size (512 for SD v1 at its native resolution). The npz is streamed image by image
into its zip member (a 30k × 512² batch is 24 GB) and renamed into place only when complete (ldm.fileio).
An empty or missing folder, or an image PIL cannot decode (named), stops with one line and exit status 2.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from evaluation.npz_io import IMAGE_KEY, MIN_IMAGES
from ldm.fileio import file_sha256, write_atomic
from ldm.util import ArgumentParser, UserFacingError, run_cli

SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(directory: str | Path, limit: int | None = None) -> list[Path]:
    """The image files directly in ``directory``, sorted by name; the first ``limit`` of them when given."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserFacingError(f"reference image folder {directory} does not exist"
                              + (" (it is a file)" if directory.exists() else "")
                              + "; pass the folder of reference images (e.g. MS-COCO val2014)")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        raise UserFacingError(f"reference image folder {directory} holds no {'/'.join(SUFFIXES)} image")
    return files[:limit] if limit is not None else files


def load_square(path: Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the image as RGB, its centered square resized with PIL's bicubic filter."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")     # decodes the whole file: a truncated one fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserFacingError(f"reference image {path} cannot be read ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:120]}); remove or replace it") from None
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=(left, top, left + s, top + s)), dtype=np.uint8)


def write_reference(files: list[Path], out: str | Path, size: int, progress: bool = False) -> Path:
    """Stream the images into ``out`` as np.savez would write ``arr_0`` (a stored .npy member), atomically."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(files), size, size, 3)}

    # a fixed member date: the same images give the same bytes (and SHA-256) on every run
    member = zipfile.ZipInfo(IMAGE_KEY + ".npy", date_time=(1980, 1, 1, 0, 0, 0))

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf, \
                zf.open(member, "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            # the bar only on a terminal, erased at the end: a bad image leaves just its one error line
            for path in tqdm(files, desc="reference images", unit="img", disable=None if progress else True,
                             leave=False, dynamic_ncols=True):
                f.write(load_square(path, size).tobytes())

    return write_atomic(out, write, keep_suffix=True)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("directory", help="folder of reference images (.png/.jpg/.jpeg, not searched recursively)")
    p.add_argument("out", help="reference batch .npz to write (arr_0 uint8 [N, size, size, 3])")
    p.add_argument("--size", type=int, default=512, help="side of the square images (use the samples' size)")
    p.add_argument("--limit", type=int, default=None, help="only the first N files in sorted name order")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.size < 1:
        raise UserFacingError(f"--size must be >= 1, got {args.size}")
    if args.limit is not None and args.limit < MIN_IMAGES:
        raise UserFacingError(f"--limit must be >= {MIN_IMAGES} (the evaluator needs {MIN_IMAGES} images), got "
                              f"{args.limit}")
    files = list_images(args.directory, args.limit)
    if len(files) < MIN_IMAGES:
        raise UserFacingError(f"reference image folder {args.directory} holds {len(files)} images; the evaluator "
                              f"needs at least {MIN_IMAGES}")
    out = write_reference(files, args.out, args.size, progress=True)
    print(f"wrote {out}: {len(files)} images {args.size}×{args.size} from {args.directory} "
          f"(sha256 {file_sha256(out)})")
    return out


if __name__ == "__main__":
    run_cli(main)
