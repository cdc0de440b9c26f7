"""quantize.ptq through recipes: ONNX-only sources, backend: nncf, and clear errors for bad configs."""

import numpy as np
import onnx
import pytest
import torch

from edgekit.cli import main
from edgekit.pipeline import Pipeline
from edgekit.progress import Reporter
from edgekit.recipe import load_recipe
from tests.conftest import TINY_DIGITS, write_recipe


def _run(tmp_path, text):
    recipe = load_recipe(write_recipe(tmp_path, text))
    p = Pipeline(recipe, tmp_path / "run", reporter=Reporter(quiet=True))
    p.prepare()
    return p.run()


def _mlp_onnx(path, opset=17):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)).eval()
    torch.onnx.export(m, (torch.zeros(1, 64),), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return m


ONNX_RECIPE = """
name: onnx-ptq
model:
  source: onnx:{path}
  task: classification
data:
  source: npz:{data}
  calibration: {{samples: 16}}
compress:
  - quantize.ptq: {{}}
report: {{formats: [json]}}
"""


def test_onnx_only_model_is_quantized_and_counted(tmp_path):
    m = _mlp_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", image=x, labels=m(torch.from_numpy(x)).argmax(1).numpy())
    report = _run(tmp_path, ONNX_RECIPE.format(path=tmp_path / "mlp.onnx", data=tmp_path / "d.npz"))
    step = report["steps"][1]
    q = step["metrics"]["quantize"]
    assert step["format"] == "onnx" and q["backend"] == "edgekit-onnx" and q["quantized_layers"] == 2
    assert q["integer"]["integer"] == 2 and q["integer"]["float"] == 0
    model = onnx.load(str(tmp_path / "run" / "steps" / step["id"] / "artifact" / "model.onnx"))
    assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == 2
    # the labels are the float model's own predictions: the int8 model keeps nearly all of them
    assert step["metrics"]["accuracy"]["value"] >= 0.95


@pytest.mark.slow
def test_backend_nncf_quantizes_the_same_recipe(tmp_path):
    text = TINY_DIGITS.replace(
        "  - train.supervised: {epochs: 2}\n", "  - train.supervised: {epochs: 12}\n  - quantize.ptq: {backend: nncf}\n"
    ).replace("export:\n  - onnx: {opset: 17}\n", "")
    report = _run(tmp_path, text)
    trained, nncf_step = report["steps"][1], report["steps"][2]
    assert nncf_step["format"] == "onnx" and nncf_step["metrics"]["quantize"]["backend"] == "nncf"
    model = onnx.load(str(tmp_path / "run" / "steps" / nncf_step["id"] / "artifact" / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert trained["metrics"]["accuracy"]["value"] - nncf_step["metrics"]["accuracy"]["value"] <= 0.05


# bits: 3, per-channel activations and unknown calibration methods: tests/test_quantize_ptq.py
@pytest.mark.parametrize(
    "setting, path",
    [
        ("{weights: {group_size: 48}}", "compress[1].quantize.ptq.weights"),
        ("{max_drop: {absolute: 0.01, relative: 0.01}}", "compress[1].quantize.ptq.max_drop"),
    ],
)
def test_bad_group_size_and_max_drop_fail_with_one_line_naming_the_key(tmp_path, capsys, setting, path):
    text = TINY_DIGITS.replace("  - train.supervised: {epochs: 2}\n", f"  - train.supervised: {{epochs: 2}}\n  - quantize.ptq: {setting}\n")
    with pytest.raises(SystemExit) as e:
        main(["recipe", "validate", str(write_recipe(tmp_path, text))])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and path in err and "Traceback" not in err


def test_export_of_an_unknown_step_is_a_clear_error(tmp_path, capsys):
    text = TINY_DIGITS.replace("  - onnx: {opset: 17}\n", "  - onnx: {opset: 17}\n    of: quantize.ptq\n")
    with pytest.raises(SystemExit) as e:
        main(["recipe", "validate", str(write_recipe(tmp_path, text))])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "export[0].of" in err and "quantize.ptq" in err and len(err.splitlines()) == 1


def test_quantized_model_with_the_dynamo_exporter_is_a_clear_error(tmp_path, capsys):
    text = TINY_DIGITS.replace(
        "  - train.supervised: {epochs: 2}\n", "  - train.supervised: {epochs: 2}\n  - quantize.ptq: {latency_aware: false, sensitivity: false}\n"
    ).replace("  - onnx: {opset: 17}\n", "  - onnx: {opset: 17, exporter: dynamo}\n")
    with pytest.raises(SystemExit) as e:
        main(["compress", str(write_recipe(tmp_path, text)), "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "exporter: torchscript" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "steps" / "03-export.onnx").exists()
