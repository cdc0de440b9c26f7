import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tests never touch the user's cache or a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path_factory.getbasetemp() / "edgekit-cache"))


@pytest.fixture
def root() -> Path:
    return ROOT


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


TINY_DIGITS = """
name: tiny-digits
model:
  source: zoo:digits_cnn_tiny
data:
  source: sklearn:digits
  calibration: {samples: 16}
  eval: {samples: 120}
compress:
  - train.supervised: {epochs: 2}
export:
  - onnx: {opset: 17}
bench:
  runtimes: [onnxruntime]
  threads: [1]
  batch_sizes: [1]
  warmup: 2
  repeats: 5
report: {formats: [json, md]}
"""
