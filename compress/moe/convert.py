"""Turn the dense FFNs of a model into BlockFFN experts (neuron clustering).

A :class:`DenseFFN` ``fc2(act(fc1(x)))`` of H neurons is exactly a sum over
its neurons, so any partition of the neurons into E equal blocks gives experts
whose sum is the dense FFN. :func:`convert_model` picks the partition by
balanced k-means, permutes fc1 rows / fc2 columns into ``up`` / ``down``
``(E, B, d)``, and starts the router at ``weight 0, bias 1`` with the score
norm's weight ``sqrt(1 + eps)``: every expert then gets score 1 for every
token and the converted model computes what the dense one did. Fine-tuning
(``moe.blockffn``) makes it sparse.

:func:`to_blockffn` only reshapes (placeholder weights): it is the builder
transform a converted artifact is rebuilt with before its state dict loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from edgekit.errors import UserError
from edgekit.models.blockffn import BlockFFN, DenseFFN

Cluster = Literal["coactivation", "weights"]


def dense_ffns(model: nn.Module) -> dict[str, DenseFFN]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DenseFFN)}


def require_dense_ffns(model: nn.Module) -> dict[str, DenseFFN]:
    """The model's DenseFFNs; a UserError naming what was looked for when there is none."""
    layers = dense_ffns(model)
    if not layers:
        hint = " (it already has BlockFFN layers)" if any(isinstance(m, BlockFFN) for m in model.modules()) else ""
        raise UserError(
            f"moe.blockffn converts DenseFFN modules (edgekit.models.blockffn.DenseFFN: fc1, activation, fc2) but {type(model).__name__} has none{hint}; "
            "use a model built from them such as zoo:tiny_lm_small"
        )
    return layers


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def expert_count(hidden: int, experts: int | None, expert_size: int | None) -> int:
    """E for an FFN of ``hidden`` neurons given ``experts`` or ``expert_size`` (exactly one may be set)."""
    if experts is not None and expert_size is not None:
        if experts * expert_size != hidden:
            raise UserError(f"experts {experts} x expert_size {expert_size} must equal the FFN width {hidden}; set only one of them")
        return experts
    if expert_size is not None:
        experts = hidden // expert_size if expert_size > 0 else 0
    if not experts or experts < 1 or hidden % experts:
        what = f"expert_size {expert_size}" if expert_size is not None else f"experts {experts}"
        divisors = [k for k in range(2, min(hidden, 256) + 1) if hidden % k == 0]
        raise UserError(f"{what} does not split an FFN of {hidden} neurons into equal blocks; use a number of experts dividing {hidden} (e.g. {', '.join(map(str, divisors[:8]))})")
    return experts


# -- clustering ------------------------------------------------------------------------

def balanced_kmeans(features: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Labels (N,) putting exactly N/k rows of ``features (N, F)`` in each of k clusters.

    Spherical k-means (cosine similarity to unit centroids) whose assignment
    step is greedy under a capacity: the most similar (row, cluster) pairs are
    taken first while the cluster has room.
    """
    n = features.shape[0]
    if k < 1 or n % k:
        raise ValueError(f"{n} rows do not split into {k} equal clusters")
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    x = torch.nn.functional.normalize(features.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:k]].clone()
    labels = None
    for _ in range(iters):
        new = _balanced_assign((x @ centroids.t()).numpy(), n // k)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return labels


def _balanced_assign(sim: np.ndarray, capacity: int) -> torch.Tensor:
    n, k = sim.shape
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity)
    left = n
    for flat in np.argsort(-sim, axis=None, kind="stable"):
        i, c = divmod(int(flat), k)
        if labels[i] < 0 and room[c] > 0:
            labels[i], room[c] = c, room[c] - 1
            left -= 1
            if left == 0:
                break
    return torch.from_numpy(labels)


@torch.no_grad()
def coactivation_features(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per DenseFFN, each neuron's on/off pattern over the calibration tokens: ``(H, tokens)``."""
    layers = dense_ffns(model)
    patterns: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        m.fc1.register_forward_hook(lambda _m, _i, out, name=name: patterns[name].append((out.reshape(-1, out.shape[-1]) > 0).float()))
        for name, m in layers.items()
    ]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(input_ids), batch_size):
            model(input_ids[i : i + batch_size])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: torch.cat(p).t().contiguous() for name, p in patterns.items()}


# -- conversion ------------------------------------------------------------------------

@dataclass
class LayerConversion:
    name: str
    experts: int
    expert_size: int
    order: torch.Tensor  # dense neuron index of each (expert, slot), flattened


@torch.no_grad()
def convert_ffn(dense: DenseFFN, experts: int, features: torch.Tensor | None = None, seed: int = 0, eps: float = 1e-6) -> tuple[BlockFFN, torch.Tensor]:
    """A BlockFFN computing exactly what ``dense`` computes, and the neuron order it uses.

    ``features (H, F)`` describe the neurons for clustering (default: fc1's rows
    and bias). The router starts dense-equivalent: weight 0, bias 1 and norm
    weight sqrt(1 + eps), so every score is 1.
    """
    hidden, d = dense.fc1.weight.shape
    experts = expert_count(hidden, experts, None)
    if features is None:
        features = _weight_features(dense)
    labels = balanced_kmeans(features, experts, seed=seed)
    order = torch.argsort(labels * hidden + torch.arange(hidden))  # cluster by cluster, dense order inside
    B = hidden // experts
    has_bias = dense.fc1.bias is not None
    block = BlockFFN(d, experts, B, dense.activation, bias=has_bias, eps=eps).to(dense.fc1.weight.dtype)
    block.up.copy_(dense.fc1.weight[order].reshape(experts, B, d))
    block.down.copy_(dense.fc2.weight[:, order].t().reshape(experts, B, d))
    if has_bias:
        block.up_bias.copy_(dense.fc1.bias[order].reshape(experts, B))
        if dense.fc2.bias is not None:
            block.out_bias.copy_(dense.fc2.bias)
        else:
            block.out_bias.zero_()
    block.router.weight.zero_()
    block.router.bias.fill_(1.0)
    block.router_norm.weight.fill_(math.sqrt(1.0 + eps))  # s = 1 everywhere -> scores exactly 1
    return block, order


def _weight_features(dense: DenseFFN) -> torch.Tensor:
    w = torch.nn.functional.normalize(dense.fc1.weight.detach().double(), dim=1)
    if dense.fc1.bias is None:
        return w
    return torch.cat([w, dense.fc1.bias.detach().double().unsqueeze(1)], dim=1)


def convert_model(
    model: nn.Module,
    experts: int | None = None,
    expert_size: int | None = None,
    calibration_ids: torch.Tensor | None = None,
    cluster: Cluster = "coactivation",
    seed: int = 0,
) -> list[LayerConversion]:
    """Replace every DenseFFN of ``model`` (in place) by an equivalent BlockFFN.

    ``cluster="coactivation"`` groups neurons that fire for the same
    calibration tokens (``calibration_ids (N, T)``), ``"weights"`` groups
    similar fc1 rows. Co-activation is the default: the point of a block is that
    its neurons are on or off together, which is what it measures directly
    (MoEfication found it the better split too); weight similarity is a proxy.
    """
    layers = require_dense_ffns(model)
    if cluster not in ("coactivation", "weights"):
        raise UserError(f"unknown neuron clustering {cluster!r}; use coactivation or weights")
    if cluster == "coactivation":
        if calibration_ids is None or len(calibration_ids) == 0:
            raise UserError("co-activation clustering needs calibration token windows; give calibration data or use cluster: weights")
        features = coactivation_features(model, calibration_ids)
    else:
        features = {name: None for name in layers}
    done = []
    for name, dense in layers.items():
        E = expert_count(dense.hidden, experts, expert_size)
        block, order = convert_ffn(dense, E, features[name], seed=seed)
        _set_submodule(model, name, block.train(dense.training))
        done.append(LayerConversion(name, E, dense.hidden // E, order))
    return done


def to_blockffn(model: nn.Module, experts: int | None = None, expert_size: int | None = None) -> nn.Module:
    """The builder transform: every DenseFFN becomes a BlockFFN of the converted shape
    (placeholder weights; the converted state dict loads on top)."""
    layers = dense_ffns(model)
    if not layers:
        raise UserError(f"the artifact records a BlockFFN conversion but {type(model).__name__} has no DenseFFN to convert; rebuild from the source model")
    for name, dense in layers.items():
        E = expert_count(dense.hidden, experts, expert_size)
        block = BlockFFN(dense.dim, E, dense.hidden // E, dense.activation, bias=dense.fc1.bias is not None)
        if dense.fc2.bias is None and block.out_bias is not None:
            block.out_bias.data.zero_()
        _set_submodule(model, name, block)
    return model
