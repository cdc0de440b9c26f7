"""``quantize.qat``: quantization-aware training (whitepaper section 3.2).

The model starts as the PTQ model (same plan, calibration and scales); then a
short fine-tuning on the recipe's train split lets the weights adapt to their
grid. Weights and inputs are fake-quantized in the forward pass; the
straight-through estimator passes gradients inside the clamp range.

BatchNorm is folded *while training*, as in the whitepaper's figure 10: the
convolution runs with weights folded by the running standard deviation and
quantized, then its output is rescaled by sigma_running / sigma_batch so the
batch statistics still normalise the training signal; after
``freeze_bn_after`` steps the running statistics are frozen and the
correction is dropped, so training ends on exactly the folded integer layer
that is deployed.

Checkpoints land in the shared cache (one per epoch, keyed by the step), so an
interrupted run resumes from its last epoch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.passes import Pass, PassConfig, PassContext

from .config import QuantizeSettings


class TrainSettings(PassConfig):
    epochs: int = Field(3, ge=1, description="passes over the train split")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0, description="learning rate (Adam, cosine decay); a fraction of the original training's")
    freeze_bn_after: int = Field(200, ge=0, description="steps after which BatchNorm statistics are frozen (whitepaper 3.2)")
    loss: Literal["auto", "labels", "distill"] = Field(
        "auto", description="labels: cross-entropy to the train labels; distill: match the float model's outputs "
        "(for models without labels, e.g. encoders); auto: labels for labelled classifiers, else distill"
    )


class QatSettings(QuantizeSettings):
    train: TrainSettings = Field(default_factory=TrainSettings)


class QuantizeQAT(Pass):
    """Quantization-aware fine-tuning with STE fake quantization and BN folding during training."""

    name = "quantize.qat"
    kind = "compress"
    Config = QatSettings
    accepts = ("torch",)
    uses_data = ("train", "calibration", "eval")

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from .modules import quant_layers
        from .ptq import TorchQuantizer
        from .qat_train import finalize_batchnorm, train

        cfg: QatSettings = self.config
        if cfg.backend != "edgekit":
            raise UserError("quantize.qat runs on the edgekit backend only (NNCF's torch backend does not work with torch 2.13); remove backend")
        if ctx.data is None or not ctx.data.has_split("train"):
            raise UserError("quantize.qat fine-tunes on data.train; add a data: section with a train source")
        split = ctx.data.split("train")
        labelled = artifact.task == "classification" and split.labels is not None
        use_labels = cfg.train.loss == "labels" or (cfg.train.loss == "auto" and labelled)
        if use_labels and not labelled:
            raise UserError("quantize.qat train.loss: labels needs a classifier and labels in the train split; use loss: distill")
        quantizer = TorchQuantizer(artifact, cfg, ctx)
        quantizer.prepare(qat=True)
        if ctx.data.has_split("eval"):
            quantizer._setup_eval()
            before = quantizer._evaluate()
        else:
            before = None
        teacher = None if use_labels else quantizer.float_model
        record = train(quantizer.model, split, [s.name for s in artifact.inputs], cfg.train, ctx, teacher)
        finalize_batchnorm(quantizer.model)
        quantizer.model.eval()
        quantizer.original_bias = {
            n: (m.bias.detach().clone() if m.bias is not None else None) for n, m in quant_layers(quantizer.model).items()
        }
        if before is not None:
            record["ptq_metric"] = round(before, 6)
        quantizer.metrics["qat"] = record
        quantizer.finish(qat=True)
        return quantizer.result()
