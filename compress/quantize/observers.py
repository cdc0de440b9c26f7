"""Activation range calibration: watch batches, then pick a (min, max) to quantize with.

All observers are per-tensor and keep bounded state (running min/max and, for the
clipping methods, one fixed-size histogram), never the activations themselves.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from edgekit.errors import UserError
from edgekit.passes import suggest

from .primitives import QuantSpec, compute_qparams

NUM_BINS = 2048


class Observer:
    """Common interface: ``observe(tensor)`` per batch, then ``range()`` or ``qparams(spec)``."""

    def __init__(self) -> None:
        self.min_val = math.inf
        self.max_val = -math.inf

    def observe(self, tensor: torch.Tensor) -> None:
        x = tensor.detach().float().flatten()
        x = x[torch.isfinite(x)]  # one inf/nan must not wreck the whole range
        if x.numel() == 0:
            return
        self.min_val = min(self.min_val, float(x.min()))
        self.max_val = max(self.max_val, float(x.max()))
        self._update(x)

    def _update(self, x: torch.Tensor) -> None:
        """Extra per-batch state of subclasses."""

    def _check_seen(self) -> None:
        if self.min_val > self.max_val:
            name = type(self).__name__
            raise UserError(f"{name} saw no finite values; give calibration data with at least one sample")

    def range_for(self, spec: QuantSpec) -> tuple[float, float]:
        """The range to quantize with for ``spec`` (clipping methods depend on the bit width)."""
        self._check_seen()
        return self.min_val, self.max_val

    def range(self) -> tuple[float, float]:
        return self.range_for(QuantSpec())

    def qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range_for(spec)
        return compute_qparams(lo, hi, spec)


class MinMaxObserver(Observer):
    """Full observed range: no clipping, so a single outlier stretches the grid."""


class _Histogram:
    """Fixed-size histogram whose range grows to cover every value (and 0).

    When a batch falls outside the range, the old counts move to the bins holding
    their old bin centres; bins only get wider, so this costs at most one new bin
    of resolution.
    """

    def __init__(self, bins: int = NUM_BINS) -> None:
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.lo = 0.0
        self.hi = 0.0

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    def centers(self) -> torch.Tensor:
        return self.lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width

    def _index(self, values: torch.Tensor) -> torch.Tensor:
        idx = ((values - self.lo) / max(self.width, 1e-300)).floor().long()
        return idx.clamp(0, self.bins - 1)

    def add(self, x: torch.Tensor) -> None:
        lo, hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        if hi <= lo:  # all zeros so far: any non-empty range works
            hi = lo + 1e-12
        if (lo, hi) != (self.lo, self.hi):
            old_centers = self.centers()
            self.lo, self.hi = lo, hi
            if self.counts.sum() > 0:
                self.counts = torch.bincount(self._index(old_centers), weights=self.counts, minlength=self.bins)
        self.counts += torch.bincount(self._index(x.double()), minlength=self.bins).double()

    def quantile(self, q: float) -> float:
        """Value below which a share q of the mass lies (linear inside a bin)."""
        cdf = torch.cumsum(self.counts, 0) / self.counts.sum()
        i = int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64)).clamp(max=self.bins - 1))
        before = float(cdf[i - 1]) if i > 0 else 0.0
        inside = float(cdf[i]) - before
        frac = (q - before) / inside if inside > 0 else 0.0
        return self.lo + (i + min(max(frac, 0.0), 1.0)) * self.width


class PercentileObserver(Observer):
    """Clip to the [100 - p, p] percentiles of everything observed (histogram-based)."""

    def __init__(self, percentile: float = 99.99, bins: int = NUM_BINS) -> None:
        super().__init__()
        if not 50.0 < percentile <= 100.0:
            raise UserError(f"percentile must be in (50, 100], got {percentile}; 99.99 is a common choice")
        self.percentile = percentile
        self.hist = _Histogram(bins)

    def _update(self, x: torch.Tensor) -> None:
        self.hist.add(x)

    def range_for(self, spec: QuantSpec) -> tuple[float, float]:
        self._check_seen()
        p = self.percentile / 100.0
        lo = max(self.hist.quantile(1.0 - p), self.min_val)
        hi = min(self.hist.quantile(p), self.max_val)
        return lo, hi


class MSEObserver(Observer):
    """Clipping range minimising the expected quantization MSE on the histogram.

    For a candidate range the error is the clipping error of the values outside it
    (exact, on bin centres) plus the rounding noise scale^2 / 12 of each value inside
    (uniform noise model, as in ACIQ). Candidates shrink each end of the observed
    range independently on a ``steps`` x ``steps`` grid, so skewed data gets an
    asymmetric range; the error is separable, so the grid costs O(steps * bins).
    """

    def __init__(self, bins: int = NUM_BINS, steps: int = 256) -> None:
        super().__init__()
        self.hist = _Histogram(bins)
        self.steps = steps

    def _update(self, x: torch.Tensor) -> None:
        self.hist.add(x)

    def range_for(self, spec: QuantSpec) -> tuple[float, float]:
        self._check_seen()
        c, n = self.hist.centers(), self.hist.counts
        frac = torch.linspace(1.0 / self.steps, 1.0, self.steps, dtype=torch.float64)
        if spec.symmetric:
            amax = max(-self.min_val, self.max_val, 0.0)
            scale = frac * amax / spec.qmax
            lo, hi = scale * spec.qmin, scale * spec.qmax  # the grid's own ends
            err = _clip_err_low(c, n, lo) + _clip_err_high(c, n, hi) + _inside(c, n, lo, hi) * scale**2 / 12
            best = int(torch.argmin(err))
            return float(lo[best]), float(hi[best])
        lo = frac * min(self.min_val, 0.0)
        hi = frac * max(self.max_val, 0.0)
        below = (c[None, :] < lo[:, None]).double() @ n  # per low candidate
        above = (c[None, :] > hi[:, None]).double() @ n  # per high candidate
        inside = n.sum() - below[:, None] - above[None, :]
        scale = (hi[None, :] - lo[:, None]) / (spec.qmax - spec.qmin)
        err = _clip_err_low(c, n, lo)[:, None] + _clip_err_high(c, n, hi)[None, :] + inside * scale**2 / 12
        i, j = divmod(int(torch.argmin(err)), self.steps)
        return float(lo[i]), float(hi[j])


def _clip_err_low(c: torch.Tensor, n: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    gap = torch.clamp(lo[:, None] - c[None, :], min=0.0)
    return (gap**2) @ n


def _clip_err_high(c: torch.Tensor, n: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    gap = torch.clamp(c[None, :] - hi[:, None], min=0.0)
    return (gap**2) @ n


def _inside(c: torch.Tensor, n: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    mask = (c[None, :] >= lo[:, None]) & (c[None, :] <= hi[:, None])
    return mask.double() @ n


class EntropyObserver(Observer):
    """TensorRT-style calibration: the |x| threshold minimising KL(P || Q).

    P is the 2048-bin histogram of |x| cut at a candidate bin i (the cut-off mass
    folded into the last kept bin); Q is P merged into 2^(bits-1) levels and spread
    back over the non-empty bins. The result is symmetric (-t, t), or (0, t) for
    non-negative data, whatever the spec's symmetry.
    """

    def __init__(self, bins: int = NUM_BINS) -> None:
        super().__init__()
        self.hist = _Histogram(bins)

    def _update(self, x: torch.Tensor) -> None:
        self.hist.add(x.abs())

    def range_for(self, spec: QuantSpec) -> tuple[float, float]:
        self._check_seen()
        levels = 2 ** (spec.bits - 1)
        t = (_best_kl_bin(self.hist.counts, levels) + 1) * self.hist.width
        t = min(t, max(-self.min_val, self.max_val))
        return (-t if self.min_val < 0 else 0.0), t


def _best_kl_bin(counts: torch.Tensor, levels: int) -> int:
    """Index of the last bin kept by the KL-optimal threshold."""
    # numpy: a ~2000-step loop of tiny array ops costs far less than with torch
    hist = counts.double().numpy()
    nbins = hist.size
    nonzero = np.nonzero(hist)[0]
    last = int(nonzero.max()) if nonzero.size else 0
    if last < levels:  # everything fits without clipping
        return last
    tail = np.cumsum(hist[::-1])[::-1]  # tail[i] = sum(hist[i:])
    best_i, best_kl = nbins, math.inf
    for i in range(levels, nbins + 1):
        kept = hist[:i]
        p = kept.copy()
        if i < nbins:
            p[-1] += tail[i]
        # Merge the i bins into `levels` groups (bin -> group by position), then spread each
        # group's mass evenly over its non-empty bins, as the quantized grid would see it.
        group = np.arange(i) * levels // i
        filled = kept > 0
        group_mass = np.bincount(group, weights=kept, minlength=levels)
        group_size = np.bincount(group, weights=filled, minlength=levels)
        q = np.where(filled, group_mass[group] / np.maximum(group_size[group], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i - 1


def _kl(p, q) -> float:
    p = p / p.sum()
    q = q / q.sum()
    mask = p > 0
    # Where p has mass but q has none (only the folded last bin can cause it), q gets a tiny floor.
    return float((p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))).sum())


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(method: str, **options: float) -> Observer:
    """A fresh observer by name ("minmax", "percentile", "mse", "entropy")."""
    cls = OBSERVERS.get(method)
    if cls is None:
        valid = ", ".join(OBSERVERS)
        raise UserError(f"unknown calibration method {method!r} (valid: {valid}){suggest(method, list(OBSERVERS))}")
    return cls(**options)
