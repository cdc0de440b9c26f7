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
    if requested == "exact_match" and task != "seq2seq":
        raise UserError(f"data.eval.metric exact_match is for text-to-text models (task seq2seq), but this model's task is {task}; use another metric or set model.task: seq2seq")
    if requested:
        return requested
    if task == "seq2seq":
        return "exact_match"
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
    if metric == "exact_match":
        return evaluate_generation(artifact, split)
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


def evaluate_generation(artifact: Artifact, split) -> dict[str, Any]:
    """Greedy answers of a text-to-text model (torch, or an ONNX generation export run on
    ONNX Runtime) against the split's ``target_ids``: exact match of whole answers, and tokens."""
    if "target_ids" not in split.arrays:
        raise UserError("data.eval.metric exact_match needs target_ids in the eval data; use synth:event_log:N or an npz with target_ids")
    source = np.asarray(split.arrays["input_ids"], dtype=np.int64)
    mask = np.asarray(split.arrays.get("attention_mask", np.ones_like(source)), dtype=np.int64)
    target = np.asarray(split.arrays["target_ids"], dtype=np.int64)
    scores = score_generation(*_generator(artifact), source, mask, target)
    return {"metric": "exact_match", "samples": len(source), "value": scores["rows"], "token_accuracy": scores["tokens"]}


def score_generation(run, kind: str, pad: int, source: np.ndarray, mask: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Greedy answers from ``run(source, mask, max_new) -> new tokens`` scored against ``target``
    (:func:`metrics.exact_match`). An encoder-decoder answers 32 rows at a time; a decoder-only
    model one row at a time, since its prompt cannot be padded."""
    rows = []
    step = 32 if kind == "encdec" else 1
    for start in range(0, len(source), step):
        src, m = source[start : start + step], mask[start : start + step]
        width = max(1, int(m.sum(1).max()))
        new = run(src[:, :width], m[:, :width], target.shape[1])
        padded = np.full((len(src), target.shape[1]), pad, dtype=np.int64)
        padded[:, : min(new.shape[1], target.shape[1])] = new[:, : target.shape[1]]
        rows.append(padded)
    return metrics.exact_match(np.concatenate(rows), target, pad)


def torch_generator(module):
    """(run, kind, pad) of :func:`score_generation` for one of edgekit's torch LMs."""
    import torch

    from edgekit.models.encdec import generate

    def run(src, m, n):
        mask = torch.from_numpy(m) if module.kind == "encdec" else None
        return generate(module, torch.from_numpy(src), n, mask).numpy()

    return run, module.kind, int(module.cfg.pad)


def _generator(artifact: Artifact):
    """(run(source, mask, max_new) -> new tokens, kind, pad) for a torch model or an ONNX generation export."""
    if artifact.format == "onnx" and "generation" in artifact.meta:
        from edgekit.runtimes.generation import OrtGenerator

        meta = artifact.meta["generation"]
        gen = OrtGenerator.load(artifact.folder, artifact.files, meta)
        return (lambda src, m, n: gen.generate(src, n, m if meta["kind"] == "encdec" else None)), meta["kind"], int(meta["pad"])
    if artifact.format == "torch":
        module = artifact.torch_module().eval()
        if getattr(module, "kind", None) in ("decoder", "encdec"):
            return torch_generator(module)
    raise UserError(f"exact_match evaluates edgekit's text-to-text LMs and their ONNX generation exports, not this {artifact.format} model; use another data.eval.metric")
