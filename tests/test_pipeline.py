"""The pipeline end to end on small models: steps, manifests, resume, report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit.cli import main
from edgekit.pipeline import Pipeline
from edgekit.progress import Reporter
from edgekit.recipe import load_recipe
from tests.conftest import TINY_DIGITS, write_recipe


def run_pipeline(tmp_path, text, **kwargs):
    recipe = load_recipe(write_recipe(tmp_path, text))
    p = Pipeline(recipe, tmp_path / "run", reporter=Reporter(quiet=True), **kwargs)
    p.prepare()
    return p.run()


def manifests(run_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "steps").glob("*/manifest.json"))}


def test_tiny_digits_end_to_end(tmp_path):
    report = run_pipeline(tmp_path, TINY_DIGITS)
    ids = [s["id"] for s in report["steps"]]
    assert ids == ["00-source", "01-train.supervised", "02-export.onnx"]
    src, trained, onnx_step = report["steps"]
    # training helps, export keeps the accuracy, parity is recorded and tight
    assert trained["metrics"]["accuracy"]["value"] > src["metrics"]["accuracy"]["value"]
    assert onnx_step["metrics"]["verify"]["passed"] and onnx_step["metrics"]["verify"]["max_abs"] < 1e-4
    assert abs(onnx_step["metrics"]["accuracy"]["value"] - trained["metrics"]["accuracy"]["value"]) < 0.01
    assert onnx_step["metrics"]["params"] > 0 and onnx_step["metrics"]["macs"] > 0
    bench = onnx_step["metrics"]["bench"][0]
    assert bench["runtime"] == "onnxruntime" and bench["latency_ms"]["p50"] > 0
    run = tmp_path / "run"
    assert (run / "report.json").is_file() and (run / "report.md").is_file()
    assert (run / "steps/02-export.onnx/artifact/model.onnx").is_file()
    art = json.loads((run / "steps/02-export.onnx/artifact/artifact.json").read_text())
    assert [entry["pass"] for entry in art["lineage"]] == ["train.supervised", "export.onnx"]


def test_rerun_needs_resume_and_reuses_everything(tmp_path, capsys):
    run_pipeline(tmp_path, TINY_DIGITS)
    before = manifests(tmp_path / "run")
    recipe = tmp_path / "recipe.yaml"
    with pytest.raises(SystemExit) as e:
        main(["compress", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    report = run_pipeline(tmp_path, TINY_DIGITS, resume=True)
    assert all(s["cached"] for s in report["steps"])
    assert manifests(tmp_path / "run") == before


def test_changed_step_redoes_only_that_step_and_after(tmp_path):
    run_pipeline(tmp_path, TINY_DIGITS)
    before = manifests(tmp_path / "run")
    report = run_pipeline(tmp_path, TINY_DIGITS.replace("opset: 17", "opset: 18"), resume=True)
    cached = {s["id"]: s["cached"] for s in report["steps"]}
    assert cached == {"00-source": True, "01-train.supervised": True, "02-export.onnx": False}
    after = manifests(tmp_path / "run")
    assert after["01-train.supervised"] == before["01-train.supervised"]
    assert after["02-export.onnx"]["config"]["opset"] == 18


def test_force_starts_over(tmp_path):
    run_pipeline(tmp_path, TINY_DIGITS)
    report = run_pipeline(tmp_path, TINY_DIGITS, force=True)
    assert not any(s["cached"] for s in report["steps"])


@pytest.mark.slow
def test_killed_run_resumes_only_unfinished_steps(tmp_path):
    # A slow benchmark in the export step gives the kill a window after the
    # training step has finished.
    text = TINY_DIGITS.replace("repeats: 5", "repeats: 200000").replace("[json, md]", "[json]")
    recipe = write_recipe(tmp_path, text)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgekit", "compress", str(recipe), "--run-dir", str(run_dir), "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.time() + 240
    target = run_dir / "steps/01-train.supervised/manifest.json"
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert target.exists(), "training step never finished"
    time.sleep(1.0)  # now inside the export step's probes
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = manifests(run_dir)
    assert "02-export.onnx" not in finished  # the interrupted step left no manifest
    leftovers = [p.name for p in (run_dir / "steps").iterdir() if p.name.endswith(".tmp")]
    # finish with a short benchmark: only the export step may run again
    fast = text.replace("repeats: 200000", "repeats: 5")
    report = run_pipeline(tmp_path, fast, resume=True)
    cached = {s["id"]: s["cached"] for s in report["steps"]}
    assert cached == {"00-source": True, "01-train.supervised": True, "02-export.onnx": False}
    after = manifests(run_dir)
    for step_id, m in finished.items():
        assert after[step_id] == m
    assert not [p for p in (run_dir / "steps").iterdir() if p.name.endswith(".tmp")], leftovers


def test_python_source_with_opt_in(tmp_path):
    text = """
name: py-mlp
model:
  source: python:tests.factories:mlp
  trust_python: true
  args: {hidden: 8}
  task: classification
  inputs: [{name: x, shape: [batch, 1, 8, 8], dtype: float32}]
data: {source: sklearn:digits, eval: {samples: 50}}
export:
  - onnx: {}
report: {formats: [json]}
"""
    report = run_pipeline(tmp_path, text)
    assert report["steps"][-1]["metrics"]["verify"]["passed"]


def test_onnx_source_with_npz_data(tmp_path):
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh())
    torch.onnx.export(m, (torch.zeros(1, 6),), str(tmp_path / "m.onnx"), dynamo=False,
                      input_names=["features"], output_names=["y"], dynamic_axes={"features": {0: "batch"}})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", features=rng.normal(size=(40, 6)).astype(np.float32))
    text = """
name: onnx-npz
model: {source: onnx:m.onnx}
data: {source: npz:d.npz, eval: {metric: cosine}}
bench: {runtimes: [onnxruntime], warmup: 1, repeats: 3, batch_sizes: [1, 4]}
report: {formats: [json, md, png]}
"""
    report = run_pipeline(tmp_path, text)
    (step,) = report["steps"]
    assert step["format"] == "onnx"
    assert step["metrics"]["accuracy"]["value"] == pytest.approx(1.0)
    assert [b["batch_size"] for b in step["metrics"]["bench"]] == [1, 4]
    assert (tmp_path / "run/steps/00-source/artifact/m.onnx").is_file()
    assert (tmp_path / "run/report.png").stat().st_size > 1000
