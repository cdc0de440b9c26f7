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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and two threads crawl when another process shares the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scrambled_weights(model, seed: int):
    """Random weights large enough that greedy decoding varies with position (a default init mostly repeats one token)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    return model.eval()


def randomize_norms(model, seed: int = 0):
    """BatchNorm statistics and affines far from their initial values: fresh ones are the identity, which makes every fold trivial."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return model.eval()


def rel_diff(a, b) -> float:
    """Largest absolute difference of two outputs relative to their largest magnitude."""
    return float((a - b).abs().max() / max(a.abs().max(), b.abs().max()))


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


def run_cli(argv: list[str]) -> int:
    """``edgekit ARGV`` in this process; its exit code."""
    from edgekit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def compress_recipe(folder: Path, text: str, cache: Path | None = None) -> Path:
    """Write ``text`` as a recipe in ``folder``, run ``edgekit compress`` on it (exit 0 asserted); the run folder.

    ``cache``: an EDGEKIT_CACHE for module-scoped fixtures, which run before the per-test cache is set.
    """
    recipe = write_recipe(folder, text)
    with pytest.MonkeyPatch.context() as mp:
        if cache is not None:
            mp.setenv("EDGEKIT_CACHE", str(cache))
        code = run_cli(["compress", str(recipe), "--run-dir", str(folder / "run"), "--quiet"])
    assert code == 0
    return folder / "run"


def step_manifest(run_dir: Path, pass_name: str) -> dict:
    """The manifest of the (first) step of a run that ran ``pass_name``."""
    import json

    return json.loads((next((run_dir / "steps").glob(f"*{pass_name}")) / "manifest.json").read_text())
