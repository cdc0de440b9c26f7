"""Bytes as tokens: the vocabulary of ``tiny_lm`` models (256 ids, no tokenizer files).

Kept free of torch so the data loaders can use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import UserError

VOCAB = 256


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as uint8 token ids."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(ids) -> str:
    """Token ids back to text (invalid UTF-8 sequences become U+FFFD)."""
    return bytes(int(i) for i in np.asarray(ids).reshape(-1)).decode("utf-8", errors="replace")


def read_tokens(path: str | Path) -> np.ndarray:
    """A file's bytes as uint8 token ids."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist; fix the path")
    return np.fromfile(path, dtype=np.uint8)


def windows(tokens: np.ndarray, seq: int, stride: int | None = None) -> np.ndarray:
    """Consecutive windows of ``seq`` tokens, ``(N, seq)`` int64; windows start every
    ``stride`` tokens (default ``seq``: non-overlapping) and a short tail is dropped."""
    tokens = np.asarray(tokens).reshape(-1)
    stride = seq if stride is None else stride
    if seq < 1 or stride < 1:
        raise UserError(f"byte windows need seq >= 1 and stride >= 1, got {seq} and {stride}")
    if len(tokens) < seq:
        raise UserError(f"the text has {len(tokens)} bytes, fewer than one window of {seq}; use a longer text or a shorter seq")
    starts = np.arange(0, len(tokens) - seq + 1, stride)
    return np.stack([tokens[s : s + seq] for s in starts]).astype(np.int64)


def text_windows(path: str | Path, seq: int, stride: int | None = None) -> np.ndarray:
    """:func:`windows` of a text file's bytes."""
    return windows(read_tokens(path), seq, stride)
