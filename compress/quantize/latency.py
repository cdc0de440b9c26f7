"""Latency-aware placement: keep float where integer is slower on the target runtime.

On CPUs without int8 dot-product instructions an integer layer can be slower
than its float original (quantize/dequantize work, kernels that gain little).
Timing layers one by one misleads, since in the whole graph neighbouring
integer layers share quantized tensors; so candidates are timed as whole
models on ONNX Runtime at batch 1 with the deployment's threads:

1. layers are grouped into blocks by signature (type, config, weight and input
   shape): the six identical FFN projections of a transformer form one block;
2. starting from everything in integer, each block in turn is tried in float,
   and stays float when the whole model is clearly faster that way (in the
   median of the per-round ratios and in at least 12 of 15 alternating rounds,
   by the margin);
3. when some blocks went float, the result is timed against the all-integer
   model and kept only if it is clearly faster: with many blocks near a tie,
   some pass the per-block test by chance (on unireplknet_small, 7 of 45
   layers once went float on such near-ties), and together they need not be
   faster than all-integer;
4. the final model is timed against the all-float model; when float is still
   faster (in the median and in 9 of 15 rounds: small losses per block that each
   hid in the timing noise), every timed layer goes back to float, so the
   result is never clearly slower.

Sessions are timed in alternating blocks so slow drifts of a shared machine
hit both sides. Weight-only layers are kept for their size and not tried.
"""

from __future__ import annotations

import io
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from .modules import QuantConv2d, _QuantBase, needs_ms_domain, quant_layers


def export_bytes(model: nn.Module, names: list[str], feed: dict[str, np.ndarray], dynamic_axes: dict | None = None) -> bytes:
    """The model as ONNX Runtime will get it from export.onnx (same opset, dynamic axes, joined chains)."""
    from edgekit.export.onnx import _positional

    args = tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names)
    buf = io.BytesIO()
    extra = {"custom_opsets": {"com.microsoft": 1}} if needs_ms_domain(model) else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _positional(model, names), args, buf, dynamo=False, opset_version=17, input_names=names,
            do_constant_folding=True, dynamic_axes=dynamic_axes or None, **extra,
        )
    import onnx

    from edgekit.export.dedupe import dedupe_nodes, drop_unused
    from edgekit.export.qdq_chain import join_integer_chains

    proto = onnx.load_from_string(buf.getvalue())
    dedupe_nodes(proto)  # as export.onnx does for quantized models
    join_integer_chains(proto)
    drop_unused(proto)
    return proto.SerializeToString()


def _session(model: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _median_ms(session, feed: dict[str, np.ndarray], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def time_models(models: dict[str, bytes], feed: dict[str, np.ndarray], threads: int, budget_s: float = 1.5, rounds: int = 15) -> dict[str, list[float]]:
    """Batch-1 latency (ms) of each model per round, timed in alternating blocks.

    Many short rounds rather than a few long ones: a shared core's speed drifts
    over seconds, and only timings taken close together compare fairly."""
    sessions = {k: _session(m, threads) for k, m in models.items()}
    one = {k: _median_ms(s, feed, 3) for k, s in sessions.items()}  # warm-up and a first estimate
    # tiny models need many runs per round, or one scheduler hiccup decides the round
    repeats = int(min(2000, max(5, budget_s * 1e3 / max(sum(one.values()), 1e-3) / rounds)))
    runs: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            runs[k].append(_median_ms(s, feed, repeats))
    return runs


def _median(values: list[float]) -> float:
    return round(float(np.median(values)), 4)


def clearly_faster(fast: list[float], slow: list[float], margin: float, rounds_share: float = 0.8) -> bool:
    """``fast`` beats ``slow`` by the margin in the median of the per-round ratios and in at least
    ``rounds_share`` of the rounds (12 of 15 by default).

    Rounds are compared within themselves (the two timings of a round are close in
    time); requiring most rounds, not just the median, keeps one burst of load on a
    shared machine from flipping a decision.
    """
    ratios = [s / max(f, 1e-12) for f, s in zip(fast, slow)]
    wins = sum(r > margin for r in ratios)
    return float(np.median(ratios)) > margin and wins >= max(1, int(rounds_share * len(ratios)))


def _signature(layer: _QuantBase) -> tuple:
    extra = (layer.stride, layer.padding, layer.groups) if isinstance(layer, QuantConv2d) else ()
    return (type(layer).__name__, layer.cfg, tuple(layer.weight.shape), extra)


def blocks(model: nn.Module) -> list[list[str]]:
    """Timed layers grouped by signature, in model order."""
    groups: dict[tuple, list[str]] = {}
    for name, layer in quant_layers(model).items():
        if layer.cfg.mode in ("dynamic", "static"):
            groups.setdefault(_signature(layer), []).append(name)
    return list(groups.values())


def place_by_latency(
    model: nn.Module, names: list[str], feed: dict[str, np.ndarray], threads: int, margin: float, log=None,
    dynamic_axes: dict | None = None,
) -> tuple[set[str], dict[str, Any]]:
    """Layers to keep float (whole-model timings say integer is slower there) and the record.

    ``dynamic_axes`` as the export will write them: a graph with a symbolic batch runs
    extra shape ops, which on a tiny model decide whether integer pays."""
    layers = quant_layers(model)
    kept_float: set[str] = set()
    trials = []

    def export(disabled: set[str]) -> bytes:
        for n, m in layers.items():
            m.enabled = n not in disabled
        try:
            return export_bytes(model, names, feed, dynamic_axes)
        finally:
            for m in layers.values():
                m.enabled = True

    all_integer = current = export(set())
    fallback = reverted = False
    for block in blocks(model):
        candidate = export(kept_float | set(block))
        runs = time_models({"current": current, "candidate": candidate}, feed, threads)
        t = {k: _median(v) for k, v in runs.items()}
        faster_in_float = clearly_faster(runs["candidate"], runs["current"], margin)  # float must win clearly
        trials.append({"layers": block, "integer_ms": t["current"], "float_ms": t["candidate"], "kept_float": faster_in_float})
        if faster_in_float:
            kept_float |= set(block)
            current = candidate
        if log:
            log(f"  block of {len(block)} ({block[0]}{', ...' if len(block) > 1 else ''}): integer {t['current']:.3f} ms, float {t['candidate']:.3f} ms")
    if kept_float and kept_float != set(layers):
        runs = time_models({"all_integer": all_integer, "placed": current}, feed, threads)
        if not clearly_faster(runs["placed"], runs["all_integer"], margin):
            # the blocks' wins did not add up: each may have won its trial in the noise
            reverted = True
            if log:
                log(f"  placement {_median(runs['placed']):.3f} ms is not clearly faster than all-integer {_median(runs['all_integer']):.3f} ms: all integer")
            kept_float, current = set(), all_integer
    if kept_float == set(layers):  # nothing left in integer: the same model, no need to time it
        t = trials[-1]["float_ms"] if trials else float("nan")
        final = {"float": t, "quantized": t}
    else:
        runs = time_models({"float": export(set(layers)), "quantized": current}, feed, threads)
        final = {k: _median(v) for k, v in runs.items()}
        # the safety net needs only a majority of rounds: a quantized model that is slower in the
        # median and in most rounds is not worth shipping as the faster one
        if clearly_faster(runs["float"], runs["quantized"], margin, rounds_share=0.6):
            # block by block each loss hid in the noise, but together integer is slower: keep all float
            fallback = True
            kept_float = {n for b in blocks(model) for n in b}
            final["quantized"] = final["float"]
    record = {
        "threads": threads,
        "trials": trials,
        "kept_float": sorted(kept_float),
        "whole_model_fallback": fallback,
        "placement_reverted": reverted,
        "float_ms": final["float"],
        "quantized_ms": final["quantized"],
        "speedup": round(final["float"] / max(final["quantized"], 1e-9), 3) if final["quantized"] == final["quantized"] else 1.0,
    }
    return kept_float, record
