"""The ``event_log`` task: summarise a generated log by its three most frequent events.

A document is a log of events (``login``, ``error``, ``retry``, ...), each one
token, drawn from a random skewed mix; the answer is the three events that occur
most often, most frequent first. The counts of the top four events are at least
two apart, so the answer is never a tie. Long input, short output: the model has
to read the whole log to write the first word, which is the regime where an
encoder that reads the input once pays off.

Tokens: PAD 0, BOS 1, EOS 2, SEP 3 (end of the source), then one per event.
``synth:event_log:N`` gives ``input_ids`` / ``attention_mask`` (the source,
padded at the end to ``model.dims.seq``) and ``target_ids`` (the answer + EOS),
ready for ``train.seq2seq`` and ``distill.encdec``. The zoo models
``event_log_teacher`` and ``event_log_teacher_micro`` use this vocabulary.
"""

from __future__ import annotations

import numpy as np

from edgekit.artifact import TensorSpec
from edgekit.errors import UserError
from edgekit.models.datasets import SynthData, register_dataset
from edgekit.models.encdec import BOS, EOS, PAD, DecoderLM, LMConfig
from edgekit.models.registry import register_model

SEP = 3
EVENTS = (
    "login", "logout", "read", "write", "error", "retry", "timeout", "upload",
    "download", "alert", "backup", "restart", "sync", "query", "update", "delete",
)
FIRST_EVENT = 4
VOCAB_SIZE = FIRST_EVENT + len(EVENTS)
TOP = 3  # events in an answer
MARGIN = 2  # the top TOP + 1 counts differ by at least this much
MIN_SEQ = 16


def decode(ids) -> str:
    """Readable text of token ids, up to EOS (special tokens left out)."""
    words = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i >= FIRST_EVENT:
            words.append(EVENTS[i - FIRST_EVENT])
    return " ".join(words)


def make_pair(rng: np.random.Generator, length: tuple[int, int]) -> tuple[list[int], list[int]]:
    """One (source tokens, answer tokens) pair with a log of ``length`` events (inclusive range)."""
    while True:  # rejection: about a third of the draws have well separated top counts
        n = int(rng.integers(length[0], length[1] + 1))
        mix = rng.dirichlet(np.full(len(EVENTS), 0.7))
        log = rng.choice(len(EVENTS), size=n, p=mix)
        counts = np.bincount(log, minlength=len(EVENTS))
        order = np.argsort(-counts, kind="stable")
        top = counts[order[: TOP + 1]]
        if np.all(top[:-1] - top[1:] >= MARGIN):
            return [BOS, *(log + FIRST_EVENT).tolist(), SEP], [*(order[:TOP] + FIRST_EVENT).tolist(), EOS]


def pad_rows(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), width), PAD, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


@register_dataset("event_log")
def event_log(n: int, seed: int, inputs: list[TensorSpec], dims: dict[str, int]) -> SynthData:
    """Generated event logs; the answer is the three most frequent events, most frequent first (text to text)."""
    seq = int(dims.get("seq", 128))
    if seq < MIN_SEQ:
        raise UserError(f"synth:event_log needs model.dims.seq of at least {MIN_SEQ} tokens, got {seq}")
    rng = np.random.default_rng(seed)
    pairs = [make_pair(rng, (seq // 3, seq - 2)) for _ in range(n)]
    src, src_mask = pad_rows([s for s, _ in pairs], seq)
    tgt, _ = pad_rows([a for _, a in pairs], TOP + 1)
    return SynthData(arrays={"input_ids": src, "attention_mask": src_mask, "target_ids": tgt}, info={"vocab": VOCAB_SIZE, "task": "seq2seq"})


_INPUTS = [
    TensorSpec(name="input_ids", shape=["batch", "seq"], dtype="int64", low=FIRST_EVENT, high=VOCAB_SIZE),
    TensorSpec(name="attention_mask", shape=["batch", "seq"], dtype="int64", low=1, high=2),
]


def _teacher(dim: int, layers: int, heads: int, kv_heads: int, ffn: int) -> DecoderLM:
    return DecoderLM(LMConfig(vocab=VOCAB_SIZE, dim=dim, heads=heads, kv_heads=kv_heads, ffn=ffn, layers=layers))


@register_model(inputs=_INPUTS, task="seq2seq", dims={"batch": 1, "seq": 128})
def event_log_teacher() -> DecoderLM:
    """Decoder-only teacher for the event_log task: width 128, 6 layers, 4 heads / 2 KV heads, SwiGLU 384 (~1.2 M params)."""
    return _teacher(128, 6, 4, 2, 384)


@register_model(inputs=_INPUTS, task="seq2seq", dims={"batch": 1, "seq": 64})
def event_log_teacher_micro() -> DecoderLM:
    """Decoder-only event_log model for tests: width 64, 3 layers, 4 heads / 2 KV heads, SwiGLU 128."""
    return _teacher(64, 3, 4, 2, 128)
