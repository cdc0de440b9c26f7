"""The size budget: parameters or FLOPs of the transformer layers, measured on a
hard shape or estimated from soft masks, and the greedy snap that makes a hard
mask meet the budget exactly or just under."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .structure import layer_flops, layer_params


@dataclass
class Budget:
    kind: str  # "params" or "flops"
    target: float  # absolute, in the unit of ``kind``
    full: float  # the unpruned model's size in that unit
    head_dim: int
    seq: int

    def measure(self, shape: dict[str, Any]) -> float:
        """Size of a hard shape (sublayers with nothing kept cost nothing)."""
        h = shape["hidden"]
        return float(sum(self._layer(L["heads"], L["ffn"], h, L["heads"] > 0, L["ffn"] > 0) for L in shape["layers"]))

    def soft(self, hidden, heads: list, ffn: list) -> torch.Tensor:
        """Expected size under soft keep probabilities (differentiable)."""
        return sum(self._layer(hh, ff, hidden) for hh, ff in zip(heads, ffn))

    def _layer(self, heads, ffn, hidden, attn_alive=True, ffn_alive=True):
        if self.kind == "flops":
            return layer_flops(heads, ffn, hidden, self.head_dim, self.seq, attn_alive, ffn_alive)
        return layer_params(heads, ffn, hidden, self.head_dim, attn_alive, ffn_alive)


def resolve_target(value: float, full: float) -> float:
    """A fraction (<= 1) of the full size, or an absolute size."""
    return value * full if value <= 1 else float(value)


def snap(shape_of, keep: dict[tuple[str, int], torch.Tensor], priority: dict[tuple[str, int], torch.Tensor], budget: Budget) -> dict[tuple[str, int], torch.Tensor]:
    """Make ``keep`` meet the budget exactly or just under.

    ``keep`` maps (kind, layer) to a boolean vector (kind: hidden, heads, ffn);
    ``priority`` gives each unit's pruning priority (higher goes first; for VIB
    masks the log-ratio log(sigma^2) - log(mu^2)). Units are dropped in priority
    order while the size is over the budget, then pruned units are added back in
    reverse order wherever they still fit.
    """
    keep = {k: v.clone() for k, v in keep.items()}
    units = [(float(priority[k][j]), k, j) for k in keep for j in range(len(keep[k]))]
    units.sort(key=lambda u: -u[0])
    size = budget.measure(shape_of(keep))
    if size > budget.target:
        for _, k, j in units:
            if size <= budget.target:
                break
            if keep[k][j]:
                keep[k][j] = False
                size = budget.measure(shape_of(keep))
    for _, k, j in reversed(units):
        if not keep[k][j]:
            keep[k][j] = True
            new = budget.measure(shape_of(keep))
            if new <= budget.target:
                size = new
            else:
                keep[k][j] = False
    return keep
