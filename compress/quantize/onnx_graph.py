"""Quantize ONNX models "from the wild": the user brings only an .onnx file.

Two steps:

* ``normalize`` makes an arbitrary exported graph predictable: Constant nodes become
  initializers (so weights are found in one place), the opset is raised to one with
  per-axis QuantizeLinear/DequantizeLinear, shapes are inferred and every node gets a
  unique name for the report.
* ``quantize_onnx`` rewrites weight ops: MatMul/Gemm with a constant weight become
  dynamic int8 (``DynamicQuantizeLinear -> MatMulInteger``), Conv gets static QDQ with
  activation ranges measured on calibration feeds in onnxruntime.

Weights are symmetric int8 per output channel. ``reduce_range`` limits them to 7 bits:
x86 AVX2 without VNNI multiplies u8*s8 pairs into a saturating int16 (vpmaddubsw), and
255*127*2 overflows it while 255*63*2 does not.
"""

from __future__ import annotations

import copy
import fnmatch
from collections import Counter
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import UserError

# Ops that compute in integers whatever their inputs look like.
INTEGER_OPS = frozenset({
    "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "MatMulNBits", "GatherBlockQuantized", "QAttention",
})
# Compute ops that are integer only when their weight comes out of a DequantizeLinear.
_WEIGHT_OPS = frozenset({"Conv", "MatMul", "Gemm"})
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})
_DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------- graphs


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The bodies of If/Loop/Scan (and any other graph-valued attribute)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def _sub_path(path: str, node: onnx.NodeProto, attr_name: str) -> str:
    """Report path of a subgraph, e.g. "If_0/then_branch" or "Loop_1/body/If_2/else_branch"."""
    return f"{node.name}/{attr_name}" if path == "main" else f"{path}/{node.name}/{attr_name}"


def _all_graphs(graph: onnx.GraphProto, path: str = "main") -> Iterator[tuple[str, onnx.GraphProto]]:
    yield path, graph
    for node in graph.node:
        for attr_name, sub in _subgraphs(node):
            yield from _all_graphs(sub, _sub_path(path, node, attr_name))


def _all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name in the model, so new ones can avoid them."""
    names: set[str] = set()
    for _, g in _all_graphs(model.graph):
        names.update(i.name for i in g.input)
        names.update(o.name for o in g.output)
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in g.value_info)
        for n in g.node:
            names.update(n.output)
            names.add(n.name)
    return names


class _Namer:
    """Hands out names that collide with nothing in the model (ONNX names are global)."""

    def __init__(self, taken: set[str]):
        self.taken = set(taken)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


# ------------------------------------------------------------------------ normalize


def normalize(model: onnx.ModelProto, min_opset: int = 13) -> tuple[onnx.ModelProto, list[str]]:
    """Returns a normalized copy and human-readable notes of what was changed."""
    model = copy.deepcopy(model)
    notes: list[str] = []
    # Convert first: the converter may itself insert Constant nodes (e.g. Reshape shapes).
    model = _upgrade_opset(model, min_opset, notes)
    folded = sum(_fold_constants(g) for _, g in _all_graphs(model.graph))
    if folded:
        notes.append(f"folded {folded} Constant node(s) into initializers")
    model = _infer_shapes(model, notes)
    named = _name_nodes(model)
    if named:
        notes.append(f"named {named} unnamed or duplicate node(s)")
    return model, notes


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)


def _upgrade_opset(model: onnx.ModelProto, min_opset: int, notes: list[str]) -> onnx.ModelProto:
    current = _default_opset(model)
    if current is None or current >= min_opset:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, min_opset)
    except Exception as exc:  # the converter raises several unrelated types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"Cannot convert the model from opset {current} to opset {min_opset} ({reason}); "
            f"re-export it with opset {min_opset} or newer."
        ) from exc
    notes.append(f"converted default-domain opset {current} -> {min_opset}")
    return converted


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a Constant node produces, or None for kinds we leave alone (sparse)."""
    name = node.output[0]
    for attr in node.attribute:
        if attr.name == "value":
            tensor = copy.deepcopy(attr.t)
            tensor.name = name
            return tensor
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32), name)
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32), name)
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, dtype=np.int64), name)
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64), name)
        if attr.name == "value_string":
            return helper.make_tensor(name, TensorProto.STRING, [], [attr.s])
        if attr.name == "value_strings":
            return helper.make_tensor(name, TensorProto.STRING, [len(attr.strings)], list(attr.strings))
    return None


def _fold_constants(graph: onnx.GraphProto) -> int:
    """Moves Constant nodes of this graph (not its subgraphs) into its initializers."""
    kept, folded = [], 0
    for node in graph.node:
        tensor = _constant_value(node) if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS else None
        if tensor is None:
            kept.append(node)
            continue
        graph.initializer.append(tensor)
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
    return folded


def _infer_shapes(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # e.g. >2 GB models or ops the inferencer does not know
        return model
    added = len(inferred.graph.value_info) - len(model.graph.value_info)
    if added > 0:
        notes.append(f"inferred shapes for {added} tensor(s)")
    return inferred


def _name_nodes(model: onnx.ModelProto) -> int:
    """Gives `<op_type>_<i>` to nodes whose name is empty or already used."""
    graphs = [g for _, g in _all_graphs(model.graph)]
    taken = {n.name for g in graphs for n in g.node if n.name}
    seen: set[str] = set()
    renamed, counter = 0, Counter()
    for g in graphs:
        for node in g.node:
            if node.name and node.name not in seen:
                seen.add(node.name)
                continue
            while True:
                name = f"{node.op_type}_{counter[node.op_type]}"
                counter[node.op_type] += 1
                if name not in taken:
                    break
            node.name = name
            taken.add(name)
            seen.add(name)
            renamed += 1
    return renamed


# ---------------------------------------------------------------- weight quantizing


def _quantize_symmetric(w: np.ndarray, axis: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along `axis`: returns (q, scale[channels])."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=other) if other else np.abs(w)
    scale = (amax / qmax).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero channel quantizes to zeros with any scale
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def _activation_qparams(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric uint8 scale/zero point; the range always holds 0 so padding is exact."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero_point = np.clip(np.round(-lo / scale), 0, 255)
    return np.array(scale, dtype=np.float32), np.array(zero_point, dtype=np.uint8)


# -------------------------------------------------------------------- calibration


def _graph_feeds(graph: onnx.GraphProto) -> list[str]:
    """Graph inputs a caller must feed (inputs that are also initializers have defaults)."""
    inits = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def _check_feeds(graph: onnx.GraphProto, calibration: list[dict[str, np.ndarray]]) -> None:
    required = _graph_feeds(graph)
    known = {i.name for i in graph.input}
    for feed in calibration:
        missing = [n for n in required if n not in feed]
        unknown = [n for n in feed if n not in known]
        if missing or unknown:
            bad = f"is missing input(s) {missing}" if missing else f"has unknown input(s) {unknown}"
            raise UserError(f"A calibration feed {bad}; each feed must give exactly the model inputs {required}.")


def _calibration_ranges(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]],
                        names: set[str]) -> dict[str, tuple[float, float]]:
    """min/max of each named main-graph tensor over all calibration feeds."""
    if not calibration or not names:
        return {}
    _check_feeds(model.graph, calibration)
    import onnxruntime as ort  # heavy import, only needed when calibrating

    probe = copy.deepcopy(model)
    fed = {i.name for i in probe.graph.input}
    outputs = {o.name for o in probe.graph.output}
    for name in sorted(names - fed - outputs):
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fetch = sorted(names - fed)
    ranges: dict[str, tuple[float, float]] = {}
    for feed in calibration:
        values = dict(zip(fetch, session.run(fetch, feed))) if fetch else {}
        values.update({n: np.asarray(feed[n]) for n in names & fed if n in feed})
        for name, value in values.items():
            lo, hi = float(np.min(value)), float(np.max(value))
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(lo, old[0]), max(hi, old[1]))
    return ranges


def _conv_inputs(graph: onnx.GraphProto) -> set[str]:
    """Main-graph Conv activations that may need a range (over-collecting is harmless)."""
    inits = {t.name for t in graph.initializer}
    return {n.input[0] for n in graph.node
            if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits and n.input[0] not in inits}


# --------------------------------------------------------------------- the rewrite


class _Quantizer:
    """Rewrites weight ops graph by graph; collects the report as it goes."""

    def __init__(self, model: onnx.ModelProto, qmax: int, skip: list[str], static_conv: bool,
                 ranges: dict[str, tuple[float, float]]):
        self.model = model
        self.qmax = qmax
        self.skip = list(skip)
        self.static_conv = static_conv
        self.ranges = ranges
        self.name = _Namer(_all_names(model))
        self.quantized: list[dict] = []
        self.skipped: list[dict] = []
        # (graph path, name) of float weights that may now be unused. Paths, not graph objects:
        # rebuilding a node list copies the nodes, so subgraph objects go stale.
        self.replaced: list[tuple[str, str]] = []
        self.shared: dict[tuple, object] = {}  # (graph path, kind, tensor) -> what was built for it

    # -- walking

    def rewrite(self, graph: onnx.GraphProto, path: str, outer: dict) -> None:
        """`outer` maps visible constant names to (tensor, path of the graph that owns it)."""
        consts = self._scope(graph, path, outer)
        new_nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            for attr_name, sub in _subgraphs(node):
                self.rewrite(sub, _sub_path(path, node, attr_name), consts)
            new_nodes.extend(self._rewrite_node(node, graph, path, consts) or [node])
        del graph.node[:]
        graph.node.extend(new_nodes)

    @staticmethod
    def _scope(graph: onnx.GraphProto, path: str, outer: dict) -> dict:
        consts = dict(outer)
        # Names a subgraph defines itself hide outer constants of the same name.
        local = {o for n in graph.node for o in n.output}
        if path != "main":
            # Subgraph inputs are run-time values (Loop state, Scan slices). Main-graph inputs
            # that are also initializers (old IR) are kept as weights: that is how they run.
            local |= {i.name for i in graph.input}
        for name in local:
            consts.pop(name, None)
        consts.update({t.name: (t, path) for t in graph.initializer})
        return consts

    def _rewrite_node(self, node, graph, path, consts) -> list[onnx.NodeProto] | None:
        if node.domain not in _DEFAULT_DOMAINS:
            return None
        if node.op_type in ("MatMul", "Gemm"):
            return self._matmul(node, graph, path, consts)
        if node.op_type == "Conv" and self.static_conv:
            return self._conv(node, graph, path, consts)
        return None

    # -- bookkeeping

    def _skip(self, node, reason: str) -> None:
        self.skipped.append({"node": node.name, "op": node.op_type, "reason": reason})

    def _skip_pattern(self, node) -> str | None:
        return next((p for p in self.skip if fnmatch.fnmatchcase(node.name, p)), None)

    def _float_weight(self, node, index: int, consts) -> tuple[np.ndarray | None, str | None]:
        """(array, None) for a float32 constant; (None, reason) for another float dtype; (None, None) else."""
        if len(node.input) <= index or node.input[index] not in consts:
            return None, None
        tensor, _ = consts[node.input[index]]
        if tensor.data_type not in _FLOAT_TYPES:
            return None, None
        if tensor.data_type != TensorProto.FLOAT:
            return None, f"weight is {TensorProto.DataType.Name(tensor.data_type).lower()}; only float32 is quantized"
        try:
            array = numpy_helper.to_array(tensor)
        except Exception:
            return None, "weight data could not be read (external data not loaded?)"
        if not np.all(np.isfinite(array)):
            return None, "weight holds NaN or infinite values"
        return array, None

    def _replacing(self, name: str, consts) -> None:
        """Remembers a float weight so it can be dropped once nothing reads it."""
        tensor, owner_path = consts[name]
        self.replaced.append((owner_path, tensor.name))

    def _initializer(self, graph, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def _node(self, op: str, inputs: list[str], base: str, **attrs) -> tuple[onnx.NodeProto, str]:
        out = self.name(f"{base}_out")
        return helper.make_node(op, inputs, [out], name=self.name(base), **attrs), out

    # -- dynamic MatMul / Gemm

    def _matmul_weight(self, node, consts) -> tuple[np.ndarray | None, str | None]:
        """The weight as [K, N] float32, (None, reason) to report, or (None, None) to ignore."""
        weight, reason = self._float_weight(node, 1, consts)
        if weight is None and reason is None and node.op_type == "MatMul":
            if self._float_weight(node, 0, consts)[0] is not None:
                return None, "the constant is the first input; only a constant second input is quantized"
        if weight is None:
            return None, reason
        if weight.ndim != 2:
            return None, f"weight is {weight.ndim}-D; only 2-D weights are quantized"
        if node.op_type == "MatMul":
            return weight, None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            return None, "Gemm with transA=1 is not supported"
        weight = weight.T if attrs.get("transB", 0) else weight
        return weight * np.float32(attrs.get("alpha", 1.0)), None

    def _matmul(self, node, graph, path, consts):
        weight, reason = self._matmul_weight(node, consts)
        if weight is None:
            if reason:
                self._skip(node, reason)
            return None
        pattern = self._skip_pattern(node)
        if pattern:
            self._skip(node, f"matches skip pattern '{pattern}'")
            return None
        self._replacing(node.input[1], consts)
        nodes = self._dynamic_nodes(node, graph, path, weight)
        self.quantized.append({"node": node.name, "op": node.op_type, "mode": "dynamic", "graph": path})
        return nodes

    def _dynamic_input(self, x: str, base: str, nodes: list, path: str) -> tuple[str, str, str]:
        """One DynamicQuantizeLinear per input tensor and graph, shared by its MatMuls."""
        key = (path, "dql", x)
        if key not in self.shared:
            outs = [self.name(f"{x}_quant"), self.name(f"{x}_scale"), self.name(f"{x}_zero_point")]
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], outs, name=self.name(f"{base}_dynamic_quant")))
            self.shared[key] = tuple(outs)
        return self.shared[key]

    def _dynamic_nodes(self, node, graph, path: str, weight: np.ndarray) -> list[onnx.NodeProto]:
        base = node.name
        nodes: list[onnx.NodeProto] = []
        xq, x_scale, x_zp = self._dynamic_input(node.input[0], base, nodes, path)
        q, w_scale = _quantize_symmetric(weight, axis=1, qmax=self.qmax)
        wq = self._initializer(graph, f"{base}_weight_quant", q)
        w_zp = self._initializer(graph, f"{base}_weight_zero_point", np.zeros(q.shape[1], np.int8))
        w_scale_name = self._initializer(graph, f"{base}_weight_scale", w_scale)
        mm, acc = self._node("MatMulInteger", [xq, wq, x_zp, w_zp], f"{base}_matmul_integer")
        cast, acc_f = self._node("Cast", [acc], f"{base}_cast", to=TensorProto.FLOAT)
        comb, scale = self._node("Mul", [x_scale, w_scale_name], f"{base}_scale")
        nodes += [mm, cast, comb]
        bias = self._gemm_bias(node, graph, nodes) if node.op_type == "Gemm" else None
        out = self.name(f"{base}_unbiased") if bias else node.output[0]
        nodes.append(helper.make_node("Mul", [acc_f, scale], [out], name=self.name(f"{base}_rescale")))
        if bias:
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]], name=self.name(f"{base}_bias")))
        return nodes

    def _gemm_bias(self, node, graph, nodes: list) -> str | None:
        """The name of beta * C (C itself when beta is 1), or None without C."""
        if len(node.input) < 3 or not node.input[2]:
            return None
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        c = node.input[2]
        if beta == 1.0:
            return c
        beta_name = self._initializer(graph, f"{node.name}_beta", np.array(beta, dtype=np.float32))
        mul, scaled = self._node("Mul", [c, beta_name], f"{node.name}_beta_mul")
        nodes.append(mul)
        return scaled

    # -- static Conv

    def _conv(self, node, graph, path, consts):
        weight, reason = self._float_weight(node, 1, consts)
        if weight is None:
            if reason:
                self._skip(node, reason)
            return None
        reason = self._conv_problem(node, weight, path)
        if reason:
            self._skip(node, reason)
            return None
        self._replacing(node.input[1], consts)
        nodes: list[onnx.NodeProto] = []
        new = copy.deepcopy(node)
        new.input[0] = self._static_input(node.input[0], nodes, graph)
        new.input[1] = self._static_weight(node, weight, nodes, graph)
        self.quantized.append({"node": node.name, "op": node.op_type, "mode": "static", "graph": path})
        return nodes + [new]

    def _conv_problem(self, node, weight: np.ndarray, path: str) -> str | None:
        pattern = self._skip_pattern(node)
        if pattern:
            return f"matches skip pattern '{pattern}'"
        if weight.ndim != 4:
            return f"weight is {weight.ndim}-D; only 2-D convolutions (4-D weights) are quantized"
        if path != "main":
            return "inside a subgraph: no calibration range"
        if node.input[0] not in self.ranges:
            return "no calibration range for its input (no calibration feeds given)"
        return None

    def _static_input(self, x: str, nodes: list, graph) -> str:
        """QuantizeLinear -> DequantizeLinear on an activation, shared by its Convs."""
        key = ("main", "qdq", x)  # static Convs only live in the main graph
        if key not in self.shared:
            scale, zp = _activation_qparams(*self.ranges[x])
            s_name = self._initializer(graph, f"{x}_scale", scale)
            zp_name = self._initializer(graph, f"{x}_zero_point", zp)
            q, xq = self._node("QuantizeLinear", [x, s_name, zp_name], f"{x}_quantize")
            dq, xdq = self._node("DequantizeLinear", [xq, s_name, zp_name], f"{x}_dequantize")
            nodes += [q, dq]
            self.shared[key] = xdq
        return self.shared[key]

    def _static_weight(self, node, weight: np.ndarray, nodes: list, graph) -> str:
        """Per-output-channel int8 weight behind a DequantizeLinear(axis=0), shared per graph."""
        key = ("main", "weight", node.input[1])
        if key not in self.shared:
            q, scale = _quantize_symmetric(weight, axis=0, qmax=self.qmax)
            base = node.name
            wq = self._initializer(graph, f"{base}_weight_quant", q)
            s = self._initializer(graph, f"{base}_weight_scale", scale)
            zp = self._initializer(graph, f"{base}_weight_zero_point", np.zeros(q.shape[0], np.int8))
            dq, w = self._node("DequantizeLinear", [wq, s, zp], f"{base}_weight_dequantize", axis=0)
            nodes.append(dq)
            self.shared[key] = w
        return self.shared[key]

    # -- cleanup

    def drop_unused_weights(self) -> None:
        """Removes float weights that no node or graph output reads any more."""
        graphs = dict(_all_graphs(self.model.graph))
        used = set()
        for g in graphs.values():
            used.update(i for n in g.node for i in n.input)
            used.update(o.name for o in g.output)
        for path, g in graphs.items():
            dead = {name for owner, name in self.replaced if owner == path and name not in used}
            if dead:
                _remove_initializers(g, dead)


def _remove_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    keep_init = [t for t in graph.initializer if t.name not in names]
    keep_input = [i for i in graph.input if i.name not in names]  # IR<4 models list weights as inputs
    del graph.initializer[:]
    graph.initializer.extend(keep_init)
    del graph.input[:]
    graph.input.extend(keep_input)


def quantize_onnx(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]], *, reduce_range: bool,
                  skip: list[str] = (), static_conv: bool = True) -> tuple[onnx.ModelProto, dict]:
    """Returns the quantized model and a report dict."""
    model, notes = normalize(model)
    ranges = _calibration_ranges(model, list(calibration), _conv_inputs(model.graph)) if static_conv else {}
    quantizer = _Quantizer(model, qmax=63 if reduce_range else 127, skip=list(skip),
                           static_conv=static_conv, ranges=ranges)
    quantizer.rewrite(model.graph, "main", {})
    quantizer.drop_unused_weights()
    report = {
        "normalize": notes,
        "quantized": quantizer.quantized,
        "skipped": quantizer.skipped,
        "integer_ops": count_integer_ops(model),
    }
    return model, report


# ------------------------------------------------------------------------ counting


def count_integer_ops(model: onnx.ModelProto) -> dict:
    """{"integer": n, "float": m, "by_op": {op_type: count}} over all graphs incl. subgraphs.

    ``by_op`` counts the classified nodes (integer ops and float/QDQ Conv, MatMul, Gemm).
    """
    counts = {"integer": 0, "float": 0, "by_op": Counter()}
    _count_graph(model.graph, {}, counts)
    counts["by_op"] = dict(counts["by_op"])
    return counts


def _count_graph(graph: onnx.GraphProto, outer_producers: dict[str, str], counts: dict) -> None:
    producers = dict(outer_producers)
    producers.update({o: n.op_type for n in graph.node for o in n.output})
    for node in graph.node:
        for _, sub in _subgraphs(node):
            _count_graph(sub, producers, counts)
        if node.op_type in INTEGER_OPS:
            kind = "integer"
        elif node.op_type in _WEIGHT_OPS:
            weight_from_dq = len(node.input) > 1 and producers.get(node.input[1]) == "DequantizeLinear"
            kind = "integer" if weight_from_dq else "float"
        else:
            continue
        counts[kind] += 1
        counts["by_op"][node.op_type] += 1
