"""SGConv: Structured Global Convolution, from "What Makes Convolutional Models Great on Long
Sequence Modeling?" (Li, Cai, Zhang, Chen, Dey; ICLR 2023).

A global (sequence-long) causal depthwise convolution whose kernel is cheap to
parameterise and decays with distance, the two properties the paper finds
behind S4's success. The kernel of each channel is a concatenation of scales:
scale 0 covers taps [0, d), scale i >= 1 covers [d 2^(i-1), d 2^i); each scale
is a learnable d-tap sub-kernel linearly interpolated up to its span and
weighted by ``alpha^i`` (alpha = 1/2), so far taps are smooth and small and
the parameter count grows with log(L). There are ``1 + ceil(log2(L / d))``
scales. As in the official code the kernel is divided by its per-channel norm
at initialisation (a fixed buffer here, computed in ``__init__`` instead of on
the first forward), and a per-channel skip ``D * x`` is added.

Convolutions are causal (edgekit.models.fftconv). Training uses the FFT
convolution; in eval mode the training form regenerates the kernel on every
call and convolves with the ``deploy_mode`` implementation, so the eval-mode
training form exports too (unless that mode is ``fft``).

Deploy form (``reparameterize``): the kernel is computed once, the skip ``D`` is
folded into tap 0 (causal tap 0 multiplies x[t] itself), and the generator's
parameters are replaced by a frozen :class:`LongConv1d` in ``deploy_mode``:

* ``direct`` (default): one depthwise Conv1d with the L-tap kernel; exports to
  ONNX (TorchScript, opset 17), TFLite (litert-torch) and TVM.
* ``monarch``: the FFT as real matmuls with the kernel spectrum precomputed;
  exports to ONNX and TFLite; O(L * sum of radix factors) instead of O(L^2).
* ``fft``: torch.fft with the spectrum precomputed; fastest in torch but does
  NOT export with the TorchScript ONNX exporter (aten::fft_rfft unsupported),
  nor to TFLite (complex tensors); the dynamo exporter writes ONNX DFT (opset 18).

The classifier reads the 32x32x3 image as a sequence in raster order, as in the
LRA image task / sequential CIFAR, after a small conv stem (3x3 conv, 3x3 conv
stride 2: a sequence of 256 local feature vectors). Blocks are pre-norm:
``x + Linear(GELU(SGConv(ShortConv(LayerNorm(x)))))`` with a 3x3 depthwise
short conv on the tokens' 2-D layout; then mean pool, LayerNorm, head. Pixel
sequences with only a linear patch embedding and no short conv (the LRA
setting) stayed near chance in a few epochs on digits_canvas (loss 2.35 ->
2.30 after 5 epochs); the stem and the short conv are what makes a test-sized
training learn.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.models.fftconv import MODES, LongConv1d, MonarchConv, direct_conv, fft_conv
from edgekit.models.registry import image_inputs, register_model


def num_scales(length: int, kernel_dim: int) -> int:
    """Scales needed for the concatenated kernel (d, d, 2d, 4d, ... taps) to reach ``length``."""
    return 1 + max(0, math.ceil(math.log2(length / kernel_dim)))


class SGConv(nn.Module):
    """Causal global depthwise convolution over [B, C, L] with a multi-scale, decaying kernel."""

    def __init__(self, channels: int, length: int, kernel_dim: int = 32, alpha: float = 0.5, deploy_mode: str = "direct", radix: int = 32):
        super().__init__()
        if deploy_mode not in MODES:
            raise ValueError(f"unknown deploy_mode {deploy_mode!r}; expected one of {MODES}")
        if length < 1 or kernel_dim < 2:
            raise ValueError(f"need length >= 1 and kernel_dim >= 2, got {length} and {kernel_dim}")
        self.length = length
        self.deploy_mode, self.radix = deploy_mode, radix
        scales = num_scales(length, kernel_dim)
        self.kernels = nn.ParameterList(nn.Parameter(torch.randn(channels, kernel_dim)) for _ in range(scales))
        # Linear interpolation is linear in the sub-kernel: precompute it (times alpha^i) as a [d, span] matrix,
        # so the kernel is a few matmuls with static shapes (F.interpolate leaves the exporters a kernel of unknown size)
        for i in range(scales):
            eye = torch.eye(kernel_dim, dtype=torch.float64).unsqueeze(0)
            span = kernel_dim * 2 ** max(0, i - 1)
            self.register_buffer(f"interp{i}", (F.interpolate(eye, size=span, mode="linear")[0] * alpha**i).float())
        self.skip = nn.Parameter(torch.randn(channels))  # the "D" term of S4/SGConv
        with torch.no_grad():
            self.register_buffer("kernel_norm", self._raw_kernel().norm(dim=-1, keepdim=True))
        # the monarch matrices depend only on the length, so the eval-mode training form owns them too
        self.monarch = MonarchConv(length, length, radix) if deploy_mode == "monarch" else None
        self.conv: LongConv1d | None = None  # set by reparameterize()

    def _raw_kernel(self) -> torch.Tensor:
        parts = [sub @ getattr(self, f"interp{i}") for i, sub in enumerate(self.kernels)]
        return torch.cat(parts, dim=-1)[:, : self.length]

    def kernel(self) -> torch.Tensor:
        """The normalised [C, L] kernel (without the skip)."""
        return self._raw_kernel() / self.kernel_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.conv(x)
        k = self.kernel()
        if self.training or self.deploy_mode == "fft":
            y = fft_conv(x, k)
        elif self.deploy_mode == "monarch":
            y = self.monarch(x, k)
        else:
            y = direct_conv(x, k)
        return y + x * self.skip.unsqueeze(-1)

    def reparameterize(self) -> None:
        """Freeze the kernel (skip folded into tap 0) into a LongConv1d; drops every generator parameter."""
        if self.conv is not None:
            return
        with torch.no_grad():
            k = self.kernel()
            k[:, 0] += self.skip
            self.conv = LongConv1d(k, self.length, self.deploy_mode, self.radix)
        for i in range(len(self.kernels)):
            delattr(self, f"interp{i}")
        del self.kernels, self.skip, self.kernel_norm, self.monarch


class SGConvBlock(nn.Module):
    """Pre-norm residual block on [B, L, D]: x + Linear(GELU(SGConv(ShortConv(LayerNorm(x))))).

    The short conv is a 3x3 depthwise conv on the sequence laid back out as its ``side`` x ``side`` image
    (the short convolution H3 and Hyena put before their long one): it gives each token its 2-D
    neighbours, which the raster-order global kernel only reaches ``side`` taps apart. The output
    projection starts at zero so every block starts as the identity.
    """

    def __init__(self, dim: int, length: int, side: int, **sgconv):
        super().__init__()
        if side * side != length:
            raise ValueError(f"a block over {length} tokens cannot lay them out as a {side}x{side} image")
        self.side = side
        self.norm = nn.LayerNorm(dim)
        self.short = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.sgconv = SGConv(dim, length, **sgconv)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        h = self.norm(x).transpose(1, 2).reshape(b, dim, self.side, self.side)
        h = self.sgconv(self.short(h).flatten(2)).transpose(1, 2)
        return x + self.proj(self.act(h))


class SGConvNet(nn.Module):
    """Image classifier reading the image as a raster-order sequence of stem features."""

    def __init__(self, dim: int, depth: int, num_classes: int = 10, image_size: int = 32, in_channels: int = 3, **sgconv):
        super().__init__()
        if image_size % 2:
            raise ValueError(f"the stride-2 stem needs an even image size, got {image_size}")
        # two 3x3 convs (the second stride 2): local features for the sequence, Conv + BN pairs deploy() folds
        self.embed = nn.Sequential(
            nn.Conv2d(in_channels, dim // 2, 3, padding=1, bias=False), nn.BatchNorm2d(dim // 2), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(dim), nn.GELU(),
        )
        side = image_size // 2
        self.blocks = nn.Sequential(*(SGConvBlock(dim, side * side, side, **sgconv) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.embed(image).flatten(2).transpose(1, 2)  # [B, L, D], raster order
        x = self.blocks(x)
        return self.head(self.norm(x.mean(dim=1)))


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def sgconv_tiny(num_classes: int = 10, deploy_mode: str = "direct") -> SGConvNet:
    """SGConv, conv stem -> 256-step sequence, 4 blocks (3x3 short conv + global SGConv) of width 80."""
    return SGConvNet(80, 4, num_classes, kernel_dim=32, deploy_mode=deploy_mode)


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def sgconv_small(num_classes: int = 10, deploy_mode: str = "direct") -> SGConvNet:
    """SGConv, conv stem -> 256-step sequence, 6 blocks (3x3 short conv + global SGConv) of width 192."""
    return SGConvNet(192, 6, num_classes, kernel_dim=32, deploy_mode=deploy_mode)
