"""Recipe settings of ``prune.vib``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgekit.passes import PassConfig


class KLScales(PassConfig):
    hidden: float = Field(1.0, ge=0, description="weight of the hidden-dimension mask's KL term")
    heads: float = Field(1.0, ge=0, description="weight of the head masks' KL term")
    ffn: float = Field(1.0, ge=0, description="weight of the FFN-neuron masks' KL term")


class PruneSettings(PassConfig):
    target_params: float | None = Field(
        None, gt=0, description="encoder (transformer-layer) parameters to keep: a fraction (<= 1) or an absolute count"
    )
    target_flops: float | None = Field(None, gt=0, description="encoder FLOPs per sequence to keep: a fraction (<= 1) or an absolute count")
    method: Literal["vib", "magnitude", "taylor"] = Field(
        "vib", description="vib: VTrans masks; magnitude / taylor: one-shot importance pruning to the same budget, then the same fine-tuning (a baseline)"
    )
    mode: Literal["full", "fast", "faster"] = Field(
        "fast", description="full: all train data; fast: a data_fraction of it; faster: that share with the weights frozen (masks only)"
    )
    data_fraction: float = Field(0.03, gt=0, le=1, description="share of the train split that fast and faster use")
    epochs: int = Field(1, ge=1, description="passes over the (possibly reduced) train split per pruning round")
    min_steps: int = Field(100, ge=1, description="a round has at least this many optimisation steps")
    max_rounds: int = Field(3, ge=1, description="pruning rounds until the hard mask meets the budget; then it is snapped to it")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0, description="learning rate of the model weights")
    mask_lr: float = Field(0.1, gt=0, description="learning rate of the masks' mu and log-variance")
    lagrangian_lr: float = Field(0.05, gt=0, description="gradient-ascent rate of the Lagrange multipliers")
    warmup: float = Field(0.5, gt=0, le=1, description="share of the first round over which the target ramps from the full size to the goal")
    init_log_alpha: float = Field(-2.0, lt=0, description="initial log(sigma^2) - log(mu^2) of every mask (all units kept)")
    kl_weight: float = Field(0.01, ge=0, description="weight of the KL term (mean over units)")
    kl_scales: KLScales = Field(default_factory=KLScales)
    sharpness: float = Field(1.0, gt=0, description="slope of the soft keep probability sigmoid(-sharpness * log_alpha)")
    prune_hidden: Literal["auto"] | bool = Field(
        "auto", description="prune the hidden dimension too; auto: not when the model's output is the hidden state (it would change the embedding width)"
    )
    hidden_distill: float = Field(1.0, ge=0, description="weight of layer-wise hidden-state distillation (off while the hidden dimension is pruned)")
    task_weight: float = Field(1.0, ge=0, description="weight of the task loss where labels exist (class labels, or the text of a causal LM)")
    recovery_steps: int | None = Field(
        None, ge=0, description="distillation fine-tuning steps after the cut (weights only); default: one round's steps for full and fast, none for faster"
    )
    teacher_cache_mb: int = Field(
        1024, ge=0, description="faster mode: keep the unpruned model's outputs on the train data in memory up to this size while only the masks train; 0: run it on every batch"
    )
    seq: int | None = Field(None, ge=1, description="sequence length for FLOP counts (default: the recipe's seq dim, else 128)")

    @model_validator(mode="after")
    def _one_target(self) -> "PruneSettings":
        if (self.target_params is None) == (self.target_flops is None):
            raise ValueError("set exactly one of target_params or target_flops (a fraction such as 0.5, or an absolute count)")
        return self

    def budget_kind(self) -> tuple[str, float]:
        return ("params", self.target_params) if self.target_params is not None else ("flops", self.target_flops)
