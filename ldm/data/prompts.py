"""Prompt lists of text-to-image runs: one prompt per line (MS-COCO caption files as QNCD reads them, val_ann.txt),
and the fingerprint that artifacts and sample manifests record of a list (condition / label i is prompt i)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from ldm.util import UserFacingError


def load_prompts(path: str | Path) -> tuple[str, ...]:
    """One prompt per line; blank lines skipped, surrounding whitespace stripped. An unreadable or empty file stops
    with one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserFacingError(f"prompt file {path} does not exist; pass a text file with one prompt per line") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserFacingError(f"prompt file {path} is unreadable ({type(e).__name__}: "
                              f"{getattr(e, 'strerror', None) or e}); pass a UTF-8 text file, one prompt per line") \
            from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise UserFacingError(f"prompt file {path} holds no prompt; write one prompt per line")
    return prompts


def prompts_fingerprint(prompts: Sequence[str]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
