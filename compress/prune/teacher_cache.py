"""The unpruned model's outputs on the train subset, computed once.

The teacher never changes while pruning, and faster mode revisits a small
subset for many steps, so running it on every batch repeats the same work:
about a third of a faster-mode step on MiniLM-L6 (``search._teacher_cache``
decides when it is used). Each sample's outputs are kept trimmed to its own
length (right padding, as the batches assume) and padded back to a batch's
length; padded positions are masked out of every loss, so their values do
not matter.
"""

from __future__ import annotations

import torch
from torch import nn

from .objective import Outputs, forward, take_batch

CHUNK = 32  # samples per teacher forward while filling the cache


class TeacherCache:
    def __init__(self, out: list[torch.Tensor], hidden: list[list[torch.Tensor]], logits: bool, token_level: bool):
        self.out, self.hidden, self.logits, self.token_level = out, hidden, logits, token_level

    @classmethod
    def build(cls, teacher: nn.Module, data: dict[str, torch.Tensor], with_hidden: bool) -> "TeacherCache":
        n = int(next(iter(data.values())).shape[0])
        lengths = _lengths(data)
        out: list[torch.Tensor] = []
        hidden: list[list[torch.Tensor]] = []
        logits = token_level = False
        with torch.no_grad():
            for start in range(0, n, CHUNK):
                idx = torch.arange(start, min(n, start + CHUNK))
                res = forward(teacher, take_batch(data, idx))
                logits, token_level = res.logits, res.out.dim() == 3
                for row, i in enumerate(idx.tolist()):
                    keep = int(lengths[i])
                    out.append(res.out[row, :keep].clone() if token_level else res.out[row].clone())
                    hidden.append([h[row, :keep].clone() for h in res.hidden] if with_hidden else [])
        return cls(out, hidden, logits, token_level)

    def get(self, idx: torch.Tensor, length: int) -> Outputs:
        """The teacher's outputs for samples ``idx`` in a batch cut to ``length`` tokens."""
        rows = idx.tolist()
        out = torch.stack([_pad(self.out[i], length) for i in rows]) if self.token_level else torch.stack([self.out[i] for i in rows])
        layers = len(self.hidden[rows[0]]) if rows else 0
        hidden = tuple(torch.stack([_pad(self.hidden[i][layer], length) for i in rows]) for layer in range(layers))
        return Outputs(out, hidden, self.logits)


def estimated_bytes(teacher: nn.Module, data: dict[str, torch.Tensor], with_hidden: bool) -> int:
    """What the cache would hold, from one probe batch: floats per token and per sample, times the data."""
    lengths = _lengths(data)
    idx = torch.arange(min(2, len(lengths)))
    with torch.no_grad():
        res = forward(teacher, take_batch(data, idx))
    per_token = (res.out.shape[-1] if res.out.dim() == 3 else 0) + (sum(h.shape[-1] for h in res.hidden) if with_hidden else 0)
    per_sample = res.out.shape[-1] if res.out.dim() == 2 else 0
    return 4 * (per_token * int(lengths.sum()) + per_sample * len(lengths))


def _lengths(data: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = data.get("attention_mask")
    ids = data["input_ids"]
    if mask is None or mask.dim() != 2:
        return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)
    return mask.sum(1).clamp(min=1).long()


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[0] >= length:
        return x[:length]
    return torch.cat([x, x.new_zeros(length - x.shape[0], *x.shape[1:])])
