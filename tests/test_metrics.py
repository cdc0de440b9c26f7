"""Metrics on hand-made arrays."""

import math

import numpy as np
import pytest

from edgekit import metrics


def test_top1_and_agreement():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert metrics.top1(logits, np.array([1, 0, 0, 0])) == 0.75
    other = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert metrics.top1_agreement(logits, other) == 0.5
    with pytest.raises(ValueError):
        metrics.top1(logits, np.array([1, 0]))


def test_cosine_rowwise_with_zero_vectors():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [1.0, -1.0], [0.0, 0.0], [3.0, 4.0]])
    cos = metrics.cosine(a, b)
    assert cos["min"] == 0.0 and math.isclose(cos["mean"], (1 + 0 + 1 + 0) / 4)
    x = np.random.default_rng(0).normal(size=(3, 2, 4))  # flattened per sample
    assert math.isclose(metrics.cosine(x, -x)["mean"], -1.0)


def test_abs_and_rel_errors():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[1.0, 2.5], [3.0, 3.0]])
    assert metrics.max_abs(a, b) == 1.0
    assert metrics.mean_abs(a, b) == 0.375
    assert math.isclose(metrics.max_rel(a, b), 1.0 / 3.0)
    with pytest.raises(ValueError):
        metrics.max_abs(a, b[:1])
