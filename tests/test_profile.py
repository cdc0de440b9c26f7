"""Params, MACs and op histograms agree with hand counts, for torch and for ONNX."""

import warnings

import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgekit.artifact import Artifact, TensorSpec
from edgekit.errors import UserError
from edgekit.profile import format_inspect, inspect_target, onnx_macs, profile_artifact

SPEC = TensorSpec(name="x", shape=["batch", 1, 8, 8])
# Conv 1->4 (3x3, pad 1) on 8x8: 4*8*8 outputs * 1*3*3 = 2304 MACs; Linear 256->10: 2560 MACs.
TINY_MACS = 4 * 8 * 8 * 9 + 256 * 10
TINY_PARAMS = (4 * 9 + 4) + (256 * 10 + 10)


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10)
    ).eval()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, still supported
        torch.onnx.export(
            tiny_net(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
            input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def test_torch_profile_matches_hand_count():
    art = Artifact(format="torch", inputs=[SPEC], module=tiny_net())
    prof = profile_artifact(art, {"batch": 8})  # MACs are per sample whatever the batch dim says
    assert prof["params"] == TINY_PARAMS
    assert prof["macs"] == TINY_MACS
    assert prof["ops"] == {"Conv2d": 1, "ReLU": 1, "Flatten": 1, "Linear": 1}
    assert prof["size_bytes"] == TINY_PARAMS * 4


def test_onnx_export_profiles_the_same(tiny_onnx):
    art = Artifact(format="onnx", inputs=[SPEC], folder=tiny_onnx.parent, files={"model": tiny_onnx.name})
    prof = profile_artifact(art, {"batch": 8})
    assert prof["params"] == TINY_PARAMS
    assert prof["macs"] == TINY_MACS
    assert "macs_partial" not in prof
    assert prof["ops"]["Conv"] == 1 and prof["ops"]["Gemm"] == 1
    assert prof["size_bytes"] == tiny_onnx.stat().st_size


def test_inspect_onnx_file(tiny_onnx):
    info = inspect_target(str(tiny_onnx))
    assert info["inputs"] == [{"name": "x", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert info["outputs"][0]["name"] == "logits" and info["outputs"][0]["shape"] == ["batch", 10]
    assert (info["params"], info["macs"]) == (TINY_PARAMS, TINY_MACS)
    assert info["opset"]["ai.onnx"] == 17
    assert info["producer"].startswith("pytorch")
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(format_inspect(info))
    text = console.export_text()
    assert "[batch, 1, 8, 8]" in text and "Gemm" in text and "4.86 K" in text


def test_inspect_zoo_model():
    info = inspect_target("zoo:digits_cnn_tiny")
    # 8-16-32 channels, 3x3 convs on 8x8 -> 8x8 -> 4x4 -> 4x4, then Linear 32 -> 10
    assert info["macs"] == 8 * 64 * 9 + 16 * 16 * 8 * 9 + 32 * 16 * 16 * 9 + 32 * 10
    assert info["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert info["outputs"] == [{"name": "output", "shape": ["batch", 10], "dtype": "float32"}]
    assert info["ops"]["Conv2d"] == 3
    assert info["size_bytes"] > info["params"] * 4  # batch-norm buffers count too


def test_inspect_saved_torch_artifact(tmp_path):
    from tests.factories import mlp

    saved = Artifact(
        format="torch", inputs=[SPEC], module=mlp(), builder={"kind": "python", "target": "tests.factories:mlp", "args": {}}
    ).save(tmp_path / "artifact")
    info = inspect_target(str(tmp_path))  # a step folder holds artifact/
    assert info["params"] == 64 * 16 + 16 + 16 * 10 + 10
    assert info["macs"] == 64 * 16 + 16 * 10
    assert info["size_bytes"] == saved.size_bytes()


def _graph_model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_macs_matmul_einsum_convtranspose_with_named_dims():
    import numpy as np

    f = TensorProto.FLOAT
    w = numpy_helper.from_array(np.zeros((4, 8), np.float32), "w")
    wt = numpy_helper.from_array(np.zeros((2, 3, 3, 3), np.float32), "wt")
    model = _graph_model(
        [
            helper.make_node("MatMul", ["a", "w"], ["mm"]),  # [1, seq, 4] x [4, 8]
            helper.make_node("MatMul", ["b", "c"], ["bmm"]),  # [2, 3, 4, 5] x [5, 6] broadcast
            helper.make_node("Einsum", ["d", "e"], ["es"], equation="bij,bjk->bik"),
            helper.make_node("ConvTranspose", ["img", "wt"], ["up"], strides=[2, 2]),
        ],
        [
            helper.make_tensor_value_info("a", f, ["batch", "seq", 4]),
            helper.make_tensor_value_info("b", f, [2, 3, 4, 5]),
            helper.make_tensor_value_info("c", f, [5, 6]),
            helper.make_tensor_value_info("d", f, [2, 3, 4]),
            helper.make_tensor_value_info("e", f, [2, 4, 5]),
            helper.make_tensor_value_info("img", f, [1, 2, 4, 4]),
        ],
        [helper.make_tensor_value_info(n, f, None) for n in ("mm", "bmm", "es", "up")],
        [w, wt],
    )
    macs, partial = onnx_macs(model, [], {"batch": 16, "seq": 7})
    assert not partial
    assert macs == 7 * 4 * 8 + 2 * 3 * 4 * 5 * 6 + 2 * 3 * 4 * 5 + (2 * 4 * 4) * (3 * 3 * 3)


def test_onnx_macs_unknown_shape_is_partial():
    f = TensorProto.FLOAT
    model = _graph_model(
        [
            helper.make_node("Mystery", ["a"], ["m"], domain="custom"),  # shape inference knows nothing of it
            helper.make_node("MatMul", ["m", "b"], ["y"]),
            helper.make_node("MatMul", ["a", "b"], ["z"]),
        ],
        [helper.make_tensor_value_info("a", f, [2, 3]), helper.make_tensor_value_info("b", f, [3, 5])],
        [helper.make_tensor_value_info("y", f, None), helper.make_tensor_value_info("z", f, None)],
    )
    model.opset_import.append(helper.make_opsetid("custom", 1))
    assert onnx_macs(model) == (2 * 3 * 5, True)


def test_inspect_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        inspect_target(str(tmp_path / "missing.onnx"))
    junk = tmp_path / "notes.onnx"
    junk.write_text("this is not a protobuf\n" * 20)
    with pytest.raises(UserError, match="not an ONNX model"):
        inspect_target(str(junk))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="not an ONNX model"):
        inspect_target(str(empty))
    with pytest.raises(UserError, match="not an edgekit artifact folder"):
        inspect_target(str(tmp_path))
    with pytest.raises(UserError, match="digits_cnn"):
        inspect_target("zoo:digits_cn")
    with pytest.raises(UserError, match="needs a model name"):
        inspect_target("zoo:")


@pytest.mark.filterwarnings("ignore")
def test_quantized_torch_module_counts_packed_weights():
    quantize_dynamic = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize_dynamic is None:
        pytest.skip("torch.ao.quantization is gone from this torch")
    from edgekit.profile import _torch_profile
    from tests.factories import mlp

    q = quantize_dynamic(mlp(), {torch.nn.Linear}, dtype=torch.qint8)
    prof = _torch_profile(q, [SPEC], {})
    assert prof["params"] == 64 * 16 + 16 + 16 * 10 + 10  # int8 weights live outside parameters()
    assert prof["ops"]["Linear"] == 2
    assert prof["macs"] is None  # the FLOP counter cannot see packed int8 kernels: unknown, not 0
