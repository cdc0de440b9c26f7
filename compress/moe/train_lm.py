"""``train.lm``: train a causal language model from scratch on the train split.

Next-token cross-entropy, AdamW, warm-up then cosine decay. Weights trained
under a step key are cached in the shared cache folder like ``train.supervised``'s.
"""

from __future__ import annotations

import copy

from pydantic import Field

from edgekit.artifact import Artifact
from edgekit.compress import weights_cache
from edgekit.passes import Pass, PassConfig, PassContext


class TrainLMConfig(PassConfig):
    steps: int = Field(600, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="token windows per step")
    lr: float = Field(2e-3, gt=0, description="peak AdamW learning rate (warm-up, cosine decay)")
    weight_decay: float = Field(0.01, ge=0)
    eval_samples: int = Field(256, ge=0, description="eval windows for the perplexity before and after (0: skip)")
    cache: bool = Field(True, description="reuse weights trained earlier with the same model, data and config")


class TrainLM(Pass):
    """Train a causal LM (e.g. zoo:tiny_lm_small) on data.train with next-token cross-entropy (weights cached)."""

    name = "train.lm"
    kind = "compress"
    Config = TrainLMConfig
    accepts = ("torch",)
    uses_data = ("train",)

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from . import lm

        cfg: TrainLMConfig = self.config
        ids = lm.token_windows(ctx, "train", self.name)
        module = copy.deepcopy(artifact.torch_module())
        lm.check_lm(module, ids, self.name)
        eval_ids = eval_windows(ctx, cfg.eval_samples, self.name)
        metrics: dict = {}
        cache_file = weights_cache.cache_file(ctx, cfg.cache)
        if weights_cache.load_cached(module, cache_file, ctx, self.name):
            metrics = {"cached": True, "weights": str(cache_file)}
        else:
            if eval_ids is not None:
                metrics["eval_before"] = lm.evaluate_lm(module, eval_ids)
            log = train_lm(module, ids, cfg.steps, cfg.batch_size, cfg.lr, cfg.weight_decay, ctx.seed, ctx)
            weights_cache.save_cached(module, cache_file)
            metrics.update(cached=False, steps=cfg.steps, windows=len(ids), seq=ids.shape[1], **log.head_tail(), seconds=round(log.seconds, 1))
        module.eval()
        if eval_ids is not None:
            metrics["eval"] = lm.evaluate_lm(module, eval_ids)
            ctx.log(f"  eval perplexity {metrics['eval']['ppl']:.3f} per token on {len(eval_ids)} windows")
        ctx.metrics["train"] = metrics
        return artifact.derive(module=module)


def eval_windows(ctx: PassContext, n: int, pass_name: str):
    """The first ``n`` eval windows, or None without an eval split."""
    if n == 0 or ctx.data is None or not ctx.data.has_split("eval"):
        return None
    from . import lm

    return lm.token_windows(ctx, "eval", pass_name)[:n]


def train_lm(module, ids, steps: int, batch_size: int, lr: float, weight_decay: float, seed: int, ctx: PassContext | None = None):
    """Train ``module`` in place on windows ``ids (N, T)``; returns an :class:`lm.TrainLog`."""
    import torch

    from edgekit.models.tiny_lm import next_token_loss

    from . import lm

    opt = lm.adamw(module, lr, weight_decay)
    sched = lm.warmup_cosine(opt, steps)
    log, elapsed = lm.TrainLog(), lm.timer()
    report = lm.step_reporter(ctx, steps, "train.lm") if ctx is not None else None
    module.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        it = lm.batches(len(ids), min(batch_size, len(ids)), steps, seed)
        if ctx is not None:
            it = lm.progress(ctx, it, "training LM", steps)
        for step, idx in enumerate(it):
            x = ids[idx]
            loss = next_token_loss(module(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            sched.step()
            log.losses.append(float(loss.detach()))
            if report is not None:
                report(step, f"loss {log.losses[-1]:.3f}")
    log.seconds = elapsed()
    module.eval()
    return log
