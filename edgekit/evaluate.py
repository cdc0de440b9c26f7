"""The evaluate probe: a task metric of one artifact on the recipe's eval split.

``top1`` compares with labels; ``perplexity`` scores a causal LM's next-token
logits against its own ``input_ids`` (lower is better); ``cosine``, ``max_abs`` and ``mean_abs`` compare
with the source model's outputs on the same inputs, so every step and export is
measured against where the pipeline started.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit import metrics
from edgekit.artifact import Artifact
from edgekit.errors import UserError


def choose_metric(requested: str | None, task: str, has_labels: bool) -> str:
    if requested == "top1" and not has_labels:
        raise UserError("data.eval.metric top1 needs labels, but the eval data has none; use cosine or give labels")
    if requested == "perplexity" and task != "lm":
        raise UserError(f"data.eval.metric perplexity is for language models (task lm), but this model's task is {task}; use cosine or set model.task: lm")
    if requested:
        return requested
    if task == "lm":
        return "perplexity"
    return "top1" if task == "classification" and has_labels else "cosine"


def run_outputs(artifact: Artifact, split, batch_size: int) -> np.ndarray:
    """The first output of ``artifact`` over the whole split, stacked along axis 0."""
    from edgekit.runtimes import load_session

    session = load_session(artifact)
    outs = [session.run(feeds)[0] for feeds, _ in split.batches(batch_size)]
    return np.concatenate(outs, axis=0)


def evaluate(artifact: Artifact, split, metric: str, reference: np.ndarray | None) -> dict[str, Any]:
    batch = 32 if isinstance(artifact.inputs[0].shape[0], str) else 1
    out = run_outputs(artifact, split, batch)
    result: dict[str, Any] = {"metric": metric, "samples": int(out.shape[0])}
    if metric == "top1":
        result["value"] = metrics.top1(out, split.labels)
        groups = getattr(split, "groups", None)
        if groups is not None:  # e.g. localization vs other questions of a generated VQA set
            result["by_group"] = {
                name: metrics.top1(out[groups == g], split.labels[groups == g])
                for g, name in enumerate(split.group_names) if (groups == g).any()
            }
        return result
    if metric == "perplexity":
        if "input_ids" not in split.arrays:
            raise UserError("data.eval.metric perplexity needs input_ids in the eval data; use text:FILE or an npz with input_ids")
        result["value"] = metrics.perplexity(out, split.arrays["input_ids"], split.arrays.get("attention_mask"))
        return result
    if reference is None:
        raise ValueError("a reference output is needed for metric " + metric)
    if metric == "cosine":
        cos = metrics.cosine(out, reference)
        result.update(value=cos["mean"], min=cos["min"])
    elif metric == "max_abs":
        result["value"] = metrics.max_abs(out, reference)
    else:
        result["value"] = metrics.mean_abs(out, reference)
    return result
