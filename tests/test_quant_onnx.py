"""Quantizing ONNX models brought as a bare .onnx file (edgekit.compress.quantize.onnx_graph)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.compress.quantize.onnx_graph import count_integer_ops, normalize, quantize_onnx
from edgekit.errors import UserError

FLOAT = TensorProto.FLOAT
# Accuracy runs use 7-bit weights: on x86 AVX2 without VNNI, ORT's u8*s8 kernels saturate
# int16 pair sums with full 8-bit weights (255*127*2 > 32767), and CI machines may be such CPUs.
RR = True


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _model(nodes, inputs, outputs, initializers=(), opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    # IR 8 is what many exporters still write; ORT and the checker both accept it.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(array, name))


def _mlp(opset: int = 13, seed: int = 0) -> onnx.ModelProto:
    """x[N,16] -> MatMul+Add+Relu -> Gemm(transB=1) -> y[N,10]; weights are Constant nodes."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 32).astype(np.float32)
    w2 = rng.normal(0, 0.3, (10, 32)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 10).astype(np.float32)
    nodes = [
        _const("w1", w1), _const("b1", b1), _const("w2", w2), _const("b2", b2),
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("Gemm", ["h2", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", FLOAT, ["N", 16])],
                  [helper.make_tensor_value_info("y", FLOAT, ["N", 10])], opset=opset)


def _const_tensor(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    node = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name)
    return node.attribute[0].t


def _x(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


def _int8_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    graphs = [model.graph]
    for node in model.graph.node:
        graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return [numpy_helper.to_array(t) for g in graphs for t in g.initializer
            if t.data_type == TensorProto.INT8 and np.any(numpy_helper.to_array(t))]


# 1
@pytest.mark.parametrize("reduce_range", [False, True])
def test_mlp_with_constant_weights_is_dynamically_quantized(reduce_range):
    model = _mlp()
    x = _x((8, 16))
    ref = _run(model, {"x": x})[0]

    quant, report = quantize_onnx(model, [], reduce_range=reduce_range)
    out = _run(quant, {"x": x})[0]

    assert [(q["node"], q["op"], q["mode"], q["graph"]) for q in report["quantized"]] == [
        ("fc1", "MatMul", "dynamic", "main"), ("fc2", "Gemm", "dynamic", "main")]
    assert report["skipped"] == []
    assert not [n for n in quant.graph.node if n.op_type == "Constant"]
    assert not [t for t in quant.graph.initializer if t.name in ("w1", "w2")]  # float weights are gone
    ops = [n.op_type for n in quant.graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("DynamicQuantizeLinear") == 2
    assert "MatMul" not in ops and "Gemm" not in ops
    # Symmetric per column: every column reaches exactly +-qmax and never beyond.
    qmax = 63 if reduce_range else 127
    weights = _int8_weights(quant)
    assert sorted(w.shape for w in weights) == [(16, 32), (32, 10)]
    for w in weights:
        assert np.all(np.abs(w.astype(np.int32)).max(axis=0) == qmax)
    assert report["integer_ops"] == {"integer": 2, "float": 0, "by_op": {"MatMulInteger": 2}}
    assert any("Constant" in note for note in report["normalize"])
    # The int8 weights times their scales are close to the float weights on any CPU...
    w1 = numpy_helper.to_array(_const_tensor(model, "w1"))
    w1_q = next(w for w in weights if w.shape == (16, 32))
    w1_scale = next(numpy_helper.to_array(t) for t in quant.graph.initializer if t.name == "fc1_weight_scale")
    assert np.abs(w1_q * w1_scale - w1).max() <= w1_scale.max() / 2 + 1e-7
    # ...and the runtime result is close where the kernel cannot saturate (see RR).
    if reduce_range:
        assert _rel_err(out, ref) < 0.03
    assert not np.array_equal(out, ref)  # it really computed in int8


def test_dynamic_quantize_is_shared_by_matmuls_reading_one_tensor():
    rng = np.random.default_rng(3)
    wa, wb = (rng.normal(0, 1, (8, 4)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="a"),
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="b"),
             helper.make_node("Add", ["a", "b"], ["y"], name="sum")]
    model = _model(nodes, [helper.make_tensor_value_info("x", FLOAT, [2, 8])],
                   [helper.make_tensor_value_info("y", FLOAT, [2, 4])],
                   [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb")])
    quant, report = quantize_onnx(model, [], reduce_range=RR)
    assert [n.op_type for n in quant.graph.node].count("DynamicQuantizeLinear") == 1
    x = _x((2, 8))
    assert _rel_err(_run(quant, {"x": x})[0], x @ wa + x @ wb) < 0.03


# 2
def test_opset_12_model_is_raised_to_13():
    model = _mlp(opset=12)
    normalized, notes = normalize(model)
    assert [o.version for o in normalized.opset_import if o.domain == ""] == [13]
    assert any("12 -> 13" in note for note in notes)
    assert [o.version for o in model.opset_import] == [12]  # the input is not modified

    x = _x((4, 16))
    ref = _run(model, {"x": x})[0]
    quant, report = quantize_onnx(model, [], reduce_range=RR)
    assert [o.version for o in quant.opset_import if o.domain == ""] == [13]
    assert len(report["quantized"]) == 2
    assert _rel_err(_run(quant, {"x": x})[0], ref) < 0.03


def test_normalize_names_nodes_and_folds_scalar_constants():
    nodes = [helper.make_node("Constant", [], ["two"], value_float=2.0),
             helper.make_node("Mul", ["x", "two"], ["y"]),
             helper.make_node("Relu", ["y"], ["z"], name="dup"),
             helper.make_node("Relu", ["z"], ["out"], name="dup")]
    model = _model(nodes, [helper.make_tensor_value_info("x", FLOAT, [3])],
                   [helper.make_tensor_value_info("out", FLOAT, [3])])
    normalized, _ = normalize(model)
    names = [n.name for n in normalized.graph.node]
    assert names == ["Mul_0", "dup", "Relu_0"]
    assert numpy_helper.to_array(normalized.graph.initializer[0]).item() == 2.0
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    np.testing.assert_allclose(_run(normalized, {"x": x})[0], np.maximum(2 * x, 0))


def test_failed_opset_conversion_is_a_user_error():
    with pytest.raises(UserError, match="opset 13 to opset 999"):
        normalize(_mlp(), min_opset=999)


# 3
def _if_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """then: x @ wt (Constant inside the branch); else: x @ we (outer-scope initializer)."""
    rng = np.random.default_rng(5)
    wt = rng.normal(0, 0.5, (8, 6)).astype(np.float32)
    we = rng.normal(0, 0.5, (8, 6)).astype(np.float32)
    out_info = [helper.make_tensor_value_info("branch_out", FLOAT, [3, 6])]
    then_g = helper.make_graph([_const("wt", wt), helper.make_node("MatMul", ["x", "wt"], ["branch_out"], name="then_mm")],
                               "then", [], out_info)
    else_info = [helper.make_tensor_value_info("else_out", FLOAT, [3, 6])]
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "we"], ["else_out"], name="else_mm")],
                               "else", [], else_info)
    node = helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=then_g, else_branch=else_g)
    model = _model([node],
                   [helper.make_tensor_value_info("x", FLOAT, [3, 8]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", FLOAT, [3, 6])], [numpy_helper.from_array(we, "we")])
    return model, wt, we


def test_matmul_inside_if_branches_is_quantized_in_the_subgraph():
    model, wt, we = _if_model()
    quant, report = quantize_onnx(model, [], reduce_range=RR)

    assert sorted((q["node"], q["graph"]) for q in report["quantized"]) == [
        ("else_mm", "choose/else_branch"), ("then_mm", "choose/then_branch")]
    if_node = quant.graph.node[0]
    for attr in if_node.attribute:
        ops = [n.op_type for n in attr.g.node]
        assert "MatMulInteger" in ops and "MatMul" not in ops and "Constant" not in ops
        assert not [t.name for t in attr.g.initializer if t.data_type == FLOAT and len(t.dims) == 2]
    assert "we" not in {t.name for t in quant.graph.initializer}  # outer float weight dropped
    assert report["integer_ops"]["integer"] == 2 and report["integer_ops"]["float"] == 0

    x = _x((3, 8))
    for cond, w in ((True, wt), (False, we)):
        out = _run(quant, {"x": x, "cond": np.array(cond)})[0]
        assert _rel_err(out, x @ w) < 0.03


def test_matmul_inside_a_loop_body_reads_the_outer_weight():
    w = np.random.default_rng(6).normal(0, 0.4, (8, 8)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("MatMul", ["v_in", "w"], ["mm"], name="step_mm"),
         helper.make_node("Tanh", ["mm"], ["v_out"], name="step_tanh")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", FLOAT, [2, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", FLOAT, [2, 8])])
    loop = helper.make_node("Loop", ["trips", "", "v0"], ["v"], name="repeat", body=body)
    model = _model([loop], [helper.make_tensor_value_info("trips", TensorProto.INT64, []),
                            helper.make_tensor_value_info("v0", FLOAT, [2, 8])],
                   [helper.make_tensor_value_info("v", FLOAT, [2, 8])], [numpy_helper.from_array(w, "w")])
    quant, report = quantize_onnx(model, [], reduce_range=RR)
    assert report["quantized"] == [{"node": "step_mm", "op": "MatMul", "mode": "dynamic", "graph": "repeat/body"}]
    assert "w" not in {t.name for t in quant.graph.initializer}

    v0 = _x((2, 8))
    ref = v0
    for _ in range(3):
        ref = np.tanh(ref @ w)
    out = _run(quant, {"trips": np.array(3, np.int64), "v0": v0})[0]
    assert _rel_err(out, ref) < 0.03


def test_conv_inside_a_subgraph_is_left_float_with_a_reason():
    w = np.random.default_rng(2).normal(0, 0.5, (2, 1, 3, 3)).astype(np.float32)
    body = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="inner_conv", pads=[1, 1, 1, 1])],
                             "then", [], [helper.make_tensor_value_info("c", FLOAT, [1, 2, 4, 4])])
    node = helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=body, else_branch=body)
    model = _model([node], [helper.make_tensor_value_info("x", FLOAT, [1, 1, 4, 4]),
                            helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", FLOAT, [1, 2, 4, 4])], [numpy_helper.from_array(w, "w")])
    feed = {"x": _x((1, 1, 4, 4)), "cond": np.array(True)}
    quant, report = quantize_onnx(model, [feed], reduce_range=RR)
    assert report["quantized"] == []
    assert {"node": "inner_conv", "op": "Conv", "reason": "inside a subgraph: no calibration range"} in report["skipped"]
    np.testing.assert_allclose(_run(quant, feed)[0], _run(model, feed)[0], rtol=1e-6)


# 4
def _conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (4, 8, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return _model(nodes, [helper.make_tensor_value_info("x", FLOAT, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", FLOAT, [1, 4, 8, 8])], inits)


def test_conv_gets_static_qdq_from_calibration():
    model = _conv_model()
    calibration = [{"x": _x((1, 3, 8, 8), seed=s)} for s in range(10, 18)]
    x = _x((1, 3, 8, 8), seed=99)
    ref = _run(model, {"x": x})[0]

    quant, report = quantize_onnx(model, calibration, reduce_range=RR)

    assert [(q["node"], q["mode"]) for q in report["quantized"]] == [("conv1", "static"), ("conv2", "static")]
    assert report["integer_ops"]["integer"] == 2 and report["integer_ops"]["float"] == 0
    assert count_integer_ops(quant)["by_op"] == {"Conv": 2}
    ops = [n.op_type for n in quant.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4
    inits = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer}
    assert "w1" not in inits and "w2" not in inits and "b1" in inits  # bias stays float
    weight_dqs = [n for n in quant.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dqs) == 2
    for dq in weight_dqs:
        assert helper.get_attribute_value(dq.attribute[0]) == 0  # axis: per output channel
        q = inits[dq.input[0]]
        assert inits[dq.input[1]].shape == (q.shape[0],)
        assert np.all(np.abs(q.reshape(q.shape[0], -1).astype(np.int32)).max(axis=1) == (63 if RR else 127))
    # The Relu output range starts at 0, so its zero point must be 0; x straddles 0.
    act_zps = {n.input[0]: int(inits[n.input[2]]) for n in quant.graph.node if n.op_type == "QuantizeLinear"}
    assert act_zps["r1"] == 0 and 50 < act_zps["x"] < 200

    out = _run(quant, {"x": x})[0]
    assert _rel_err(out, ref) < 0.05
    assert not np.allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_activation_range_is_widened_to_hold_zero():
    # Calibration inputs all in [2, 3]: the range must still start at 0 (zero point 0).
    calibration = [{"x": 2 + np.random.default_rng(s).random((1, 3, 8, 8)).astype(np.float32)} for s in range(4)]
    quant, _ = quantize_onnx(_conv_model(), calibration, reduce_range=RR)
    inits = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer}
    q = next(n for n in quant.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    hi = max(float(f["x"].max()) for f in calibration)
    assert int(inits[q.input[2]]) == 0
    assert float(inits[q.input[1]]) == pytest.approx(hi / 255, rel=1e-6)


def test_conv_without_calibration_is_skipped_and_missing_feed_is_a_user_error():
    quant, report = quantize_onnx(_conv_model(), [], reduce_range=RR)
    assert report["quantized"] == [] and {s["node"] for s in report["skipped"]} == {"conv1", "conv2"}
    with pytest.raises(UserError, match="missing input"):
        quantize_onnx(_conv_model(), [{"image": _x((1, 3, 8, 8))}], reduce_range=RR)


def test_static_conv_off_leaves_convs_float():
    quant, report = quantize_onnx(_conv_model(), [{"x": _x((1, 3, 8, 8))}], reduce_range=RR, static_conv=False)
    assert report["quantized"] == [] and report["skipped"] == []
    assert report["integer_ops"]["integer"] == 0 and report["integer_ops"]["float"] == 2


# 5
@pytest.mark.parametrize("pattern", ["fc2", "fc[2-9]*"])
def test_skip_list_leaves_a_named_node_float(pattern):
    model = _mlp()
    quant, report = quantize_onnx(model, [], reduce_range=RR, skip=[pattern])
    assert [q["node"] for q in report["quantized"]] == ["fc1"]
    assert report["skipped"] == [{"node": "fc2", "op": "Gemm", "reason": f"matches skip pattern '{pattern}'"}]
    gemm = [n for n in quant.graph.node if n.op_type == "Gemm"]
    assert len(gemm) == 1 and gemm[0].name == "fc2"
    w2 = next(t for t in quant.graph.initializer if t.name == gemm[0].input[1])
    assert w2.data_type == FLOAT
    assert report["integer_ops"] == {"integer": 1, "float": 1, "by_op": {"MatMulInteger": 1, "Gemm": 1}}
    x = _x((4, 16))
    assert _rel_err(_run(quant, {"x": x})[0], _run(model, {"x": x})[0]) < 0.03


# 6
def test_3d_weight_matmul_is_reported_and_activation_matmul_ignored():
    w = np.random.default_rng(4).normal(0, 1, (4, 8, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="batched"),
             helper.make_node("MatMul", ["y", "t"], ["z"], name="attention_like")]
    model = _model(nodes, [helper.make_tensor_value_info("x", FLOAT, [4, 2, 8]),
                           helper.make_tensor_value_info("t", FLOAT, [4, 5, 3])],
                   [helper.make_tensor_value_info("z", FLOAT, [4, 2, 3])], [numpy_helper.from_array(w, "w")])
    quant, report = quantize_onnx(model, [], reduce_range=RR)

    assert report["quantized"] == []
    assert [(s["node"], s["op"]) for s in report["skipped"]] == [("batched", "MatMul")]
    assert "3-D" in report["skipped"][0]["reason"]
    assert report["integer_ops"] == {"integer": 0, "float": 2, "by_op": {"MatMul": 2}}
    feed = {"x": _x((4, 2, 8)), "t": _x((4, 5, 3), seed=2)}
    np.testing.assert_allclose(_run(quant, feed)[0], (feed["x"] @ w) @ feed["t"], rtol=1e-5, atol=1e-5)


# 7
def test_count_integer_ops_on_a_float_model():
    assert count_integer_ops(_mlp()) == {"integer": 0, "float": 2, "by_op": {"MatMul": 1, "Gemm": 1}}
    model, _, _ = _if_model()
    assert count_integer_ops(model) == {"integer": 0, "float": 2, "by_op": {"MatMul": 2}}
