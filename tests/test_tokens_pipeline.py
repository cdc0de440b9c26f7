"""Token compression in the pipeline: recipe -> ViT trained on generated shapes -> tokens.transform -> ONNX,
with the per-layer token and MAC accounting in the manifest, the report and `edgekit inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import compress_recipe, run_cli, step_manifest

RECIPE = """
name: vit_tokens_micro
seed: 0
model:
  source: zoo:vit_micro
  dims: {batch: 1}
data:
  source: synth:shapes_cls:300
  eval: {source: "synth:shapes_cls:64", metric: top1}
  calibration: {samples: 8}
compress:
  - train.supervised: {epochs: 2, batch_size: 32}
  - tokens.transform: {method: transform, flops_cut: 0.3}
export:
  - onnx: {opset: 17, verify: {samples: 4, atol: 1.0e-4}}
bench:
  runtimes: [onnxruntime]
  threads: [1]
  warmup: 1
  repeats: 3
  isolate: false
report: {formats: [json, md]}
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tokens")
    return compress_recipe(tmp, RECIPE, cache=tmp / "cache")


@pytest.mark.slow
def test_recipe_records_tokens_and_macs_per_layer(finished_run):
    m = step_manifest(finished_run, "tokens.transform")
    tokens = m["metrics"]["tokens"]
    assert tokens["method"] == "transform"
    layers = tokens["layers"]
    assert len(layers) == 4 and layers[0]["tokens"] == layers[0]["dense_tokens"] == 65
    counts = [r["tokens"] for r in layers]
    assert counts == sorted(counts, reverse=True) and counts[-1] < 65  # tokens only ever go down
    assert 0.2 < tokens["block_macs_cut"] < 0.4  # the schedule was solved for 30%, measured on the model
    assert sum(r["macs"] for r in layers) == tokens["block_macs"] < tokens["dense_block_macs"]
    assert m["metrics"]["accuracy"]["metric"] == "top1"
    onnx = step_manifest(finished_run, "export.onnx")
    assert onnx["metrics"]["verify"]["passed"] is True
    report = (finished_run / "report.md").read_text()
    assert "## Token compression" in report and "| layer | tokens in | tokens out | MACs |" in report and "65 → " in report


@pytest.mark.slow
def test_inspect_shows_the_schedule_of_the_export(finished_run, capsys):
    step = next((finished_run / "steps").glob("*export.onnx"))
    assert run_cli(["inspect", str(step), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [r["tokens"] for r in info["tokens"]["layers"]][0] == 65
    assert info["macs"] < info["tokens"]["dense_total_macs"]  # the exported graph computes the compressed schedule


HF_RECIPE = """
name: hf_vit_tokens
seed: 0
model:
  source: hf:./hf_vit
data:
  source: synth:digits_canvas:40
  calibration: {samples: 4}
  eval: {metric: top1}
compress:
  - tokens.transform: {method: tome, flops_cut: 0.3}
export:
  - onnx: {opset: 17, verify: {samples: 2, atol: 1.0e-4}}
report: {formats: [json]}
"""


def test_hugging_face_vit_from_a_folder_compresses_and_exports(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)
    ViTForImageClassification(config).save_pretrained(tmp_path / "hf_vit")
    compress_recipe(tmp_path, HF_RECIPE)
    tokens = step_manifest(tmp_path / "run", "tokens.transform")["metrics"]["tokens"]
    assert tokens["method"] == "tome" and [r["dense_tokens"] for r in tokens["layers"]] == [65, 65, 65]
    assert tokens["layers"][-1]["tokens"] < 65 and tokens["block_macs_cut"] > 0.2
    assert step_manifest(tmp_path / "run", "export.onnx")["metrics"]["verify"]["passed"] is True


VLM_RECIPE = """
name: vlm_feather_micro
seed: 0
model:
  source: zoo:tiny_vlm_micro
  dims: {batch: 1}
data:
  source: synth:shapes_vqa:60
  holdout: 0.5
  calibration: {samples: 4}
  eval: {metric: top1}
compress:
  - tokens.feather: {method: feather}
report: {formats: [json, md]}
"""


def test_vlm_recipe_reports_accuracy_by_question_kind(tmp_path):
    compress_recipe(tmp_path, VLM_RECIPE)
    acc = step_manifest(tmp_path / "run", "tokens.feather")["metrics"]["accuracy"]
    assert set(acc["by_group"]) == {"localization", "other"}
    assert all(0 <= v <= 1 for v in acc["by_group"].values())
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Accuracy by group" in report and "| Step | localization | other |" in report
    assert "## Token compression (01-tokens.feather)" in report
