"""Uniform affine quantization primitives (Krishnamoorthi 2018, section 2).

A real value x maps to an integer q = clamp(round(x / scale) + zero_point, qmin, qmax)
and back to scale * (q - zero_point). Everything here is plain torch on tensors:
no modules, no passes, so observers, folding and future passes/exporters share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALLOWED_BITS = (4, 8)

# Smallest scale we hand out: a constant (or all-zero) tensor would otherwise give
# scale 0 and a division by zero in quantize().
SCALE_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Symmetric signed specs use the restricted range -(2^(b-1)-1)..2^(b-1)-1
    (-127..127 for 8 bits, -7..7 for 4 bits), as ONNX Runtime and TFLite do for
    weights: the grid is then exactly symmetric around 0 and int8 x int8 products
    never hit -128 * -128. Asymmetric signed specs use the full -2^(b-1)..2^(b-1)-1.
    """

    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    axis: int = 0
    signed: bool = True
    # One bit less of range (int8 weights in -63..63): on x86 CPUs without VNNI the
    # u8 x s8 integer kernels add pairs of products in int16, which saturates otherwise.
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if self.bits not in ALLOWED_BITS:
            allowed = ", ".join(str(b) for b in ALLOWED_BITS)
            raise ValueError(f"quantization bits must be one of {allowed}, got {self.bits!r}")

    @property
    def _bits(self) -> int:
        return self.bits - 1 if self.reduce_range else self.bits

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        if self.symmetric:
            return -(2 ** (self._bits - 1) - 1)
        return -(2 ** (self._bits - 1))

    @property
    def qmax(self) -> int:
        return 2**self._bits - 1 if not self.signed else 2 ** (self._bits - 1) - 1

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of quantized values (4-bit values are stored unpacked in 8 bits)."""
        return torch.int8 if self.signed else torch.uint8


def _as_tensor(value: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32).detach().float()


def compute_qparams(
    min_val: torch.Tensor | float, max_val: torch.Tensor | float, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int64) for a range; vectors give per-channel params.

    The range is widened to include 0 so that zero (padding, ReLU output) is exactly
    representable (whitepaper 3.1.1).
    """
    lo = torch.clamp(_as_tensor(min_val), max=0.0)
    hi = torch.clamp(_as_tensor(max_val), min=0.0)
    if spec.symmetric:
        # Unsigned symmetric only makes sense for non-negative data (e.g. after ReLU):
        # negatives then clamp to 0, the same grid as TFLite's uint8 ReLU outputs.
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / spec.qmax, min=SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
        return scale, zero_point
    scale = torch.clamp((hi - lo) / (spec.qmax - spec.qmin), min=SCALE_EPS)
    # Rounding the zero point nudges the range slightly, but keeps 0 on the grid.
    zero_point = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax).to(torch.int64)
    return scale, zero_point


def _broadcast(param: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape a per-channel vector so it lines up with ``spec.axis`` of ``x``."""
    param = torch.as_tensor(param, device=x.device)
    if spec.per_channel and param.ndim == 1 and x.ndim > 1:
        shape = [1] * x.ndim
        shape[spec.axis] = -1
        return param.reshape(shape)
    return param


def _grid(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer grid values of x as float (round to nearest, then clamp)."""
    s = _broadcast(scale, x, spec).to(x.dtype)
    zp = _broadcast(zero_point, x, spec).to(x.dtype)
    return torch.clamp(torch.round(x / s) + zp, spec.qmin, spec.qmax)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float tensor -> integer tensor (``spec.dtype``)."""
    return _grid(x.float(), scale, zero_point, spec).to(spec.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer tensor -> float32 tensor."""
    qf = q.float()
    s = _broadcast(scale, qf, spec).float()
    zp = _broadcast(zero_point, qf, spec).float()
    return (qf - zp) * s


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, ste: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid [qmin, qmax] (scale / zero already broadcastable).

    With ``ste`` the gradient is the straight-through estimator (whitepaper 3.2): 1 where
    x is inside the range, 0 where it was clamped; scale and zero point get none.
    """
    unclamped = torch.round(x / scale) + zero
    out = (torch.clamp(unclamped, qmin, qmax) - zero) * scale
    if not ste:
        return out
    inside = (unclamped >= qmin) & (unclamped <= qmax)
    return torch.where(inside, x + (out - x).detach(), out.detach())


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize, staying in x's float dtype (simulated quantization)."""
    s = _broadcast(scale, x, spec).to(x.dtype)
    zp = _broadcast(zero_point, x, spec).to(x.dtype)
    return fake_quant(x, s, zp, spec.qmin, spec.qmax)


def fake_quantize_ste(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """``fake_quantize`` with a straight-through gradient: 1 where x is inside the range, 0 outside."""
    s = _broadcast(scale, x, spec).to(x.dtype)
    zp = _broadcast(zero_point, x, spec).to(x.dtype)
    return fake_quant(x, s, zp, spec.qmin, spec.qmax, ste=True)


def weight_qparams(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Qparams for a weight: one per output channel (``spec.axis``) when per_channel, else one."""
    w = weight.detach().float()
    if spec.per_channel and w.ndim > 1:
        flat = w.movedim(spec.axis, 0).reshape(w.shape[spec.axis], -1)
        return compute_qparams(flat.amin(dim=1), flat.amax(dim=1), spec)
    return compute_qparams(w.min(), w.max(), spec)
