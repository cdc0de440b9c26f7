"""Long causal depthwise convolution: FFT vs direct vs matmul-FFT ("monarch"), in torch and on ONNX Runtime.

For each sequence length L, one frozen kernel [C, L] (the deploy form of an
SGConv layer, edgekit.models.fftconv.LongConv1d) convolves x [1, C, L]:

- torch eager: ``fft`` (torch.fft, kernel spectrum precomputed), ``direct``
  (one depthwise Conv1d with L taps, O(L^2)), ``monarch`` (DFT as real matmuls).
- onnxruntime: ``monarch`` and ``direct`` exported with the TorchScript exporter
  (opset 17); ``fft`` exported with the dynamo exporter (ONNX DFT, opset 18),
  since the TorchScript exporter cannot export torch.fft.

Each variant is timed in its own block (warm-up, then repeats; median), one ORT
session per variant, ``threads`` intra-op threads. Ratios are to torch ``fft``
(below 1 is faster). A variant whose estimated cost is too high (direct at
64k: C * L^2 multiply-adds) is skipped and the row says so. Used by bench/zoo.py:
``rows, markdown = fftconv_table()``.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgekit.models.fftconv import LongConv1d, monarch_factors, monarch_size

DIRECT_MAX_MACS = 2e9  # a direct conv above this (C * L^2) takes seconds per call on one core: skipped
BLOCK_SECONDS = 1.5  # time budget of one variant's timing block after its warm-up
SLOW_CALL_SECONDS = 3.0  # a variant slower than this per call is timed once after its warm-up


def _median_ms(fn: Callable[[], object], min_repeats: int = 3, max_repeats: int = 30) -> float:
    t0 = time.perf_counter()
    fn()  # warm-up (allocations, ORT arena, FFT plans); its time, an overestimate, sizes the block
    first = time.perf_counter() - t0
    floor = 1 if first > SLOW_CALL_SECONDS else min_repeats  # ORT's DFT at 64k takes seconds per call
    repeats = int(min(max_repeats, max(floor, BLOCK_SECONDS / max(first, 1e-6))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _onnx_session(module: torch.nn.Module, x: torch.Tensor, path: Path, threads: int, dynamo: bool):
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            with contextlib.redirect_stdout(io.StringIO()):  # the dynamo exporter narrates its steps on stdout
                program = torch.onnx.export(module, (x,), dynamo=True, opset_version=18, input_names=["x"], verbose=False)
            program.save(str(path))
        else:
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _fmt(ms: float | None, base: float | None) -> str:
    if ms is None:
        return "skipped"
    return f"{ms:.2f} ({ms / base:.2f}x)" if base else f"{ms:.2f}"


def fftconv_table(
    lengths: tuple[int, ...] = (1024, 4096, 16384, 65536), channels: int = 16, threads: int = 1
) -> tuple[list[dict], str]:
    """Median batch-1 latency of each long-convolution variant per length; rows and a markdown table (also printed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            for length in lengths:
                gen = torch.Generator().manual_seed(length)
                x = torch.randn(1, channels, length, generator=gen)
                k = torch.randn(channels, length, generator=gen) / length**0.5
                n = monarch_size(length, length)
                row: dict = {"length": length, "channels": channels, "threads": threads, "monarch_n": n,
                             "monarch_factors": monarch_factors(n), "notes": []}
                direct_ok = channels * length**2 <= DIRECT_MAX_MACS
                if not direct_ok:
                    row["notes"].append(f"direct skipped: {channels * length**2 / 1e9:.0f} G multiply-adds per call")
                modules = {mode: LongConv1d(k, length, mode).eval() for mode in ("fft", "direct", "monarch")}
                reference = modules["fft"](x).numpy()
                for mode, module in modules.items():
                    ok = mode != "direct" or direct_ok
                    row[f"torch_{mode}_ms"] = _median_ms(lambda m=module, x=x: m(x)) if ok else None
                for mode, module in modules.items():
                    key = f"ort_{mode}_ms"
                    if mode == "direct" and not direct_ok:
                        row[key] = None
                        continue
                    try:
                        sess = _onnx_session(module, x, Path(tmp) / f"{mode}-{length}.onnx", threads, dynamo=mode == "fft")
                    except Exception as e:  # an exporter gap is a finding to report, not a crash
                        row[key] = None
                        row["notes"].append(f"ort {mode} not exported: {type(e).__name__}")
                        continue
                    feed = {"x": x.numpy()}
                    out = sess.run(None, feed)[0]
                    row[f"ort_{mode}_rel_err"] = float(np.abs(out - reference).max() / np.abs(reference).max())
                    row[key] = _median_ms(lambda s=sess, f=feed: s.run(None, f))
                    del sess
                rows.append(row)
    finally:
        torch.set_num_threads(before)
    table = _markdown(rows)
    print(table)
    return rows, table


def _markdown(rows: list[dict]) -> str:
    head = (
        "| L | monarch N (factors) | torch fft ms | torch direct ms (x fft) | torch monarch ms (x fft) "
        "| ORT fft ms (x fft) | ORT direct ms (x fft) | ORT monarch ms (x fft) | ORT monarch / ORT direct | notes |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        base = r["torch_fft_ms"]
        md, dd = r["ort_monarch_ms"], r["ort_direct_ms"]
        vs_direct = f"{md / dd:.2f}x" if md and dd else "n/a"
        factors = "x".join(map(str, r["monarch_factors"]))
        lines.append(
            f"| {r['length']} | {r['monarch_n']} ({factors}) | {base:.2f} | {_fmt(r['torch_direct_ms'], base)} "
            f"| {_fmt(r['torch_monarch_ms'], base)} | {_fmt(r['ort_fft_ms'], base)} | {_fmt(dd, base)} "
            f"| {_fmt(md, base)} | {vs_direct} | {'; '.join(r['notes'])} |"
        )
    c, t = (rows[0]["channels"], rows[0]["threads"]) if rows else ("?", "?")
    lines.append(f"\nBatch 1, {c} channels, {t} thread(s); medians; (Nx) is the ratio to torch fft (below 1 is faster).")
    return "\n".join(lines)
