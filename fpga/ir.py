"""The integer IR between a quantized torch detector and the HLS generator.

A :class:`Graph` is a list of layers in execution order over named 8-bit
tensors (channels, height, width; batch is always 1 on the FPGA). Every number
the hardware computes is defined here, so the Python reference
(``edgekit.fpga.reference``) and the generated C++ must agree bit for bit:

- zero points are always 0: a tensor after ReLU is unsigned [0, 255], one
  without is signed [-127, 127], a dilation map is unsigned [0, N];
- a conv accumulates ``bias + sum(w * x)`` exactly in int32, with 4-bit
  weights in [-7, 7];
- requantization is ``clamp((acc * M + (1 << (S - 1))) >> S, lo, hi)`` with a
  per-channel multiplier ``M`` in [2^14, 2^15) and shift ``S >= 1``; a layer
  without requantization hands on its int32 accumulator (the head outputs).

The graph serialises to ``graph.json`` (structure, scales, shapes) and
``weights.npz`` (integer arrays; loaded with ``allow_pickle=False``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from edgekit.errors import UserError

LayerKind = Literal["conv", "deform_dw", "upsample", "concat", "split", "shuffle"]
KINDS = ("conv", "deform_dw", "upsample", "concat", "split", "shuffle")

MULTIPLIER_BITS = 15  # M in [2^14, 2^15): a 15-bit unsigned multiplier fits one DSP input
WEIGHT_BITS = 4
WEIGHT_MAX = 7  # symmetric, narrow range: [-7, 7]


@dataclass
class Tensor:
    name: str
    shape: tuple[int, int, int]  # (channels, height, width)
    bits: int  # 8 for activations, 32 for raw accumulators, ceil(log2(N+1)) for a dilation map
    signed: bool
    scale: float  # real value = integer * scale (zero point 0)
    zero_point: int = 0

    @property
    def range(self) -> tuple[int, int]:
        if self.bits >= 32:
            return (-(2**31), 2**31 - 1)
        if self.signed:
            return (-(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1)
        return (0, 2**self.bits - 1)


@dataclass
class Layer:
    """One operation. Fields that do not apply to a kind stay at their defaults.

    - ``conv``: inputs [x]; kernel 1 or 3, stride 1 or 2, padding kernel // 2,
      groups 1 or channels (depthwise). Weights ``{name}.weight`` int8 array
      [out, in/groups, k, k] with values in [-7, 7]; ``{name}.bias`` int32 [out];
      with requant, ``{name}.multiplier`` and ``{name}.shift`` int32 [out].
    - ``deform_dw``: inputs [x, dilation]; depthwise 3x3, stride 1, the square
      window of CoDeNet: tap (i, j) of output pixel (y, x) reads
      x[c, y + i*d, x + j*d] with d = dilation[0, y, x] in [0, bound], 0 outside.
    - ``upsample``: inputs [x]; nearest, factor 2.
    - ``concat``: inputs [a, b, ...] along channels.
    - ``split``: inputs [x]; outputs [first half, second half] of the channels.
    - ``shuffle``: inputs [x]; ShuffleNet channel shuffle with ``groups``:
      output channel k reads input channel (k % groups) * (C // groups) + k // groups.
    """

    name: str
    kind: LayerKind
    inputs: list[str]
    outputs: list[str]
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    relu: bool = False  # informational: the clamp range already encodes it
    requant: bool = True  # False: outputs[0] is the int32 accumulator
    clamp: tuple[int, int] | None = None  # output range of the requantized value
    bound: int = 0  # deform_dw: the largest dilation N
    source: str = ""  # the torch module this came from, for messages and reports


@dataclass
class Graph:
    input: str
    outputs: list[str]
    tensors: dict[str, Tensor]
    layers: list[Layer]
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # model name, variant, image size, ...

    def tensor(self, name: str) -> Tensor:
        return self.tensors[name]

    def validate(self) -> None:
        """Check names, order and the integer ranges the hardware relies on."""
        known = {self.input}
        for layer in self.layers:
            if layer.kind not in KINDS:
                raise UserError(f"IR layer {layer.name} has unknown kind {layer.kind!r}; valid: {', '.join(KINDS)}")
            for name in layer.inputs:
                if name not in known:
                    raise UserError(f"IR layer {layer.name} reads {name!r} before any layer writes it")
            known.update(layer.outputs)
            if layer.kind in ("conv", "deform_dw"):
                w = self.weights[f"{layer.name}.weight"]
                if np.abs(w).max(initial=0) > WEIGHT_MAX:
                    raise UserError(f"IR layer {layer.name} has weights outside [-{WEIGHT_MAX}, {WEIGHT_MAX}]")
                if layer.requant:
                    m = self.weights[f"{layer.name}.multiplier"]
                    s = self.weights[f"{layer.name}.shift"]
                    if m.min() < 2 ** (MULTIPLIER_BITS - 1) or m.max() >= 2**MULTIPLIER_BITS or s.min() < 1:
                        raise UserError(f"IR layer {layer.name} has a requantization multiplier or shift out of range")
        for name in self.outputs:
            if name not in known:
                raise UserError(f"IR output {name!r} is never written")

    def save(self, folder: str | Path) -> None:
        from edgekit.fsio import write_bytes, write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {
            "input": self.input,
            "outputs": self.outputs,
            "tensors": {k: asdict(t) for k, t in self.tensors.items()},
            "layers": [asdict(layer) for layer in self.layers],
            "meta": self.meta,
        }
        write_text(folder / "graph.json", json.dumps(doc, indent=1))
        import io

        buf = io.BytesIO()
        np.savez(buf, **self.weights)
        write_bytes(folder / "weights.npz", buf.getvalue())

    @classmethod
    def load(cls, folder: str | Path) -> Graph:
        folder = Path(folder)
        if not (folder / "graph.json").is_file():
            raise UserError(f"{folder} holds no graph.json; point at the fpga step's folder of a run")
        doc = json.loads((folder / "graph.json").read_text())
        tensors = {k: Tensor(**{**t, "shape": tuple(t["shape"])}) for k, t in doc["tensors"].items()}
        layers = [Layer(**{**d, "clamp": tuple(d["clamp"]) if d["clamp"] else None}) for d in doc["layers"]]
        with np.load(folder / "weights.npz", allow_pickle=False) as npz:
            weights = {k: npz[k] for k in npz.files}
        return cls(doc["input"], doc["outputs"], tensors, layers, weights, doc.get("meta", {}))
