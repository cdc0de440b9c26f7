"""The trained-weights cache the training passes share."""

from pathlib import Path

import torch

from edgekit.compress.weights_cache import cache_file, load_cached, save_cached
from edgekit.passes import PassContext


def _ctx(tmp_path: Path, logs: list[str]) -> PassContext:
    return PassContext(workdir=tmp_path / "step", cache_dir=tmp_path / "cache", key="abc123", log=logs.append)


def test_saved_weights_load_into_a_fresh_model(tmp_path):
    logs: list[str] = []
    ctx = _ctx(tmp_path, logs)
    path = cache_file(ctx, enabled=True)
    assert path == tmp_path / "cache" / "weights" / "abc123.pt"
    trained = torch.nn.Linear(3, 2)
    save_cached(trained, path)
    fresh = torch.nn.Linear(3, 2)
    assert load_cached(fresh, path, ctx, "train.x")
    assert torch.equal(fresh.weight, trained.weight) and not logs


def test_damaged_or_mismatched_entries_are_ignored_with_a_message(tmp_path):
    logs: list[str] = []
    ctx = _ctx(tmp_path, logs)
    path = cache_file(ctx, enabled=True)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a state dict")
    assert not load_cached(torch.nn.Linear(3, 2), path, ctx, "train.x")
    save_cached(torch.nn.Linear(4, 2), path)  # another architecture under the same key
    assert not load_cached(torch.nn.Linear(3, 2), path, ctx, "train.x")
    assert len(logs) == 2 and all("train.x: ignoring cached weights abc123.pt" in line for line in logs)


def test_caching_off_or_without_a_key_writes_nothing(tmp_path):
    ctx = _ctx(tmp_path, [])
    assert cache_file(ctx, enabled=False) is None
    assert cache_file(PassContext(workdir=tmp_path, cache_dir=tmp_path / "cache", key=""), enabled=True) is None
    save_cached(torch.nn.Linear(3, 2), None)
    assert not load_cached(torch.nn.Linear(3, 2), None, ctx, "train.x")
    assert not (tmp_path / "cache").exists()
