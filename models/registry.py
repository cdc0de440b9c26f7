"""A timm-style model registry: one file per family, one decorator per variant.

Family modules are imported on the first lookup, so ``import edgekit.models``
stays light and ``list_models`` sees every registered variant.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from edgekit.artifact import TensorSpec
from edgekit.errors import UserError

FAMILIES = (
    "edgekit.models.digits_cnn", "edgekit.models.mobile_cnn", "edgekit.models.codenet", "edgekit.models.tiny_lm", "edgekit.models.vit",
    "edgekit.models.tiny_vlm", "edgekit.models.encdec", "edgekit.models.event_log",
    # edge architectures from the literature, each with its deploy form (models/reparam.py)
    "edgekit.models.unireplknet", "edgekit.models.lsnet", "edgekit.models.hornet", "edgekit.models.ffnet", "edgekit.models.sgconv",
    "edgekit.models.convfirst", "edgekit.models.terminator",
)


def image_inputs(size: int = 32, channels: int = 3, name: str = "image") -> list[TensorSpec]:
    """One NCHW float image in [0, 1]: what the zoo's image classifiers take (``synth:shapes_cls`` draws it)."""
    return [TensorSpec(name=name, shape=["batch", channels, size, size], dtype="float32", layout="NCHW", low=0, high=1)]


@dataclass
class ModelInfo:
    name: str
    factory: Callable[..., Any]
    inputs: list[TensorSpec]
    task: str
    dims: dict[str, int] = field(default_factory=dict)
    description: str = ""


_MODELS: dict[str, ModelInfo] = {}
_loaded = False


def register_model(name: str | None = None, *, inputs: list[TensorSpec], task: str, dims: dict[str, int] | None = None):
    """Register a factory under ``name`` (default: the function's name)."""

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        key = name or factory.__name__
        doc = (factory.__doc__ or "").strip().splitlines()
        _MODELS[key] = ModelInfo(key, factory, inputs, task, dict(dims or {}), doc[0] if doc else "")
        return factory

    return wrap


def _load_families() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in FAMILIES:
            importlib.import_module(mod)


def list_models(pattern: str = "*") -> list[str]:
    _load_families()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> ModelInfo:
    _load_families()
    if name not in _MODELS:
        from edgekit.passes import suggest

        raise UserError(f"unknown zoo model {name!r}{suggest(name, sorted(_MODELS))}")
    return _MODELS[name]


def create_model(name: str, **kwargs: Any):
    import inspect

    info = model_info(name)
    try:
        inspect.signature(info.factory).bind(**kwargs)
    except TypeError as e:
        raise UserError(f"zoo model {name} does not take these arguments ({e}); fix model.args") from None
    return info.factory(**kwargs)
