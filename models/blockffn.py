"""BlockFFN: a mixture-of-experts FFN whose experts are blocks of neurons
(after "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts
with Chunk-Level Activation Sparsity", 2025).

Router: ``logits = router(x)``, ``s = relu(logits)``, ``scores = RMSNorm_E(s)``
(normalised over the E experts, no top-k, differentiable). Expert ``e`` is
active for a token when its score is non-zero; a token whose ``s`` is all zero
has no active expert and its FFN output is ``out_bias`` alone.

Experts are stored "row per neuron", ``up`` and ``down`` both ``(E, B, d)``,
so one expert's weights are contiguous: the sparse kernels in
``edgekit.runtimes.blockffn`` read only the active blocks. :meth:`BlockFFN.forward`
is the dense formulation (every expert computed, scaled by its score): exact,
differentiable, and it exports to ONNX as plain MatMuls.

Metrics: :func:`token_sparsity` (TLS) and :func:`chunk_sparsity` (CLS_L);
:func:`record_routing` collects every layer's routing during a forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.errors import UserError

ACTIVATIONS = ("relu", "silu", "gelu")


def activation_fn(name: str):
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu  # the exact erf form, like the kernels' reference
    raise UserError(f"unknown FFN activation {name!r}; use one of {', '.join(ACTIVATIONS)}")


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DenseFFN(nn.Module):
    """``fc2(act(fc1(x)))``: the dense FFN that ``moe.blockffn`` converts."""

    def __init__(self, dim: int, hidden: int, activation: str = "relu", bias: bool = True):
        super().__init__()
        activation_fn(activation)
        self.dim, self.hidden, self.activation = dim, hidden, activation
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation_fn(self.activation)(self.fc1(x)))


@dataclass
class Routing:
    """One BlockFFN call: router logits and scores, both ``(..., E)``."""

    logits: torch.Tensor
    scores: torch.Tensor

    @property
    def s(self) -> torch.Tensor:
        """The ReLU'd logits (before the RMSNorm): the objectives' routing mass."""
        return F.relu(self.logits)


class BlockFFN(nn.Module):
    """E experts of B neurons each, routed by ReLU + RMSNorm (see the module docstring)."""

    def __init__(self, dim: int, num_experts: int, expert_size: int, activation: str = "silu", bias: bool = True, eps: float = 1e-6):
        super().__init__()
        activation_fn(activation)
        if dim < 1 or num_experts < 1 or expert_size < 1:
            raise UserError(f"BlockFFN needs dim, num_experts and expert_size >= 1, got {dim}, {num_experts}, {expert_size}")
        self.dim, self.num_experts, self.expert_size, self.activation = dim, num_experts, expert_size, activation
        self.router = nn.Linear(dim, num_experts, bias=True)
        self.router_norm = RMSNorm(num_experts, eps)
        self.up = nn.Parameter(torch.empty(num_experts, expert_size, dim))
        self.down = nn.Parameter(torch.empty(num_experts, expert_size, dim))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, expert_size)) if bias else None
        self.out_bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self._records: list[Routing] | None = None  # set by record_routing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        hidden = self.num_experts * self.expert_size
        # like two nn.Linear layers of a dense FFN of the same width
        nn.init.uniform_(self.up, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.down, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))
        for b in (self.up_bias, self.out_bias):
            if b is not None:
                nn.init.zeros_(b)

    @property
    def eps(self) -> float:
        return self.router_norm.eps

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, scores)`` for ``x (..., d)``, both ``(..., E)``."""
        logits = self.router(x)
        return logits, self.router_norm(F.relu(logits))

    def experts(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``sum_e scores[e] * down[e].T @ act(up[e] @ x + up_bias[e]) + out_bias``, every expert computed."""
        E, B, d = self.up.shape
        h = x @ self.up.reshape(E * B, d).t()
        if self.up_bias is not None:
            h = h + self.up_bias.reshape(E * B)
        h = activation_fn(self.activation)(h)
        h = (h.unflatten(-1, (E, B)) * scores.unsqueeze(-1)).flatten(-2)
        y = h @ self.down.reshape(E * B, d)
        return y + self.out_bias if self.out_bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, scores = self.route(x)
        if self._records is not None:
            self._records.append(Routing(logits, scores))
        return self.experts(x, scores)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, experts={self.num_experts}x{self.expert_size}, activation={self.activation}"


# -- routing records -----------------------------------------------------------------

@contextmanager
def record_routing(model: nn.Module, detach: bool = False) -> Iterator[dict[str, list[Routing]]]:
    """Collect each BlockFFN layer's routing while the block runs.

    Yields ``{layer name: [Routing per call]}`` in module order; the lists fill
    as the model runs. ``detach=True`` keeps no autograd graph (for metrics);
    the default keeps it, so the training objectives can backpropagate.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BlockFFN)}
    records: dict[str, list[Routing]] = {name: [] for name in layers}
    previous = {name: m._records for name, m in layers.items()}
    for name, m in layers.items():
        m._records = _DetachingList(records[name]) if detach else records[name]
    try:
        yield records
    finally:
        for name, m in layers.items():
            m._records = previous[name]


class _DetachingList(list):
    """Appends go to ``target`` with the tensors detached."""

    def __init__(self, target: list):
        super().__init__()
        self.target = target

    def append(self, r: Routing) -> None:
        self.target.append(Routing(r.logits.detach(), r.scores.detach()))


def blockffn_layers(model: nn.Module) -> dict[str, BlockFFN]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BlockFFN)}


# -- sparsity metrics -----------------------------------------------------------------

def _active(scores: torch.Tensor) -> torch.Tensor:
    return scores.detach() != 0


def token_sparsity(scores: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """TLS: the share of (token, expert) pairs that are inactive.

    ``scores (..., E)``; ``mask (...)`` (True = a real token) leaves padding out.
    Returns NaN when there is no token.
    """
    active = _active(scores)
    if mask is not None:
        active = active[mask.to(torch.bool)]
    if active.numel() == 0:
        return float("nan")
    return 1.0 - active.float().mean().item()


def chunk_counts(scores: torch.Tensor, chunk: int = 8, mask: torch.Tensor | None = None) -> tuple[int, int]:
    """(inactive (chunk, expert) pairs, all pairs) for :func:`chunk_sparsity`."""
    if chunk < 1:
        raise UserError(f"the chunk length must be >= 1, got {chunk}")
    if scores.ndim == 2:
        scores = scores.unsqueeze(0)
    if scores.ndim != 3:
        raise ValueError(f"chunk sparsity needs scores of shape (batch, T, E), got {list(scores.shape)}")
    active = _active(scores)
    n, T, E = active.shape
    if mask is None:
        usable = T - T % chunk
        per_chunk = active[:, :usable].reshape(n, usable // chunk, chunk, E).any(2)
        return int((~per_chunk).sum()), per_chunk.numel()
    # a sequence's real tokens, in order, are chunked; its short tail is dropped
    mask = mask.to(torch.bool).reshape(n, T)
    inactive = total = 0
    for i in range(n):
        a = active[i][mask[i]]
        usable = a.shape[0] - a.shape[0] % chunk
        if usable == 0:
            continue
        per_chunk = a[:usable].reshape(usable // chunk, chunk, E).any(1)
        inactive += int((~per_chunk).sum())
        total += per_chunk.numel()
    return inactive, total


def chunk_sparsity(scores: torch.Tensor, chunk: int = 8, mask: torch.Tensor | None = None) -> float:
    """CLS_L: the share of (chunk, expert) pairs where the expert is inactive for every token of the chunk.

    ``scores (batch, T, E)`` (or ``(T, E)``, one sequence): each sequence is cut
    into consecutive chunks of ``chunk`` tokens and its short tail is dropped.
    With ``mask (batch, T)`` only a sequence's real tokens are chunked (in order).
    Returns NaN when no sequence holds a whole chunk.
    """
    inactive, total = chunk_counts(scores, chunk, mask)
    return inactive / total if total else float("nan")
