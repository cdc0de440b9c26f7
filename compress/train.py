"""Supervised training on the recipe's train split.

Used to train a fresh zoo model (the quickstart) and, later, to recover
accuracy after pruning. Weights trained under a given step key are cached in
the shared cache folder, so the same recipe on another run folder does not
train again.
"""

from __future__ import annotations

import copy
import time
from typing import Literal

from pydantic import Field

from edgekit.artifact import Artifact
from edgekit.compress import weights_cache
from edgekit.errors import UserError
from edgekit.passes import Pass, PassConfig, PassContext


class TrainConfig(PassConfig):
    epochs: int = Field(10, ge=1, description="passes over the train split")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, description="peak learning rate (cosine decay)")
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(
        None, gt=0, description="clip the global gradient norm to this value every step (transformers trained from scratch need it at higher rates); null: no clipping"
    )
    cache: bool = Field(True, description="reuse weights trained earlier with the same model, data and config")


class TrainSupervised(Pass):
    """Train a classifier on data.train with cross-entropy (weights cached across runs)."""

    name = "train.supervised"
    kind = "compress"
    Config = TrainConfig
    accepts = ("torch",)
    uses_data = ("train",)

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import torch

        cfg: TrainConfig = self.config
        if ctx.data is None:
            raise UserError("train.supervised needs data.train; add a data: section with a labelled source (e.g. data: {source: sklearn:digits})")
        if artifact.task != "classification":
            raise UserError(f"train.supervised trains classifiers, but this model's task is {artifact.task}; set model.task: classification if it outputs class scores")
        split = ctx.data.split("train")
        if split.labels is None:
            raise UserError("train.supervised needs labels, but the train data has none; use a labelled source (sklearn:digits, images:DIR, npz with 'labels')")
        module = copy.deepcopy(artifact.torch_module())
        cache_file = weights_cache.cache_file(ctx, cfg.cache)
        if weights_cache.load_cached(module, cache_file, ctx, self.name):
            ctx.metrics["train"] = {"cached": True, "weights": str(cache_file)}
            return artifact.derive(module=module.eval())

        started = time.perf_counter()
        torch.manual_seed(ctx.seed)
        names = [s.name for s in artifact.inputs]
        x = {n: torch.from_numpy(split.arrays[n]) for n in names}
        y = torch.from_numpy(split.labels)
        n = len(y)
        steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
        params = [p for p in module.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        gen = torch.Generator().manual_seed(ctx.seed)
        epochs = range(cfg.epochs)
        if ctx.progress:
            epochs = ctx.progress(epochs, description="training", total=cfg.epochs)
        module.train()
        loss_value, correct = float("nan"), 0
        for epoch in epochs:
            order = torch.randperm(n, generator=gen)
            total, correct = 0.0, 0
            for i in range(0, n, cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                logits = _logits(module(*[x[k][idx] for k in names]))
                if epoch == 0 and i == 0:
                    _check_classes(logits, y)
                loss = loss_fn(logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                correct += int((logits.argmax(1) == y[idx]).sum())
            loss_value = total / n
        module.eval()
        weights_cache.save_cached(module, cache_file)
        ctx.metrics["train"] = {
            "cached": False,
            "epochs": cfg.epochs,
            "samples": n,
            "final_loss": round(loss_value, 5),
            "train_top1": round(correct / n, 5),  # running accuracy over the last epoch (train mode)
            "seconds": round(time.perf_counter() - started, 2),
        }
        return artifact.derive(module=module)


def _logits(out):
    """The class scores: the first tensor of a tuple / ModelOutput."""
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    return out


def _check_classes(logits, labels) -> None:
    if logits.ndim != 2:
        raise UserError(f"train.supervised needs class scores of shape [batch, classes] but the model outputs {list(logits.shape)}; train a classifier head")
    top = int(labels.max())
    if top >= logits.shape[1] or int(labels.min()) < 0:
        raise UserError(
            f"the train labels go up to {top} but the model outputs {logits.shape[1]} classes; "
            f"set model.args.num_classes: {top + 1} (or fix the labels)"
        )
