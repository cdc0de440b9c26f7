"""Passes: named, registered transformations ``Artifact -> Artifact``.

A pass subclasses :class:`Pass`, sets ``name`` (e.g. ``"export.onnx"``), a
pydantic ``Config`` with ``extra="forbid"``, the formats it ``accepts`` and the
format it ``produces``. Subclassing registers it. Pass modules import heavy
frameworks inside ``run`` only, so the registry loads in milliseconds.

The core knows algorithms only through this registry: it imports the modules
listed in ``BUILTIN_PASS_MODULES`` and any third-party module announced under
the ``edgekit.passes`` entry-point group.
"""

from __future__ import annotations

import difflib
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from edgekit.artifact import Artifact
from edgekit.errors import UserError

BUILTIN_PASS_MODULES = (
    "edgekit.compress.train",
    "edgekit.compress.train_detection",
    "edgekit.compress.quantize.ptq",
    "edgekit.compress.quantize.qat",
    "edgekit.compress.prune.vib",
    "edgekit.compress.moe.train_lm",
    "edgekit.compress.moe.finetune",
    "edgekit.compress.distill.passes",
    "edgekit.compress.tokens.transform",
    "edgekit.compress.tokens.feather",
    "edgekit.compress.reparam",
    "edgekit.export.onnx",
    "edgekit.export.tflite",
    "edgekit.export.tvm",
    "edgekit.fpga.export_hls",
)


class PassConfig(BaseModel):
    """Base for pass configs: unknown keys are errors, not silent defaults."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PassContext:
    """What a pass may use besides its input artifact."""

    workdir: Path  # an empty folder the pass writes its output files into
    data: Any = None  # edgekit.data.RecipeData, or None when the recipe has no data
    dims: dict[str, int] = field(default_factory=dict)  # sizes of named dynamic dims
    seed: int = 0
    cache_dir: Path | None = None  # shared across runs (e.g. trained weights)
    run_dir: Path | None = None  # this run's folder: state a rerun of the recipe reuses (e.g. TVM tuning records)
    key: str = ""  # this step's cache key (hash of input, pass, config, data)
    progress: Callable[..., Any] | None = None  # progress(iterable, description=, total=) -> iterable
    log: Callable[[str], None] = print
    metrics: dict[str, Any] = field(default_factory=dict)  # filled by the pass; lands in the report
    samples: Callable[[int], list[dict[str, Any]]] | None = None  # n batch-1 feed dicts (real data if any)
    source: Artifact | None = None  # the artifact this step reads
    path: str = ""  # the step's YAML path (e.g. export[0].onnx), for messages


class Pass(ABC):
    name: ClassVar[str] = ""
    kind: ClassVar[Literal["compress", "export"]] = "compress"
    Config: ClassVar[type[PassConfig]] = PassConfig
    accepts: ClassVar[tuple[str, ...]] = ("torch",)
    produces: ClassVar[str | None] = None  # None: same format as the input
    uses_data: ClassVar[tuple[str, ...]] = ()  # data splits this pass reads
    comes_before: ClassVar[tuple[str, ...]] = ()  # name prefixes of passes that must not run earlier (checked before work)

    def __init__(self, config: PassConfig):
        self.config = config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    def check_input(self, artifact: Artifact) -> None:
        if artifact.format not in self.accepts:
            raise UserError(
                f"pass {self.name} takes {' or '.join(self.accepts)} models but got a {artifact.format} model; "
                f"move it earlier in the recipe or use a source in one of those formats"
            )

    @abstractmethod
    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        """Return the transformed artifact (torch: with ``module``; files: inside ``ctx.workdir``)."""


_REGISTRY: dict[str, type[Pass]] = {}
_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_PASS_MODULES:
        importlib.import_module(mod)
    for ep in entry_points(group="edgekit.passes"):
        ep.load()


def registry() -> dict[str, type[Pass]]:
    _load_builtin()
    return dict(_REGISTRY)


def canonical_name(name: str, kind: str) -> str:
    """``onnx`` under ``export:`` means ``export.onnx``."""
    if kind == "export" and not name.startswith("export.") and "." not in name:
        return f"export.{name}"
    return name


def get_pass(name: str, kind: str | None = None) -> type[Pass]:
    reg = registry()
    if name in reg and (kind is None or reg[name].kind == kind):
        return reg[name]
    choices = sorted(n for n, p in reg.items() if kind is None or p.kind == kind)
    raise UserError(f"unknown pass {name!r}{suggest(name, choices)}")


def suggest(word: str, choices: list[str]) -> str:
    """A ``; did you mean X?`` suffix, or the list of valid choices."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {close[0]!r}?"
    if choices:
        return f"; valid: {', '.join(choices)}"
    return ""
