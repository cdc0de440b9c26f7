"""Long depthwise 1-D convolution three ways: FFT, direct, and FFT-as-matmuls ("monarch").

``y = x * k`` with ``x`` [B, C, L] and one kernel per channel ``k`` [C, L_k] is a
*causal* convolution here: ``y[b, c, t] = sum_{s <= t} k[c, s] x[b, c, t - s]``,
output length L. Causal is what long-convolution sequence models (S4, SGConv,
Hyena) use; a kernel tap beyond L never reaches an output, so it is dropped.

* ``fft``: ``torch.fft.rfft`` / ``irfft`` zero-padded to ``L + L_k - 1`` (no
  circular wrap-around). O(L log L); the training path.
* ``direct``: a depthwise ``conv1d`` (groups=C) with the flipped kernel and
  ``L_k - 1`` zeros on the left. O(L * L_k), but a plain convolution that every
  exporter and runtime handles.
* ``monarch``: the FFT written as matrix multiplications, in the spirit of
  FlashFFTConv (Fu et al., 2023). For ``N = N1 * N2`` the N-point DFT is the
  Cooley-Tukey "four-step" form: view the signal as [N1, N2] (stride-N1
  subsequences along the last axis), take N2-point DFTs along it (recursively,
  so N2 may itself split), multiply by the twiddles ``w_N^(n1 k2)``, then take
  N1-point DFTs along the other axis as a dense [N1, N1] matmul; the result is
  already in natural frequency order. Complex numbers are carried as separate
  real and imaginary float tensors because ONNX and TFLite have no complex
  type, and the DFT and twiddle matrices are float buffers computed in float64.
  The inverse reuses the forward DFT: ``ifft(Z) = conj(dft(conj(Z))) / N``, and
  the conjugate and ``1 / N`` are folded into the stored kernel spectrum.
  Signals are zero-padded to the next power of two ``N >= L + L_k - 1``, so any
  L works. Each factor is at most ``radix`` (default 32), so the work is
  O(N * sum of factors), between the FFT and the direct convolution.

Export findings (torch 2.13, onnxruntime, litert-torch; see tests/test_fftconv.py):

* ``torch.fft`` does NOT export with the TorchScript exporter (``dynamo=False``):
  "Exporting the operator 'aten::fft_rfft' to ONNX opset version 17 is not supported".
* The dynamo exporter (``dynamo=True``) writes ONNX ``DFT`` nodes and onnxruntime
  runs them with parity (~1e-5). It cannot emit opset 17 for this graph: the
  model comes out at opset 18 (the onnx version converter has no Pad adapter
  down to 17), so ask for opset >= 18 with dynamo when exporting ``fft``.
* ``monarch`` and ``direct`` export with the TorchScript exporter at opset 17
  (MatMul / Mul / Add / Reshape / Transpose / Conv only) and run on onnxruntime.
  Both convert to TFLite through litert-torch; ``fft`` does not (no complex
  tensors / FFT lowering in the TFLite path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("fft", "direct", "monarch")


def _check(x: torch.Tensor, k: torch.Tensor) -> None:
    if x.dim() != 3 or k.dim() != 2 or k.shape[0] != x.shape[1]:
        raise ValueError(f"expected x [B, C, L] and k [C, L_k] with the same C, got {tuple(x.shape)} and {tuple(k.shape)}")


def fft_conv(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution by real FFT (differentiable, O(L log L)); not exportable by TorchScript."""
    _check(x, k)
    length = x.shape[-1]
    k = k[:, :length]
    n = length + k.shape[-1] - 1  # long enough that the circular convolution equals the linear one
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(k, n=n), n=n)
    return y[..., :length]


def direct_conv(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution as one grouped conv1d with the whole kernel (exports everywhere)."""
    _check(x, k)
    if k.shape[-1] > x.shape[-1]:  # a shape test, not data: keeps the traced kernel shape static when nothing is cut
        k = k[:, : x.shape[-1]]
    # conv1d is a cross-correlation, so the kernel is flipped; left zeros make it causal
    return F.conv1d(F.pad(x, (k.shape[-1] - 1, 0)), k.flip(-1).unsqueeze(1), groups=x.shape[1])


def monarch_factors(n: int, radix: int = 32) -> list[int]:
    """Split a power of two ``n`` into as few power-of-two factors <= ``radix`` as possible, balanced."""
    if n < 1 or n & (n - 1) or radix < 2 or radix & (radix - 1):
        raise ValueError(f"monarch sizes must be powers of two, got n={n}, radix={radix}")
    bits, per = n.bit_length() - 1, radix.bit_length() - 1
    levels = max(1, math.ceil(bits / per))
    exps = [bits // levels + (i < bits % levels) for i in range(levels)]
    return [2**e for e in exps]


def _dft_matrix(n: int, scale: int = 1, rows: int | None = None) -> torch.Tensor:
    """``exp(-2 pi i r c / (n * scale))`` for r < rows, c < n, in complex128."""
    r = torch.arange(n if rows is None else rows, dtype=torch.float64).unsqueeze(1)
    c = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * (r * c) / (n * scale))


def _cmatmul(ar, ai, br, bi):
    """(ar + i ai) @ (br + i bi) in real arithmetic; an imaginary part of None means zero."""
    if ai is None and bi is None:
        return ar @ br, None
    if ai is None:
        return ar @ br, ar @ bi
    if bi is None:
        return ar @ br, ai @ br
    return ar @ br - ai @ bi, ar @ bi + ai @ br


class MonarchDFT(nn.Module):
    """The N-point DFT (N a power of two) along the last axis as matmuls and twiddle products."""

    def __init__(self, n: int, radix: int = 32):
        super().__init__()
        self.n = n
        self.factors = monarch_factors(n, radix)
        for level, n1 in enumerate(self.factors):
            rest = n // math.prod(self.factors[:level + 1])
            dft = _dft_matrix(n1)
            self.register_buffer(f"dft{level}_re", dft.real.float())
            self.register_buffer(f"dft{level}_im", dft.imag.float())
            if rest > 1:
                # twiddle[n1, k2] = w_{n1*rest}^(n1 * k2): rows index the stride, columns the inner frequency
                tw = _dft_matrix(rest, scale=n1, rows=n1)
                self.register_buffer(f"tw{level}_re", tw.real.float())
                self.register_buffer(f"tw{level}_im", tw.imag.float())

    def forward(self, xr: torch.Tensor, xi: torch.Tensor | None = None, real_only: bool = False):
        """DFT of ``xr + i xi`` over the last axis (any leading shape); ``real_only`` skips the imaginary output."""
        shape = xr.shape
        yr, yi = self._level(xr.reshape(-1, self.n), None if xi is None else xi.reshape(-1, self.n), 0, real_only)
        return yr.reshape(shape), None if yi is None else yi.reshape(shape)

    def _level(self, xr, xi, level: int, real_only: bool):
        n1 = self.factors[level]
        fr, fi = getattr(self, f"dft{level}_re"), getattr(self, f"dft{level}_im")
        size = xr.shape[-1]
        rest = size // n1
        if rest == 1:  # innermost: one dense DFT (symmetric matrix, so x @ F)
            yr, yi = _cmatmul(xr, xi, fr, fi)
            return yr, (None if real_only else yi)
        # element n1 + N1 * n2 goes to [n1, n2]: stride-N1 subsequences become rows
        def split(t):
            return None if t is None else t.reshape(-1, rest, n1).transpose(1, 2).reshape(-1, rest)

        br, bi = self._level(split(xr), split(xi), level + 1, False)
        br, bi = br.reshape(-1, n1, rest), bi.reshape(-1, n1, rest)
        tr, ti = getattr(self, f"tw{level}_re"), getattr(self, f"tw{level}_im")
        br, bi = br * tr - bi * ti, br * ti + bi * tr
        # outer DFT over n1 (rows): F @ B; output [k1, k2] is frequency k2 + N2 * k1, i.e. natural order when flattened
        if real_only:
            return (fr @ br - fi @ bi).reshape(-1, size), None
        yr, yi = _cmatmul(fr, fi, br, bi)
        return yr.reshape(-1, size), yi.reshape(-1, size)


def monarch_size(length: int, kernel_length: int) -> int:
    """The power-of-two transform size for a causal convolution of ``length`` with ``kernel_length`` taps."""
    return 1 << (length + min(kernel_length, length) - 2).bit_length()


class MonarchConv(nn.Module):
    """Causal depthwise convolution of a fixed input length through :class:`MonarchDFT` (kernel passed per call)."""

    def __init__(self, length: int, kernel_length: int, radix: int = 32):
        super().__init__()
        self.length = length
        self.kernel_length = min(kernel_length, length)
        self.dft = MonarchDFT(monarch_size(length, kernel_length), radix)

    def spectrum(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``conj(DFT(k)) / N``: the kernel's part of the convolution, precomputable at deploy time."""
        n = self.dft.n
        kr, ki = self.dft(F.pad(k[:, : self.kernel_length], (0, n - self.kernel_length)))
        return kr / n, -ki / n

    def forward(self, x: torch.Tensor, k: torch.Tensor | None = None, spectrum: tuple[torch.Tensor, torch.Tensor] | None = None):
        kr, ki = self.spectrum(k) if spectrum is None else spectrum
        xr, xi = self.dft(F.pad(x, (0, self.dft.n - self.length)))
        # conj(X * K) = conj(X) * conj(K); the stored spectrum is already conj(K) / N
        zr, zi = xr * kr + xi * ki, xr * ki - xi * kr
        y, _ = self.dft(zr, zi, real_only=True)  # Re(DFT(conj(Y))) / N = IDFT(Y) for real y
        return y[..., : self.length]


def monarch_conv(x: torch.Tensor, k: torch.Tensor, radix: int = 32) -> torch.Tensor:
    """Causal depthwise convolution through matmul DFTs (builds the DFT buffers on each call; for tests)."""
    _check(x, k)
    conv = MonarchConv(x.shape[-1], k.shape[-1], radix).to(x.device, x.dtype)
    return conv(x, k)


def long_conv(x: torch.Tensor, k: torch.Tensor, mode: str = "fft") -> torch.Tensor:
    """Causal depthwise ``x * k`` by ``mode`` (one of :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"unknown long-convolution mode {mode!r}; expected one of {MODES}")
    return {"fft": fft_conv, "direct": direct_conv, "monarch": monarch_conv}[mode](x, k)


class LongConv1d(nn.Module):
    """A frozen causal depthwise long convolution (the deploy form): the kernel, or its spectrum, is a buffer.

    ``direct`` accepts any input length; ``fft`` and ``monarch`` are built for ``length`` (their
    transform size depends on it). ``fft`` does not export with TorchScript nor convert to TFLite.
    """

    def __init__(self, kernel: torch.Tensor, length: int, mode: str = "direct", radix: int = 32):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown long-convolution mode {mode!r}; expected one of {MODES}")
        self.mode, self.length = mode, length
        kernel = kernel.detach()[:, :length]
        if mode == "direct":
            self.register_buffer("weight", kernel.flip(-1).unsqueeze(1).contiguous())
        elif mode == "fft":
            self.n = length + kernel.shape[-1] - 1
            self.register_buffer("spectrum", torch.fft.rfft(kernel.double(), n=self.n).to(torch.complex64))
        else:
            self.conv = MonarchConv(length, kernel.shape[-1], radix)
            plan = MonarchConv(length, kernel.shape[-1], radix).double()  # kernel spectrum in float64, stored as float
            kr, ki = plan.spectrum(kernel.double())
            self.register_buffer("spectrum_re", kr.float())
            self.register_buffer("spectrum_im", ki.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "direct":
            return F.conv1d(F.pad(x, (self.weight.shape[-1] - 1, 0)), self.weight, groups=self.weight.shape[0])
        if self.mode == "fft":
            return torch.fft.irfft(torch.fft.rfft(x, n=self.n) * self.spectrum, n=self.n)[..., : self.length]
        return self.conv(x, spectrum=(self.spectrum_re, self.spectrum_im))
