"""Metrics on numpy arrays; axis 0 counts samples."""

from __future__ import annotations

import numpy as np


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {list(a.shape)} vs {list(b.shape)}")
    return a, b


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose highest logit is the label."""
    labels = np.asarray(labels).reshape(-1)
    logits = np.asarray(logits)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} outputs but {labels.shape[0]} labels")
    pred = logits.reshape(len(labels), -1).argmax(axis=1)
    return float((pred == labels).mean())


def exact_match(generated: np.ndarray, target: np.ndarray, pad: int) -> dict[str, float]:
    """Generated token rows against target rows (both padded with ``pad``): the share of rows
    whose answer matches exactly, and the share of target tokens matched in place."""
    generated, target = np.asarray(generated), np.asarray(target)
    out = np.full_like(target, pad)
    w = min(target.shape[1], generated.shape[1])
    out[:, :w] = generated[:, :w]
    valid = target != pad
    rows = ((out == target) | ~valid).all(axis=1)
    tokens = ((out == target) & valid).sum()
    return {"rows": float(rows.mean()) if len(rows) else float("nan"), "tokens": float(tokens / max(1, valid.sum()))}


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of samples where two models pick the same class."""
    a, b = _pair(a, b)
    n = a.shape[0]
    return float((a.reshape(n, -1).argmax(1) == b.reshape(n, -1).argmax(1)).mean())


def cosine(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Row-wise cosine similarity of flattened samples: mean and worst."""
    a, b = _pair(a, b)
    n = a.shape[0]
    a, b = a.reshape(n, -1), b.reshape(n, -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    cos = np.where(both_zero, 1.0, cos)
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _pair(a, b)
    return float(np.abs(a - b).max()) if a.size else 0.0


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _pair(a, b)
    return float(np.abs(a - b).mean()) if a.size else 0.0


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude.

    Scale-relative rather than element-wise, so near-zero elements do not blow it up.
    """
    a, b = _pair(a, b)
    if not a.size:
        return 0.0
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def perplexity(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> float:
    """exp of the mean next-token negative log-likelihood of a causal LM.

    ``logits`` (N, T, V) predict token ``t + 1`` at position ``t``; positions whose
    target is masked out (``attention_mask`` 0) do not count.
    """
    logits = np.asarray(logits, dtype=np.float64)
    ids = np.asarray(input_ids)
    if logits.ndim != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"perplexity needs logits [N, T, V] and input_ids [N, T], got {list(logits.shape)} and {list(ids.shape)}")
    pred, target = logits[:, :-1], ids[:, 1:]
    peak = pred.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(pred - peak).sum(axis=-1)) + peak[..., 0]
    nll = log_z - np.take_along_axis(pred, target[..., None], axis=-1)[..., 0]
    keep = np.ones_like(nll, dtype=bool) if attention_mask is None else np.asarray(attention_mask)[:, 1:].astype(bool)
    if not keep.any():
        raise ValueError("perplexity: every target position is masked out")
    return float(np.exp(nll[keep].mean()))
