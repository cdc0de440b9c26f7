"""VTrans pruning: train VIB masks under a Lagrangian size constraint, snap the
hard mask to the budget, cut the pruned units out; and the importance
baselines that cut the same structures to the same budget.

The loss while pruning is

    distill (+ task) + kl_weight * KL + l1 * (s - t) + l2 * (s - t)^2

where ``s`` is the expected size under soft masks (as a fraction of the full
size), ``t`` the target, ramped from 1 to the goal over the first ``warmup``
share of the first round, and ``l1, l2`` Lagrange multipliers raised by
gradient ascent. Rounds repeat until the hard mask is within the budget (at
most ``max_rounds``); a round after the first stops at the step where it gets
there, since its only job is to finish the cut. The snap then drops the least
informative units (highest log-ratio) or adds back the most informative pruned
ones until the size meets the budget exactly or just under.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from edgekit.errors import UserError

from .budget import Budget, resolve_target, snap
from .config import PruneSettings
from .masks import MaskSet
from .objective import distill_loss, forward, take_batch, task_loss
from .structure import TransformerView, cut, encoder_param_count, structure_flops, structure_params
from .teacher_cache import TeacherCache, estimated_bytes


@dataclass
class PruneResult:
    model: nn.Module
    structure: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def prune_model(
    model: nn.Module,
    data: dict[str, torch.Tensor],
    cfg: PruneSettings,
    *,
    seq: int = 128,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> PruneResult:
    """Prune a copy of ``model`` (an edgekit HFEncoder or a transformers model) to the budget.

    ``data`` maps input names (input_ids, attention_mask, token_type_ids, optional labels)
    to tensors with samples along axis 0. The input model is left unchanged.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    teacher = model.eval()
    student = copy.deepcopy(model)
    _no_dropout(student)
    view = TransformerView(student)
    prune_hidden = _resolve_hidden(cfg, view)
    kind, value = cfg.budget_kind()
    full_shape = view.shape()
    full = _measure(kind, full_shape, view.head_dim, seq)
    budget = Budget(kind, resolve_target(value, full), full, view.head_dim, seq)
    if budget.target < _smallest(kind, view, seq, prune_hidden):
        raise UserError(f"prune.vib: target_{kind} {value} is below the smallest model the masks can reach; raise it")
    n = _samples(data)
    subset = n if cfg.mode == "full" else max(min(n, cfg.batch_size), math.ceil(cfg.data_fraction * n))
    data = {k: v[:subset] for k, v in data.items()}
    steps = max(cfg.min_steps, cfg.epochs * math.ceil(subset / cfg.batch_size))
    params_before = encoder_param_count(student)
    total_before = sum(p.numel() for p in student.parameters())
    log(f"  prune.vib: {cfg.method} ({cfg.mode}) to {budget.target / full:.0%} of encoder {kind}, {subset} samples, {steps} steps per round")
    cache = _teacher_cache(teacher, data, steps, cfg, prune_hidden, log)

    rounds: list[dict[str, Any]] = []
    if cfg.method == "vib":
        masks = MaskSet(view, prune_hidden, cfg.init_log_alpha).attach()
        rounds = _vib_rounds(student, teacher, masks, data, steps, cfg, budget, log, cache)
        keep = _snapped_keep(masks, budget, view)
        for mask, k in zip(_mask_list(masks), keep):
            mask.force(k)
        final = masks.keep()
        masks.detach()
        cut(student, final)
        train_steps = sum(r["steps"] for r in rounds)
        recovery = cfg.recovery_steps if cfg.recovery_steps is not None else (0 if cfg.mode == "faster" else steps)
        if recovery:
            _train(student, teacher, None, data, recovery, cfg, None, {})
            train_steps += recovery
    else:
        from .importance import importance_keep

        final = importance_keep(student, teacher, view, data, cfg, budget, prune_hidden)
        cut(student, final)
        # the baseline fine-tunes as long as one VIB round plus its recovery in this mode
        train_steps = steps + (cfg.recovery_steps if cfg.recovery_steps is not None else steps)
        _train(student, teacher, None, data, train_steps, cfg, None, {})
        rounds = [{"round": 1, "steps": train_steps, "hard": round(budget.measure(TransformerView(student).shape()) / full, 4)}]
    student.eval()
    shape = TransformerView(student).shape()
    seconds = time.perf_counter() - started
    metrics = {
        "method": cfg.method,
        "mode": cfg.mode,
        "budget": kind,
        "target": round(budget.target / full, 4),
        "achieved": round(_measure(kind, shape, view.head_dim, seq) / full, 4),
        "encoder_params_before": params_before,
        "encoder_params_after": encoder_param_count(student),
        "params_before": total_before,
        "params_after": sum(p.numel() for p in student.parameters()),
        "flops_before": structure_flops(full_shape, view.head_dim, seq),
        "flops_after": structure_flops(shape, view.head_dim, seq),
        "seq": seq,
        "samples": subset,
        "teacher_cached": cache is not None,
        "steps": train_steps,
        "seconds": round(seconds, 2),
        "prune_hidden": prune_hidden,
        "rounds": rounds,
        "structure": shape,
    }
    log(
        f"  pruned: encoder params {params_before:,} -> {metrics['encoder_params_after']:,} "
        f"({metrics['achieved']:.1%} of {kind}), heads {[L['heads'] for L in shape['layers']]}, "
        f"ffn {[L['ffn'] for L in shape['layers']]}, hidden {shape['hidden']}, {seconds:.0f} s"
    )
    return PruneResult(student, shape, rounds, metrics)


# -- the VIB rounds ------------------------------------------------------------------

def _teacher_cache(teacher, data, steps: int, cfg: PruneSettings, prune_hidden: bool, log) -> TeacherCache | None:
    """The teacher's outputs computed once for faster mode's mask rounds, when batches revisit
    samples and the outputs fit ``teacher_cache_mb``.

    Only while the weights are frozen: there it cut MiniLM-L6's faster mode from 82 s to
    62 s; in rounds that also train the weights (fast mode) the cached run measured
    slower (143-157 s against 119-122 s, the student's forward passes slower), for a
    reason not found yet.
    """
    n = _samples(data)
    if cfg.mode != "faster" or cfg.method != "vib" or cfg.teacher_cache_mb == 0 or steps * cfg.batch_size <= n:
        return None
    with_hidden = not prune_hidden and cfg.hidden_distill > 0  # layer-wise distillation needs the hidden states
    size = estimated_bytes(teacher, data, with_hidden)
    if size > cfg.teacher_cache_mb * 2**20:
        log(f"  teacher outputs not cached: they would take {size / 2**20:.0f} MB (teacher_cache_mb: {cfg.teacher_cache_mb})")
        return None
    return TeacherCache.build(teacher, data, with_hidden)


def _vib_rounds(student, teacher, masks: MaskSet, data, steps, cfg: PruneSettings, budget: Budget, log, cache=None) -> list[dict[str, Any]]:
    goal = budget.target / budget.full
    lambdas = nn.Parameter(torch.zeros(2))
    lag_opt = torch.optim.AdamW([lambdas], lr=cfg.lagrangian_lr, weight_decay=0.0, maximize=True)
    mask_opt = torch.optim.Adam(masks.parameters(), lr=cfg.mask_lr)
    state = {"lambdas": lambdas, "lag_opt": lag_opt, "mask_opt": mask_opt}
    rounds = []
    for r in range(1, cfg.max_rounds + 1):
        ramp = max(1, int(cfg.warmup * steps)) if r == 1 else 0

        def target(step: int, ramp=ramp) -> float:
            return goal if ramp == 0 else 1 - (1 - goal) * min(1.0, step / ramp)

        def reached() -> bool:
            return budget.measure(masks.hard_shape()) <= budget.target

        # round 1 trains the whole schedule; later rounds only finish the cut
        stats = _train(student, teacher, masks, data, steps, cfg, budget, state, target, cache=cache, until=reached if r > 1 else None)
        hard = budget.measure(masks.hard_shape()) / budget.full
        record = {"round": r, "steps": stats["steps"], "target": round(goal, 4), "expected": round(stats["expected"], 4),
                  "hard": round(hard, 4), "lambda1": round(float(lambdas[0].detach()), 4), "lambda2": round(float(lambdas[1].detach()), 4),
                  "kl": round(stats["kl"], 5), "distill": round(stats["distill"], 5)}
        rounds.append(record)
        log(f"    round {r}: hard mask at {hard:.1%} (expected {stats['expected']:.1%}, goal {goal:.1%}), distill {stats['distill']:.4f}")
        if hard <= goal:
            break
    return rounds


def _train(
    student, teacher, masks: MaskSet | None, data, steps: int, cfg: PruneSettings, budget: Budget | None, state: dict, target=None,
    cache: TeacherCache | None = None, until: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """``steps`` optimisation steps: masks (and weights unless frozen) with the Lagrangian, or a
    plain distillation fine-tune of the weights when ``masks`` is None. While only the masks
    train, the teacher's outputs come from ``cache`` when given. Stops early once ``until()``
    holds after a step; ``steps`` in the result counts the steps taken."""
    train_weights = masks is None or cfg.mode != "faster"
    weights = [p for p in student.parameters() if p.requires_grad]
    for p in weights:
        p.requires_grad_(train_weights)
    weight_opt = torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=0.0) if train_weights else None
    # layer-wise hidden states are comparable only while the student keeps the teacher's width
    use_hidden = (masks is None or masks.hidden is None) and TransformerView(student).hidden == TransformerView(teacher).hidden
    student.train()
    last = {"distill": float("nan"), "kl": 0.0, "expected": float("nan"), "steps": 0}
    for step, (idx, batch) in enumerate(_batches(data, cfg.batch_size, steps)):
        if cache is not None and not train_weights:
            t_out = cache.get(idx, int(batch["input_ids"].shape[1]))
        else:
            with torch.no_grad():
                t_out = forward(teacher, batch)
        s_out = forward(student, batch)
        loss = distill_loss(s_out, t_out, batch.get("attention_mask"), use_hidden, cfg.hidden_distill)
        last["distill"] = float(loss.detach())
        task = task_loss(student, s_out, batch) if cfg.task_weight > 0 else None
        if task is not None:
            loss = loss + cfg.task_weight * task
        if masks is not None:
            kl = masks.kl(cfg.kl_scales.model_dump())
            s = budget.soft(*masks.soft_shape(cfg.sharpness)) / budget.full
            gap = s - target(step)
            lam = state["lambdas"]
            loss = loss + cfg.kl_weight * kl + lam[0] * gap + lam[1] * gap * gap
            last["kl"], last["expected"] = float(kl.detach()), float(s.detach())
            state["mask_opt"].zero_grad(set_to_none=True)
            state["lag_opt"].zero_grad(set_to_none=True)
        if weight_opt is not None:
            weight_opt.zero_grad(set_to_none=True)
        loss.backward()
        if weight_opt is not None:
            weight_opt.step()
        if masks is not None:
            state["mask_opt"].step()
            state["lag_opt"].step()
        last["steps"] = step + 1
        if until is not None and until():
            break
    for p in weights:
        p.requires_grad_(True)
    student.eval()
    return last


def _batches(data: dict[str, torch.Tensor], batch_size: int, steps: int):
    """``steps`` minibatches ``(indices, batch)`` cycling over shuffled data, padding trimmed to the longest sample."""
    n = _samples(data)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        yield idx, take_batch(data, idx)


# -- snapping ------------------------------------------------------------------------

def _mask_list(masks: MaskSet) -> list:
    out = ([masks.hidden] if masks.hidden is not None else []) + list(masks.heads) + list(masks.ffn)
    return out


def _snapped_keep(masks: MaskSet, budget: Budget, view: TransformerView) -> list[torch.Tensor]:
    keys, keep, prio = [], {}, {}
    for key, m in _keyed(masks):
        keys.append(key)
        keep[key] = m.keep().clone()
        prio[key] = m.log_alpha().detach()
    snapped = snap(lambda k: shape_from_keep(k, view), keep, prio, budget)
    return [snapped[k] for k in keys]


def _keyed(masks: MaskSet):
    if masks.hidden is not None:
        yield ("hidden", 0), masks.hidden
    for i, m in enumerate(masks.heads):
        yield ("heads", i), m
    for i, m in enumerate(masks.ffn):
        yield ("ffn", i), m


def shape_from_keep(keep: dict, view: TransformerView) -> dict[str, Any]:
    hidden = int(keep[("hidden", 0)].sum()) if ("hidden", 0) in keep else view.hidden
    return {
        "family": view.family,
        "hidden": hidden,
        "layers": [{"heads": int(keep[("heads", i)].sum()), "ffn": int(keep[("ffn", i)].sum())} for i in range(len(view.layers))],
    }


# -- small helpers -------------------------------------------------------------------

def _measure(kind: str, shape: dict, head_dim: int, seq: int) -> float:
    return float(structure_flops(shape, head_dim, seq) if kind == "flops" else structure_params(shape, head_dim))


def _smallest(kind: str, view: TransformerView, seq: int, prune_hidden: bool) -> float:
    """The size with every head and neuron pruned (LayerNorms stay)."""
    shape = {"family": view.family, "hidden": 1 if prune_hidden else view.hidden, "layers": [{"heads": 0, "ffn": 0} for _ in view.layers]}
    return _measure(kind, shape, view.head_dim, seq)


def _resolve_hidden(cfg: PruneSettings, view: TransformerView) -> bool:
    narrowable = not view.outputs_hidden() and view.head_inputs() is not None
    if cfg.prune_hidden == "auto":
        return narrowable
    if cfg.prune_hidden and view.outputs_hidden():
        raise UserError(
            "prune.vib: prune_hidden: true would change the width of this model's output (its hidden state); "
            "set prune_hidden: auto or false for encoders whose output is the embedding"
        )
    if cfg.prune_hidden and not narrowable:
        raise UserError(
            f"prune.vib: prune_hidden: true cannot narrow the inputs of this model's heads ({', '.join(view.unknown_heads())}); "
            "set prune_hidden: auto or false"
        )
    return bool(cfg.prune_hidden)


def _samples(data: dict[str, torch.Tensor]) -> int:
    return int(next(iter(data.values())).shape[0])


def _no_dropout(model: nn.Module) -> None:
    """Dropout only slows a short schedule's match to the teacher: off while pruning."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
