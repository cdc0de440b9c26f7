"""Where does quantization hurt? Per-layer error (SQNR) and per-layer sensitivity.

- :func:`layer_sqnr`: the float and the quantized model run on the same inputs;
  for every quantized layer, the signal-to-quantization-noise ratio of its
  output, 10 log10(sum y^2 / sum (y - y_q)^2) in dB. The error accumulates
  along the network, so the layer where SQNR falls sharply is the culprit.
- :func:`sensitivity`: quantize one layer at a time (the rest float) and record
  the drop of the recipe's eval metric: what each layer costs on its own.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .calibrate import quantization_disabled, run_feeds
from .modules import quant_layers

HIGHER_IS_BETTER = {"top1": True, "perplexity": False, "cosine": True, "max_abs": False, "mean_abs": False}


def metric_drop(metric: str, baseline: float, value: float) -> float:
    """How much worse ``value`` is than ``baseline`` (positive = worse)."""
    return baseline - value if HIGHER_IS_BETTER.get(metric, True) else value - baseline


def layer_sqnr(model: nn.Module, feeds: list[dict[str, np.ndarray]], input_names: list[str]) -> dict[str, float]:
    layers = quant_layers(model)
    signal = {n: 0.0 for n in layers}
    noise = {n: 0.0 for n in layers}
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: captured.__setitem__(n, out.detach().float())) for n, m in layers.items()]
    try:
        for feed in feeds:
            with quantization_disabled(model):
                run_feeds(model, [feed], input_names)
            ref = dict(captured)
            captured.clear()
            run_feeds(model, [feed], input_names)
            for n in layers:
                if n in ref and n in captured and ref[n].shape == captured[n].shape:
                    signal[n] += float((ref[n] ** 2).sum())
                    noise[n] += float(((ref[n] - captured[n]) ** 2).sum())
            captured.clear()
    finally:
        for h in hooks:
            h.remove()
    return {n: _db(signal[n], noise[n]) for n in layers}


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return round(10 * math.log10(signal / noise), 2)


def sensitivity(
    model: nn.Module, names: list[str], evaluate: Callable[[], float], metric: str, baseline: float, progress=None
) -> dict[str, float]:
    """Metric drop with only one layer quantized, for each of ``names``."""
    drops: dict[str, float] = {}
    items = progress(names, description="sensitivity", total=len(names)) if progress else names
    for name in items:
        with quantization_disabled(model, {name}):
            drops[name] = round(metric_drop(metric, baseline, evaluate()), 6)
    return drops


def debug_table(model: nn.Module, sqnr: dict[str, float], drops: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per quantized layer in model order, for the report and ``inspect --quant-debug``."""
    rows = []
    for name, layer in quant_layers(model).items():
        c = layer.cfg
        row = {"layer": name, "type": type(layer).__name__.removeprefix("Quant"), "mode": c.mode, "bits": c.bits, "sqnr_db": sqnr.get(name)}
        if drops is not None:
            row["drop"] = drops.get(name)
        rows.append(row)
    return rows
