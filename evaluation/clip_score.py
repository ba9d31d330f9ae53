"""CLIP score of generated images against their prompts (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation
Metric for Image Captioning"), with a local CLIP model (Radford et al. 2021; evaluation/clip_model.py).

features → statistics → metric:
    features     f_img(j) = CLIP image embedding of sample j, f_txt(j) = CLIP text embedding of its prompt
    per sample   s_j = 100 · max(cos(f_img(j), f_txt(j)), 0)
    statistics   mean over the samples, percentile-bootstrap 95 % interval (evaluation.fidelity.Bootstrap, seeded)

Convention: torchmetrics' ``CLIPScore`` (w = 100, the number text-to-image papers report). Hessel et al. 2021, Eq. 1
define CLIP-S = w · max(cos, 0) with w = 2.5: multiply by 0.025 for theirs. The record names the convention; values
also depend on the CLIP model (ViT-B/32 vs L/14), its preprocessing and the 77-token truncation of long prompts.

    python -m evaluation.clip_score SAMPLES.npz --prompts PROMPTS.txt --clip MODEL_PATH [--json OUT] [--batch_size 32]

The prompt of sample j is prompts[arr_1[j]] (step 7 labels text samples with their prompt's index in the run's
prompt file: one prompt per line, blank lines skipped, whitespace stripped). Bad input stops with one line (exit 2)
before the model is loaded.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from evaluation.clip_model import ACTIVATIONS, LoadedCLIP, load_clip
from evaluation.fidelity import Bootstrap
from evaluation.npz_io import open_batch
from ldm.data.prompts import load_prompts, prompts_fingerprint
from ldm.fileio import file_sha256, write_json_atomic
from ldm.util import ArgumentParser, UserFacingError, parse_device, run_cli

RECORD_FORMAT, RECORD_VERSION = "ldm-ptq-clip-score", 1
SCALE = 100.0
CONVENTION = {"name": "torchmetrics CLIPScore", "formula": "100 * max(cos(image_features, text_features), 0)",
              "reference": "Hessel et al. 2021, CLIPScore, Eq. 1 with w = 100 (the paper uses w = 2.5)"}


def scores_from_features(image_features: torch.Tensor | np.ndarray,
                         text_features: torch.Tensor | np.ndarray) -> np.ndarray:
    """float64 [N] 100 · max(cos, 0) of paired rows [N, D]."""
    a = torch.as_tensor(image_features).double()
    b = torch.as_tensor(text_features).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return (SCALE * cos.clamp(min=0)).cpu().numpy()


def text_features(clip: LoadedCLIP, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """[P, D] text embeddings, ``batch_size`` prompts per forward pass."""
    return torch.cat([clip.text_features(list(prompts[i:i + batch_size]))
                      for i in range(0, len(prompts), batch_size)])


def score_chunks(chunks: Iterable[np.ndarray], prompt_ids: np.ndarray, prompts: Sequence[str], clip: LoadedCLIP,
                 batch_size: int, progress: bool = False) -> np.ndarray:
    """Per-sample scores of uint8 [B, H, W, 3] image chunks (in order) whose sample j has prompt
    ``prompts[prompt_ids[j]]``; each prompt used is embedded once."""
    used, inverse = np.unique(prompt_ids, return_inverse=True)
    texts = text_features(clip, [prompts[i] for i in used], batch_size)
    out, j = [], 0
    # the bar only on a terminal (disable=None), and erased at the end: an error stays the one line on stderr
    with tqdm(total=len(prompt_ids), desc="CLIP image features", unit="img", disable=None if progress else True,
              leave=False, dynamic_ncols=True) as bar:
        for chunk in chunks:
            for k in range(0, len(chunk), batch_size):
                images = chunk[k:k + batch_size]
                t = texts[torch.as_tensor(inverse[j:j + len(images)], device=texts.device)]
                out.append(scores_from_features(clip.image_features(images), t))
                j += len(images)
                bar.update(len(images))
    if j != len(prompt_ids):
        raise ValueError(f"{j} images for {len(prompt_ids)} prompts")
    return np.concatenate(out) if out else np.zeros(0)


def clip_score(images: np.ndarray, prompts: Sequence[str], clip: LoadedCLIP, batch_size: int = 32) -> np.ndarray:
    """Per-sample CLIP scores of uint8 images [N, H, W, 3] against one prompt each (``prompts`` [N])."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    unique = list(dict.fromkeys(prompts))
    index = {p: i for i, p in enumerate(unique)}
    return score_chunks([np.asarray(images)], np.array([index[p] for p in prompts], dtype=np.int64), unique, clip,
                        batch_size)


def summarize(scores: np.ndarray, boot: Bootstrap) -> dict:
    """{"mean", "ci"}: the mean score and its percentile-bootstrap interval over samples."""
    return boot.mean(np.asarray(scores, dtype=np.float64))


def read_labels(path: Path, n: int, n_prompts: int, prompts_path: Path) -> np.ndarray:
    """arr_1 of the samples file as prompt indices, checked: one integer per sample, each in 0..P−1."""
    with np.load(path, allow_pickle=False) as f:
        if "arr_1" not in f.files:
            raise UserFacingError(f"samples {path} have no labels (arr_1); the prompt of sample j is "
                                  f"prompts[arr_1[j]]: use step 7's samples.npz of a text model")
        labels = np.asarray(f["arr_1"])
    if labels.ndim != 1 or len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
        raise UserFacingError(f"samples {path}: arr_1 holds {labels.dtype} {labels.shape} for {n} samples, not one "
                              f"integer prompt index each")
    bad = np.flatnonzero((labels < 0) | (labels >= n_prompts))
    if len(bad):
        j = int(bad[0])
        raise UserFacingError(f"samples {path}: label {int(labels[j])} of sample {j} (and {len(bad) - 1} more) is "
                              f"outside 0..{n_prompts - 1} for the {n_prompts} prompts of {prompts_path}; pass the "
                              f"prompt file the samples were made from")
    return labels.astype(np.int64)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("samples", help="samples .npz (arr_0 uint8 [N, H, W, 3], arr_1 prompt indices), e.g. step 7's")
    p.add_argument("--prompts", required=True, help="the run's prompt file, one prompt per line")
    p.add_argument("--clip", required=True, help="local CLIP checkpoint: a transformers CLIPModel folder "
                                                 "(config.json + weights) or an open_clip / OpenAI state-dict file")
    p.add_argument("--clip_config", default=None, help="config.json of a transformers state-dict file not beside it")
    p.add_argument("--clip_activation", default=None, choices=sorted(ACTIVATIONS),
                   help="MLP activation of an open_clip file (default quick_gelu, OpenAI's; gelu for LAION's)")
    p.add_argument("--clip_heads", type=int, nargs=2, default=None, metavar=("VISION", "TEXT"),
                   help="attention heads of an open_clip file (default: inferred, width // 64)")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow unsafe reading: a TorchScript archive (OpenAI's released ViT-*.pt, via torch.jit.load) "
                        "or a pickle weights_only loading refuses; only for files you trust")
    p.add_argument("--json", default=None, help="also write the record here (atomically)")
    p.add_argument("--batch_size", type=int, default=32, help="images (and prompts) per forward pass")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the interval")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


def check_manifest(samples: Path, prompts, prompts_path) -> None:
    """Step 7 records the prompt list its labels index (manifest.json beside samples.npz): another list would pair
    images with the wrong prompts, so it is refused. Samples without a manifest (made elsewhere) are taken as given."""
    manifest = Path(samples).with_name("manifest.json")
    if not manifest.is_file():
        return
    try:
        recorded = json.loads(manifest.read_text()).get("prompts")
    except (OSError, ValueError):
        return
    if recorded is not None and recorded != prompts_fingerprint(prompts):
        raise UserFacingError(f"{samples} was made from another prompt list than {prompts_path} (its manifest records "
                              f"{recorded[:19]}…); pass the prompt file of that run")


def _checked_inputs(args):
    """Every cheap refusal, before the model is loaded: flags, samples header and labels, prompts, CLIP path."""
    if args.batch_size < 1 or args.resamples < 1:
        raise UserFacingError(f"--batch_size and --resamples must be >= 1, got {args.batch_size}, {args.resamples}")
    if args.json is not None and Path(args.json).is_dir():
        raise UserFacingError(f"--json {args.json} is a directory; give a file name")
    batch = open_batch(args.samples, "sample", verify=False)
    prompts = load_prompts(args.prompts)
    check_manifest(batch.path, prompts, args.prompts)
    labels = read_labels(batch.path, batch.n, len(prompts), Path(args.prompts))
    if not Path(args.clip).exists():
        raise UserFacingError(f"CLIP model path {args.clip} does not exist; pass a local open_clip / transformers "
                              f"CLIP checkpoint (nothing is downloaded)")
    return batch, prompts, labels, parse_device(args.device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    batch, prompts, labels, device = _checked_inputs(args)
    clip = load_clip(args.clip, config=args.clip_config, activation=args.clip_activation,
                     heads=tuple(args.clip_heads) if args.clip_heads else None, trust=args.trust_checkpoint,
                     device=device)
    context = clip.model.text_config.max_position_embeddings
    truncated = sum(len(clip.tokenizer.encode(prompts[i])) > context - 2 for i in np.unique(labels))
    if truncated:
        print(f"note: {truncated} of the prompts used exceed the {context - 2} tokens CLIP reads and are truncated "
              f"(as torchmetrics and the CLIP tokenizers do)", file=sys.stderr)
    scores = score_chunks(batch.iter_images(args.batch_size), labels, prompts, clip, args.batch_size,
                          progress=True)
    boot = Bootstrap(resamples=args.resamples, seed=args.seed)
    summary = summarize(scores, boot)
    print(f"CLIP score: {summary['mean']}")
    print(f"CLIP score {boot.level:.0%} CI: {summary['ci'][0]} {summary['ci'][1]}")
    record = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "convention": CONVENTION,
              "metrics": {"clip_score": summary}, "n": int(batch.n),
              "samples": {"path": str(batch.path), "sha256": file_sha256(batch.path)},
              "prompts": {"path": str(args.prompts), "sha256": file_sha256(args.prompts), "count": len(prompts),
                          "used": int(len(np.unique(labels))), "truncated": int(truncated)},
              "clip_model": clip.record(),
              "bootstrap": {"resamples": boot.resamples, "seed": boot.seed, "level": boot.level,
                            "method": "percentile"},
              "per_sample": {"clip_score": [float(s) for s in scores]},
              "settings": {"batch_size": args.batch_size, "device": str(device), "image_size": clip.image_size,
                           "context_length": context},
              "environment": {"python": platform.python_version(), "numpy": np.__version__,
                              "torch": torch.__version__}}
    if args.json is not None:
        write_json_atomic(args.json, record)
        print(f"wrote {args.json}", file=sys.stderr)
    return record


if __name__ == "__main__":
    run_cli(main)
