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
    "litert": "edgekit.runtimes.litert:LiteRT",
    "tvm": "edgekit.runtimes.tvm:TvmRuntime",
    "torch": "edgekit.runtimes.torch_eager:TorchEager",
    "blockffn": "edgekit.runtimes.blockffn_runtime:BlockFFNRuntime",
}
_DEFAULTS = {"torch": "torch", "onnx": "onnxruntime", "tflite": "litert", "tvm": "tvm"}


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


def runtime_options(name: str, bench: Any) -> dict[str, Any]:
    """The settings of a recipe's bench section that the runtime ``name`` takes."""
    if name == "onnxruntime":
        return {"graph_optimization": bench.graph_optimization}
    if name == "litert":
        return {"xnnpack": bench.xnnpack}
    if name == "blockffn":
        return {"weights": bench.blockffn_weights, "chunk": bench.blockffn_chunk}
    return {}


def load_session(artifact: Artifact, runtime: str | None = None, threads: int | None = None, **options: Any) -> Session:
    rt = get_runtime(runtime or default_runtime(artifact.format))
    if artifact.format not in rt.formats:
        raise UserError(f"runtime {rt.name} runs {', '.join(rt.formats)} models, not {artifact.format}")
    session = rt.load(artifact, threads=threads, **options)
    if artifact.meta.get("channel_last_inputs"):
        return _SourceLayout(session, artifact.meta["channel_last_inputs"])
    return session


def channels_last(feeds: dict[str, Any], names) -> dict[str, Any]:
    """NCHW -> NHWC for the named 4-D feeds; the others unchanged."""
    return {k: (v.transpose(0, 2, 3, 1).copy() if k in names else v) for k, v in feeds.items()}


def to_model_layout(artifact: Artifact, feeds: dict[str, Any]) -> dict[str, Any]:
    """Feeds in the source model's layout (NCHW) -> the export's, for inputs it takes channels-last."""
    return channels_last(feeds, artifact.meta.get("channel_last_inputs") or ())


class _SourceLayout(Session):
    """Lets probes feed source-layout (NCHW) data to an export that takes some inputs channels-last."""

    def __init__(self, inner: Session, names: list[str]):
        self._inner, self._names = inner, set(names)
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def run(self, feeds):
        return self._inner.run(channels_last(feeds, self._names))

    def describe(self):
        return self._inner.describe()


__all__ = ["Runtime", "Session", "default_runtime", "get_runtime", "load_session", "runtime_names", "runtime_options", "channels_last", "to_model_layout"]
