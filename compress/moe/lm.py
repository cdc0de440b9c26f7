"""Causal-LM plumbing shared by ``train.lm`` and ``moe.blockffn``: token windows
from a split, batches, the learning-rate schedule and the evaluation (perplexity
per token plus BlockFFN sparsity)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgekit.errors import UserError
from edgekit.models.blockffn import blockffn_layers, chunk_counts, record_routing
from edgekit.models.tiny_lm import next_token_loss


def token_windows(ctx, split: str, pass_name: str) -> torch.Tensor:
    """``input_ids (N, T)`` int64 of a data split, checked."""
    if ctx.data is None:
        raise UserError(f"{pass_name} trains on data.train; add a data: section with text, e.g. data: {{source: text:examples/data/python_docs_sentences.txt}}")
    arrays = ctx.data.split(split).arrays
    if "input_ids" not in arrays:
        raise UserError(f"the {split} data has no input_ids (it has {', '.join(sorted(arrays)) or 'nothing'}); use a text: source for this language model")
    ids = np.asarray(arrays["input_ids"])
    if ids.ndim != 2 or ids.shape[1] < 2 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"{pass_name} needs input_ids of shape (samples, seq >= 2) with integer tokens, got {ids.dtype} {list(ids.shape)}; set model.dims.seq")
    return torch.from_numpy(ids.astype(np.int64, copy=False))


def check_lm(module: nn.Module, ids: torch.Tensor, pass_name: str) -> int:
    """The vocabulary size, after checking the model maps (batch, T) tokens to (batch, T, vocab) logits."""
    with torch.no_grad():
        out = module(torch.zeros_like(ids[:1, :8]))  # token 0 exists in any vocabulary; the range is checked below
    if not isinstance(out, torch.Tensor) or out.ndim != 3 or tuple(out.shape[:2]) != (1, min(8, ids.shape[1])):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{pass_name} needs a causal LM that maps input_ids (batch, T) to logits (batch, T, vocab), but the model gives {got}; use e.g. zoo:tiny_lm_small")
    vocab = out.shape[-1]
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise UserError(f"the token ids go up to {int(ids.max())} but the model has a vocabulary of {vocab}; tokenize the text for this model")
    return vocab


def batches(n: int, batch_size: int, steps: int, seed: int):
    """Index batches drawn from per-epoch permutations of ``n`` samples."""
    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size


def adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on the matrices only, not on norms and biases."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def warmup_cosine(optimizer, steps: int, warmup: int | None = None, floor: float = 0.1):
    """Linear warm-up over ``warmup`` steps (default 5%), then cosine decay to ``floor`` x the peak."""
    warmup = max(1, steps // 20 if warmup is None else warmup)

    def scale(s: int) -> float:
        ramp = min(1.0, (s + 1) / warmup)
        return ramp * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def mean(self, start: int, end: int) -> float:
        part = self.losses[start:end]
        return float(sum(part) / len(part)) if part else float("nan")

    def head_tail(self) -> dict[str, float]:
        tail = max(1, len(self.losses) // 10)
        return {"first_loss": round(self.mean(0, tail), 4), "final_loss": round(self.mean(len(self.losses) - tail, len(self.losses)), 4)}


def step_reporter(ctx, steps: int, what: str) -> Callable[[int, str], None]:
    every = max(1, steps // 10)

    def report(step: int, text: str) -> None:
        if (step + 1) % every == 0 or step + 1 == steps:
            ctx.log(f"  {what} step {step + 1}/{steps}: {text}")

    return report


def progress(ctx, iterable, description: str, total: int):
    return ctx.progress(iterable, description=description, total=total) if ctx.progress else iterable


@torch.no_grad()
def evaluate_lm(model: nn.Module, ids: torch.Tensor, batch_size: int = 32, chunks: tuple[int, ...] = (8, 32)) -> dict:
    """Next-token loss and perplexity over ``ids (N, T)``; with BlockFFN layers also TLS,
    CLS for each chunk length, the share of tokens with no active expert (all layers pooled) and per-layer TLS."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    layers = list(blockffn_layers(model))
    active = {name: [0, 0] for name in layers}  # active pairs, all pairs
    zero = [0, 0]  # (token, layer) with no active expert, all (token, layer)
    chunked = {c: [0, 0] for c in chunks}
    try:
        for i in range(0, len(ids), batch_size):
            x = ids[i : i + batch_size]
            with record_routing(model, detach=True) as rec:
                logits = model(x)
            total_loss += float(next_token_loss(logits, x, reduction="sum"))
            total_tokens += x.shape[0] * (x.shape[1] - 1)
            for name in layers:
                for r in rec[name]:
                    on = r.scores != 0
                    active[name][0] += int(on.sum())
                    active[name][1] += on.numel()
                    none = ~on.any(-1)
                    zero[0] += int(none.sum())
                    zero[1] += none.numel()
                    for c in chunks:
                        a, b = chunk_counts(r.scores, c)
                        chunked[c][0] += a
                        chunked[c][1] += b
    finally:
        model.train(was_training)
    loss = total_loss / max(1, total_tokens)
    out = {"loss": round(loss, 5), "ppl": round(math.exp(loss), 4), "tokens": total_tokens}
    if layers:
        on, all_ = sum(v[0] for v in active.values()), sum(v[1] for v in active.values())
        out["tls"] = round(1 - on / all_, 4) if all_ else float("nan")
        for c in chunks:
            out[f"cls_{c}"] = round(chunked[c][0] / chunked[c][1], 4) if chunked[c][1] else float("nan")
        out["zero_active_tokens"] = round(zero[0] / zero[1], 4) if zero[1] else float("nan")
        out["per_layer_tls"] = {name: round(1 - v[0] / v[1], 4) for name, v in active.items() if v[1]}
    return out


def timer() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
