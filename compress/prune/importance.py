"""The baseline: one-shot importance pruning of the same structures to the same budget.

``magnitude``: a unit's importance is the mean squared weight of the rows and
columns it owns (a head's query/key/value rows and output-projection columns,
an FFN neuron's input row and output column, a hidden dimension's columns).

``taylor``: first-order Taylor importance of a gate on the unit. The data need
not be labelled, so the loss is the model's own output along a random
direction v: importance_j = E[(v . d out / d z_j)^2], an estimate of how much
the output moves when the unit is removed (the squared norm of its Jacobian).
"""

from __future__ import annotations

import torch

from .budget import Budget, snap
from .config import PruneSettings
from .masks import MaskSet
from .objective import forward
from .structure import Keep, TransformerView, _is_conv1d


def importance_keep(student, teacher, view: TransformerView, data, cfg: PruneSettings, budget: Budget, prune_hidden: bool) -> Keep:
    from .search import _keyed, shape_from_keep

    masks = MaskSet(view, prune_hidden)
    scores = _taylor(student, masks, data, cfg) if cfg.method == "taylor" else _magnitude(view, prune_hidden)
    # scores are comparable within a kind (across layers), not across kinds: normalise each kind by its median
    medians = {}
    for kind in ("hidden", "heads", "ffn"):
        pooled = [scores[k] for k, _ in _keyed(masks) if k[0] == kind and len(scores[k])]
        if pooled:
            medians[kind] = torch.cat(pooled).median().clamp(min=1e-12)
    keep, prio = {}, {}
    for key, m in _keyed(masks):
        keep[key] = torch.ones(len(m), dtype=torch.bool)
        prio[key] = -(scores[key] / medians[key[0]]) if len(m) else scores[key]
    keep = snap(lambda k: shape_from_keep(k, view), keep, prio, budget)

    def idx(key):
        return torch.nonzero(keep[key], as_tuple=False).flatten()

    return Keep(
        hidden=idx(("hidden", 0)) if prune_hidden else None,
        heads=[idx(("heads", i)) for i in range(len(view.layers))],
        ffn=[idx(("ffn", i)) for i in range(len(view.layers))],
    )


def _weight(m) -> torch.Tensor:
    """[out, in] weight of a Linear or GPT-2 Conv1D."""
    w = m.weight.detach()
    return w.t() if _is_conv1d(m) else w


def _magnitude(view: TransformerView, prune_hidden: bool) -> dict:
    scores = {}
    d = view.head_dim
    hidden_energy = torch.zeros(view.hidden)
    for i, lv in enumerate(view.layers):
        if view.family == "bert":
            sa = lv.block.attention.self
            qkv = torch.cat([_weight(sa.query), _weight(sa.key), _weight(sa.value)], 1) if lv.heads else None  # [heads*d, 3H]... per row
            fc_in = _weight(lv.block.intermediate.dense) if lv.ffn else None
        else:
            qkv = _split_gpt2_qkv(_weight(lv.block.attn.c_attn), lv.heads * d) if lv.heads else None
            fc_in = _weight(lv.block.mlp.c_fc) if lv.ffn else None
        if lv.heads:
            o = _weight(lv.attn_out)  # [H, heads*d]
            per_row = qkv.pow(2).sum(1) + o.pow(2).sum(0)
            scores[("heads", i)] = per_row.reshape(lv.heads, d).mean(1)
            hidden_energy += o.pow(2).sum(1) + qkv.pow(2).reshape(-1, 3, view.hidden).sum((0, 1))
        else:
            scores[("heads", i)] = torch.zeros(0)
        if lv.ffn:
            o = _weight(lv.ffn_out)  # [H, ffn]
            scores[("ffn", i)] = fc_in.pow(2).mean(1) + o.pow(2).mean(0)
            hidden_energy += o.pow(2).sum(1) + fc_in.pow(2).sum(0)
        else:
            scores[("ffn", i)] = torch.zeros(0)
    if prune_hidden:
        scores[("hidden", 0)] = hidden_energy
    return scores


def _split_gpt2_qkv(w: torch.Tensor, inner: int) -> torch.Tensor:
    """GPT-2's fused [3*inner, H] query/key/value weight as [inner, 3H] (one row per head dim)."""
    q, k, v = w[:inner], w[inner : 2 * inner], w[2 * inner :]
    return torch.cat([q, k, v], 1)


def _taylor(student, masks: MaskSet, data, cfg: PruneSettings) -> dict:
    from .search import _batches, _keyed

    masks.sampling = False
    for m in masks.modules():
        if hasattr(m, "log_var"):
            with torch.no_grad():
                m.mu.fill_(1.0)
                m.log_var.fill_(-30.0)  # z = mu = 1 exactly: the unpruned model
    masks.attach()
    sums = {key: torch.zeros(len(m)) for key, m in _keyed(masks)}
    steps = max(1, min(cfg.min_steps, _n(data) // cfg.batch_size or 1))
    gen = torch.Generator().manual_seed(1)
    student.eval()
    try:
        for _, batch in _batches(data, cfg.batch_size, steps):
            out = forward(student, batch).out
            v = torch.randn(out.shape, generator=gen)
            masks.zero_grad(set_to_none=True)
            (out * v).sum().backward()
            for key, m in _keyed(masks):
                if m.mu.grad is not None:
                    sums[key] += m.mu.grad.detach().pow(2)
        student.zero_grad(set_to_none=True)
    finally:
        masks.detach()
    return sums


def _n(data) -> int:
    return int(next(iter(data.values())).shape[0])
