"""LiteRT (TensorFlow Lite) adapter: ``ai_edge_litert`` first, then
``tflite_runtime`` and ``tf.lite``.

Runs a model's default signature. A full-integer model takes and returns int8
(or uint8) tensors; the session quantizes float feeds with the input's own
scale and zero point and dequantizes the outputs, so callers always see floats
as they would from the source model.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import numpy as np

from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.runtimes.base import Runtime, Session

# (module, attribute holding the Interpreter class), tried in this order
_INTERPRETERS = (
    ("ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow.lite", "tensorflow"),
)


def find_interpreter() -> tuple[Any, str, str]:
    """(interpreter module, pip package, version) of the first LiteRT interpreter that imports."""
    for module_name, package in _INTERPRETERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version(package if package != "tensorflow" else "tensorflow-cpu")
        except PackageNotFoundError:
            ver = getattr(module, "__version__", "unknown")
        return module, package, ver
    raise UserError("no LiteRT interpreter is installed; pip install ai-edge-litert (or tflite-runtime)")


def _output_order(name: str) -> tuple[int, str]:
    """Signature outputs are named output_0, output_1, ...: sort them by number, not as text."""
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else 0, name)


class LiteRTSession(Session):
    def __init__(self, interpreter, input_names: list[str], info: dict[str, Any]):
        self._it = interpreter
        sig = interpreter.get_signature_list()
        self._sig_key = next(iter(sig))
        self._runner = interpreter.get_signature_runner(self._sig_key)
        sig_inputs = list(sig[self._sig_key]["inputs"])
        if len(sig_inputs) != len(input_names):
            raise UserError(
                f"the TFLite model takes {len(sig_inputs)} inputs but the artifact names {len(input_names)}; re-export it"
            )
        # signature inputs are args_0, args_1, ... in the artifact's input order
        self._sig_inputs = dict(zip(input_names, sorted(sig_inputs, key=_output_order)))
        self._in_details = self._runner.get_input_details()
        self._out_details = self._runner.get_output_details()
        self._outputs = sorted(sig[self._sig_key]["outputs"], key=_output_order)
        self.input_names = list(input_names)
        self.output_names = list(self._outputs)
        self._info = info

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise UserError(f"inputs {', '.join(missing)} are missing; the model takes {', '.join(self.input_names)}")
        args = {}
        for name, sig_name in self._sig_inputs.items():
            detail = self._in_details[sig_name]
            arr = np.asarray(feeds[name])
            want = [int(d) for d in detail["shape"]]
            if list(arr.shape) != want:
                raise UserError(
                    f"input {name} has shape {list(arr.shape)} but the TFLite model expects {want} "
                    "(TFLite models have fixed shapes; export again with these dims)"
                )
            args[sig_name] = _to_model_dtype(arr, detail)
        out = self._runner(**args)
        return [_from_model_dtype(out[k], self._out_details[k]) for k in self._outputs]

    def describe(self) -> dict[str, Any]:
        return dict(self._info)


def _to_model_dtype(arr: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = detail["dtype"]
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(dtype, np.integer) and np.issubdtype(arr.dtype, np.floating) and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(arr / scale) + zero, info.min, info.max).astype(dtype)
    return arr.astype(dtype, copy=False)


def _from_model_dtype(arr: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(arr.dtype, np.integer) and scale:
        return ((arr.astype(np.float32) - zero) * scale).astype(np.float32)
    return arr


class LiteRT(Runtime):
    name = "litert"
    formats = ("tflite",)

    def available(self) -> bool:
        try:
            find_interpreter()
        except UserError:
            return False
        return True

    def version(self) -> str:
        return find_interpreter()[2]

    def load(self, artifact: Artifact, threads: int | None = None, **options: Any) -> Session:
        module, package, ver = find_interpreter()
        xnnpack = bool(options.get("xnnpack", True))
        kwargs: dict[str, Any] = {"model_path": str(artifact.path("model"))}
        if threads:
            kwargs["num_threads"] = int(threads)
        if not xnnpack:
            resolver = getattr(module, "OpResolverType", None)
            if resolver is None:
                raise UserError(f"{package} cannot turn XNNPACK off; set bench.xnnpack: true or install ai-edge-litert")
            kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            interpreter = module.Interpreter(**kwargs)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{artifact.path('model')} does not load in LiteRT ({first}); re-export it") from None
        info = {"runtime": self.name, "package": package, "version": ver, "threads": threads, "xnnpack": xnnpack}
        return LiteRTSession(interpreter, [s.name for s in artifact.inputs], info)
