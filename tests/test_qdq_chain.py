"""export/qdq_chain.py: a quantized export's layers joined into integer chains that
ONNX Runtime fuses (QLinearConv with its activation, QLinearAdd), with outputs
still matching the torch simulation."""

import io
import tempfile
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgekit.compress.quantize.modules import LayerConfig, apply_plan, quant_layers
from edgekit.export.dedupe import dedupe_nodes, drop_unused
from edgekit.export.qdq_chain import join_integer_chains


class InvertedResidual(nn.Module):
    """MobileNet-style: conv + ReLU6, a projection conv added back, ReLU, max pooling, a last conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.MaxPool2d(2)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = self.act(self.c1(x))
        y = torch.relu(a + self.c2(a))
        return self.c3(self.pool(y))


def _quantized(act_symmetric: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = InvertedResidual().eval()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    ranges: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: ranges.__setitem__(n, (a[0].min().item(), a[0].max().item(), o.min().item(), o.max().item())))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    cfg = LayerConfig("static", 8, 0, True, act_symmetric, True, out_quant=True).to_dict()
    apply_plan(model, {n: cfg for n in ranges})
    for name, layer in quant_layers(model).items():
        layer.calibrate_weight()
        lo, hi, olo, ohi = ranges[name]
        layer.set_act_qparams(lo, hi)
        layer.set_out_qparams(olo, ohi)
    return model, x


def _export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    proto = onnx.load_from_string(buf.getvalue())
    dedupe_nodes(proto)
    return proto


def _run(proto: onnx.ModelProto, feeds: dict) -> tuple[np.ndarray, Counter]:
    """Output and the op types of the graph ONNX Runtime really runs after its own fusions."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tempfile.TemporaryDirectory() as tmp:
            opts.optimized_model_filepath = f"{tmp}/optimized.onnx"
            session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return session.run(None, feeds)[0], ops


def test_inverted_residual_runs_as_one_integer_chain():
    model, x = _quantized()
    with torch.no_grad():
        simulated = model(x).numpy()
    before = _export(model, x)
    after = onnx.load_from_string(before.SerializeToString())
    counts = join_integer_chains(after)
    onnx.checker.check_model(after, full_check=True)
    # the ReLU after the add is skipped, and the pooling's input quantized; c1's output pair goes
    assert counts == {"moved_quantizers": 2, "folded_activations": 1, "shared_quantizations": 1}, counts

    out_before, ops_before = _run(before, {"x": x.numpy()})
    out_after, ops_after = _run(after, {"x": x.numpy()})
    # before: the activation and the residual add run in float between integer convolutions
    assert ops_before["Clip"] == 1 and ops_before["Add"] == 1, ops_before
    # after: every op of the chain is integer
    assert ops_after["QLinearConv"] == 3 and ops_after["QLinearAdd"] == 1, ops_after
    assert not {"Clip", "Relu", "Add", "Conv", "FusedConv"} & set(ops_after), ops_after
    assert ops_after["QuantizeLinear"] + ops_after["DequantizeLinear"] < ops_before["QuantizeLinear"] + ops_before["DequantizeLinear"]

    scale = float(np.abs(simulated).max())
    assert np.abs(out_before - simulated).max() / scale < 0.03
    assert np.abs(out_after - simulated).max() / scale < 0.03


def test_leftover_constants_and_scales_are_dropped_and_outputs_unchanged():
    model, x = _quantized()
    proto = _export(model, x)
    join_integer_chains(proto)  # replaces 1-element scales by scalars: the old ones are no longer read
    graph = proto.graph
    read = {i for n in graph.node for i in n.input}
    dead = [n.output[0] for n in graph.node if n.op_type == "Constant" and n.output[0] not in read]
    stale = [t.name for t in graph.initializer if t.name not in read]
    assert dead or stale  # the export really leaves some behind
    out_before, _ = _run(proto, {"x": x.numpy()})

    removed = drop_unused(proto)
    assert removed >= len(dead) + len(stale)
    onnx.checker.check_model(proto, full_check=True)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    assert all(set(n.output) & read for n in graph.node)
    assert all(t.name in read for t in graph.initializer)
    out_after, _ = _run(proto, {"x": x.numpy()})
    np.testing.assert_array_equal(out_after, out_before)
    assert drop_unused(proto) == 0


def test_activation_stays_where_the_quantizer_can_hold_negative_values():
    """Symmetric int8 activations can represent values below 0: dropping the ReLU would change results."""
    model, x = _quantized(act_symmetric=True)
    with torch.no_grad():
        simulated = model(x).numpy()
    proto = _export(model, x)
    counts = join_integer_chains(proto)
    assert counts["folded_activations"] == 0
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["Clip"] == 1 and ops["Relu"] == 1, ops
    out, _ = _run(proto, {"x": x.numpy()})
    assert np.abs(out - simulated).max() / float(np.abs(simulated).max()) < 0.03


def _scalar(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _pool_graph(zero: int) -> onnx.ModelProto:
    """x + b -> MaxPool -> Q -> DQ -> y: the pooling runs on floats before any rewrite."""
    nodes = [
        helper.make_node("Add", ["x", "b"], ["s"]),
        helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("QuantizeLinear", ["p", "scale", "zero"], ["pq"]),
        helper.make_node("DequantizeLinear", ["pq", "scale", "zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])],
        [_scalar("b", 0.25, np.float32), _scalar("scale", 0.05, np.float32), _scalar("zero", zero, np.uint8)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("zero", [0, 128])
def test_quantizing_in_front_of_max_pooling_gives_the_same_integers(zero):
    proto = _pool_graph(zero)
    x = {"x": np.random.default_rng(0).normal(0, 4, (1, 2, 6, 6)).astype(np.float32)}  # far outside the range: clamping matters
    want, _ = _run(proto, x)
    moved = onnx.load_from_string(proto.SerializeToString())
    assert join_integer_chains(moved)["moved_quantizers"] == 1
    assert [n.op_type for n in moved.graph.node] == ["Add", "QuantizeLinear", "DequantizeLinear", "MaxPool", "QuantizeLinear", "DequantizeLinear"]
    got, _ = _run(moved, x)
    assert np.array_equal(got, want)


def test_graph_outputs_and_float_readers_are_left_alone():
    """A ReLU whose output is also a graph output, or is read by an op without an integer kernel, keeps its float path."""
    nodes = [
        helper.make_node("Add", ["x", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "scale", "zero"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "scale", "zero"], ["y"]),
        helper.make_node("Tanh", ["r"], ["t"]),
    ]
    graph = helper.make_graph(
        nodes, "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]), helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
        [_scalar("b", 0.0, np.float32), _scalar("scale", 0.1, np.float32), _scalar("zero", 0, np.uint8)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    counts = join_integer_chains(proto)
    assert counts == {"moved_quantizers": 0, "folded_activations": 0, "shared_quantizations": 0}
    assert [n.op_type for n in proto.graph.node] == ["Add", "Relu", "QuantizeLinear", "DequantizeLinear", "Tanh"]


def _artifacts(tmp_path, model: nn.Module, proto: onnx.ModelProto):
    from edgekit.artifact import Artifact, TensorSpec

    spec = [TensorSpec(name="x", shape=[4, 3, 16, 16])]
    onnx.save(proto, str(tmp_path / "model.onnx"))
    source = Artifact(format="torch", inputs=spec, outputs=["y"], module=model, meta={"quantized": True})
    exported = Artifact(format="onnx", inputs=spec, outputs=["y"], folder=tmp_path, files={"model": "model.onnx"})
    return source, exported


def test_joined_chain_is_judged_by_its_distance_to_the_float_model(tmp_path):
    from edgekit.export.qdq_chain import float_reference

    model, x = _quantized()
    proto = _export(model, x)
    join_integer_chains(proto)
    feeds = [{"x": x.numpy()}, {"x": x.flip(-1).numpy()}]
    ref = float_reference(*_artifacts(tmp_path, model, proto), feeds)
    assert 0 < ref["export_rel_l2"] <= ref["simulation_rel_l2"] < 0.1 and ref["passed"], ref
    assert all(layer.enabled for layer in quant_layers(model).values())  # the float run is undone

    # a broken export (the last layer's output quantizer three times too coarse) fails the same check
    last_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"][-1]
    scale = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == last_q.input[1]))
    proto.graph.initializer.append(numpy_helper.from_array(scale * 3, "coarse_scale"))
    for node in proto.graph.node:
        if node.input and node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] in (last_q.input[0], last_q.output[0]):
            node.input[1] = "coarse_scale"
    broken = tmp_path / "broken"
    broken.mkdir()
    ref = float_reference(*_artifacts(broken, model, proto), feeds)
    assert not ref["passed"] and ref["export_rel_l2"] > ref["simulation_rel_l2"], ref
