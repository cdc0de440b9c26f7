"""Latency-aware placement decisions, with scripted timings instead of a noisy clock.

The exporter is replaced by one that names the float layers, and the timer by a
cost model over those names, so each test fixes what the runtime "measures".
"""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from edgekit.compress.quantize import latency
from edgekit.compress.quantize.modules import LayerConfig, apply_plan, quant_layers


def _model() -> nn.Module:
    # three blocks by signature: two 16x16 layers, one 16x8, one 8x4
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(8, 4))
    return apply_plan(model, {n: LayerConfig(mode="dynamic").to_dict() for n in ("0", "1", "2", "3")})


def _script(monkeypatch, cost_ms) -> None:
    """``cost_ms(float_layers, call)`` is the batch-1 latency of the model with those layers float, in
    every round of the ``call``-th timing (0: the first block's trial)."""
    def export_bytes(model, names, feed, dynamic_axes=None):
        return ",".join(sorted(n for n, m in quant_layers(model).items() if not m.enabled)).encode()

    calls = []

    def time_models(models, feed, threads, **_):
        calls.append(1)
        return {k: [cost_ms(set(filter(None, b.decode().split(","))), len(calls) - 1)] * 5 for k, b in models.items()}

    monkeypatch.setattr(latency, "export_bytes", export_bytes)
    monkeypatch.setattr(latency, "time_models", time_models)


def _place(model, margin=1.0):
    return latency.place_by_latency(model, ["x"], {"x": np.zeros((1, 16), np.float32)}, threads=1, margin=margin)


def test_a_block_that_is_faster_in_float_goes_float(monkeypatch):
    _script(monkeypatch, lambda f, call: 10.0 - (3.0 if "3" in f else 0.0) + 0.1 * len(f - {"3"}))
    kept, record = _place(_model())
    assert kept == {"3"}
    assert not record["placement_reverted"] and not record["whole_model_fallback"]
    assert record["quantized_ms"] == pytest.approx(7.0) and record["float_ms"] == pytest.approx(7.3)


def test_per_block_wins_that_do_not_hold_up_are_reverted(monkeypatch):
    # during the block trials float looks a little faster for the first two blocks (the noise of a
    # shared machine); timed again, the placement is no faster than all-integer
    def cost(f, call):
        if call >= 3:
            return 10.0
        return 10.0 - 0.1 * len(f - {"3"}) + (0.5 if "3" in f else 0.0)

    _script(monkeypatch, cost)
    kept, record = _place(_model())
    assert [t["kept_float"] for t in record["trials"]] == [True, True, False]
    assert kept == set()
    assert record["placement_reverted"] and not record["whole_model_fallback"]


def test_whole_model_fallback_when_float_is_clearly_faster(monkeypatch):
    # no single block beats the margin, but everything in float is clearly faster than all-integer
    _script(monkeypatch, lambda f, call: 10.0 - 0.05 * len(f) - (3.0 if len(f) == 4 else 0.0))
    kept, record = _place(_model(), margin=1.02)
    assert kept == {"0", "1", "2", "3"}
    assert record["whole_model_fallback"] and not record["placement_reverted"]
