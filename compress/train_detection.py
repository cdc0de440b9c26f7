"""Train a CenterNet-style detector on the project's generated shapes dataset.

The detection data is made by ``edgekit.models.shapes_detection`` (filled
shapes on cluttered backgrounds, boxes known exactly, deterministic from the
recipe seed), so a recipe needs no downloads and no data section. Weights
trained under a given step key are cached like ``train.supervised``'s.
"""

from __future__ import annotations

import copy

from pydantic import Field

from edgekit.artifact import Artifact
from edgekit.compress import weights_cache
from edgekit.errors import UserError
from edgekit.passes import Pass, PassConfig, PassContext

EVAL_SEED_OFFSET = 10_000  # eval scenes come from another seed than the training scenes


class CenterNetTrainConfig(PassConfig):
    images: int = Field(2000, ge=16, description="generated training scenes")
    steps: int = Field(600, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0, description="peak AdamW learning rate (warm-up, cosine decay)")
    eval_images: int = Field(200, ge=0, description="held-out scenes for AP50 after training (0: skip)")
    cache: bool = Field(True, description="reuse weights trained earlier with the same model and config")


def image_size_of(artifact: Artifact) -> int:
    """The square input size of an NCHW detector (``model.input_shape``)."""
    shape = artifact.inputs[0].shape if artifact.inputs else []
    if len(shape) != 4 or not all(isinstance(s, int) for s in shape[2:]) or shape[2] != shape[3] or shape[1] != 3:
        raise UserError(f"the detector's input must be [batch, 3, S, S] with a fixed square size S, not {shape}; set model.input_shape")
    return int(shape[2])


class TrainCenterNet(Pass):
    """Train a CenterNet detector (heatmap, size, offset heads) on generated shapes scenes."""

    name = "train.centernet"
    kind = "compress"
    Config = CenterNetTrainConfig
    accepts = ("torch",)

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from edgekit.models.centernet import evaluate_ap50, train_detector
        from edgekit.models.shapes_detection import make_dataset

        cfg: CenterNetTrainConfig = self.config
        size = image_size_of(artifact)
        module = copy.deepcopy(artifact.torch_module())
        _check_outputs(module, size)
        eval_set = make_dataset(cfg.eval_images, ctx.seed + EVAL_SEED_OFFSET, size) if cfg.eval_images else None
        cache_file = weights_cache.cache_file(ctx, cfg.cache)
        if weights_cache.load_cached(module, cache_file, ctx, self.name):
            ctx.metrics["train"] = {"cached": True, "weights": str(cache_file)}
        else:
            ctx.log(f"  generating {cfg.images} training scenes at {size}x{size}")
            train_set = make_dataset(cfg.images, ctx.seed, size)
            log = train_detector(module, train_set, cfg.steps, cfg.batch_size, cfg.lr, ctx.seed, on_step=_progress(ctx, cfg.steps))
            weights_cache.save_cached(module, cache_file)
            tail = max(1, cfg.steps // 10)
            ctx.metrics["train"] = {
                "cached": False,
                "steps": cfg.steps,
                "images": cfg.images,
                "first_loss": round(log.mean_loss(0, tail), 4),
                "final_loss": round(log.mean_loss(cfg.steps - tail, cfg.steps), 4),
                "seconds": round(log.seconds, 1),
            }
        module.eval()
        if eval_set is not None:
            ctx.metrics["train"]["ap50"] = round(evaluate_ap50(module, eval_set), 4)
            ctx.log(f"  AP50 on {cfg.eval_images} held-out scenes: {ctx.metrics['train']['ap50']:.3f}")
        return artifact.derive(module=module, task="detection")


def _check_outputs(module, size: int) -> None:
    import torch

    stride = int(getattr(module, "stride", 4))
    classes = getattr(module, "num_classes", None)
    with torch.no_grad():
        out = module.eval()(torch.zeros(1, 3, size, size))
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[2] != size // stride or (classes and out.shape[1] != classes + 4):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"train.centernet needs one output [batch, classes + 4, S/{stride}, S/{stride}] (heatmap, size, offset) but the model gives {got}; "
            "use a CenterNet-style detector such as zoo model codenet_tiny"
        )


def _progress(ctx: PassContext, steps: int):
    every = max(1, steps // 10)

    def report(step: int, loss: float) -> None:
        if (step + 1) % every == 0 or step + 1 == steps:
            ctx.log(f"  step {step + 1}/{steps}: loss {loss:.3f}")

    return report
