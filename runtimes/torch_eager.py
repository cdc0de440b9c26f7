"""PyTorch eager adapter: the source model as the baseline every export is compared with."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from edgekit.artifact import Artifact
from edgekit.runtimes.base import Runtime, Session


def call_module(module, feeds: dict[str, Any], names: list[str]):
    """Call ``module`` with feeds by keyword when its forward takes those names, else positionally."""
    params = inspect.signature(module.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if all(n in params for n in names) or takes_kwargs:
        return module(**{n: feeds[n] for n in names})
    return module(*[feeds[n] for n in names])


def flatten_outputs(out) -> list:
    """Tensors of a model output in order: a tensor, a tuple/list, or a dict-like output."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
    flat = []
    for o in out:
        flat.extend(flatten_outputs(o) if not isinstance(o, torch.Tensor) else [o])
    return flat


class TorchSession(Session):
    def __init__(self, module, names: list[str], threads: int | None):
        self.module = module
        self.input_names = names
        self.output_names = []
        self.threads = threads

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        if self.threads:
            torch.set_num_threads(int(self.threads))
        tensors = {n: torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names}
        with torch.inference_mode():
            out = call_module(self.module, tensors, self.input_names)
        return [o.detach().cpu().numpy() for o in flatten_outputs(out)]

    def describe(self) -> dict[str, Any]:
        import torch

        return {"runtime": "torch", "version": torch.__version__, "threads": self.threads or torch.get_num_threads(), "mode": "eager"}


class TorchEager(Runtime):
    name = "torch"
    formats = ("torch",)

    def version(self) -> str:
        import torch

        return torch.__version__

    def load(self, artifact: Artifact, threads: int | None = None, **options: Any) -> Session:
        module = artifact.torch_module()
        module.eval()
        return TorchSession(module, [s.name for s in artifact.inputs], threads)
