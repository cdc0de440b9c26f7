"""The profile probe and `edgekit inspect`: params, MACs, op histogram, size.

Torch MACs come from PyTorch's FLOP counter on one batch-1 forward pass; ONNX
MACs from the graph's inferred shapes (Conv, ConvTranspose, Gemm, MatMul).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from edgekit.artifact import Artifact, torch_state_bytes
from edgekit.errors import UserError


def profile_artifact(artifact: Artifact, dims: dict[str, int]) -> dict[str, Any]:
    if artifact.format == "torch":
        info = _torch_profile(artifact.torch_module(), artifact.inputs, dims)
    elif artifact.format == "onnx":
        info = _onnx_profile(artifact.path("model"), dims)
    else:
        info = {"params": None, "macs": None, "ops": {}}
    info["size_bytes"] = artifact.size_bytes()
    return info


# -- torch ---------------------------------------------------------------------

def _torch_profile(module, inputs, dims) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edgekit.runtimes.torch_eager import call_module

    params = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    feeds = {s.name: torch.from_numpy(s.random({**dims, **_batch1(s)})) for s in inputs}
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        call_module(module, feeds, [s.name for s in inputs])
    ops = Counter(type(m).__name__ for m in module.modules() if not list(m.children()))
    return {"params": int(params), "macs": int(counter.get_total_flops() // 2), "ops": dict(ops.most_common())}


def _batch1(spec) -> dict[str, int]:
    first = spec.shape[0]
    return {first: 1} if isinstance(first, str) else {}


# -- onnx ----------------------------------------------------------------------

def _onnx_profile(path: Path, dims: dict[str, int]) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path), load_external_data=False)
    params = sum(math.prod(t.dims) for t in model.graph.initializer)
    ops: Counter = Counter()
    _count_ops(model.graph, ops)
    # Fix named dims so shape inference gives concrete sizes (batch 1 for the first dim).
    for i, inp in enumerate(model.graph.input):
        for k, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.dim_param or not d.HasField("dim_value"):
                size = 1 if k == 0 else int(dims.get(d.dim_param, 1))
                d.Clear()
                d.dim_value = size
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    shapes = _shapes(inferred)
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    macs, partial = 0, False
    for node in inferred.graph.node:
        m = _node_macs(node, shapes)
        if m is None:
            partial = partial or node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            continue
        macs += m
    out = {"params": int(params), "macs": int(macs), "ops": dict(ops.most_common())}
    if partial:
        out["macs_partial"] = True
    return out


def _count_ops(graph, ops: Counter) -> None:
    for node in graph.node:
        ops[node.op_type] += 1
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                _count_ops(attr.g, ops)
            for g in attr.graphs:
                _count_ops(g, ops)


def _shapes(model) -> dict[str, list[int]]:
    out = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [d.dim_value for d in dims]
    return out


def _node_macs(node, shapes) -> int | None:
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        out = shapes.get(node.output[0])
        w = shapes.get(node.input[1])
        if not out or not w:
            return None
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if op == "Conv":  # each output element: Cin/group * kH * kW MACs
            return math.prod(out) * math.prod(w[1:])
        x = shapes.get(node.input[0])
        return math.prod(x) * math.prod(w[1:]) if x else None
    if op in ("Gemm", "MatMul"):
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        out = shapes.get(node.output[0])
        if not a or not out:
            return None
        k = a[-1]
        if op == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
            k = a[0]
        return math.prod(out) * k
    return 0


# -- inspect -------------------------------------------------------------------

def inspect_target(target: str) -> dict[str, Any]:
    if target.startswith("zoo:"):
        return _inspect_zoo(target[4:])
    path = Path(target.removeprefix("onnx:"))
    if not path.is_file():
        raise UserError(f"{path} does not exist; give an .onnx file or zoo:NAME")
    return _inspect_onnx(path)


def _inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__}); give an .onnx file or zoo:NAME") from None
    if not model.graph.node:
        raise UserError(f"{path} is not an ONNX model (no graph nodes); give an .onnx file or zoo:NAME")
    init = {i.name for i in model.graph.initializer}

    def desc(vi) -> dict[str, Any]:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return {"name": vi.name, "shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"}

    prof = _onnx_profile(path, {})
    return {
        "target": str(path),
        "format": "onnx",
        "inputs": [desc(i) for i in model.graph.input if i.name not in init],
        "outputs": [desc(o) for o in model.graph.output],
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "size_bytes": path.stat().st_size,
        **prof,
    }


def _inspect_zoo(name: str) -> dict[str, Any]:
    from edgekit.models import create_model, model_info

    info = model_info(name)
    module = create_model(name).eval()
    prof = _torch_profile(module, info.inputs, info.dims)
    return {
        "target": f"zoo:{name}",
        "format": "torch",
        "description": info.description,
        "task": info.task,
        "inputs": [{"name": s.name, "shape": s.shape, "dtype": s.dtype} for s in info.inputs],
        "outputs": [],
        "size_bytes": torch_state_bytes(module),
        **prof,
    }


def format_inspect(info: dict[str, Any]):
    """A rich renderable of an inspect result."""
    from rich.console import Group
    from rich.table import Table

    head = Table(show_header=False, box=None)
    head.add_row("model", info["target"])
    head.add_row("format", info["format"])
    for key in ("description", "producer", "opset"):
        if info.get(key):
            head.add_row(key, str(info[key]))
    head.add_row("params", f"{info['params']:,}" if info.get("params") is not None else "–")
    macs = info.get("macs")
    head.add_row("MACs (batch 1)", (f"{macs:,}" + (" (partial)" if info.get("macs_partial") else "")) if macs is not None else "–")
    head.add_row("size", f"{info['size_bytes'] / 1e6:.3f} MB")
    io = Table(title="inputs and outputs")
    for col in ("", "name", "shape", "dtype"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in info.get(kind, []):
            io.add_row(kind[:-1], t["name"], str(t["shape"]), t["dtype"])
    ops = Table(title="ops" if info["format"] == "onnx" else "modules")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info.get("ops", {}).items():
        ops.add_row(op, str(n))
    return Group(head, io, ops)
