"""The CLIP byte-level BPE tokenizer of Stable Diffusion v1, offline (Radford et al. 2021, §2.4; Sennrich et al. 2016).

Reproduces what SD v1's ``FrozenCLIPEmbedder`` gets from ``transformers.CLIPTokenizer`` (the slow Python tokenizer
with ftfy installed), token for token:

    ftfy.fix_text → whitespace runs to one space, strip → lower() → CLIP regex → byte-level BPE
    [<|startoftext|>] + tokens[:max_length - 2] + [<|endoftext|>], padded to max_length with <|endoftext|> (49407)

The pad id matters: SD uses all 77 output vectors, and through the causal mask every position after the first EOS
sees the pad ids, so openai ``clip.tokenize``'s pad of 0 gives a different conditioning. Unlike openai's
``SimpleTokenizer`` there is no extra ``html.unescape``: ftfy unescapes entities only when the text holds no ``<``.

The vocabulary is built from ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP's merges file, MIT licence, vendored
beside this module: the same 1,356,917 bytes that ship in the open-clip-torch and clip-anytorch wheels, whose other
dependencies — torchvision — do not install with this torch). Its SHA-256 is checked before use. ``vocab_size``
below 49408 keeps the first ``vocab_size − 514`` merges (how the tiny test models truncate the vocabulary).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
from pathlib import Path

import torch

from ldm.util import ConfigError

BPE_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
FULL_VOCAB_SIZE = 49408  # 512 byte symbols + 48,894 merges + <|startoftext|> + <|endoftext|>
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Every byte to a printable unicode character (openai's table: printable latin-1 bytes map to themselves, the
    rest to code points from 256 on, in byte order)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_merges(path: str | os.PathLike, vocab_size: int) -> list[tuple[str, str]]:
    """The first ``vocab_size − 514`` merges of a CLIP BPE file (gzip or plain text; line 0 is a header), after
    checking the file is the CLIP vocabulary (SHA-256)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tokenizer vocabulary {path} does not exist; pass the CLIP file "
                          f"bpe_simple_vocab_16e6.txt.gz (it ships with this package: {BPE_FILE})")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        raise ConfigError(f"tokenizer vocabulary {path} has SHA-256 {digest[:16]}…, not the CLIP BPE file's "
                          f"{BPE_SHA256[:16]}…; use bpe_simple_vocab_16e6.txt.gz from open_clip/clip (or {BPE_FILE})")
    n_merges = vocab_size - 2 * 256 - 2
    if not 0 <= n_merges <= FULL_VOCAB_SIZE - 514:
        raise ConfigError(f"CLIP vocab_size {vocab_size} out of range: 514..{FULL_VOCAB_SIZE} (byte symbols + "
                          f"merges + the two special tokens)")
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:1 + n_merges]]


class CLIPTokenizer:
    """Prompts -> [B, max_length] int64 ids, as SD v1's tokenizer call (``truncation=True, padding="max_length"``)."""

    def __init__(self, vocab_size: int = FULL_VOCAB_SIZE, max_length: int = 77,
                 bpe_file: str | os.PathLike = BPE_FILE):
        import ftfy  # noqa: F401  (imported here so a model without a text encoder does not need it)
        import regex

        merges = read_merges(bpe_file, vocab_size)
        byte_symbols = list(bytes_to_unicode().values())
        vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.cache = {SOT: SOT, EOT: EOT}
        self.pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        self.vocab_size = len(vocab)
        self.max_length = max_length
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.pad_id = self.eot_id

    def bpe(self, token: str) -> str:
        """Byte-level BPE of one pre-token: repeatedly merge the lowest-ranked adjacent pair (``</w>`` marks the
        end of the word); pieces joined by spaces."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    @staticmethod
    def normalise(text: str) -> str:
        import ftfy

        return " ".join(ftfy.fix_text(text).split()).lower()

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without the special tokens."""
        ids = []
        for token in self.pattern.findall(self.normalise(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids if i not in (self.sot_id, self.eot_id))
        text = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = []
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
            ids = [self.sot_id] + self.encode(p)[:self.max_length - 2] + [self.eot_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), self.max_length)
