"""Calibration: watch the float model on sample inputs, then set every layer's scales.

One pass over the calibration feeds with quantization switched off records,
per quantized layer, the input range (an observer: min/max, percentile, MSE or
entropy), the mean of each input feature (for bias correction) and its mean
square (to weight the clipping search of the weights). Nothing keeps the
activations themselves.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .modules import QuantConv2d, QuantEmbedding, QuantLinear, _QuantBase, quant_layers
from .observers import Observer, make_observer


KEEP_INPUTS = 4  # inputs kept per layer for scoring smoothing strengths
SMOOTH_ALPHAS = (None, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)  # None: no smoothing


@dataclass
class InputStats:
    observer: Observer | None
    count: int = 0
    total: torch.Tensor | None = None  # per input feature (Linear) or channel (Conv)
    total_sq: torch.Tensor | None = None
    absmax: torch.Tensor | None = None  # per input feature
    kept: list[torch.Tensor] = field(default_factory=list)  # the first few inputs, to score candidate settings
    shape: list[int] = field(default_factory=list)  # the first input shape seen (for latency probes)

    def add(self, x: torch.Tensor, channel_axis: int) -> None:
        x = x.detach().float()
        if not self.shape:
            self.shape = list(x.shape)
        if len(self.kept) < KEEP_INPUTS:
            self.kept.append(x.clone())
        if self.observer is not None:
            self.observer.observe(x)
        flat = x.movedim(channel_axis, -1).reshape(-1, x.shape[channel_axis])
        s, sq, amax = flat.sum(0), (flat * flat).sum(0), flat.abs().amax(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.count += flat.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.total_sq / max(self.count, 1)


@contextlib.contextmanager
def quantization_disabled(model: nn.Module, names: set[str] | None = None) -> Iterator[None]:
    """Run the quantized layers (all, or those not in ``names``) in float inside the block."""
    layers = quant_layers(model)
    saved = {n: m.enabled for n, m in layers.items()}
    for n, m in layers.items():
        m.enabled = names is not None and n in names
    try:
        yield
    finally:
        for n, m in layers.items():
            m.enabled = saved[n]


def run_feeds(model: nn.Module, feeds: list[dict[str, np.ndarray]], input_names: list[str]) -> list[Any]:
    from edgekit.runtimes.torch_eager import call_module

    outs = []
    with torch.inference_mode():
        for feed in feeds:
            tensors = {n: torch.from_numpy(np.ascontiguousarray(feed[n])) for n in input_names}
            outs.append(call_module(model, tensors, input_names))
    return outs


def collect_stats(
    model: nn.Module, feeds: list[dict[str, np.ndarray]], input_names: list[str], method: str, percentile: float
) -> dict[str, InputStats]:
    """Input statistics of every quantized layer, observed with quantization off."""
    stats: dict[str, InputStats] = {}
    hooks = []
    for name, layer in quant_layers(model).items():
        static = layer.cfg.mode == "static"
        options = {"percentile": percentile} if method == "percentile" else {}
        stats[name] = InputStats(make_observer(method, **options) if static else None)
        if isinstance(layer, QuantEmbedding):
            continue  # its input is token ids
        axis = 1 if isinstance(layer, QuantConv2d) else -1
        hooks.append(layer.register_forward_pre_hook(lambda m, args, s=stats[name], a=axis: s.add(args[0], a)))
    try:
        with quantization_disabled(model):
            run_feeds(model, feeds, input_names)
    finally:
        for h in hooks:
            h.remove()
    return stats


def set_qparams(model: nn.Module, stats: dict[str, InputStats], clip_search: bool, smooth_alpha: float | None = None) -> dict[str, float | None]:
    """Smoothing, weight scales (clipping search weighted by input energy) and static input ranges.

    For smoothed layers ``smooth_alpha`` is a starting point: the strength with the
    smallest output error on the kept calibration inputs wins (None: no smoothing).
    Returns the chosen strength per smoothed layer.
    """
    chosen: dict[str, float | None] = {}
    for name, layer in quant_layers(model).items():
        st = stats.get(name)
        seen = st is not None and st.count > 0
        if isinstance(layer, QuantLinear) and layer.cfg.smooth and seen:
            alphas = sorted(set(SMOOTH_ALPHAS) - {None} | ({smooth_alpha} if smooth_alpha is not None else set()))
            chosen[name] = _choose_smoothing(layer, st, [None, *alphas])
        _calibrate_layer(layer, st if seen else None, clip_search)
    return chosen


def _calibrate_layer(layer: _QuantBase, st: InputStats | None, clip_search: bool) -> None:
    smooth = layer.smooth if getattr(layer.cfg, "smooth", False) else None
    importance = None
    if st is not None and isinstance(layer, QuantLinear):
        importance = st.mean_sq / smooth**2 if smooth is not None else st.mean_sq
    layer.calibrate_weight(importance, search=clip_search)
    if layer.cfg.mode == "static" and st is not None and st.observer is not None:
        lo, hi = st.observer.range_for(_act_spec(layer))
        if smooth is not None:  # the observer saw x, the kernel sees x / s
            lo, hi = _smoothed_range(st, smooth)
        layer.set_act_qparams(lo, hi)


@torch.no_grad()
def _choose_smoothing(layer: QuantLinear, st: InputStats, alphas: list[float | None]) -> float | None:
    """The smoothing strength whose quantized layer output is closest to float on the kept inputs."""
    import torch.nn.functional as F

    best_err, best_alpha = float("inf"), None
    for alpha in alphas:
        _set_alpha(layer, st, alpha)
        _calibrate_layer(layer, st, clip_search=False)
        err = sum(float(((layer.simulate(x) - F.linear(x, layer.weight, layer.bias)) ** 2).sum()) for x in st.kept)
        if err < best_err:
            best_err, best_alpha = err, alpha
    _set_alpha(layer, st, best_alpha)
    return best_alpha


def _set_alpha(layer: QuantLinear, st: InputStats, alpha: float | None) -> None:
    if alpha is None:
        layer.smooth.fill_(1.0)
    else:
        layer.set_smoothing(st.absmax, alpha)


def _smoothed_range(st: InputStats, smooth: torch.Tensor) -> tuple[float, float]:
    # per-feature maxima are all that is kept; the range of x / s is bounded by them
    bound = float((st.absmax / smooth).max())
    return -bound, bound


def _act_spec(layer: _QuantBase):
    from .primitives import QuantSpec

    return QuantSpec(bits=8, symmetric=layer.cfg.act_symmetric, signed=layer.cfg.act_symmetric)


@torch.no_grad()
def correct_bias(model: nn.Module, stats: dict[str, InputStats]) -> list[str]:
    """Bias correction: remove the mean output shift that weight rounding causes.

    With E[x] the mean input per feature, quantized weights shift the output mean
    by (W_q - W) E[x]; subtracting that from the bias recentres it (Nagel et
    al. 2019; the whitepaper lists it as a fix for per-layer weight error). Only
    layers that have a bias are corrected, so the model's structure stays as it was.
    """
    corrected = []
    for name, layer in quant_layers(model).items():
        st = stats.get(name)
        if layer.bias is None or st is None or not st.count or isinstance(layer, QuantEmbedding):
            continue
        delta_w = (layer.quant_weight() - layer.effective_weight()).float()
        mean = st.mean / layer.smooth if getattr(layer.cfg, "smooth", False) else st.mean
        if isinstance(layer, QuantLinear):
            shift = delta_w @ mean
        else:
            # a channel's mean input is constant over the image: sum the kernel window
            per_in = delta_w.sum(dim=(2, 3))  # [out, in/groups]
            out_ch, in_per_group = per_in.shape
            group_of_out = torch.arange(out_ch) // (out_ch // layer.groups)
            idx = group_of_out[:, None] * in_per_group + torch.arange(in_per_group)[None, :]
            shift = (per_in * mean[idx]).sum(dim=1)
        layer.bias.sub_(shift.to(layer.bias.dtype))
        corrected.append(name)
    return corrected
