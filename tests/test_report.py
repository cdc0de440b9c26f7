"""The report: json round-trips, the markdown shows every step's numbers, the png is a PNG."""

import copy
import json

import pytest

from edgekit.errors import UserError
from edgekit.machine import machine_info, versions
from edgekit.report import headline_bench, human_bytes, human_count, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(runtime: str, p50: float, threads: int = 1, batch: int = 1) -> dict:
    return {
        "runtime": runtime, "runtime_version": "1.0", "threads": threads, "batch_size": batch,
        "warmup": 5, "repeats": 50, "isolated": True,
        "latency_ms": {"p50": p50, "p90": p50 * 1.2, "p99": p50 * 1.5, "mean": p50 * 1.05},
        "throughput_sps": batch * 1000 / (p50 * 1.05), "peak_rss_mb": 180.4,
    }


def step(index: int, name: str, kind: str, fmt: str, metrics: dict) -> dict:
    return {"index": index, "id": f"{index:02d}-{name}", "pass": name, "kind": kind, "format": fmt,
            "config": {}, "cached": False, "seconds": 1.5, "metrics": metrics}


def make_report() -> dict:
    acc = lambda v: {"metric": "top1", "value": v, "samples": 360}  # noqa: E731
    return {
        "name": "tiny-digits",
        "created": "2025-01-02T03:04:05+00:00",
        "recipe": {"name": "tiny-digits"},
        "machine": {"cpu": "Test CPU 9000", "cores": 2, "flags": ["avx2"], "memory_gb": 7.7, "os": "Linux", "python": "3.11.9"},
        "versions": {"edgekit": "0.1.0", "torch": "2.13.0", "onnxruntime": "1.32.0"},
        "steps": [
            step(0, "source", "source", "torch", {"accuracy": acc(0.1), "size_bytes": 25_600, "params": 6274, "macs": 97_088,
                                                  "bench": [bench("torch", 0.412)]}),
            step(1, "train.supervised", "compress", "torch", {"accuracy": acc(0.9611), "size_bytes": 25_600, "params": 6274,
                                                               "macs": 97_088, "bench": [bench("torch", 0.398)], "train": {"epochs": 2}}),
            step(2, "export.onnx", "export", "onnx", {
                "accuracy": acc(0.9611), "size_bytes": 12_800, "params": 6210, "macs": 97_088,
                "verify": {"max_abs": 2.1e-6, "mean_abs": 3.0e-7, "max_rel": 1.2e-7, "top1_agreement": 1.0, "passed": True,
                           "atol": 1e-4, "rtol": None, "samples": 8, "runtime": "onnxruntime"},
                "bench": [bench("onnxruntime", 0.071, threads=2, batch=8), bench("onnxruntime", 0.052, threads=2),
                          bench("onnxruntime", 0.047, threads=1)],
            }),
        ],
    }


def test_write_report_three_files(tmp_path):
    report = make_report()
    paths = write_report(tmp_path, report, ["json", "md", "png"])
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    md = (tmp_path / "report.md").read_text()
    for sid in ("00-source", "01-train.supervised", "02-export.onnx"):
        assert sid in md
    assert "top1 96.11 %" in md and "+86.11 pp" in md  # accuracy and its change vs. the source
    assert "0.50×" in md  # size ratio of the export
    assert "25.6 KB" in md and "6.27 K" in md and "97.09 K" in md
    main_rows = [line for line in md.splitlines() if line.startswith("| 02-export.onnx")]
    assert "0.047" in main_rows[0]  # headline latency: batch 1, fewest threads
    assert "## Benchmarks" in md and md.count("| 02-export.onnx |") >= 4
    assert "## Parity with the source" in md and "2.10e-06" in md and "100.00 %" in md
    assert "Test CPU 9000 (2 cores)" in md and "torch 2.13.0" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_with_missing_metrics_still_writes(tmp_path):
    report = make_report()
    for s in report["steps"]:
        s["metrics"] = {"size_bytes": s["metrics"]["size_bytes"], "params": None, "macs": None}
    report["steps"][1]["metrics"] = {}
    del report["machine"], report["versions"]
    write_report(tmp_path, report, ["json", "md", "png"])
    md = (tmp_path / "report.md").read_text()
    assert "01-train.supervised" in md and "–" in md
    assert "## Benchmarks" not in md and "## Parity" not in md
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG_MAGIC

    # latency without accuracy, and nothing at all: a plot of what exists
    only_bench = make_report()
    for s in only_bench["steps"]:
        s["metrics"].pop("accuracy")
    write_report(tmp_path / "b", only_bench, ["png"])
    empty = {"name": "empty", "steps": []}
    write_report(tmp_path / "c", empty, ["json", "md", "png"])
    for d in ("b", "c"):
        assert (tmp_path / d / "report.png").read_bytes()[:8] == PNG_MAGIC


def test_report_tolerates_nan_and_none_numbers(tmp_path):
    report = make_report()
    b = report["steps"][2]["metrics"]["bench"][2]
    b["throughput_sps"] = None
    b["latency_ms"]["p99"] = float("nan")
    report["steps"][2]["metrics"]["verify"]["top1_agreement"] = None
    write_report(tmp_path, report, ["md", "png"])
    assert "02-export.onnx" in (tmp_path / "report.md").read_text()


def test_only_requested_formats_and_unknown_format(tmp_path):
    assert write_report(tmp_path, make_report(), ["md"]) == [tmp_path / "report.md"]
    assert not (tmp_path / "report.json").exists()
    with pytest.raises(UserError, match="pdf"):
        write_report(tmp_path, make_report(), ["pdf"])


def test_helpers():
    assert human_bytes(25_600) == "25.6 KB" and human_bytes(90_852_864) == "90.85 MB" and human_bytes(None) == "–"
    assert human_count(22_713_216) == "22.71 M" and human_count(1_434_599_424) == "1.43 G" and human_count(512) == "512"
    m = copy.deepcopy(make_report()["steps"][2]["metrics"])
    assert headline_bench(m)["latency_ms"]["p50"] == 0.047
    assert headline_bench({"bench": [bench("x", 1.0, batch=8)]})["batch_size"] == 8
    assert headline_bench({}) is None


def test_machine_and_versions():
    info = machine_info()
    assert info["cores"] and info["cpu"] and info["python"]
    assert set(info["flags"]) <= {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "neon", "asimd", "asimddp", "i8mm"}
    v = versions()
    assert v["torch"] and v["onnx"] and v["numpy"] and "transformers" in v
