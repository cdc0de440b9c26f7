"""Quantization (Krishnamoorthi 2018 and beyond): primitives, observers, BatchNorm
folding, quantized layers, and the ``quantize.ptq`` / ``quantize.qat`` passes.

Names are imported lazily so that loading the pass registry does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "fold_batchnorm": "bn_fold",
    "EntropyObserver": "observers",
    "MSEObserver": "observers",
    "MinMaxObserver": "observers",
    "Observer": "observers",
    "PercentileObserver": "observers",
    "make_observer": "observers",
    "QuantSpec": "primitives",
    "compute_qparams": "primitives",
    "dequantize": "primitives",
    "fake_quantize": "primitives",
    "fake_quantize_ste": "primitives",
    "quantize": "primitives",
    "weight_qparams": "primitives",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
