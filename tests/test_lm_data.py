"""Language-model plumbing in the core: byte-level text data and the perplexity metric."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit import metrics
from edgekit.artifact import TensorSpec
from edgekit.data import RecipeData
from edgekit.errors import UserError
from edgekit.evaluate import choose_metric
from edgekit.recipe import DataSection

IDS = [TensorSpec(name="input_ids", shape=["batch", "seq"], dtype="int64", low=0, high=256)]


def _data(tmp_path, text: bytes, seq: int = 8, **section) -> RecipeData:
    (tmp_path / "corpus.txt").write_bytes(text)
    sec = DataSection(source="text:corpus.txt", **section)
    return RecipeData(sec, lambda p: tmp_path / p, IDS, {"batch": 1, "seq": seq}, None, seed=0, byte_tokens=True)


def test_byte_windows_are_consecutive_utf8_bytes(tmp_path):
    text = "héllo wörld, bytes all the way down.\n".encode() * 3
    data = _data(tmp_path, text, holdout=0.25)
    train, evals = data.split("train"), data.split("eval")
    windows = np.concatenate([train.arrays["input_ids"], evals.arrays["input_ids"]])
    assert windows.dtype == np.int64 and windows.shape[1] == 8
    assert len(windows) == len(text) // 8
    got = sorted(bytes(w.astype(np.uint8)) for w in windows)
    want = sorted(text[i * 8 : (i + 1) * 8] for i in range(len(text) // 8))
    assert got == want
    assert len(evals) == int(np.ceil(0.25 * len(windows)))


def test_byte_windows_refuse_non_utf8_and_short_text(tmp_path):
    with pytest.raises(UserError, match="not UTF-8"):
        _data(tmp_path, b"\xff\xfe" * 20).check()
    with pytest.raises(UserError, match="fewer than one window"):
        _data(tmp_path, b"short", seq=64).check()


def test_text_without_tokenizer_still_asks_for_one(tmp_path):
    (tmp_path / "c.txt").write_text("one line\n")
    data = RecipeData(DataSection(source="text:c.txt"), lambda p: tmp_path / p, IDS, {"seq": 8}, None, seed=0)
    with pytest.raises(UserError, match="needs a tokenizer"):
        data.check()


def test_perplexity_known_values():
    ids = np.array([[1, 2, 3, 0]])
    uniform = np.zeros((1, 4, 5))
    assert metrics.perplexity(uniform, ids) == pytest.approx(5.0)
    sure = np.full((1, 4, 5), -50.0)
    for t, nxt in enumerate([2, 3, 0]):
        sure[0, t, nxt] = 50.0
    assert metrics.perplexity(sure, ids) == pytest.approx(1.0)
    # a wrong, confident last prediction counts unless its target is masked out
    sure[0, 2, 0], sure[0, 2, 4] = -50.0, 50.0
    assert metrics.perplexity(sure, ids) > 1e10
    assert metrics.perplexity(sure, ids, np.array([[1, 1, 1, 0]])) == pytest.approx(1.0)


def test_perplexity_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        metrics.perplexity(np.zeros((1, 4)), np.zeros((1, 4), dtype=int))


def test_metric_choice_for_language_models():
    assert choose_metric(None, "lm", False) == "perplexity"
    assert choose_metric("cosine", "lm", False) == "cosine"
    with pytest.raises(UserError, match="task lm"):
        choose_metric("perplexity", "classification", True)
