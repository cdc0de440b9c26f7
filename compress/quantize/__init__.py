"""Quantization building blocks (Krishnamoorthi 2018): uniform affine primitives,
activation range observers and BatchNorm folding. Passes build on these."""

from .bn_fold import fold_batchnorm
from .observers import (
    EntropyObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from .primitives import (
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    quantize,
    weight_qparams,
)

__all__ = [
    "EntropyObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QuantSpec",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_ste",
    "fold_batchnorm",
    "make_observer",
    "quantize",
    "weight_qparams",
]
