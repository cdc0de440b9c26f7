"""Join a quantized export's integer layers into integer chains ONNX Runtime can fuse.

Each quantized layer writes its own QuantizeLinear (Q) / DequantizeLinear (DQ)
pairs, and the ops torch runs as plain functions between layers (activations,
residual adds, pooling) export in float:

    Conv -> Q(o) -> DQ -> Clip -> Q(a) -> DQ -> Conv        clip in float, quantized twice
    DQ(o) -> Add <- float skip;  Add -> Q(a) -> DQ -> Conv   add in float

ONNX Runtime turns a node into an integer kernel only when every activation
input comes from a DQ and its output goes into a Q. Three rewrites, in this
order, make that true with the ranges edgekit already calibrated (no new
calibration, the torch simulation is left as it is):

1. Quantizing earlier. A Relu/Clip read only by Qs that cannot hold a value
   outside its range is skipped (the Q clamps the same way), and a max pooling
   or reshape read only by Qs gets a copy of that Q on its input (quantization
   is monotone, so the integers are the same). Either way the tensor in front,
   say a residual Add's output, now has a quantizer.
2. Activation folding. ``Q(o) -> DQ -> Relu/Clip -> Q(a)``, when every value Q(a)
   can represent lies inside the activation's range: the pair Q(o)/DQ goes, the
   layer writes straight into the activation's quantized range and the runtime
   drops the activation (integer saturation clips the same way): a QLinearConv
   with its ReLU6 fused, and one rounding fewer than before.
3. Shared quantization. A float tensor that a Q reads (the next layer's input)
   and that ops with integer kernels also read (Add, Mul, Concat, pooling) gives
   those ops the dequantized copy, provided their own output goes into a Q. A
   residual Add then reads two DQs and writes into a Q: QLinearAdd.

Rewrite 1 is exact; 2 drops a rounding and 3 adds one, each on a range calibrated
for that very tensor. The export's parity check still judges the result against
the torch simulation.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from onnx import helper, numpy_helper

# ops ONNX Runtime runs in uint8/int8 when wrapped in DQ -> op -> Q
_CHAIN_OPS = frozenset({"Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "Clip", "Sigmoid", "LeakyRelu"})
_ACTIVATIONS = frozenset({"Relu", "Clip"})
# ops that only select or move elements: quantizing their input with the quantizer of their
# output gives the same integers (quantization is monotone), so that quantizer can move in front
_SELECTORS = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})
_QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}


class _Graph:
    """Producers, consumers and constant values of a main graph."""

    def __init__(self, graph):
        self.graph = graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.outputs = {o.name for o in graph.output}
        self.refresh()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.graph.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)

    def qparams(self, node) -> tuple[float, int, str] | None:
        """Per-tensor (scale, zero point, dtype) of a Q or DQ node; None for per-axis or unknown."""
        scale = self.consts.get(node.input[1]) if len(node.input) > 1 else None
        zero = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if scale is None or zero is None or scale.size != 1 or zero.size != 1 or zero.dtype.name not in _QRANGE:
            return None
        return float(np.float32(scale.reshape(()))), int(zero.reshape(())), zero.dtype.name

    def only_consumer(self, tensor: str):
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None


def _activation_range(g: _Graph, node) -> tuple[float, float] | None:
    if node.op_type == "Relu":
        return 0.0, float("inf")
    lo, hi = -np.inf, np.inf
    for attr in node.attribute:  # opset < 11 keeps the bounds as attributes
        lo = attr.f if attr.name == "min" else lo
        hi = attr.f if attr.name == "max" else hi
    for i, name in ((1, "lo"), (2, "hi")):
        if len(node.input) > i and node.input[i]:
            value = g.consts.get(node.input[i])
            if value is None:
                return None  # bounds computed at run time
            lo, hi = (float(value), hi) if name == "lo" else (lo, float(value))
    return float(lo), float(hi)


def _inside(params: tuple[float, int, str], bounds: tuple[float, float]) -> bool:
    """Every value the quantized tensor can hold lies in ``bounds`` (computed as ONNX Runtime checks it, in float32)."""
    scale, zero, dtype = params
    qmin, qmax = _QRANGE[dtype]
    low = np.float32(scale) * np.float32(qmin - zero)
    high = np.float32(scale) * np.float32(qmax - zero)
    return bool(bounds[0] <= low and high <= bounds[1])


def _q_consumers(g: _Graph, tensor: str) -> list:
    return [n for n in g.consumers.get(tensor, []) if n.op_type == "QuantizeLinear" and n.input[0] == tensor]


def _common_params(g: _Graph, qs: list) -> tuple[float, int, str] | None:
    params = {g.qparams(q) for q in qs}
    return params.pop() if len(params) == 1 and None not in params else None


def _dequantized(g: _Graph, tensor: str, q_like) -> str:
    """The name of ``tensor`` quantized and dequantized with the parameters of ``q_like``;
    an existing Q/DQ pair on it is reused, else one is added."""
    params = g.qparams(q_like)
    for q in _q_consumers(g, tensor):
        if g.qparams(q) == params:
            dq = next((d for d in g.consumers.get(q.output[0], []) if d.op_type == "DequantizeLinear" and g.qparams(d) == params), None)
            if dq is not None:
                return dq.output[0]
    base = f"{tensor}_chain{len(g.graph.node)}"  # the node count keeps names unique
    q = helper.make_node("QuantizeLinear", [tensor, *q_like.input[1:]], [f"{base}_q"], name=f"{base}_q")
    dq = helper.make_node("DequantizeLinear", [f"{base}_q", *q_like.input[1:]], [f"{base}_dq"], name=f"{base}_dq")
    g.graph.node.extend([q, dq])
    return dq.output[0]


def _quantize_earlier(g: _Graph) -> int:
    """Rewrite 1: move a quantizer in front of the op it follows where that gives the same integers.

    An activation whose every reader is a Q that cannot hold values outside the
    activation's range is skipped (the Q clamps the same way); a selecting op
    (max pooling, reshapes) gets a copy of its readers' Q on its input.
    """
    moved = 0
    changed = True
    while changed:
        changed = False
        for node in list(g.graph.node):
            if node.op_type not in _SELECTORS | _ACTIVATIONS or not node.input or len([o for o in node.output if o]) != 1:
                continue
            out = node.output[0]
            readers = g.consumers.get(out, [])
            params = _common_params(g, readers) if readers and all(r.op_type == "QuantizeLinear" for r in readers) else None
            if params is None or out in g.outputs:
                continue
            source = g.producer.get(node.input[0])
            if source is None or source.op_type == "DequantizeLinear":
                continue  # a graph input, or already quantized (activation folding handles Q -> DQ -> Relu)
            if node.op_type in _ACTIVATIONS:
                bounds = _activation_range(g, node)
                if bounds is None or not _inside(params, bounds):
                    continue
                for r in readers:
                    r.input[0] = node.input[0]
                g.graph.node.remove(node)
            else:
                node.input[0] = _dequantized(g, node.input[0], readers[0])
            g.refresh()
            moved += 1
            changed = True
    return moved


def _fold_activations(g: _Graph) -> int:
    """Rewrite 2: drop Q(o)/DQ in front of a Relu/Clip whose every reader quantizes inside its range."""
    folded = 0
    for act in list(g.graph.node):
        if act.op_type not in _ACTIVATIONS or not act.input:
            continue
        dq = g.producer.get(act.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or g.only_consumer(dq.output[0]) is not act:
            continue
        q = g.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or g.only_consumer(q.output[0]) is not dq:
            continue
        readers = g.consumers.get(act.output[0], [])
        qs = _q_consumers(g, act.output[0])
        params = _common_params(g, qs)
        bounds = _activation_range(g, act)
        if act.output[0] in g.outputs or not qs or params is None or bounds is None or not _inside(params, bounds):
            continue
        if any(r.op_type != "QuantizeLinear" and not (r.op_type in _CHAIN_OPS and _joinable(g, r)) for r in readers):
            continue  # a reader left in float keeps the activation alive, and the layer would fall back to float
        act.input[0] = q.input[0]
        g.graph.node.remove(q)
        g.graph.node.remove(dq)
        g.refresh()
        folded += 1
    return folded


def _joinable(g: _Graph, node) -> bool:
    """The node's output goes into a Q and each activation input is, or can be, dequantized."""
    if not any(_q_consumers(g, o) for o in node.output):
        return False
    inputs = node.input[:1] if node.op_type == "Clip" else node.input
    for name in inputs:
        producer = g.producer.get(name)
        if not (producer is not None and producer.op_type == "DequantizeLinear") and _common_params(g, _q_consumers(g, name)) is None:
            return False
    return True


def _share_quantization(g: _Graph) -> int:
    """Rewrite 3: chain ops that read a tensor some Q also reads take the dequantized copy."""
    shared = 0
    for tensor in list(g.consumers):
        qs = _q_consumers(g, tensor)
        params = _common_params(g, qs)
        if params is None:
            continue
        readers = [r for r in g.consumers[tensor] if r.op_type in _CHAIN_OPS and _joinable(g, r)]
        if not readers:
            continue
        dequantized = _dequantized(g, tensor, qs[0])
        for r in readers:
            for k, name in enumerate(r.input):
                if name == tensor:
                    r.input[k] = dequantized
        g.refresh()
        shared += len(readers)
    return shared


def _topological_order(graph) -> None:
    """Reorder nodes so each comes after the producers of its inputs (rewrites may move readers behind new nodes)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("the quantized graph has a cycle after joining its integer chains")
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            known.update(n.output)
        ordered.extend(ready)
    del graph.node[:]
    graph.node.extend(ordered)


def _scalar_qparams(g: _Graph) -> None:
    """One-element scales and zero points become scalars: ONNX Runtime folds a Clip/Relu into a Q only then."""
    made: dict[str, str] = {}
    for node in g.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k in (1, 2):
            name = node.input[k] if len(node.input) > k else ""
            value = g.consts.get(name)
            if value is None or value.size != 1 or value.ndim == 0:
                continue
            if name not in made:
                made[name] = f"{name}_scalar"
                g.graph.initializer.append(numpy_helper.from_array(value.reshape(()), made[name]))
                g.consts[made[name]] = value.reshape(())
            node.input[k] = made[name]


def join_integer_chains(model) -> dict[str, int]:
    """Apply the three rewrites to the main graph in place; how often each applied."""
    graph = model.graph
    if any(a.type in (5, 10) for n in graph.node for a in n.attribute):
        return {"moved_quantizers": 0, "folded_activations": 0, "shared_quantizations": 0}  # control flow: subgraphs read outer names
    g = _Graph(graph)
    _scalar_qparams(g)
    moved = _quantize_earlier(g)
    folded = _fold_activations(g)
    shared = _share_quantization(g)
    if moved or folded or shared:
        _topological_order(graph)
    return {"moved_quantizers": moved, "folded_activations": folded, "shared_quantizations": shared}


def float_reference(source, exported, feeds: list[dict[str, np.ndarray]]) -> dict:
    """How far the export and the torch simulation each are from the float model on ``feeds``.

    A joined chain rounds less often than the simulation (ONNX Runtime also merges
    a layer's output requantization into the next quantizer), so its distance to
    the simulation says little on its own; being no farther from the float model
    than the simulation is, with the same top-1 agreement, is the check that matters.
    """
    from edgekit.compress.quantize.modules import quant_layers
    from edgekit.runtimes import load_session

    layers = list(quant_layers(source.torch_module()).values())
    simulated = [load_session(source).run(f) for f in feeds]
    for layer in layers:
        layer.enabled = False
    try:
        floats = [load_session(source).run(f) for f in feeds]
    finally:
        for layer in layers:
            layer.enabled = True
    runtime = load_session(exported)
    deployed = [runtime.run(f) for f in feeds]

    def rel_l2(outs) -> float:
        worst = 0.0
        for k in range(len(floats[0])):
            a = np.concatenate([np.asarray(o[k], np.float64) for o in outs])
            ref = np.concatenate([np.asarray(o[k], np.float64) for o in floats])
            worst = max(worst, float(np.linalg.norm(a - ref) / (np.linalg.norm(ref) + 1e-12)))
        return worst

    def agreement(outs) -> float | None:
        a, ref = np.concatenate([o[0] for o in outs]), np.concatenate([o[0] for o in floats])
        return float((a.argmax(-1) == ref.argmax(-1)).mean()) if a.ndim == 2 and a.shape[1] > 1 else None

    result = {"export_rel_l2": rel_l2(deployed), "simulation_rel_l2": rel_l2(simulated),
              "export_top1_agreement": agreement(deployed), "simulation_top1_agreement": agreement(simulated)}
    closer = result["export_rel_l2"] <= result["simulation_rel_l2"]
    same_top1 = result["export_top1_agreement"] is None or result["export_top1_agreement"] >= result["simulation_top1_agreement"]
    result["passed"] = bool(closer and same_top1)
    return result
