"""ONNX Runtime adapter (CPU by default)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.runtimes.base import Runtime, Session

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class OrtSession(Session):
    def __init__(self, session, info: dict[str, Any]):
        self._s = session
        self._inputs = session.get_inputs()
        self.input_names = [i.name for i in self._inputs]
        self.output_names = [o.name for o in session.get_outputs()]
        self._info = info

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise UserError(f"inputs {', '.join(missing)} are missing; the model takes {', '.join(self.input_names)}")
        cast = {}
        for i in self._inputs:
            want = _NP_TYPES.get(i.type)
            arr = np.asarray(feeds[i.name])
            cast[i.name] = arr.astype(want, copy=False) if want is not None else arr
            _check_shape(i, cast[i.name])
        return self._s.run(None, cast)

    def describe(self) -> dict[str, Any]:
        return dict(self._info)


def _check_shape(inp, arr: np.ndarray) -> None:
    expected = list(inp.shape)
    ok = len(expected) == arr.ndim and all(not isinstance(e, int) or e == g for e, g in zip(expected, arr.shape))
    if not ok:
        shown = [e if isinstance(e, int) else str(e) for e in expected]
        raise UserError(f"input {inp.name} has shape {list(arr.shape)} but the model expects {shown}; fix model.inputs or the data")


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    formats = ("onnx",)

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def load(self, artifact: Artifact, threads: int | None = None, **options: Any) -> Session:
        import onnxruntime as ort

        level = options.get("graph_optimization", "all")
        if level not in _LEVELS:
            raise UserError(f"graph_optimization {level!r} is not one of {', '.join(_LEVELS)}")
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
        so.log_severity_level = 4  # our one-line errors already say what ORT would print
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        if options.get("allow_spinning") is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options["allow_spinning"] else "0")
        if "generation" in artifact.meta:  # encoder / decoder graphs with a KV cache: a session that generates
            from edgekit.runtimes.generation import GenerationSession, OrtGenerator

            gen = OrtGenerator.load(artifact.folder, artifact.files, artifact.meta["generation"], threads=threads)
            info = {"runtime": self.name, "version": ort.__version__, "threads": threads, "mode": "generation"}
            return GenerationSession(gen, int(options.get("max_new_tokens", 32)), info)
        providers = options.get("providers") or ["CPUExecutionProvider"]
        path = artifact.path("model")
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} is not a valid ONNX model for ONNX Runtime ({first}); re-export it or check the file") from None
        info = {
            "runtime": self.name,
            "version": ort.__version__,
            "threads": threads,
            "providers": session.get_providers(),
            "graph_optimization": level,
        }
        return OrtSession(session, info)
