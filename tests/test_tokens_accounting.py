"""Generated datasets (synth:NAME:N) and the per-layer token / MAC accounting."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.artifact import TensorSpec
from edgekit.compress.tokens.accounting import compare, format_layers, token_flops
from edgekit.data import RecipeData
from edgekit.errors import UserError
from edgekit.models import datasets
from edgekit.recipe import DataSection

IMG = [TensorSpec(name="pixel_values", shape=["batch", 3, 16, 16], low=0, high=1, layout="NCHW")]


@datasets.register_dataset("_test_noise")
def _noise(n, seed, inputs, dims):
    """Uniform noise labelled by the sign of its mean (test only)."""
    rng = np.random.default_rng(seed)
    shape = inputs[0].concrete_shape({**dims, "batch": n})
    x = rng.random(shape, dtype=np.float32)
    return datasets.SynthData({inputs[0].name: x}, (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64))


def make(tmp_path: Path, section: dict, seed=0) -> RecipeData:
    return RecipeData(DataSection(**section), lambda p: tmp_path / p, IMG, {"batch": 1}, None, seed)


def test_synth_source_splits_and_draws_per_yaml_path(tmp_path):
    d = make(tmp_path, {"source": "synth:_test_noise:50", "eval": {"source": "synth:_test_noise:20"}})
    d.check()
    train, ev = d.split("train"), d.split("eval")
    assert train.arrays["pixel_values"].shape == (40, 3, 16, 16) and len(ev) == 20
    assert train.labels.dtype == np.int64
    # the eval source is a different draw, not the first 20 samples of data.source again
    pool = d._load("synth:_test_noise:50", "data.source").arrays["pixel_values"]
    assert not any(np.array_equal(ev.arrays["pixel_values"][0], p) for p in pool)
    again = make(tmp_path, {"source": "synth:_test_noise:50", "eval": {"source": "synth:_test_noise:20"}})
    np.testing.assert_array_equal(again.split("eval").arrays["pixel_values"], ev.arrays["pixel_values"])


@pytest.mark.parametrize("source, needle", [("synth:nope:10", "unknown generated dataset 'nope'"), ("synth:_test_noise", "sample count")])
def test_synth_source_errors(tmp_path, source, needle):
    with pytest.raises(UserError, match=needle):
        make(tmp_path, {"source": source}).check()


class _Block(nn.Module):
    def __init__(self, dim, keep=None):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.keep = keep

    def forward(self, x):
        if self.keep is not None:
            x = x[:, : self.keep]
        return self.fc(x)


class _Toy(nn.Module):
    """Linear blocks over (batch, tokens, 8); block 1 drops to 5 tokens, block 2 to 3."""

    def __init__(self, keeps=(None, 5, 3)):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(8, k) for k in keeps)

    def token_blocks(self):
        return list(self.blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.mean(1)


def test_token_flops_counts_tokens_and_macs_per_block():
    x = torch.randn(1, 10, 8)
    dense = token_flops(_Toy((None, None, None)), {"x": x})
    pruned = token_flops(_Toy(), {"x": x})
    assert [r["tokens"] for r in dense["layers"]] == [10, 10, 10]
    assert [r["tokens"] for r in pruned["layers"]] == [10, 10, 5]  # tokens entering each block
    assert [r["tokens_out"] for r in pruned["layers"]] == [10, 5, 3]
    assert [r["macs"] for r in pruned["layers"]] == [10 * 64, 5 * 64, 3 * 64]
    assert pruned["block_macs"] == 18 * 64 and pruned["total_macs"] >= pruned["block_macs"]
    both = compare(dense, pruned)
    assert both["block_macs_cut"] == pytest.approx(1 - 18 / 30, abs=1e-4)
    assert both["layers"][1]["dense_macs"] == 640
    table = format_layers(both)
    assert table[2:] == ["| 0 | 10 | 10 | 640 |", "| 1 | 10 | 5 | 640 → 320 |", "| 2 | 10 → 5 | 3 | 640 → 192 |"]


def test_token_flops_names_a_model_without_blocks():
    with pytest.raises(UserError, match="Linear does not expose its transformer blocks"):
        token_flops(nn.Linear(3, 3), {"x": torch.zeros(1, 3)})
