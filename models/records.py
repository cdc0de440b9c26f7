"""The ``records`` task: read a field out of a generated document (long input, short output).

A document is a list of ``key: value;`` fields in random order, followed by a
question naming one key; the answer is that field's value. Values are random
letters and digits, so the model has to find the key and copy what follows it,
which no unigram statistics can fake. Tokens are characters (:data:`VOCAB`), with
PAD 0, BOS 1, EOS 2 and SEP 3 (end of the source). The zoo models ``records_teacher``
(decoder-only) and ``records_teacher_micro`` use this vocabulary.

``synth:records:N`` gives ``input_ids`` / ``attention_mask`` (the source, padded at
the end) and ``target_ids`` (the answer + EOS, padded), ready for ``train.seq2seq``
and ``distill.encdec``.
"""

from __future__ import annotations

import numpy as np

from edgekit.artifact import TensorSpec
from edgekit.errors import UserError
from edgekit.models.datasets import SynthData, register_dataset
from edgekit.models.encdec import BOS, EOS, PAD, DecoderLM, LMConfig
from edgekit.models.registry import register_model

SEP = 3
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 :;?-_."
VOCAB_SIZE = 4 + len(CHARS)
_INDEX = {c: i + 4 for i, c in enumerate(CHARS)}
KEYS = (
    "name", "city", "color", "code", "model", "owner", "port", "room", "team", "tag",
    "zone", "batch", "shelf", "plan", "route", "grade",
)
_VALUE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
_FIELD_CHARS = max(map(len, KEYS)) + 2 + 6 + 2  # "key: value; " at the longest value
_QUESTION_CHARS = 2 + 3 + max(map(len, KEYS))  # BOS, SEP, " ? key"


def encode(text: str) -> list[int]:
    return [_INDEX[c] for c in text]


def decode(ids) -> str:
    out = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i >= 4:
            out.append(CHARS[i - 4])
    return "".join(out)


def make_pair(rng: np.random.Generator, fields: tuple[int, int] = (6, 12), value_len: tuple[int, int] = (3, 6)) -> tuple[str, str]:
    """One (source text, answer) pair."""
    n = int(rng.integers(fields[0], fields[1] + 1))
    keys = rng.choice(len(KEYS), size=n, replace=False)
    values = ["".join(rng.choice(list(_VALUE_CHARS), size=int(rng.integers(value_len[0], value_len[1] + 1)))) for _ in keys]
    doc = " ".join(f"{KEYS[k]}: {v};" for k, v in zip(keys, values))
    q = int(rng.integers(n))
    return f"{doc} ? {KEYS[keys[q]]}", values[q]


def source_ids(text: str) -> list[int]:
    return [BOS, *encode(text), SEP]


def pad_rows(rows: list[list[int]], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    width = width or max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


@register_dataset("records")
def records(n: int, seed: int, inputs: list[TensorSpec], dims: dict[str, int]) -> SynthData:
    """Generated documents of key: value fields and a question; the answer is one field's value (text to text)."""
    seq = int(dims.get("seq", 128))
    most = (seq - _QUESTION_CHARS) // _FIELD_CHARS  # fields that surely fit in seq tokens
    if most < 2:
        raise UserError(f"synth:records needs model.dims.seq of at least {_QUESTION_CHARS + 2 * _FIELD_CHARS} tokens, got {seq}")
    rng = np.random.default_rng(seed)
    pairs = [make_pair(rng, fields=(max(2, most // 2), most)) for _ in range(n)]
    src, src_mask = pad_rows([source_ids(s) for s, _ in pairs], seq)
    tgt, _ = pad_rows([[*encode(a), EOS] for _, a in pairs])
    return SynthData(
        arrays={"input_ids": src, "attention_mask": src_mask, "target_ids": tgt},
        info={"vocab": VOCAB_SIZE, "task": "seq2seq"},
    )


_INPUTS = [
    TensorSpec(name="input_ids", shape=["batch", "seq"], dtype="int64", low=4, high=VOCAB_SIZE),
    TensorSpec(name="attention_mask", shape=["batch", "seq"], dtype="int64", low=1, high=2),
]


def _teacher(dim: int, layers: int, heads: int, kv_heads: int, ffn: int) -> DecoderLM:
    return DecoderLM(LMConfig(vocab=VOCAB_SIZE, dim=dim, heads=heads, kv_heads=kv_heads, ffn=ffn, layers=layers))


@register_model(inputs=_INPUTS, task="seq2seq", dims={"batch": 1, "seq": 128})
def records_teacher() -> DecoderLM:
    """Decoder-only teacher for the records task: width 128, 6 layers, 4 heads / 2 KV heads, SwiGLU 384 (~1.2 M params)."""
    return _teacher(128, 6, 4, 2, 384)


@register_model(inputs=_INPUTS, task="seq2seq", dims={"batch": 1, "seq": 64})
def records_teacher_micro() -> DecoderLM:
    """Decoder-only records model for tests: width 64, 3 layers, 4 heads / 2 KV heads, SwiGLU 128."""
    return _teacher(64, 3, 4, 2, 128)
