"""The CLS-aware training objectives of BlockFFN (arXiv 2507.08771, section 3.2).

Both read a layer's routing over sequences, ``(batch, T, E)``:

- :func:`activation_locality` (AL): binary cross-entropy between a token's
  sharpened router logits ``alpha * logits[t-1]`` and the soft on/off pattern
  of its successor ``sigmoid(alpha * logits[t])``, so neighbouring tokens of a
  sequence switch the same experts on and off (what chunk sparsity needs).
- :func:`chunk_sparsification` (CS): with ``p[t, e] = s[t, e] / (sum_e s[t, e] + 1e-5)``
  (a token's share of routing mass), ``1 - mean_{chunk, e} prod_{t in chunk} (1 - p[t, e])``:
  the probability that an expert fires somewhere in a chunk, averaged.

``routing_losses`` averages both over the recorded layers, so the weights
``lambda_al`` / ``lambda_cs`` do not scale with depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgekit.errors import UserError


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 2:
        return x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"routing tensors must be (batch, T, E) or (T, E), got {list(x.shape)}")
    return x


def activation_locality(logits: torch.Tensor, alpha: float = 100.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over neighbouring token pairs (t-1, t) of one sequence and experts of
    ``BCE_with_logits(alpha * logits[t-1], sigmoid(alpha * logits[t]))``.

    ``mask (batch, T)`` (True = a real token) keeps only pairs of two real tokens.
    The target is not detached (as in the reference implementation): both
    neighbours move toward each other. Zero when no pair exists.
    """
    logits = _as_batch(logits)
    if logits.shape[1] < 2:
        return logits.sum() * 0.0
    prev, nxt = alpha * logits[:, :-1], alpha * logits[:, 1:]
    loss = F.binary_cross_entropy_with_logits(prev, torch.sigmoid(nxt), reduction="none")  # (batch, T-1, E)
    if mask is None:
        return loss.mean()
    m = mask.to(torch.bool).reshape(logits.shape[:2])
    pair = (m[:, :-1] & m[:, 1:]).unsqueeze(-1).to(loss.dtype)
    n = pair.sum() * loss.shape[-1]
    return (loss * pair).sum() / n if n > 0 else loss.sum() * 0.0


def routing_share(s: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``p = s / (sum_e s + eps)``: each expert's share of a token's (non-negative) routing mass."""
    return s / (s.sum(-1, keepdim=True) + eps)


def chunk_sparsification(s: torch.Tensor, chunk: int = 8, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - mean_{chunk, e} prod_{t in chunk} (1 - p[t, e])`` for the ReLU'd router outputs ``s (batch, T, E)``.

    Each sequence is cut into consecutive chunks of ``chunk`` tokens (a short
    tail is dropped); a masked token (``mask`` False) counts as firing nothing.
    Zero when no whole chunk exists.
    """
    if chunk < 1:
        raise UserError(f"the chunk length must be >= 1, got {chunk}")
    s = _as_batch(s)
    n, T, E = s.shape
    usable = T - T % chunk
    if usable == 0:
        return s.sum() * 0.0
    p = routing_share(s[:, :usable])
    if mask is not None:
        p = p * mask.to(torch.bool).reshape(n, T)[:, :usable].unsqueeze(-1).to(p.dtype)
    none_fire = (1 - p).reshape(n, usable // chunk, chunk, E).prod(dim=2)
    return 1 - none_fire.mean()


def routing_losses(
    records: dict,
    alpha: float = 100.0,
    chunk: int = 8,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(AL, CS) averaged over the layers of a :func:`edgekit.models.blockffn.record_routing` record
    (each layer's last call)."""
    al, cs, n = 0.0, 0.0, 0
    for calls in records.values():
        if not calls:
            continue
        r = calls[-1]
        al = al + activation_locality(r.logits, alpha, mask)
        cs = cs + chunk_sparsification(r.s, chunk, mask)
        n += 1
    if n == 0:
        raise UserError("no BlockFFN layer ran; the routing objectives need a model with BlockFFN layers")
    return al / n, cs / n
