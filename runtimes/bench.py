"""The local benchmark harness: warm-up, timed repeats, latency percentiles,
throughput and peak memory of one model on one runtime.

With ``isolate=True`` (the default) each measurement runs in a fresh child
process: peak RSS is then that model's alone, and no idle thread pool of
another session spins beside it. The harness never knows which runtime it
times; it only calls ``Session.run``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import Artifact
from edgekit.errors import StepFailed


def make_batch(feeds: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Repeat batch-1 feeds along axis 0 to ``batch_size`` samples."""
    return {k: np.repeat(v[:1], batch_size, axis=0) for k, v in feeds.items()}


def time_session(session, feeds: dict[str, np.ndarray], warmup: int, repeats: int) -> np.ndarray:
    """Latencies in milliseconds of ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        session.run(feeds)
    times = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter_ns()
        session.run(feeds)
        times[i] = (time.perf_counter_ns() - t0) / 1e6
    return times


def summarize(times: np.ndarray, batch_size: int) -> dict[str, Any]:
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    mean = float(times.mean())
    return {
        "latency_ms": {
            "p50": float(p50),
            "p90": float(p90),
            "p99": float(p99),
            "mean": mean,
            "min": float(times.min()),
            "max": float(times.max()),
        },
        "throughput_sps": batch_size / (mean / 1e3) if mean > 0 else None,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    VmHWM first: ``ru_maxrss`` survives fork+exec on Linux, so a child would
    report its parent's peak.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def benchmark(
    artifact: Artifact,
    runtime: str,
    feeds: dict[str, np.ndarray],
    *,
    threads: int,
    warmup: int,
    repeats: int,
    options: dict[str, Any] | None = None,
    isolate: bool = True,
) -> dict[str, Any]:
    options = options or {}
    batch_size = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    if isolate:
        result = _run_child(artifact, runtime, feeds, threads, warmup, repeats, options)
    else:
        from edgekit.runtimes import get_runtime

        baseline = peak_rss_mb()
        session = get_runtime(runtime).load(artifact, threads=threads, **options)  # feeds come in the model's own layout
        times = time_session(session, feeds, warmup, repeats)
        result = {
            **summarize(times, batch_size),
            "peak_rss_mb": peak_rss_mb(),
            "baseline_rss_mb": baseline,
            "describe": session.describe(),
            "note": "measured in-process: peak RSS includes everything this process loaded",
        }
    from edgekit.runtimes import get_runtime

    return {
        "runtime": runtime,
        "runtime_version": result.get("describe", {}).get("version") or get_runtime(runtime).version(),
        "threads": threads,
        "batch_size": batch_size,
        "warmup": warmup,
        "repeats": repeats,
        "isolated": isolate,
        **result,
    }


def _run_child(artifact, runtime, feeds, threads, warmup, repeats, options) -> dict[str, Any]:
    if artifact.folder is None:
        raise ValueError("an isolated benchmark needs a saved artifact (artifact.folder)")
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        tmpdir = Path(tmp)
        np.savez(tmpdir / "feeds.npz", **feeds)
        request = {
            "artifact": str(artifact.folder),
            "runtime": runtime,
            "threads": threads,
            "warmup": warmup,
            "repeats": repeats,
            "options": options,
            "feeds": str(tmpdir / "feeds.npz"),
            "result": str(tmpdir / "result.json"),
        }
        (tmpdir / "request.json").write_text(json.dumps(request))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(
            [sys.executable, "-m", "edgekit.runtimes.bench_worker", str(tmpdir / "request.json")],
            capture_output=True,
            text=True,
            env=env,
        )
        result_file = tmpdir / "result.json"
        if proc.returncode != 0 or not result_file.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise StepFailed(f"benchmark of {runtime} (threads {threads}) failed in its worker process: {last}")
        return json.loads(result_file.read_text())
