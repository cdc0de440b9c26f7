"""One training loop for text-to-text models: AdamW, warm-up + cosine decay, gradient
clipping, progress lines, evaluation every so often, and checkpoints a killed run
resumes from (model, optimizer, schedule and step; loaded with ``weights_only=True``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgekit.compress.distill.pairs import Pairs, exact_match
from edgekit.compress.moe import lm


@dataclass
class FitLog:
    losses: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # {"step", "exact_match", ...}
    resumed_from: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        tail = max(1, len(self.losses) // 10)
        mean = lambda xs: round(float(sum(xs) / len(xs)), 4) if xs else float("nan")  # noqa: E731
        out = {"first_loss": mean(self.losses[:tail]), "final_loss": mean(self.losses[-tail:]), "evals": self.evals, "seconds": round(self.seconds, 1)}
        if self.parts:
            for key in self.parts[-1]:
                out[f"final_{key}"] = mean([p[key] for p in self.parts[-tail:] if key in p])
        if self.resumed_from:
            out["resumed_from_step"] = self.resumed_from
        return out


def fit(
    model: torch.nn.Module,
    pairs: Pairs,
    loss_fn: Callable[[Pairs], tuple[torch.Tensor, dict[str, float]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    ctx=None,
    what: str = "training",
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    eval_pairs: Pairs | None = None,
    eval_every: int = 0,
) -> FitLog:
    """Train ``model`` in place for ``steps`` batches of ``pairs``; returns the log."""
    opt = lm.adamw(model, lr, weight_decay)
    sched = lm.warmup_cosine(opt, steps)
    log, elapsed = FitLog(), lm.timer()
    start = _resume(checkpoint, model, opt, sched, log, ctx)
    report = lm.step_reporter(ctx, steps, what) if ctx is not None else None
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed + start)
        batches = lm.batches(len(pairs), min(batch_size, len(pairs)), steps, seed)
        for _ in range(start):  # the same batch order as an uninterrupted run
            next(batches)
        it = range(start, steps)
        if ctx is not None:
            it = lm.progress(ctx, it, what, steps - start)
        for step in it:
            loss, parts = loss_fn(pairs.rows(next(batches)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            log.losses.append(float(loss.detach()))
            log.parts.append(parts)
            done = step + 1
            if eval_pairs is not None and eval_every and (done % eval_every == 0 or done == steps):
                result = exact_match(model, eval_pairs)
                log.evals.append({"step": done, **result})
                if ctx is not None:
                    ctx.log(f"  {what} step {done}: exact match {result['exact_match']:.1f}% on {result['samples']} eval pairs")
                model.train()
            if report is not None:
                report(step, f"loss {log.losses[-1]:.4f}" + "".join(f", {k} {v:.4f}" for k, v in parts.items()))
            if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
                _save(checkpoint, model, opt, sched, done, log)
    log.seconds = elapsed()
    model.eval()
    if checkpoint is not None and checkpoint.is_file():
        checkpoint.unlink()  # finished: the final weights are cached by the pass
    return log


def _save(path: Path, model, opt, sched, step: int, log: FitLog) -> None:
    from edgekit.fsio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(), "step": step, "losses": torch.tensor(log.losses)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(path: Path | None, model, opt, sched, log: FitLog, ctx) -> int:
    if path is None or not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        step = int(state["step"])
    except Exception as e:  # a damaged or stale checkpoint: start over
        if ctx is not None:
            ctx.log(f"  ignoring checkpoint {path.name} ({type(e).__name__}); starting from step 0")
        return 0
    log.losses = [float(x) for x in state["losses"]]
    log.parts = [{} for _ in log.losses]
    log.resumed_from = step
    if ctx is not None:
        ctx.log(f"  resuming from checkpoint {path.name} at step {step}")
    return step
