"""Datasets the project generates itself, by name: the ``synth:NAME:N`` data source.

A generator is a pure function of ``(n, seed, inputs, dims)``: it draws ``n``
samples shaped to the model's input specs and returns a :class:`SynthData`.
Families register with :func:`register_dataset` and are imported on the first
lookup, like the model zoo.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgekit.artifact import TensorSpec
from edgekit.errors import UserError

FAMILIES = ("edgekit.models.shapes_cls", "edgekit.models.shapes_vqa", "edgekit.models.digits_canvas", "edgekit.models.event_log")


@dataclass
class SynthData:
    arrays: dict[str, np.ndarray]  # one array per model input, samples along axis 0
    labels: np.ndarray | None = None  # int64 class ids (or None)
    groups: np.ndarray | None = None  # optional int64 category per sample (e.g. question kind)
    group_names: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)


Generator = Callable[[int, int, list[TensorSpec], dict[str, int]], SynthData]
_DATASETS: dict[str, tuple[Generator, str]] = {}
_loaded = False


def register_dataset(name: str | None = None):
    """Register a generator ``(n, seed, inputs, dims) -> SynthData`` under ``name``."""

    def wrap(fn: Generator) -> Generator:
        doc = (fn.__doc__ or "").strip().splitlines()
        _DATASETS[name or fn.__name__] = (fn, doc[0] if doc else "")
        return fn

    return wrap


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in FAMILIES:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:  # a family still being written must not hide the others
                if e.name != mod:
                    raise


def list_datasets() -> dict[str, str]:
    _load()
    return {k: v[1] for k, v in sorted(_DATASETS.items())}


def generate(name: str, n: int, seed: int, inputs: list[TensorSpec], dims: dict[str, int]) -> SynthData:
    """``n`` samples of dataset ``name``, or a UserError naming the known ones."""
    _load()
    if name not in _DATASETS:
        from edgekit.passes import suggest

        raise UserError(f"unknown generated dataset {name!r}{suggest(name, sorted(_DATASETS))}")
    data = _DATASETS[name][0](n, seed, list(inputs), dict(dims))
    missing = [s.name for s in inputs if s.name not in data.arrays]
    if missing:
        raise UserError(f"generated dataset {name} makes {', '.join(data.arrays)} but the model takes {', '.join(missing)}; use a model this dataset is made for")
    return data
