"""edgekit's own runtime for BlockFFN models: torch for everything else, the sparse C kernels for the FFNs.

Every ``BlockFFN`` layer of a torch artifact is served by
:class:`edgekit.runtimes.blockffn.SparseFFN` (fp32 or int8 weights), which reads
only the experts some token of a chunk activates. A sequence is cut into chunks
of ``chunk`` consecutive tokens (8 by default, the verification chunk of
speculative decoding) so that each chunk pays only for the union of its own
experts; one token at a time (decoding) is the chunk of 1.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.runtimes.base import Runtime, Session
from edgekit.runtimes.torch_eager import TorchSession

WEIGHT_DTYPES = ("fp32", "int8")


class ChunkedKernelFFN:
    """A drop-in ``forward`` for one BlockFFN layer: torch tensor in, torch tensor out, chunk by chunk."""

    def __init__(self, kernel, chunk: int):
        self.kernel = kernel
        self.chunk = chunk

    def __call__(self, x):
        import torch

        shape = x.shape
        seqs = x.detach().reshape(-1, shape[-1]) if x.ndim <= 2 else x.detach().reshape(-1, shape[-2], shape[-1])
        arr = np.ascontiguousarray(seqs.numpy(), dtype=np.float32)
        if arr.ndim == 2:  # tokens without a sequence axis: each one is its own chunk of 1
            out = np.concatenate([self.kernel(arr[i : i + 1]) for i in range(arr.shape[0])]) if arr.shape[0] else arr.copy()
        else:
            out = np.empty_like(arr)
            for b in range(arr.shape[0]):
                for t in range(0, arr.shape[1], self.chunk):
                    out[b, t : t + self.chunk] = self.kernel(arr[b, t : t + self.chunk])
        return torch.from_numpy(out).reshape(shape).to(x.dtype)


def attach_kernels(module, weights: str = "fp32", chunk: int = 8, threads: int | None = None) -> list[str]:
    """Serve every BlockFFN layer of ``module`` (in place) with the sparse kernels; the names of the layers."""
    from edgekit.models.blockffn import BlockFFN
    from edgekit.runtimes.blockffn import SparseFFN

    if weights not in WEIGHT_DTYPES:
        raise UserError(f"blockffn weights {weights!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    if chunk < 1:
        raise UserError(f"blockffn chunk must be at least 1 token, not {chunk}")
    names = []
    for name, layer in module.named_modules():
        if isinstance(layer, BlockFFN):
            layer.forward = ChunkedKernelFFN(SparseFFN.from_module(layer, dtype=weights, threads=threads), chunk)
            names.append(name)
    if not names:
        raise UserError("runtime blockffn runs models with BlockFFN layers and this model has none; convert its FFNs with the moe.blockffn pass first, or use runtime torch")
    return names


class BlockFFNSession(TorchSession):
    def __init__(self, module, names: list[str], threads: int | None, weights: str, chunk: int, layers: list[str]):
        super().__init__(module, names, threads)
        self.weights, self.chunk, self.layers = weights, chunk, layers

    def describe(self) -> dict[str, Any]:
        from edgekit.runtimes.blockffn import kernel_info

        info = kernel_info()
        return {**super().describe(), "runtime": "blockffn", "mode": f"{self.weights} weights, chunks of {self.chunk}",
                "kernel": {k: info.get(k) for k in ("compiler", "flags", "simd")}, "blockffn_layers": len(self.layers)}


class BlockFFNRuntime(Runtime):
    name = "blockffn"
    formats = ("torch",)

    def version(self) -> str:
        import torch

        return torch.__version__

    def skip_reason(self, artifact: Artifact) -> str | None:
        if not artifact.meta.get("blockffn"):
            return "the model has no BlockFFN layers (the moe.blockffn pass makes them)"
        return None

    def load(self, artifact: Artifact, threads: int | None = None, weights: str = "fp32", chunk: int = 8, **options: Any) -> Session:
        module = copy.deepcopy(artifact.torch_module()).eval()
        layers = attach_kernels(module, weights=weights, chunk=chunk, threads=threads)
        return BlockFFNSession(module, [s.name for s in artifact.inputs], threads, weights, chunk, layers)
