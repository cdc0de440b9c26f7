"""Prepare an ONNX graph for TVM's Relax importer (``tvm.relax.frontend.onnx``).

TVM 0.27 imports DynamicQuantizeLinear, MatMulInteger and QuantizeLinear /
DequantizeLinear (per tensor and per channel), but not the com.microsoft ops
edgekit's 4-bit layers write (MatMulNBits, GatherBlockQuantized), nor the
QOperator forms other quantizers write (QLinearConv, QLinearMatMul,
ConvInteger). :func:`prepare` rewrites those into ops it does import while
keeping the integer weights as integer initializers with the same scales and
zero points:

- ``MatMulNBits``: the packed 4-bit (or 8-bit) blocks stay packed; integer Div / Sub
  unpack them, ``(q - zero) * scale`` per block gives the weight, then
  MatMul (and the bias, if any, an Add).
- ``GatherBlockQuantized``: Gather the packed rows (and their block scales and
  zero points) first, then unpack and dequantize only the gathered rows.
- ``QLinearMatMul`` / ``QLinearConv``: DequantizeLinear on the int8 inputs and
  weights, the float op, QuantizeLinear with the output's scale and zero point.
- ``ConvInteger``: ``(x - x_zero)`` and ``(w - w_zero)`` in float, Conv, Cast to
  int32 (exact while the accumulator stays below 2^24).

It also fixes the graph's input shapes, folds small constant subgraphs (the
importer fails on some of them, e.g. ConstantOfShape of an empty shape) and
turns Constant nodes into initializers. With ``lift_weights`` the integer
weights become extra graph inputs so that TVM's FoldConstant cannot turn them
into float (or int32) tensors; the exporter binds them back as int8/uint8
constants after fusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.errors import StepFailed, UserError

REWRITTEN_OPS = ("MatMulNBits", "GatherBlockQuantized", "QLinearMatMul", "QLinearConv", "ConvInteger")
FOLD_MAX_ELEMENTS = 1 << 16  # constant subgraphs up to this size are evaluated here (shape arithmetic, masks)
MAX_SHAPE_ROUNDS = 4  # rounds of shape inference + folding (each can make more shapes static)
LIFT_MIN_ELEMENTS = 16  # integer tensors smaller than this (zero points) stay constants
# ops whose constant inputs must not be evaluated into float here: they are the integer model
_NO_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                      "If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"})
# (op type, input index) that read an integer weight
_WEIGHT_INPUTS = {("DequantizeLinear", 0), ("MatMulInteger", 0), ("MatMulInteger", 1), ("ConvInteger", 1)}
_INT_TYPES = (np.int8, np.uint8)


@dataclass
class Prepared:
    """The rewritten model and what :func:`prepare` did to it."""

    model: Any  # onnx.ModelProto
    inputs: list[str]  # the model's own inputs, in order
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # lifted integer weights, by graph input name, in order
    rewritten: dict[str, int] = field(default_factory=dict)  # op type -> nodes rewritten
    folded: int = 0
    integer_weight_bytes: int = 0  # bytes of int8/uint8 weight tensors in the model

    def summary(self) -> dict[str, Any]:
        return {"rewritten_ops": dict(self.rewritten), "folded_nodes": self.folded, "integer_weight_bytes": self.integer_weight_bytes}


def prepare(model, shapes: dict[str, list[int]], lift_weights: bool = True) -> Prepared:
    """A copy of ``model`` with static input ``shapes`` that TVM's importer takes; see the module docstring."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name for i in g.initializer}
    inputs = [i.name for i in g.input if i.name not in inits]
    missing = [n for n in inputs if n not in shapes]
    if missing:
        raise UserError(
            f"the ONNX model takes inputs {', '.join(missing)} that the artifact's input specs do not name; "
            "declare them in model.inputs"
        )
    for i in g.input:
        if i.name in shapes:
            _set_shape(i, shapes[i.name])
    del g.value_info[:]  # stale once shapes are fixed; the importer infers its own
    for o in g.output:  # outputs keep their element type; their dims follow from the inputs
        o.type.tensor_type.ClearField("shape")

    rw = _Rewriter(m)
    rw.run()
    prepared = Prepared(model=m, inputs=inputs, rewritten=rw.rewritten, folded=rw.folded)
    weight_names = rw.weight_names()
    prepared.integer_weight_bytes = int(sum(rw.consts[n].nbytes for n in weight_names))
    if lift_weights and weight_names:
        prepared.weights = _lift(m, rw.consts, weight_names)
    return prepared


# -- the rewriter ---------------------------------------------------------------


class _Rewriter:
    def __init__(self, model) -> None:
        self.m = model
        self.g = model.graph
        self.opsets = {o.domain or "": o.version for o in model.opset_import}
        self.consts: dict[str, np.ndarray] = {}
        self.rewritten: dict[str, int] = {}
        self.folded = 0
        self.extra_weights: set[str] = set()  # integer tensors read by unpacking nodes written here
        self._written: set[int] = set()  # ids of the nodes the rewrites wrote: never folded (they unpack integer weights)
        self._names: set[str] = set()
        self._shapes: dict[str, list[int]] | None = None

    # -- bookkeeping ------------------------------------------------------------
    def run(self) -> None:
        from onnx import numpy_helper

        for init in self.g.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        self._names = {n for node in self.g.node for n in node.output} | set(self.consts) | {i.name for i in self.g.input}
        nodes = []
        for node in self.g.node:
            nodes.extend(self._visit(node))
        self._write(nodes)
        # with the input shapes fixed, Shape of a static tensor is a constant too; folding it turns the shape
        # arithmetic exporters leave behind (Shape -> Gather -> Concat -> Where -> Expand) into constants
        for _ in range(MAX_SHAPE_ROUNDS):
            self._shapes = _infer_shapes(self.m)
            before = len(nodes)
            nodes = [n for n in nodes if not (self._static_shape_of(n) or (self._foldable(n) and self._fold(n)))]
            self._write(nodes)
            if len(nodes) == before:
                break
        if not any(n.domain == "com.microsoft" for n in self.g.node):
            kept = [o for o in self.m.opset_import if o.domain != "com.microsoft"]
            del self.m.opset_import[:]
            self.m.opset_import.extend(kept)

    def _write(self, nodes: list) -> None:
        """Put ``nodes`` and the constants they use into the graph."""
        from onnx import numpy_helper

        del self.g.node[:]
        self.g.node.extend(nodes)
        used = {n for node in self.g.node for n in node.input} | {o.name for o in self.g.output} | _subgraph_inputs(self.g)
        self.consts = {k: v for k, v in self.consts.items() if k in used}
        del self.g.initializer[:]
        self.g.initializer.extend(numpy_helper.from_array(v, k) for k, v in self.consts.items())

    def _static_shape_of(self, node) -> bool:
        """Replace a Shape node of a tensor whose shape is known by its value; True if done."""
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
            return False
        shape = self._shapes.get(node.input[0]) if self._shapes is not None else None
        if shape is None:
            return False
        attrs = _attrs(node)
        self.consts[node.output[0]] = np.array(shape[attrs.get("start", 0) : attrs.get("end", len(shape))], np.int64)
        self.folded += 1
        return True

    def _fold(self, node) -> bool:
        values = self._evaluate(node)
        if values is None:
            return False
        self.consts.update(values)
        self.folded += 1
        return True

    def weight_names(self) -> list[str]:
        names = set(self.extra_weights)
        for node in self.g.node:
            for k, name in enumerate(node.input):
                if (node.op_type, k) in _WEIGHT_INPUTS and name in self.consts:
                    names.add(name)
        return sorted(n for n in names if n in self.consts and self.consts[n].dtype in _INT_TYPES and self.consts[n].size >= LIFT_MIN_ELEMENTS)

    def _fresh(self, hint: str) -> str:
        base = f"{hint}__tvm"
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}{i}"
        self._names.add(name)
        return name

    def _const(self, hint: str, value: np.ndarray) -> str:
        name = self._fresh(hint)
        self.consts[name] = np.ascontiguousarray(value)
        return name

    def _node(self, out: list, op: str, inputs: list[str], hint: str, **attrs) -> str:
        from onnx import helper

        name = self._fresh(hint)
        out.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        self._written.add(id(out[-1]))
        return name

    # -- per node -----------------------------------------------------------------
    def _visit(self, node) -> list:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            self.consts[node.output[0]] = _constant_value(node)
            return []
        if node.op_type in REWRITTEN_OPS:
            out = getattr(self, f"_rewrite_{node.op_type}")(node)
            self.rewritten[node.op_type] = self.rewritten.get(node.op_type, 0) + 1
            return out
        if self._foldable(node) and self._fold(node):
            return []
        return [node]

    def _foldable(self, node) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD or not node.output or id(node) in self._written:
            return False
        ins = [n for n in node.input if n]
        if not all(n in self.consts for n in ins):
            return False
        return sum(self.consts[n].size for n in ins) <= FOLD_MAX_ELEMENTS and not any(a.g.node or a.graphs for a in node.attribute)

    def _evaluate(self, node) -> dict[str, np.ndarray] | None:
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        try:
            ins = [n for n in node.input if n]
            graph = helper.make_graph(
                [node], "fold", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(self.consts[n].dtype), self.consts[n].shape) for n in ins],
                [helper.make_tensor_value_info(o, 0, None) for o in node.output],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opsets.get("", 17))], ir_version=self.m.ir_version)
            results = ReferenceEvaluator(model).run(None, {n: self.consts[n] for n in ins})
        except Exception:  # the importer gets the node as it is
            return None
        values = {o: np.asarray(r) for o, r in zip(node.output, results)}
        if any(v.dtype == object or v.size > FOLD_MAX_ELEMENTS for v in values.values()):
            return None
        return values

    def _need_const(self, node, k: int, what: str) -> np.ndarray | None:
        if len(node.input) <= k or not node.input[k]:
            return None
        name = node.input[k]
        if name not in self.consts:
            raise StepFailed(f"{node.op_type} node {node.name!r} computes its {what} at run time; TVM export needs it constant")
        return self.consts[name]

    def _static_shape(self, name: str) -> list[int]:
        if name in self.consts:
            return list(self.consts[name].shape)
        if self._shapes is None:
            self._shapes = _infer_shapes(self.m)
        shape = self._shapes.get(name)
        if shape is None:
            raise StepFailed(f"the shape of {name!r} is not known before run time; TVM export of this graph needs it static")
        return shape

    # -- rewrites -----------------------------------------------------------------
    def _unpack(self, out: list, packed: str, shape: list[int], bits: int, hint: str) -> str:
        """uint8 bytes of ``shape`` [..., n] -> values [..., n * 8/bits] (low nibble first), still uint8."""
        if bits == 8:
            return packed
        # Div/Mul/Sub rather than BitShift/BitwiseAnd, which need opset 18
        sixteen = self._const(f"{hint}_sixteen", np.array(16, np.uint8))
        high = self._node(out, "Div", [packed, sixteen], f"{hint}_hi")
        low = self._node(out, "Sub", [packed, self._node(out, "Mul", [high, sixteen], f"{hint}_hi16")], f"{hint}_lo")
        axis = self._const(f"{hint}_axis", np.array([-1], np.int64))
        pair = self._node(out, "Concat", [
            self._node(out, "Unsqueeze", [low, axis], f"{hint}_lo1"), self._node(out, "Unsqueeze", [high, axis], f"{hint}_hi1"),
        ], f"{hint}_pair", axis=-1)
        return self._node(out, "Reshape", [pair, self._const(f"{hint}_shape", np.array([*shape[:-1], shape[-1] * 2], np.int64))], f"{hint}_q")

    def _rewrite_MatMulNBits(self, node) -> list:
        attrs = _attrs(node)
        k, n, bits, block = attrs.get("K"), attrs.get("N"), attrs.get("bits", 4), attrs.get("block_size")
        if bits not in (4, 8) or not k or not n or not block:
            raise UserError(f"MatMulNBits node {node.name!r} has bits={bits}; TVM export rewrites 4- and 8-bit blocks only")
        if len(node.input) > 4 and node.input[4]:
            raise UserError(f"MatMulNBits node {node.name!r} has a g_idx (act-order) input, which TVM export does not rewrite; quantize without act-order")
        blocks = -(-k // block)
        scales = self._need_const(node, 2, "scales").astype(np.float32).reshape(n, blocks, 1)
        zero = self._block_zeros(node, 3, bits, (n, blocks), scales.dtype)
        h = node.name or node.output[0]
        out: list = []
        b = node.input[1]
        self.extra_weights.add(b)
        packed = self._node(out, "Reshape", [b, self._const(f"{h}_rows", np.array([n, -1], np.int64))], f"{h}_b2")
        q = self._unpack(out, packed, [n, int(np.prod(self._static_shape(b))) // n], bits, h)
        q = self._node(out, "Reshape", [q, self._const(f"{h}_blocks", np.array([n, blocks, block], np.int64))], f"{h}_qb")
        w = self._dequant(out, q, zero, self._const(f"{h}_scale", scales), h)
        w = self._node(out, "Reshape", [w, self._const(f"{h}_flat", np.array([n, blocks * block], np.int64))], f"{h}_wf")
        if blocks * block != k:
            w = self._slice_last(out, w, k, h)
        wt = self._node(out, "Transpose", [w], f"{h}_wt", perm=[1, 0])
        if len(node.input) > 5 and node.input[5]:
            y = self._node(out, "MatMul", [node.input[0], wt], f"{h}_mm")
            out.append(_make(node, "Add", [y, node.input[5]]))
        else:
            out.append(_make(node, "MatMul", [node.input[0], wt]))
        return out

    def _rewrite_GatherBlockQuantized(self, node) -> list:
        attrs = _attrs(node)
        bits, block = attrs.get("bits", 4), attrs.get("block_size", 128)
        data_shape = self._static_shape(node.input[0])
        qaxis = attrs.get("quantize_axis", 1) % len(data_shape)
        if attrs.get("gather_axis", 0) != 0 or qaxis != len(data_shape) - 1 or bits not in (4, 8):
            raise UserError(
                f"GatherBlockQuantized node {node.name!r} (gather_axis {attrs.get('gather_axis', 0)}, quantize_axis {qaxis}, "
                f"bits {bits}): TVM export rewrites gathers along axis 0 of 4- or 8-bit blocks along the last axis only"
            )
        if self.consts.get(node.input[0]) is not None and self.consts[node.input[0]].dtype != np.uint8:
            raise UserError(f"GatherBlockQuantized node {node.name!r} stores {self.consts[node.input[0]].dtype} data; TVM export rewrites uint8 data")
        rows = data_shape[0]
        k = data_shape[-1] * (8 // bits)
        blocks = -(-k // block)
        scales = self._need_const(node, 2, "scales").astype(np.float32).reshape(rows, blocks)
        zero = self._block_zeros(node, 3, bits, (rows, blocks), np.float32)
        idx_shape = self._static_shape(node.input[1])
        h = node.name or node.output[0]
        out: list = []
        self.extra_weights.add(node.input[0])
        flat = self._node(out, "Reshape", [node.input[1], self._const(f"{h}_m1", np.array([-1], np.int64))], f"{h}_idx")
        picked = self._node(out, "Gather", [node.input[0], flat], f"{h}_rows", axis=0)
        count = int(np.prod(idx_shape)) if idx_shape else 1
        q = self._unpack(out, picked, [count, data_shape[-1]], bits, h)
        if blocks * block != k:
            q = self._node(out, "Pad", [q, self._const(f"{h}_pads", np.array([0, 0, 0, blocks * block - k], np.int64))], f"{h}_pad")
        q = self._node(out, "Reshape", [q, self._const(f"{h}_blocks", np.array([count, blocks, block], np.int64))], f"{h}_qb")
        s = self._node(out, "Gather", [self._const(f"{h}_scale", scales[..., None]), flat], f"{h}_s", axis=0)
        if zero.ndim:  # per-row block zero points are gathered with the rows
            zero = self._node(out, "Gather", [self._const(f"{h}_zero", zero[..., None]), flat], f"{h}_z", axis=0)
        w = self._dequant(out, q, zero, s, h)
        w = self._node(out, "Reshape", [w, self._const(f"{h}_flat", np.array([count, blocks * block], np.int64))], f"{h}_wf")
        if blocks * block != k:
            w = self._slice_last(out, w, k, h)
        out.append(_make(node, "Reshape", [w, self._const(f"{h}_out", np.array([*idx_shape, k], np.int64))]))
        return out

    def _block_zeros(self, node, k: int, bits: int, shape: tuple[int, int], dtype) -> np.ndarray:
        """Zero points per block as floats of ``shape`` (absent: 2^(bits-1), as ONNX Runtime assumes)."""
        zp = self._need_const(node, k, "zero points")
        if zp is None:
            return np.array(2 ** (bits - 1), np.float32)
        if zp.dtype != np.uint8:  # float zero points, one per block
            return zp.astype(np.float32).reshape(shape)
        rows, blocks = shape
        per_row = zp.reshape(rows, -1)
        if bits == 4:
            per_row = np.stack([per_row & 15, per_row >> 4], axis=-1).reshape(rows, -1)
        return per_row[:, :blocks].astype(np.float32)

    def _dequant(self, out: list, q: str, zero, scale: str, h: str) -> str:
        qf = self._node(out, "Cast", [q], f"{h}_qf", to=1)  # FLOAT
        z = zero if isinstance(zero, str) else self._const(f"{h}_zero", zero[..., None] if zero.ndim else zero)
        return self._node(out, "Mul", [self._node(out, "Sub", [qf, z], f"{h}_centered"), scale], f"{h}_w")

    def _slice_last(self, out: list, x: str, size: int, h: str) -> str:
        return self._node(out, "Slice", [
            x, self._const(f"{h}_s0", np.array([0], np.int64)), self._const(f"{h}_s1", np.array([size], np.int64)),
            self._const(f"{h}_s2", np.array([-1], np.int64)),
        ], f"{h}_sl")

    def _rewrite_QLinearMatMul(self, node) -> list:
        a, a_s, a_z, b, b_s, b_z, y_s, y_z = (list(node.input) + [""] * 8)[:8]
        h = node.name or node.output[0]
        out: list = []
        b_axis = {"axis": len(self._static_shape(b)) - 1} if self.consts.get(b_s) is not None and self.consts[b_s].size > 1 else {}
        da = self._node(out, "DequantizeLinear", [a, a_s, a_z], f"{h}_a")
        db = self._node(out, "DequantizeLinear", [b, b_s, b_z], f"{h}_b", **b_axis)
        y = self._node(out, "MatMul", [da, db], f"{h}_y")
        out.append(_make(node, "QuantizeLinear", [y, y_s, y_z]))
        return out

    def _rewrite_QLinearConv(self, node) -> list:
        x, x_s, x_z, w, w_s, w_z, y_s, y_z, bias = (list(node.input) + [""] * 9)[:9]
        h = node.name or node.output[0]
        out: list = []
        dx = self._node(out, "DequantizeLinear", [x, x_s, x_z], f"{h}_x")
        dw = self._node(out, "DequantizeLinear", [w, w_s, w_z], f"{h}_w", axis=0)
        inputs = [dx, dw]
        if bias:
            step = self._need_const(node, 1, "input scale").astype(np.float32) * self._need_const(node, 4, "weight scale").astype(np.float32)
            if step.size == 1:
                scale, zero, axis = step.reshape(()), np.array(0, np.int32), {}
            else:
                scale, zero, axis = step.reshape(-1), np.zeros(step.size, np.int32), {"axis": 0}
            inputs.append(self._node(out, "DequantizeLinear", [bias, self._const(f"{h}_bstep", scale), self._const(f"{h}_bzero", zero)], f"{h}_b", **axis))
        y = self._node(out, "Conv", inputs, f"{h}_y", **_attrs(node))
        out.append(_make(node, "QuantizeLinear", [y, y_s, y_z]))
        return out

    def _rewrite_ConvInteger(self, node) -> list:
        x, w, x_z, w_z = (list(node.input) + [""] * 4)[:4]
        h = node.name or node.output[0]
        out: list = []
        xf = self._node(out, "Cast", [x], f"{h}_xf", to=1)
        if x_z:
            xf = self._node(out, "Sub", [xf, self._node(out, "Cast", [x_z], f"{h}_xzf", to=1)], f"{h}_xc")
        self.extra_weights.add(w)
        wf = self._node(out, "Cast", [w], f"{h}_wf", to=1)
        if w_z:
            zero = self._need_const(node, 3, "weight zero point").astype(np.float32)
            zero = zero.reshape(-1, 1, 1, 1) if zero.size > 1 else zero.reshape(())
            wf = self._node(out, "Sub", [wf, self._const(f"{h}_wz", zero)], f"{h}_wc")
        y = self._node(out, "Conv", [xf, wf], f"{h}_y", **_attrs(node))
        out.append(_make(node, "Cast", [y], to=6))  # INT32
        return out


# -- helpers --------------------------------------------------------------------


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _make(node, op: str, inputs: list[str], **attrs):
    """A node that takes over ``node``'s outputs (and name)."""
    from onnx import helper

    return helper.make_node(op, inputs, list(node.output), name=node.name or None, **attrs)


def _constant_value(node) -> np.ndarray:
    from onnx import helper, numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        value = helper.get_attribute_value(a)
        if a.name in ("value_float", "value_int"):
            return np.array(value, np.float32 if a.name == "value_float" else np.int64)
        if a.name in ("value_floats", "value_ints"):
            return np.array(value, np.float32 if a.name == "value_floats" else np.int64)
    raise StepFailed(f"Constant node {node.name!r} holds a sparse or string value, which TVM export does not take")


def _set_shape(value_info, shape: list[int]) -> None:
    dims = value_info.type.tensor_type.shape
    dims.ClearField("dim")
    for d in shape:
        dims.dim.add().dim_value = int(d)


def _subgraph_inputs(graph) -> set[str]:
    """Names that nodes inside If/Loop/Scan bodies read from the outer graph."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.g.node else []) + list(a.graphs):
                names |= {n for s in sub.node for n in s.input} | _subgraph_inputs(sub)
    return names


def _infer_shapes(model) -> dict[str, list[int]]:
    import onnx

    shapes: dict[str, list[int]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    return shapes


def _lift(model, consts: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Move the integer weight initializers ``names`` to graph inputs (after the model's own); return their values."""
    from onnx import helper

    g = model.graph
    lifted = {n: consts[n] for n in names}
    kept = [i for i in g.initializer if i.name not in lifted]
    del g.initializer[:]
    g.initializer.extend(kept)
    for n, v in lifted.items():
        g.input.append(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
    return lifted
