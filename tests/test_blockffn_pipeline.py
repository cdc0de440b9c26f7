"""BlockFFN in the pipeline: recipe -> trained byte LM -> BlockFFN -> ONNX (dense fallback) and the sparse-kernel runtime."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit.artifact import Artifact
from tests.conftest import compress_recipe, step_manifest

if shutil.which("gcc") is None and not os.environ.get("EDGEKIT_REQUIRE_SYSTEM_TOOLS"):  # .ci/system-packages.sh installs it
    pytest.skip("gcc is not installed", allow_module_level=True)

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "python_docs_sentences.txt"
RECIPE = f"""
name: blockffn_micro
seed: 0
model:
  source: zoo:tiny_lm_micro
  dims: {{batch: 1, seq: 32}}
data:
  source: text:{CORPUS}
  holdout: 0.02
  train: {{samples: 512}}
  eval: {{samples: 32}}
compress:
  - train.lm: {{steps: 40, batch_size: 8, eval_samples: 16}}
  - moe.blockffn: {{experts: 8, steps: 20, batch_size: 8, calibration_samples: 16, eval_samples: 16}}
export:
  - onnx: {{opset: 17, verify: {{samples: 2}}}}
bench:
  runtimes: [torch, blockffn, onnxruntime]
  threads: [1]
  warmup: 1
  repeats: 3
  isolate: false
report: {{formats: [json, md]}}
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("blockffn")
    return compress_recipe(tmp, RECIPE, cache=tmp / "cache")


@pytest.mark.slow
def test_recipe_reports_sparsity_perplexity_and_both_runtimes(finished_run):
    m = step_manifest(finished_run, "moe.blockffn")
    bffn = m["metrics"]["blockffn"]
    assert bffn["experts"] == 8 and bffn["layers"] == 2
    assert bffn["before"]["tls"] == 0 and 0 <= bffn["after"]["tls"] <= 1
    assert m["metrics"]["accuracy"]["metric"] == "perplexity" and m["metrics"]["accuracy"]["value"] > 1
    runtimes = {b["runtime"] for b in m["metrics"]["bench"]}
    assert runtimes == {"torch", "blockffn"}
    source = step_manifest(finished_run, "source")
    assert {b["runtime"] for b in source["metrics"].get("bench", [])} == {"torch"}  # dense: the sparse runtime skips it
    report = (finished_run / "report.md").read_text()
    assert "## BlockFFN" in report and "CLS (8 tokens)" in report and "on the sparse kernels" in report
    onnx = step_manifest(finished_run, "export.onnx")
    assert onnx["metrics"]["verify"]["passed"]


@pytest.mark.slow
def test_saved_blockffn_artifact_reloads_and_the_kernels_match_torch(finished_run):
    from edgekit.runtimes import load_session

    art = Artifact.load(next((finished_run / "steps").glob("*moe.blockffn")) / "artifact")
    ids = np.frombuffer(CORPUS.read_bytes()[:64], dtype=np.uint8).astype(np.int64).reshape(2, 32)
    dense = load_session(art, "torch").run({"input_ids": ids})[0]
    for weights, tol in (("fp32", 1e-4), ("int8", 0.1)):
        sparse = load_session(art, "blockffn", threads=2, weights=weights, chunk=8).run({"input_ids": ids})[0]
        err = np.abs(sparse - dense).max() / np.abs(dense).max()
        assert err < tol, (weights, err)


def test_sparse_runtime_refuses_a_dense_model():
    from edgekit.errors import UserError
    from edgekit.models import create_model
    from edgekit.runtimes.blockffn_runtime import attach_kernels

    with pytest.raises(UserError, match="moe.blockffn"):
        attach_kernels(create_model("tiny_lm_micro"))
