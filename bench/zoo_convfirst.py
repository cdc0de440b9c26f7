"""ConvFirst block latency: the fused C kernel against the same arithmetic layer by layer, torch eager and onnxruntime.

For a few block shapes (C channels at H x W, 3x3 grouped conv of group width gw, 4x expansion, ReLU, batch 1),
one deploy-form block (BatchNorms with random statistics, folded) runs as:
  fused       FusedConvFirstBlock.nhwc: tiles of pixels through gconv -> expand -> ReLU -> project -> +x,
              intermediates in per-thread buffers (NHWC in and out, the layout a chain of blocks stays in);
  fused+conv  the same call from NCHW (``__call__``: the two layout conversions included);
  unfused     the same C micro-kernels layer by layer, the grouped conv's and the expansion's outputs
              written to memory in full (``intermediate`` column: the bytes it writes between layers);
  torch       the deploy block in eager mode (NCHW);
  onnxruntime the deploy block exported to ONNX (opset 17), one session per thread count.
Outputs are checked against torch first. Each variant is timed in its own block (warm-up calls, then
repeats for at least MIN_SECONDS and MIN_REPEATS; the block's median), ROUNDS rounds of blocks in rotated
orders; the median over rounds is reported, and ratios are
``other / fused`` (above 1: the fused kernel is faster). The machine is shared, so absolute numbers
are noisy; ratios less so. On a shared machine run with OMP_WAIT_POLICY=passive (read once, when torch loads
libgomp, which the C kernels share): with the default busy-waiting, a 2-thread call whose partner thread waits
for a core takes tens of ms. Runtime: about a minute on 2 cores.

Imported by bench/zoo.py: ``convfirst_table(threads=(1, 2)) -> (rows, markdown)``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekit.models.convfirst import ConvFirstBlock
from edgekit.runtimes.convfirst import FusedConvFirstBlock

SHAPES = [(64, 56, 8), (64, 28, 8), (128, 28, 8), (128, 14, 16)]  # (channels, height = width, group width)
EXPANSION = 4
WARMUP = 2
MIN_REPEATS = 10
MIN_SECONDS = 0.3
MAX_REPEATS = 200
ROUNDS = 3  # each round times every variant in its own block, in a rotated order; the median over rounds is reported
VARIANTS = ("fused", "fused_nchw", "unfused", "torch", "onnxruntime")


def _median_ms(fn: Callable[[], Any]) -> float:
    for _ in range(WARMUP):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MAX_REPEATS and (len(times) < MIN_REPEATS or time.perf_counter() - start < MIN_SECONDS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _block(channels: int, group_width: int, seed: int) -> ConvFirstBlock:
    torch.manual_seed(seed)
    block = ConvFirstBlock(channels, group_width=group_width, expansion=EXPANSION, act="relu")
    with torch.no_grad():  # random BN statistics, so the folded weights are not the plain init
        for bn in (block.norm, block.scale):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    block.eval().reparameterize()
    return block


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _time_shape(block: nn.Module, x: torch.Tensor, onnx_path: Path, threads: int) -> dict[str, float]:
    fb = FusedConvFirstBlock.from_block(block, threads=threads)
    xn = x.numpy()
    xh = np.ascontiguousarray(xn.transpose(0, 2, 3, 1))
    sess = _ort_session(onnx_path, threads)
    feed = {sess.get_inputs()[0].name: xn}
    with torch.no_grad():
        ref = block(x).numpy()
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    for name, out in (("fused", fb(xn)), ("unfused", fb(xn, fused=False)), ("onnxruntime", sess.run(None, feed)[0])):
        err = float(np.abs(out - ref).max())
        if err > tol:
            raise RuntimeError(f"{name} differs from the torch block by {err:.3g} (C={fb.channels}, {x.shape[2]}x{x.shape[3]})")
    calls: dict[str, Callable[[], Any]] = {
        "fused": lambda: fb.nhwc(xh),
        "fused_nchw": lambda: fb(xn),
        "unfused": lambda: fb.nhwc(xh, fused=False),
        "torch": lambda: block(x),
        "onnxruntime": lambda: sess.run(None, feed),
    }
    blocks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for r in range(ROUNDS):
                for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                    blocks[v].append(_median_ms(calls[v]))
    finally:
        torch.set_num_threads(before)
    return {v: statistics.median(ms) for v, ms in blocks.items()}


def _markdown(rows: list[dict]) -> str:
    head = ("| block (C, HxW, gw) | threads | fused ms | fused+NCHW ms | unfused ms | torch ms | onnxruntime ms "
            "| unfused / fused | torch / fused | ort / fused | unfused intermediates |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['channels']}, {r['height']}x{r['width']}, {r['group_width']} | {r['threads']} | {r['fused_ms']:.3f} | "
                     f"{r['fused_nchw_ms']:.3f} | {r['unfused_ms']:.3f} | {r['torch_ms']:.3f} | {r['onnxruntime_ms']:.3f} | "
                     f"{r['unfused_over_fused']:.2f}x | {r['torch_over_fused']:.2f}x | {r['onnxruntime_over_fused']:.2f}x | "
                     f"{r['intermediate_bytes'] / 2**20:.2f} MiB |")
    lines.append("")
    lines.append(f"Deploy-form ConvFirst block, 3x3 grouped conv, {EXPANSION}x expansion, ReLU, batch 1, fp32. "
                 "fused / unfused: edgekit's C kernels (NHWC; fused+NCHW includes the layout conversions); ratios are "
                 f"other / fused (above 1: fused is faster); medians of each variant's own timed blocks ({ROUNDS} rounds). "
                 f"1-minute load average during the runs: {min(r['load_1min'] for r in rows):.1f} to "
                 f"{max(r['load_1min'] for r in rows):.1f} on {os.cpu_count()} CPUs (above the CPU count, threads wait for cores "
                 "and the 2-thread numbers mostly measure that). "
                 f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}: OpenMP's default busy-waiting turns a "
                 "contended 2-thread call (C kernels and torch share torch's libgomp) into tens of ms; set it to passive "
                 "before the process starts on a shared machine.")
    return "\n".join(lines)


def convfirst_table(threads: tuple[int, ...] = (1, 2)) -> tuple[list[dict], str]:
    """Rows (one per block shape and thread count) and a markdown table of the fused kernel against the others."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (C, H, gw) in enumerate(SHAPES):
            block = _block(C, gw, seed=i)
            x = torch.randn(1, C, H, H)
            onnx_path = Path(tmp) / f"convfirst_{C}_{H}.onnx"
            torch.onnx.export(block, (x,), str(onnx_path), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
            inter = FusedConvFirstBlock.from_block(block).intermediate_bytes(1, H, H)
            for t in threads:
                ms = _time_shape(block, x, onnx_path, t)
                row: dict[str, Any] = {"channels": C, "height": H, "width": H, "group_width": gw, "expansion": EXPANSION,
                                       "threads": t, "intermediate_bytes": inter, "load_1min": os.getloadavg()[0]}
                row.update({f"{v}_ms": ms[v] for v in VARIANTS})
                row.update({f"{v}_over_fused": ms[v] / ms["fused"] for v in ("unfused", "torch", "onnxruntime")})
                rows.append(row)
    return rows, _markdown(rows)
