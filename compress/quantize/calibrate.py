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
SMOOTH_MIN_GAIN = 0.9  # smooth only when it cuts the layer's output error by 10% or more


@dataclass
class InputStats:
    observer: Observer | None
    count: int = 0
    total: torch.Tensor | None = None  # per input feature (Linear) or channel (Conv)
    total_sq: torch.Tensor | None = None
    absmax: torch.Tensor | None = None  # per input feature
    kept: list[torch.Tensor] = field(default_factory=list)  # the first few inputs, to score candidate settings
    out_observer: Observer | None = None  # output range of layers that quantize their output
    input_id: tuple = ()  # identity of the first input tensor: layers with the same one read the same activation
    hessian: torch.Tensor | None = None  # sum of x x^T over input rows (GPTQ), for 4-bit Linear layers
    shape: list[int] = field(default_factory=list)  # the first input shape seen (for latency probes)

    def add(self, x: torch.Tensor, channel_axis: int) -> None:
        if not self.shape:
            self.shape = list(x.shape)
            # memory can be reused within a forward pass, so the content takes part too
            self.input_id = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), float(x.float().sum()), float(x.float().abs().sum()))
        x = x.detach().float()
        if len(self.kept) < KEEP_INPUTS:
            self.kept.append(x.clone())
        if self.observer is not None:
            self.observer.observe(x)
        flat = x.movedim(channel_axis, -1).reshape(-1, x.shape[channel_axis])
        s, sq, amax = flat.sum(0), (flat * flat).sum(0), flat.abs().amax(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if self.hessian is not None:
            self.hessian += flat.double().T @ flat.double()
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
        if isinstance(layer, QuantLinear) and layer.cfg.mode == "weight_only" and layer.cfg.bits == 4:
            stats[name].hessian = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)
        if isinstance(layer, QuantEmbedding):
            continue  # its input is token ids
        axis = 1 if isinstance(layer, QuantConv2d) else -1
        hooks.append(layer.register_forward_pre_hook(lambda m, args, s=stats[name], a=axis: s.add(args[0], a)))
        if layer.cfg.out_quant:
            stats[name].out_observer = make_observer(method, **options)
            hooks.append(layer.register_forward_hook(lambda m, args, out, s=stats[name]: s.out_observer.observe(out)))
    try:
        with quantization_disabled(model):
            run_feeds(model, feeds, input_names)
    finally:
        for h in hooks:
            h.remove()
    return stats


def set_qparams(
    model: nn.Module, stats: dict[str, InputStats], clip_search: bool, smooth_alpha: float | None = None,
    names: list[str] | None = None,
) -> dict[str, float | None]:
    """Smoothing, weight scales (clipping search weighted by input energy) and static input ranges.

    For smoothed layers ``smooth_alpha`` is a starting point: the strength with the
    smallest output error on the kept calibration inputs wins (None: no smoothing).
    Only the layers in ``names`` are set, when given. Returns the chosen strength per smoothed layer.
    """
    chosen: dict[str, float | None] = {}
    layers = {n: m for n, m in quant_layers(model).items() if names is None or n in names}
    groups: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        st = stats.get(name)
        if isinstance(layer, QuantLinear) and layer.cfg.smooth and st is not None and st.count > 0:
            groups.setdefault(st.input_id, []).append(name)
    alphas = sorted(set(SMOOTH_ALPHAS) - {None} | ({smooth_alpha} if smooth_alpha is not None else set()))
    for names in groups.values():
        best = _choose_smoothing([layers[n] for n in names], stats[names[0]], [None, *alphas])
        chosen.update({n: best for n in names})
    for name, layer in layers.items():
        st = stats.get(name)
        _calibrate_layer(layer, st if (st is not None and st.count > 0) else None, clip_search)
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
        if layer.cfg.out_quant and st.out_observer is not None:
            layer.set_out_qparams(*st.out_observer.range_for(_act_spec(layer)))


@torch.no_grad()
def _choose_smoothing(group: list[QuantLinear], st: InputStats, alphas: list[float | None]) -> float | None:
    """The smoothing strength whose quantized outputs are closest to float on the kept inputs.

    ``group`` are layers that read the same input; they get one shared factor.
    """
    import torch.nn.functional as F

    w_absmax = torch.stack([layer.weight.detach().abs().amax(dim=0) for layer in group]).amax(dim=0)
    best_err, best_alpha = float("inf"), None
    plain_err = None
    for alpha in alphas:
        err = 0.0
        for layer in group:
            _set_alpha(layer, st, alpha, w_absmax)
            _calibrate_layer(layer, st, clip_search=False)
            err += sum(float(((layer.simulate(x) - F.linear(x, layer.weight, layer.bias)) ** 2).sum()) for x in st.kept)
        if alpha is None:
            plain_err = err
        if err < best_err:
            best_err, best_alpha = err, alpha
    if plain_err is not None and best_err > SMOOTH_MIN_GAIN * plain_err:
        best_alpha = None  # not worth the extra Mul the runtime would run for it
    for layer in group:
        _set_alpha(layer, st, best_alpha, w_absmax)
    return best_alpha


def _set_alpha(layer: QuantLinear, st: InputStats, alpha: float | None, w_absmax: torch.Tensor) -> None:
    if alpha is None:
        layer.smooth.fill_(1.0)
    else:
        layer.set_smoothing(st.absmax, alpha, w_absmax)


def _smoothed_range(st: InputStats, smooth: torch.Tensor) -> tuple[float, float]:
    # per-feature maxima are all that is kept; the range of x / s is bounded by them
    bound = float((st.absmax / smooth).max())
    return -bound, bound


def _act_spec(layer: _QuantBase):
    from .primitives import QuantSpec

    return QuantSpec(bits=8, symmetric=layer.cfg.act_symmetric, signed=layer.cfg.act_symmetric)


@torch.no_grad()
def correct_bias(model: nn.Module, stats: dict[str, InputStats], names: list[str] | None = None) -> list[str]:
    """Bias correction: remove the mean output shift that weight rounding causes.

    With E[x] the mean input per feature, quantized weights shift the output mean
    by (W_q - W) E[x]; subtracting that from the bias recentres it (Nagel et
    al. 2019; the whitepaper lists it as a fix for per-layer weight error). Only
    layers that have a bias are corrected, so the model's structure stays as it was.
    """
    corrected = []
    for name, layer in quant_layers(model).items():
        if names is not None and name not in names:
            continue
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


@torch.no_grad()
def gptq(layer: QuantLinear, st: InputStats, damp: float = 0.01) -> float:
    """GPTQ (Frantar et al. 2023) for a grouped weight-only layer: quantize one input column at
    a time and spread its rounding error over the columns not yet quantized, weighted by the
    inverse Hessian of the calibration inputs, so the layer *output* error stays small.

    The layer's weight becomes the dequantized result (values on its grid), so the layer's
    fake quantization and its integer export reproduce it exactly. Returns the relative
    output error on the kept inputs.
    """
    import torch.nn.functional as F

    w0 = layer.weight.detach().double()
    w = w0.clone()
    rows, cols = w.shape
    h = st.hessian / max(st.count, 1)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(cols, dtype=h.dtype) * damp * torch.diag(h).mean()
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qmin, qmax = layer.cfg.w_qrange
    group = layer.cfg.group_size
    scale = torch.empty(rows, cols // group, dtype=torch.float64)
    zero = torch.empty_like(scale)
    for j in range(cols):
        g = j // group
        if j % group == 0:
            from .modules import weight_grid_qparams

            imp = torch.diag(h)[j : j + group]
            sc, zp = weight_grid_qparams(w[:, j : j + group].float(), qmin, qmax, layer.cfg.symmetric, imp.float())
            scale[:, g], zero[:, g] = sc.double(), zp.double()
        q = (torch.clamp(torch.round(w[:, j] / scale[:, g]) + zero[:, g], qmin, qmax) - zero[:, g]) * scale[:, g]
        err = (w[:, j] - q) / u[j, j]
        w[:, j] = q
        w[:, j + 1 :] -= err[:, None] * u[j, j + 1 :][None, :]
    layer.weight.copy_(w.to(layer.weight.dtype))
    layer.w_scale.copy_(scale.float())
    layer.w_zero.copy_(zero.float())
    ref = [F.linear(x, w0.float(), None) for x in st.kept]
    num = sum(float(((F.linear(x, layer.quant_weight(), None) - r) ** 2).sum()) for x, r in zip(st.kept, ref))
    den = sum(float((r**2).sum()) for r in ref)
    return (num / max(den, 1e-30)) ** 0.5
