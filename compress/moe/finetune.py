"""``moe.blockffn``: convert a model's dense FFNs into BlockFFN experts and
fine-tune them chunk-sparse.

1. Cluster each DenseFFN's neurons into E equal blocks (:mod:`.convert`); the
   router starts so that every expert scores 1: the model is still the dense one.
2. Fine-tune on the train split with ``LM loss + lambda_al * AL + lambda_cs * CS``
   (:mod:`.objectives`). With ``target_tls`` set, lambda_cs adapts every few
   steps: up while the training batches' token-level sparsity is below the
   target, down when it overshoots (the paper adapts the CS factor too).
3. Report (``ctx.metrics["blockffn"]``) the eval perplexity, TLS, CLS_8,
   CLS_32, the share of (token, layer) pairs with no active expert and
   per-layer TLS of the dense model (``dense``), the converted model before
   fine-tuning (``before``: the dense model, TLS 0) and after (``after``).

The artifact's builder records ``{"kind": "blockffn", "args": {"experts": E}}``
so the converted model is rebuilt from the source model's builder.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from edgekit.artifact import Artifact
from edgekit.compress import weights_cache
from edgekit.errors import UserError
from edgekit.passes import Pass, PassConfig, PassContext

DEFAULT_EXPERTS = 16


class BlockFFNConfig(PassConfig):
    experts: int | None = Field(None, ge=1, description=f"blocks per FFN (default {DEFAULT_EXPERTS} unless expert_size is set)")
    expert_size: int | None = Field(None, ge=1, description="neurons per block (instead of experts)")
    cluster: Literal["coactivation", "weights"] = Field("coactivation", description="group neurons that fire together on train tokens, or similar fc1 rows")
    calibration_samples: int = Field(64, ge=1, description="train windows the co-activation clustering reads")
    steps: int = Field(300, ge=0, description="fine-tuning steps (0: convert only)")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate of the experts and the rest of the model")
    router_lr: float = Field(1e-2, gt=0, description="peak learning rate of the routers (they start from zero)")
    lambda_al: float = Field(0.01, ge=0, description="weight of the activation-locality loss")
    lambda_cs: float = Field(1.0, ge=0, description="(initial) weight of the chunk-sparsification loss")
    target_tls: float | None = Field(0.85, gt=0, lt=1, description="adapt lambda_cs toward this token-level sparsity (null: fixed lambda_cs)")
    adapt_every: int = Field(10, ge=1, description="steps between lambda_cs adjustments")
    chunk: int = Field(8, ge=1, description="chunk length L of the CS loss")
    alpha: float = Field(100.0, gt=0, description="sigmoid steepness of the AL loss")
    eval_samples: int = Field(256, ge=0, description="eval windows for perplexity and sparsity (0: skip)")
    cache: bool = Field(True, description="reuse weights fine-tuned earlier with the same model, data and config")

    @model_validator(mode="after")
    def _one_size(self):
        if self.experts is not None and self.expert_size is not None:
            raise ValueError("set experts or expert_size, not both")
        return self

    def size_args(self) -> dict:
        if self.expert_size is not None:
            return {"expert_size": self.expert_size}
        return {"experts": self.experts or DEFAULT_EXPERTS}


class MoEBlockFFN(Pass):
    """Convert dense FFNs into chunk-sparse BlockFFN experts and fine-tune with the CLS-aware objectives."""

    name = "moe.blockffn"
    kind = "compress"
    Config = BlockFFNConfig
    accepts = ("torch",)
    uses_data = ("train",)
    comes_before = ("quantize.",)  # it regroups float weight matrices

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import torch

        from . import lm
        from edgekit.models.blockffn import blockffn_layers

        from .convert import convert_model, require_dense_ffns, to_blockffn
        from .train_lm import eval_windows

        cfg: BlockFFNConfig = self.config
        transforms = list((artifact.builder or {}).get("transforms", []))
        if transforms:
            kinds = ", ".join(t.get("kind", "?") for t in transforms)
            raise UserError(f"{ctx.path or self.name} must come before other model changes ({kinds}); move it earlier in compress:")
        ids = lm.token_windows(ctx, "train", self.name)
        dense = artifact.torch_module()
        require_dense_ffns(dense)
        lm.check_lm(dense, ids, self.name)
        eval_ids = eval_windows(ctx, cfg.eval_samples, self.name)
        chunks = tuple(sorted({8, 32, cfg.chunk}))
        metrics: dict = {"config": cfg.size_args()}
        if eval_ids is not None:
            metrics["dense"] = lm.evaluate_lm(dense, eval_ids)

        cache_file = weights_cache.cache_file(ctx, cfg.cache)
        module = None
        if cache_file is not None and cache_file.is_file():
            module = to_blockffn(copy.deepcopy(dense), **cfg.size_args())
            if weights_cache.load_cached(module, cache_file, ctx, self.name):
                if cache_file.with_suffix(".json").is_file():  # what the run that made the weights measured
                    metrics.update(json.loads(cache_file.with_suffix(".json").read_text()))
                metrics["cached"] = True
            else:
                module = None
        if module is None:
            module = copy.deepcopy(dense)
            gen = torch.Generator().manual_seed(ctx.seed)
            calib = ids[torch.randperm(len(ids), generator=gen)[: cfg.calibration_samples]]
            convert_model(module, calibration_ids=calib, cluster=cfg.cluster, seed=ctx.seed, **cfg.size_args())
            if eval_ids is not None:
                metrics["before"] = lm.evaluate_lm(module, eval_ids, chunks=chunks)  # converted, not yet fine-tuned
            log = finetune(module, ids, cfg, ctx.seed, ctx)
            metrics["finetune"] = log.summary(cfg.steps)
            weights_cache.save_cached(module, cache_file)
            if cache_file is not None:
                from edgekit.fsio import write_json

                write_json(cache_file.with_suffix(".json"), {k: metrics[k] for k in ("before", "finetune") if k in metrics})
            metrics["cached"] = False
        module.eval()
        blocks = list(blockffn_layers(module).values())
        metrics.update(layers=len(blocks), experts=blocks[0].num_experts, expert_size=blocks[0].expert_size)
        if eval_ids is not None:
            metrics["after"] = after = lm.evaluate_lm(module, eval_ids, chunks=chunks)
            ctx.log(f"  BlockFFN: TLS {after['tls']:.3f}, CLS_8 {after['cls_8']:.3f}, perplexity {metrics['dense']['ppl']:.3f} -> {after['ppl']:.3f}")
        ctx.metrics["blockffn"] = metrics
        builder = dict(artifact.builder or {})
        builder["transforms"] = [{"kind": "blockffn", "args": cfg.size_args()}]
        # the blockffn runtime reads this to know the model has layers for its sparse kernels
        meta = {**artifact.meta, "blockffn": {"layers": len(blocks), "experts": blocks[0].num_experts, "expert_size": blocks[0].expert_size}}
        return artifact.derive(module=module, builder=builder, meta=meta)


@dataclass
class FinetuneLog:
    loss: list[float] = field(default_factory=list)  # total
    lm: list[float] = field(default_factory=list)
    al: list[float] = field(default_factory=list)
    cs: list[float] = field(default_factory=list)
    tls: list[float] = field(default_factory=list)  # training batches, all layers
    lambda_cs: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, steps: int) -> dict:
        if not self.loss:
            return {"steps": 0}
        tail = max(1, len(self.loss) // 10)

        def mean(xs, a, b):
            part = xs[a:b]
            return round(sum(part) / len(part), 4)

        n = len(self.loss)
        return {
            "steps": steps,
            "lm_loss_first": mean(self.lm, 0, tail),
            "lm_loss_final": mean(self.lm, n - tail, n),
            "al_final": mean(self.al, n - tail, n),
            "cs_final": mean(self.cs, n - tail, n),
            "train_tls_final": mean(self.tls, n - tail, n),
            "lambda_cs_final": round(self.lambda_cs[-1], 5),
            "seconds": round(self.seconds, 1),
        }


def finetune(module, ids, cfg: BlockFFNConfig, seed: int = 0, ctx: PassContext | None = None) -> FinetuneLog:
    """Fine-tune a converted model in place with LM + AL + CS losses (see the module docstring)."""
    import torch

    from edgekit.models.blockffn import record_routing
    from edgekit.models.tiny_lm import next_token_loss

    from . import lm
    from .objectives import routing_losses

    log = FinetuneLog()
    if cfg.steps == 0:
        return log
    router = [p for n, p in module.named_parameters() if ".router." in f".{n}" or n.startswith("router.")]
    router_ids = {id(p) for p in router}
    decay = [p for p in module.parameters() if id(p) not in router_ids and p.ndim >= 2]
    rest = [p for p in module.parameters() if id(p) not in router_ids and p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.01, "lr": cfg.lr},
            {"params": rest, "weight_decay": 0.0, "lr": cfg.lr},
            {"params": router, "weight_decay": 0.0, "lr": cfg.router_lr},
        ],
        betas=(0.9, 0.95),
    )
    sched = lm.warmup_cosine(opt, cfg.steps)
    lambda_cs, window = cfg.lambda_cs, []
    report = lm.step_reporter(ctx, cfg.steps, "moe.blockffn") if ctx is not None else None
    elapsed = lm.timer()
    module.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        it = lm.batches(len(ids), min(cfg.batch_size, len(ids)), cfg.steps, seed + 1)
        if ctx is not None:
            it = lm.progress(ctx, it, "fine-tuning BlockFFN", cfg.steps)
        for step, idx in enumerate(it):
            x = ids[idx]
            with record_routing(module) as rec:
                logits = module(x)
            lm_loss = next_token_loss(logits, x)
            al, cs = routing_losses(rec, cfg.alpha, cfg.chunk)
            loss = lm_loss + cfg.lambda_al * al + lambda_cs * cs
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                on = [float((calls[-1].scores != 0).float().mean()) for calls in rec.values() if calls]
            tls = 1 - sum(on) / len(on)
            log.loss.append(float(loss.detach()))
            log.lm.append(float(lm_loss.detach()))
            log.al.append(float(al.detach()))
            log.cs.append(float(cs.detach()))
            log.tls.append(tls)
            log.lambda_cs.append(lambda_cs)
            window.append(tls)
            if cfg.target_tls is not None and len(window) == cfg.adapt_every:
                lambda_cs = adapt_lambda(lambda_cs, sum(window) / len(window), cfg.target_tls, cfg.lambda_cs)
                window = []
            if report is not None:
                report(step, f"lm {log.lm[-1]:.3f}, AL {log.al[-1]:.3f}, CS {log.cs[-1]:.3f}, TLS {tls:.3f}, lambda_cs {lambda_cs:.3g}")
            if not math.isfinite(log.loss[-1]):
                raise UserError(f"moe.blockffn diverged at step {step + 1} (loss {log.loss[-1]}); lower lr, router_lr or lambda_cs")
    log.seconds = elapsed()
    module.eval()
    return log


def adapt_lambda(current: float, tls: float, target: float, initial: float, factor: float = 1.3, margin: float = 0.02) -> float:
    """The next lambda_cs: raised while the sparsity is below target, lowered once it is above
    target + margin, kept within [initial / 100, initial * 1000].

    A brisk rise (x1.3 every ``adapt_every`` steps) overshoots the target a little
    because sparsity answers a few dozen steps late, but it leaves most of the
    steps for the LM loss to recover at the reached sparsity; gentler rules
    (raising only while sparsity stalls) reached it later and ended with a
    higher perplexity on tiny_lm_small.
    """
    if tls < target:
        current *= factor
    elif tls > target + margin:
        current /= factor
    lo, hi = initial / 100, initial * 1000
    return min(max(current, lo), hi) if initial > 0 else current
