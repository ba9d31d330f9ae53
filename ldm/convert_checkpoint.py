"""Convert a CompVis/Lightning checkpoint into a weights-only file that loads without unpickling code.

    python -m ldm.convert_checkpoint --trust_checkpoint models/ldm/cin256-v2/model.ckpt model.safe.ckpt

Only ``state_dict`` (and ``global_step``, if present) are kept. Run it once, on a file from a source you trust;
every later load of the output uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import sys

from ldm.util import UserFacingError, load_checkpoint_file, save_atomic, state_dict_from_checkpoint


def convert(src: str, dst: str, trust: bool) -> int:
    raw = load_checkpoint_file(src, trust=trust)
    sd = state_dict_from_checkpoint(raw, src)
    out = {"state_dict": {k: v.detach().clone() for k, v in sd.items()}}
    if isinstance(raw.get("global_step"), int):
        out["global_step"] = raw["global_step"]
    save_atomic(out, dst)
    return len(sd)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow full unpickling of SRC (needed when it holds Python objects besides tensors)")
    args = p.parse_args(argv)
    try:
        n = convert(args.src, args.dst, args.trust_checkpoint)
    except UserFacingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.dst}: {n} tensors, loadable with weights_only=True")


if __name__ == "__main__":
    main()
