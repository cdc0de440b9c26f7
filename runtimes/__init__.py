"""Runtime adapters behind one small interface, and the benchmark harness.

Adapters are imported only when asked for, so importing this package never
loads ONNX Runtime or PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.runtimes.base import Runtime, Session

_ADAPTERS = {
    "onnxruntime": "edgekit.runtimes.onnxruntime:OnnxRuntime",
    "torch": "edgekit.runtimes.torch_eager:TorchEager",
}
_DEFAULTS = {"torch": "torch", "onnx": "onnxruntime"}


def runtime_names() -> list[str]:
    return sorted(_ADAPTERS)


def get_runtime(name: str) -> Runtime:
    if name not in _ADAPTERS:
        from edgekit.passes import suggest

        raise UserError(f"unknown runtime {name!r}{suggest(name, runtime_names())}")
    module, _, cls = _ADAPTERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def default_runtime(fmt: str) -> str:
    if fmt not in _DEFAULTS:
        raise UserError(f"no runtime runs {fmt} models yet; known formats: {', '.join(_DEFAULTS)}")
    return _DEFAULTS[fmt]


def load_session(artifact: Artifact, runtime: str | None = None, threads: int | None = None, **options: Any) -> Session:
    rt = get_runtime(runtime or default_runtime(artifact.format))
    if artifact.format not in rt.formats:
        raise UserError(f"runtime {rt.name} runs {', '.join(rt.formats)} models, not {artifact.format}")
    return rt.load(artifact, threads=threads, **options)


__all__ = ["Runtime", "Session", "default_runtime", "get_runtime", "load_session", "runtime_names"]
