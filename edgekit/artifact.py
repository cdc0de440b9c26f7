"""An artifact is one model in one format, with its input specs and lineage.

Formats: ``torch`` (an in-memory ``nn.Module`` plus how to rebuild it),
``onnx``, and later ``tflite``, ``tvm``, ``hls``. An artifact can be saved to a
folder (``artifact.json`` plus its files) and loaded back; the pipeline keeps
one folder per step.

A torch artifact is saved as a state dict (loaded back with
``weights_only=True``) plus a *builder*: a small JSON description of how to
rebuild the module's architecture (the model source and its arguments, and
any structural changes a pass recorded). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgekit import fsio
from edgekit.errors import UserError

ARTIFACT_FILE = "artifact.json"
TORCH_WEIGHTS = "weights.pt"

DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


class TensorSpec(BaseModel):
    """A model input: name, shape (ints, or names for dynamic dims), dtype, layout.

    ``low``/``high`` bound the values of synthetic inputs (e.g. token ids).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int | str]
    dtype: Literal["float32", "float16", "int64", "int32", "int8", "uint8", "bool"] = "float32"
    layout: str | None = Field(default=None, description="e.g. NCHW or NHWC; recorded, not enforced")
    low: float | None = None
    high: float | None = None

    def dynamic_dims(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete_shape(self, dims: dict[str, int] | None = None) -> list[int]:
        """Shape with named dims resolved from ``dims`` (missing names default to 1)."""
        dims = dims or {}
        return [d if isinstance(d, int) else int(dims.get(d, 1)) for d in self.shape]

    def random(self, dims: dict[str, int] | None = None, seed: int = 0) -> np.ndarray:
        """A synthetic input of this spec, deterministic for a seed."""
        rng = np.random.default_rng(seed)
        shape = self.concrete_shape(dims)
        if self.dtype in ("float32", "float16"):
            lo = -1.0 if self.low is None else self.low
            hi = 1.0 if self.high is None else self.high
            return rng.uniform(lo, hi, size=shape).astype(self.dtype)
        if self.dtype == "bool":
            return rng.integers(0, 2, size=shape).astype(bool)
        lo = 0 if self.low is None else int(self.low)
        hi = 2 if self.high is None else int(self.high)
        return rng.integers(lo, hi, size=shape).astype(self.dtype)


@dataclass
class Artifact:
    """One model in one format. See the module docstring."""

    format: str
    inputs: list[TensorSpec]
    outputs: list[str] = field(default_factory=list)
    task: str = "generic"
    lineage: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # role -> file name inside ``folder``
    folder: Path | None = None
    builder: dict[str, Any] | None = None  # torch only: how to rebuild the module
    meta: dict[str, Any] = field(default_factory=dict)
    module: Any = None  # torch only: the live nn.Module (not serialised directly)

    # -- files -------------------------------------------------------------
    def path(self, role: str = "model") -> Path:
        if self.folder is None or role not in self.files:
            raise KeyError(f"{self.format} artifact has no file for role {role!r}")
        return self.folder / self.files[role]

    def size_bytes(self) -> int:
        """Bytes on disk of the model files (a torch artifact counts its state dict)."""
        if self.folder is not None and self.files:
            return sum(self.path(r).stat().st_size for r in self.files)
        if self.format == "torch" and self.module is not None:
            return torch_state_bytes(self.module)
        return 0

    # -- torch -------------------------------------------------------------
    def torch_module(self):
        """The live module, rebuilt from builder + weights when loaded from disk."""
        if self.format != "torch":
            raise TypeError(f"{self.format} artifact has no torch module")
        if self.module is None:
            import torch

            from edgekit import sources

            module = sources.build_torch_module(self.builder or {})
            state = torch.load(self.path("weights"), map_location="cpu", weights_only=True)
            module.load_state_dict(state)
            module.eval()
            self.module = module
        return self.module

    # -- persistence -------------------------------------------------------
    def derive(self, **changes: Any) -> "Artifact":
        """A new artifact that inherits specs, task and meta, with ``changes`` applied."""
        base = dict(
            format=self.format,
            inputs=[s.model_copy() for s in self.inputs],
            outputs=list(self.outputs),
            task=self.task,
            lineage=list(self.lineage),
            meta=dict(self.meta),
            builder=dict(self.builder) if self.builder else None,
        )
        base.update(changes)
        return Artifact(**base)

    def save(self, folder: str | Path) -> "Artifact":
        """Write this artifact into ``folder`` (which the caller makes atomic)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = dict(self.files)
        if self.format == "torch" and self.module is not None:
            import torch

            with fsio.atomic_path(folder / TORCH_WEIGHTS) as tmp:
                torch.save(self.module.state_dict(), tmp)
            files["weights"] = TORCH_WEIGHTS
        elif self.folder is not None and self.folder.resolve() != folder.resolve():
            for role, name in self.files.items():
                src = self.folder / name
                if src.is_dir():
                    shutil.copytree(src, folder / name, dirs_exist_ok=True)
                else:
                    shutil.copy2(src, folder / name)
        record = {
            "format": self.format,
            "inputs": [s.model_dump() for s in self.inputs],
            "outputs": self.outputs,
            "task": self.task,
            "lineage": self.lineage,
            "files": files,
            "builder": self.builder,
            "meta": self.meta,
        }
        fsio.write_json(folder / ARTIFACT_FILE, record)
        return Artifact(folder=folder, module=self.module, **{**record, "inputs": list(self.inputs)})

    @classmethod
    def load(cls, folder: str | Path) -> "Artifact":
        folder = Path(folder)
        meta_file = folder / ARTIFACT_FILE
        if not meta_file.is_file():
            raise UserError(f"{folder} is not an edgekit artifact folder (no {ARTIFACT_FILE}); point at a step's artifact folder")
        record = json.loads(meta_file.read_text())
        record["inputs"] = [TensorSpec(**s) for s in record["inputs"]]
        return cls(folder=folder, **record)

    def fingerprint(self) -> str:
        """A short content hash of the model files (used to key source steps)."""
        h = hashlib.sha256()
        for role in sorted(self.files):
            p = self.path(role)
            paths = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
            for q in paths:
                h.update(q.name.encode())
                with open(q, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
        return h.hexdigest()[:16]


def torch_state_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (its state dict payload)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.state_dict(keep_vars=False).values()):
        if not hasattr(t, "numel"):  # quantized modules keep dtypes and other metadata here
            continue
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
