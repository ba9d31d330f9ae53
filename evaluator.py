"""Evaluate a sample batch against a reference batch: Inception Score, FID, sFID, precision and recall.

    python evaluator.py models/eval/fashion_test_reference.npz samples.npz --json result.json
    python evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz --inception_graph classify_image_graph_def.pb

The metrics and printed lines of guided-diffusion's evaluations/evaluator.py (spec evaluator.md): the five
"<Metric>: <value>" lines on stdout, progress on stderr. Features come from the network the reference batch names
(--features auto: the embedded Fashion classifier for the Fashion reference, else the OpenAI Inception graph, which
needs TensorFlow). With --json, a record of the metrics, sample count, both files' SHA-256 and the feature network
is written atomically. Bad input stops with one line on stderr and exit status 2, before any feature is computed.
The work is ``evaluation.evaluate.evaluate`` (the demo calls it too); this script parses the flags.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from evaluation.evaluate import evaluate
from evaluation.features import INCEPTION_GRAPH
from ldm.fileio import check_output_file
from ldm.util import UserFacingError
from pipeline.cli import ArgumentParser, ensure_writable_dir, pick_device, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ref_batch", help="reference batch .npz (arr_0 uint8 NHWC; optional mu/sigma/mu_s/sigma_s)")
    p.add_argument("sample_batch", help="sample batch .npz (arr_0 uint8 NHWC, e.g. from the pipeline's step 7)")
    p.add_argument("--json", default=None, help="also write the result record here (atomically)")
    p.add_argument("--features", default="auto", choices=("auto", "fashion", "inception"),
                   help="feature network; auto = the one the reference batch names, else inception")
    p.add_argument("--inception_graph", default=INCEPTION_GRAPH,
                   help="path of the OpenAI Inception GraphDef (classify_image_graph_def.pb) for --features inception")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per forward pass (default: 500 for fashion, 64 for inception; no effect on results)")
    p.add_argument("--cache_dir", default=None,
                   help="keep the reference batch's activations here (keyed by the file's and the network's SHA-256) "
                        "and reuse them: evaluating many sample batches against one reference computes it once")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present), cpu, cuda, cuda:1, ...; for inception, cpu hides the GPUs from "
                        "TensorFlow and anything else lets TF place the graph")
    return p.parse_args(argv)


def _check_json_target(path: str | None, inputs: tuple[str, ...]) -> Path | None:
    """--json before any feature is computed: a file name in a writable folder, and never one of the batches read."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise UserFacingError(f"--json {out} is a directory; give a file name")
    ensure_writable_dir(out.parent if str(out.parent) else Path("."), flag="--json path")
    return check_output_file(out, inputs, "--json")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserFacingError(f"--batch_size must be >= 1, got {args.batch_size}")
    json_path = _check_json_target(args.json, (args.ref_batch, args.sample_batch))
    return evaluate(args.ref_batch, args.sample_batch, json_path, args.features, args.inception_graph,
                    args.batch_size, None if args.cache_dir is None else Path(args.cache_dir), args.device,
                    pick_device)


if __name__ == "__main__":
    run_cli(main)
