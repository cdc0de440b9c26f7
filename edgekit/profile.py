"""The profile probe and ``edgekit inspect``: params, MACs, op histogram, size.

Torch MACs come from PyTorch's FLOP counter on one batch-1 forward pass (MACs =
FLOPs / 2). ONNX MACs come from the graph itself: named dims are fixed to concrete
sizes, shapes are inferred, and Conv, ConvTranspose, Gemm, MatMul (and their
integer / QLinear forms) and Einsum are counted. A node whose shapes stay
unknown is skipped and the result is marked ``macs_partial``.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from edgekit.artifact import ARTIFACT_FILE, Artifact, TensorSpec
from edgekit.errors import UserError

# op type -> (index of the data input, index of the weight / second operand)
_CONV_OPS = {"Conv": (0, 1), "ConvInteger": (0, 1), "FusedConv": (0, 1), "QLinearConv": (0, 3)}
_MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}
_GEMM_OPS = {"Gemm", "FusedGemm"}
_COUNTED_OPS = {*_CONV_OPS, *_MATMUL_OPS, *_GEMM_OPS, "ConvTranspose", "Einsum"}
# Ops that multiply-accumulate but are not counted: their presence makes the total partial.
_UNCOUNTED_MAC_OPS = {
    "LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention", "QAttention", "FusedMatMul",
    "MatMulNBits", "DynamicQuantizeMatMul", "QGemm", "DeformConv",
}
# Initializers of these ONNX element types are shape / index data, not weights.
_NON_WEIGHT_TYPES = {4, 5, 6, 7, 8, 9, 12, 13}  # (u)int16, int32, int64, string, bool, uint32, uint64


def profile_artifact(artifact: Artifact, dims: dict[str, int]) -> dict[str, Any]:
    """{"params", "macs" (batch 1; None if not countable), "size_bytes", "ops"} of an artifact."""
    if artifact.format == "torch":
        info = _torch_profile(artifact.torch_module(), artifact.inputs, dims)
        info.pop("outputs", None)
    elif artifact.format == "onnx" and "generation" in artifact.meta:
        info = _generation_profile(artifact)
    elif artifact.format == "onnx":
        info = _onnx_profile(_load_onnx(artifact.path("model")), artifact.inputs, dims)
    else:  # formats without a counter yet still get their size
        info = {"params": None, "macs": None, "ops": {}}
    info["size_bytes"] = artifact.size_bytes()
    return info


def _batch1_dims(specs: list[TensorSpec], dims: dict[str, int]) -> dict[str, int]:
    """``dims`` with every named batch dim (the first dim of an input) set to 1."""
    fixed = dict(dims or {})
    for s in specs:
        if s.shape and isinstance(s.shape[0], str):
            fixed[s.shape[0]] = 1
    return fixed


# -- torch ---------------------------------------------------------------------

def _torch_profile(module, specs: list[TensorSpec], dims: dict[str, int]) -> dict[str, Any]:
    params = sum(p.numel() for p in module.parameters()) + _packed_params(module)  # parameters() skips shared ones
    ops = Counter(type(m).__name__ for m in module.modules() if _is_leaf(m))
    macs, outputs = _torch_macs(module, specs, _batch1_dims(specs, dims))
    if macs == 0 and any(("Conv" in op or "Linear" in op) for op in ops):
        macs = None  # e.g. packed int8 kernels the counter does not see: unknown, not zero
    return {"params": int(params), "macs": macs, "ops": dict(ops.most_common()), "outputs": outputs}


def _is_leaf(m) -> bool:
    # a quantized Linear keeps its int8 weights in a *PackedParams child; it is still one layer
    return all(type(c).__name__.endswith("PackedParams") for c in m.children()) and not type(m).__name__.endswith("PackedParams")


def _packed_params(module) -> int:
    """Elements of int8 weights and biases that quantized modules keep packed, outside parameters()."""
    import torch

    total = 0
    for m in module.modules():
        for name in ("weight", "bias"):
            getter = getattr(m, name, None)
            if callable(getter) and not isinstance(getter, torch.Tensor):
                try:
                    t = getter()
                except Exception:  # a method with another meaning: not a packed tensor
                    continue
                if isinstance(t, torch.Tensor):
                    total += t.numel()
    return total


def _torch_macs(module, specs: list[TensorSpec], dims: dict[str, int]) -> tuple[int | None, list[dict[str, Any]]]:
    """MACs of one forward pass and the output shapes; (None, []) if the forward pass fails."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edgekit.runtimes.torch_eager import call_module, flatten_outputs

    names = [s.name for s in specs]
    feeds = {s.name: torch.from_numpy(s.random(dims)) for s in specs}
    was_training = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            out = call_module(module, feeds, names)
        flat = flatten_outputs(out)
    except Exception:  # e.g. an op the counter cannot trace; the rest of the profile still stands
        return None, []
    finally:
        module.train(was_training)
    outputs = [
        {"name": f"output_{i}" if len(flat) > 1 else "output", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for i, t in enumerate(flat)
    ]
    return int(counter.get_total_flops() // 2), outputs


# -- onnx ----------------------------------------------------------------------

def _load_onnx(path: Path):
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError, or any other parse failure
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__}); pass a .onnx file (e.g. one exported by edgekit) or zoo:NAME") from None
    if not model.graph.node and not model.graph.input:
        raise UserError(f"{path} is not an ONNX model (it has no graph); pass a .onnx file (e.g. one exported by edgekit) or zoo:NAME")
    return model


def _onnx_profile(model, specs: list[TensorSpec], dims: dict[str, int]) -> dict[str, Any]:
    ops: Counter = Counter()
    for g in _graphs(model.graph):
        ops.update(n.op_type for n in g.node)
    macs, partial = onnx_macs(model, specs, dims)
    info = {"params": onnx_params(model), "macs": macs, "ops": dict(ops.most_common())}
    if partial:
        info["macs_partial"] = True
    return info


def _graphs(graph):
    """The graph and every subgraph nested in its nodes (If, Loop, Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _is_weight(t) -> bool:
    # Scalars are quantization scales / zero points or constants, not learned weights.
    return t.data_type not in _NON_WEIGHT_TYPES and math.prod(t.dims) > 1


def _generation_profile(artifact: Artifact) -> dict[str, Any]:
    """Parameters and ops of a generation export (encoder / decoder graphs with a KV cache).

    A weight stored in two graphs (the tied embedding) counts once; MACs depend on the
    generated length, so they are not given here (bench/encdec.py times generation)."""
    import hashlib

    ops: Counter = Counter()
    seen: set[tuple[str, str]] = set()
    params = 0
    for role in artifact.files:
        model = _load_onnx(artifact.path(role))
        for g in _graphs(model.graph):
            ops.update(n.op_type for n in g.node)
            for t in g.initializer:
                key = (t.name, hashlib.sha1(t.raw_data).hexdigest())
                if _is_weight(t) and key not in seen:
                    seen.add(key)
                    params += math.prod(t.dims)
    return {"params": int(params), "macs": None, "ops": dict(ops.most_common())}


def onnx_params(model) -> int:
    """Elements of weight-like initializers and Constant tensors, in all (sub)graphs."""
    total = 0
    for g in _graphs(model.graph):
        total += sum(math.prod(t.dims) for t in g.initializer if _is_weight(t))
        for node in g.node:
            if node.op_type != "Constant":
                continue
            for attr in node.attribute:
                if attr.name == "value" and _is_weight(attr.t):
                    total += math.prod(attr.t.dims)
                elif attr.name == "value_floats" and len(attr.floats) > 1:
                    total += len(attr.floats)
    return int(total)


def onnx_macs(model, specs: list[TensorSpec] | None = None, dims: dict[str, int] | None = None) -> tuple[int | None, bool]:
    """(MACs of one batch-1 run, partial?) from the graph's inferred shapes.

    Named dims come from ``specs`` / ``dims`` (the first dim is the batch: 1);
    names that are still unknown become 1.
    """
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    _fix_input_dims(g, specs or [], _batch1_dims(specs or [], dims or {}))
    # Shapes the exporter wrote with symbolic dims would clash with the now-concrete ones.
    del g.value_info[:]
    for vi in g.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    shapes = _known_shapes(_infer_shapes(m).graph)
    total, unknown, mac_nodes = _count_macs(m, shapes)
    if unknown:
        # onnx's inference loses dims behind shape arithmetic (Shape -> Slice, as in exported
        # transformers); ONNX Runtime's symbolic inference resolves those, at a few seconds' cost.
        resolved = _symbolic_shapes(m)
        if resolved is not None:
            total, unknown, mac_nodes = _count_macs(m, {**shapes, **_known_shapes(resolved.graph)})
    partial = unknown > 0 or _has_uncounted_macs(m)
    if mac_nodes and unknown == mac_nodes:
        return None, True
    return int(total), partial


def _infer_shapes(model):
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # count what the declared shapes allow
        return model


def _symbolic_shapes(model):
    """ONNX Runtime's symbolic shape inference, driven step by step: its one-call
    ``infer_shapes`` throws away a partial result and writes a temp file into the cwd."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        sym = SymbolicShapeInference(int_max=2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
        sym._preprocess(model)
        while sym.run_:
            sym._infer_impl()
        sym._update_output_from_vi()
        return sym.out_mp_
    except Exception:  # not installed, its internals changed, or an op it cannot take: stay partial
        return None


def _count_macs(model, shapes: dict[str, list[int]]) -> tuple[int, int, int]:
    """(MACs of the countable nodes, nodes skipped for unknown shapes, countable nodes) of the main graph."""
    total = unknown = mac_nodes = 0
    for node in model.graph.node:
        if node.op_type in _COUNTED_OPS:
            mac_nodes += 1
            n = _node_macs(node, shapes)
            if n is None:
                unknown += 1
            else:
                total += n
    return total, unknown, mac_nodes


def _has_uncounted_macs(model) -> bool:
    """Ops that multiply-accumulate but are not counted: RNNs, fused contrib ops, local
    functions and control-flow bodies (which run an unknown number of times)."""
    mac_ops = _COUNTED_OPS | _UNCOUNTED_MAC_OPS
    local_fns = {(f.domain, f.name) for f in model.functions if any(n.op_type in mac_ops for n in f.node)}
    for node in model.graph.node:
        if node.op_type in _UNCOUNTED_MAC_OPS or (node.domain, node.op_type) in local_fns:
            return True
        if any(o.op_type in mac_ops for sub in _subgraphs(node) for g in _graphs(sub) for o in g.node):
            return True
    return False


def _subgraphs(node):
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _fix_input_dims(graph, specs: list[TensorSpec], dims: dict[str, int]) -> None:
    by_name = {s.name: s for s in specs}
    initializers = {t.name for t in graph.initializer}
    for vi in graph.input:
        if vi.name in initializers or not vi.type.HasField("tensor_type"):
            continue
        spec = by_name.get(vi.name)
        dim_list = vi.type.tensor_type.shape.dim
        concrete = spec.concrete_shape(dims) if spec is not None and len(spec.shape) == len(dim_list) else None
        for k, d in enumerate(dim_list):
            if d.HasField("dim_value"):
                continue
            if k == 0:
                size = 1
            elif concrete is not None:
                size = concrete[k]
            else:
                size = int(dims.get(d.dim_param, 1))
            d.dim_value = size  # replaces dim_param (a oneof)


def _known_shapes(graph) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is not None and tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = [d.dim_value for d in tt.shape.dim]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _attr(node, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_macs(node, shapes: dict[str, list[int]]) -> int | None:
    """MACs of one node, or None when a shape it needs is unknown."""
    op = node.op_type

    def shape(i: int, outputs: bool = False) -> list[int] | None:
        names = node.output if outputs else node.input
        return shapes.get(names[i]) if i < len(names) and names[i] else None

    if op in _CONV_OPS:  # each output element: Cin/group * kH * kW MACs
        _, wi = _CONV_OPS[op]
        out, w = shape(0, outputs=True), shape(wi)
        return math.prod(out) * math.prod(w[1:]) if out and w else None
    if op == "ConvTranspose":  # each input element is scattered through Cout/group * kH * kW weights
        x, w = shape(0), shape(1)
        return math.prod(x) * math.prod(w[1:]) if x and w else None
    if op in _GEMM_OPS:
        a, b = shape(0), shape(1)
        if not a or not b:
            return None
        m_, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return m_ * n * k
    if op in _MATMUL_OPS:
        ai, bi = _MATMUL_OPS[op]
        return _matmul_macs(shape(ai), shape(bi))
    if op == "Einsum":
        eq = _attr(node, "equation", "")
        return _einsum_macs(eq.decode() if isinstance(eq, bytes) else eq, [shapes.get(i) for i in node.input])
    return 0


def _matmul_macs(a: list[int] | None, b: list[int] | None) -> int | None:
    """numpy matmul semantics: 1-D operands are promoted, leading dims broadcast."""
    if not a or not b:
        return None
    a2 = [1, *a] if len(a) == 1 else a
    b2 = [*b, 1] if len(b) == 1 else b
    batch = _broadcast(a2[:-2], b2[:-2])
    return math.prod(batch) * a2[-2] * a2[-1] * b2[-1]


def _broadcast(*shapes: list[int]) -> list[int]:
    rank = max((len(s) for s in shapes), default=0)
    padded = [[1] * (rank - len(s)) + list(s) for s in shapes]
    return [max(col) for col in zip(*padded)] if rank else []


def _einsum_macs(equation: str, operand_shapes: list[list[int] | None]) -> int | None:
    """A naive contraction's MACs: the product of every index's size (0 for one operand)."""
    if any(s is None for s in operand_shapes):
        return None
    terms = equation.replace(" ", "").split("->")[0].split(",")
    if len(terms) != len(operand_shapes):
        return None
    if len(terms) < 2:
        return 0
    sizes: dict[str, int] = {}
    ellipses: list[list[int]] = []
    for term, shp in zip(terms, operand_shapes):
        if "..." in term:
            before, after = term.split("...")
            n_ell = len(shp) - len(before) - len(after)
            ellipses.append(shp[len(before):len(before) + n_ell])
            letters = list(before) + [None] * n_ell + list(after)
        else:
            letters = list(term)
        if len(letters) != len(shp):
            return None
        for ch, size in zip(letters, shp):
            if ch is not None:
                sizes[ch] = max(sizes.get(ch, 1), size)
    return math.prod(sizes.values()) * math.prod(_broadcast(*ellipses) if ellipses else [])


# -- inspect -------------------------------------------------------------------

def inspect_target(target: str, dims: dict[str, int] | None = None) -> dict[str, Any]:
    """What ``edgekit inspect`` shows for an ONNX file, a saved artifact folder or zoo:NAME.

    ``dims`` sizes named dynamic dims (e.g. seq) for the MAC count of an ONNX file;
    unnamed ones count as 1.
    """
    if target.startswith("zoo:"):
        name = target[4:].strip()
        if not name:
            raise UserError("zoo: needs a model name, e.g. zoo:digits_cnn; list them with edgekit models")
        return _inspect_zoo(name)
    path = Path(target.removeprefix("onnx:")).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist; pass the path of a .onnx file, a step's artifact folder, or zoo:NAME")
    if path.is_dir():
        return _inspect_artifact(path)
    info = _inspect_onnx(path, dims=dims)
    info["dims"] = dict(dims or {})
    return info


def _tensor_info(vi) -> dict[str, Any]:
    import onnx

    tt = vi.type.tensor_type
    shape: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    except Exception:
        dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "?"
    return {"name": vi.name, "shape": shape, "dtype": dtype}


def _onnx_file_bytes(path: Path, model) -> int:
    """The file plus any external data files its tensors point to."""
    extra: set[str] = set()
    for g in _graphs(model.graph):
        for t in g.initializer:
            if t.data_location == 1:  # TensorProto.EXTERNAL
                extra.update(e.value for e in t.external_data if e.key == "location")
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in extra if (path.parent / f).is_file())


def _inspect_onnx(path: Path, specs: list[TensorSpec] | None = None, dims: dict[str, int] | None = None) -> dict[str, Any]:
    model = _load_onnx(path)
    initializers = {t.name for t in model.graph.initializer}
    producer = f"{model.producer_name} {model.producer_version}".strip()
    return {
        "target": str(path),
        "format": "onnx",
        "inputs": [_tensor_info(i) for i in model.graph.input if i.name not in initializers],
        "outputs": [_tensor_info(o) for o in model.graph.output],
        **_onnx_profile(model, specs or [], dims or {}),
        "size_bytes": _onnx_file_bytes(path, model),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "producer": producer or None,
        "runtime_ops": runtime_weight_ops(path),
    }


# Kernels ONNX Runtime runs on integer data, and the float ones the same layers become otherwise.
INTEGER_KERNELS = {
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "MatMulNBits", "GatherBlockQuantized", "QAttention", "QGemm", "QEmbedLayerNormalization", "DynamicQuantizeLSTM",
}
FLOAT_WEIGHT_KERNELS = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Attention", "LSTM", "GRU", "Gather"}


def runtime_weight_ops(path: Path) -> dict[str, Any] | None:
    """How ONNX Runtime runs the model's compute ops after its graph optimizations: integer vs float.

    Counted on the graph ONNX Runtime really executes (extended optimizations,
    which fuse QDQ patterns into integer kernels), not on the file: a QDQ
    convolution that the runtime cannot fuse runs in float and counts as float.
    """
    import tempfile

    try:
        import onnx
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            opts.log_severity_level = 3
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    except Exception:  # not loadable in ORT: inspect still shows the file's own ops
        return None
    integer: dict[str, int] = {}
    floating: dict[str, int] = {}
    for g in _graphs(optimized.graph):
        for n in g.node:
            if n.op_type in INTEGER_KERNELS:
                integer[n.op_type] = integer.get(n.op_type, 0) + 1
            elif n.op_type in FLOAT_WEIGHT_KERNELS:
                floating[n.op_type] = floating.get(n.op_type, 0) + 1
    return {"integer": sum(integer.values()), "float": sum(floating.values()), "integer_ops": integer, "float_ops": floating}


def _torch_info(target: str, module, specs: list[TensorSpec], dims: dict[str, int], size: int) -> dict[str, Any]:
    prof = _torch_profile(module, specs, dims)
    batch = specs[0].shape[0] if specs and specs[0].shape else None
    for out in prof["outputs"]:  # outputs follow the inputs' named batch dim (as the ONNX export assumes)
        if isinstance(batch, str) and out["shape"][:1] == [1]:
            out["shape"][0] = batch
    return {
        "target": target,
        "format": "torch",
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs],
        "outputs": prof.pop("outputs"),
        **prof,
        "size_bytes": size,
        "tokens": _token_layers(module, specs, dims),
    }


def _token_layers(module, specs: list[TensorSpec], dims: dict[str, int]) -> dict[str, Any] | None:
    """Tokens and MACs per transformer block, for models that expose their blocks (ViTs, VLMs)."""
    if not callable(getattr(module, "token_blocks", None)):
        return None
    import torch

    from edgekit.compress.tokens.accounting import token_flops

    dims1 = _batch1_dims(specs, dims)
    try:
        return token_flops(module, {s.name: torch.from_numpy(s.random(dims1)) for s in specs})
    except Exception:  # the profile still stands without the per-layer view
        return None


def _inspect_zoo(name: str) -> dict[str, Any]:
    from edgekit.artifact import torch_state_bytes
    from edgekit.models import create_model, model_info

    info = model_info(name)  # UserError with the nearest name
    module = create_model(name).eval()
    result = _torch_info(f"zoo:{name}", module, info.inputs, dict(info.dims or {}), torch_state_bytes(module))
    result.update(description=info.description or None, task=info.task)
    return result


def _inspect_artifact(folder: Path) -> dict[str, Any]:
    if not (folder / ARTIFACT_FILE).is_file() and (folder / "artifact" / ARTIFACT_FILE).is_file():
        folder = folder / "artifact"  # a step folder: look inside
    artifact = Artifact.load(folder)  # UserError if not an artifact folder
    dims = dict(artifact.meta.get("dims", {}))
    if artifact.format == "onnx" and "generation" in artifact.meta:
        result = _inspect_generation(folder, artifact, dims)
    elif artifact.format == "onnx":
        result = _inspect_onnx(artifact.path("model"), artifact.inputs, dims)
    elif artifact.format == "torch":
        result = _torch_info(str(folder), artifact.torch_module(), artifact.inputs, dims, artifact.size_bytes())
    else:
        result = {"target": str(folder), "format": artifact.format, "size_bytes": artifact.size_bytes(), "ops": {}}
    result.update(task=artifact.task, lineage=[step["pass"] for step in artifact.lineage])
    if artifact.meta.get("tokens"):  # the compression pass's measurement, with the dense model beside it
        result["tokens"] = artifact.meta["tokens"]
    return result


def _inspect_generation(folder: Path, artifact: Artifact, dims: dict[str, int]) -> dict[str, Any]:
    """A generation export: every graph's inputs and outputs (named ``role.name``), the weights counted once."""
    graphs = {role: _inspect_onnx(artifact.path(role), [], dims) for role in artifact.files}
    first = next(iter(graphs.values()))
    return {
        **first,
        **_generation_profile(artifact),
        "target": str(folder),
        "inputs": [{**t, "name": f"{role}.{t['name']}"} for role, g in graphs.items() for t in g["inputs"]],
        "outputs": [{**t, "name": f"{role}.{t['name']}"} for role, g in graphs.items() for t in g["outputs"]],
        "size_bytes": artifact.size_bytes(),
        "runtime_ops": None,
        "generation": artifact.meta["generation"],
    }


def format_inspect(info: dict[str, Any]):
    """A rich renderable of an ``inspect_target`` result."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    from edgekit.report import human_bytes, human_count

    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model", escape(str(info["target"])))
    head.add_row("format", info["format"])
    for key in ("description", "task", "producer"):
        if info.get(key):
            head.add_row(key, escape(str(info[key])))
    if info.get("opset"):
        head.add_row("opset", ", ".join(f"{d} {v}" for d, v in info["opset"].items()))
    if info.get("lineage"):
        head.add_row("lineage", escape(" → ".join(info["lineage"])))
    params = info.get("params")
    head.add_row("params", f"{human_count(params)} ({params:,})" if params is not None else "–")
    macs = info.get("macs")
    macs_text = f"{human_count(macs)} ({macs:,})" if macs is not None else "–"
    if info.get("macs_partial"):
        macs_text += " [yellow]partial: some shapes unknown[/yellow]"
    other_dims = ", ".join(f"{k}={v}" for k, v in (info.get("dims") or {}).items() if k != "batch")
    head.add_row(f"MACs (batch 1{', ' + other_dims if other_dims else ''})", macs_text)
    head.add_row("size", human_bytes(info.get("size_bytes")))
    rt = info.get("runtime_ops")
    if rt:
        detail = ", ".join(f"{k} {v}" for k, v in {**rt["integer_ops"]}.items()) or "none"
        head.add_row("integer in ONNX Runtime", f"{rt['integer']} of {rt['integer'] + rt['float']} compute ops ({escape(detail)})")

    io = Table(title="inputs and outputs", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("", "name", "shape", "dtype"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in info.get(kind) or []:
            shape = "[" + ", ".join(str(d) for d in t["shape"]) + "]"
            io.add_row(kind[:-1], escape(t["name"]), escape(shape), escape(str(t["dtype"])))

    ops = Table(title="ops" if info["format"] == "onnx" else "modules (leaf)", box=box.SIMPLE_HEAD, title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in (info.get("ops") or {}).items():
        ops.add_row(escape(op), str(n))
    parts = [head, io, ops]
    tokens = info.get("tokens")
    if tokens and tokens.get("layers"):
        from edgekit.compress.tokens.accounting import layer_rows

        title = "tokens per transformer block" + (f" ({escape(str(tokens['method']))})" if tokens.get("method") else "")
        table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
        for col in ("layer", "tokens in", "tokens out", "MACs"):
            table.add_column(col, justify="right")
        for row in layer_rows(tokens):
            table.add_row(*row)
        parts.append(table)
    return Group(*parts)
