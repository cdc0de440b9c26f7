"""FFNet / MetaMixer: attention rewritten as a pure convolutional FFN (Yun & Ro, "MetaMixer Is All You Need", 2024).

The paper reads self-attention as query-key-value mixing and keeps the
structure but swaps the operators ("FFNification"): the *key* is a 1x1 conv
(+ BN), the query-key interaction a large-kernel depthwise conv, the softmax
a GELU, and the *value* side another depthwise conv. So the token mixer is

    x + dw_value(GELU(dw_key(BN(conv1x1(x)))))

and the channel mixer is the same shape with the roles of the convs swapped:
a depthwise conv then an inverted-bottleneck FFN of 1x1 convs (each with BN)
around a GELU. Every depthwise conv is a large kernel (7x7) that trains with a
parallel 3x3 depthwise branch (each with its own BN); downsampling is a strided
depthwise conv of the same kind followed by a residual 1x1 conv (+ BN); the stem
is two 3x3 Conv + BN; a BatchNorm, average pooling and a linear head classify.

This version is scaled down for 32x32 inputs: a stem to 16x16 and four stages
at 16, 8, 4 and 2 pixels.

Deploy form (:meth:`reparameterize`, all exact):

- every Conv + BN pair becomes one conv with bias;
- each 7x7 + 3x3 depthwise pair becomes one 7x7 depthwise conv (the 3x3 kernel zero-padded to 7x7, biases summed);
- the downsampler's skip is folded into its 1x1 conv (identity matrix added to the kernel);
- the final BatchNorm (per channel, before the linear average pool) is folded into the head.

The deploy form is convs, GELU, adds, a pool and a linear layer: it exports to
ONNX (opset 17), TFLite and TVM, as does the training form.
"""

from __future__ import annotations

import torch
from torch import nn

from edgekit.models.registry import image_inputs, register_model
from edgekit.models.reparam import bn_scale_shift, conv_like, fold_bn, pad_kernel

# One row per stage: (channels, blocks). Stage i > 0 starts with a stride-2 downsampler.
TINY_STAGES = [(16, 1), (32, 1), (64, 2), (128, 1)]
SMALL_STAGES = [(32, 1), (64, 2), (128, 3), (256, 1)]


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm; deploy form: one conv with bias."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the single conv equal to this pair (eval mode), without changing the module."""
        weight, bias = self.conv.weight.detach(), None if self.conv.bias is None else self.conv.bias.detach()
        if isinstance(self.bn, nn.BatchNorm2d):
            return fold_bn(weight, bias, self.bn)
        return weight, bias

    def reparameterize(self) -> None:
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = conv_like(self.conv, *self.folded())
            self.bn = nn.Identity()


class RepDW(nn.Module):
    """A large-kernel depthwise conv trained beside a 3x3 depthwise branch; deploy form: one depthwise conv.

    ``cout`` may be a multiple of ``cin`` (a depthwise conv with a channel multiplier, as the downsampler uses).
    """

    def __init__(self, cin: int, cout: int, kernel: int = 7, stride: int = 1):
        super().__init__()
        if kernel % 2 == 0 or kernel <= 3:
            raise ValueError(f"RepDW needs an odd kernel larger than its parallel 3x3 branch, got {kernel}")
        if cout % cin:
            raise ValueError(f"a depthwise conv maps {cin} channels to a multiple of {cin}, not {cout}")
        self.kernel = kernel
        self.large: ConvBN | None = ConvBN(cin, cout, kernel, stride, groups=cin)
        self.small: ConvBN | None = ConvBN(cin, cout, 3, stride, groups=cin)
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return self.large(x) + self.small(x)

    def reparameterize(self) -> None:
        """Both branches are centred at the same pixel (padding k//2), so the padded 3x3 kernel adds to the 7x7."""
        if self.fused is not None:
            return
        w_large, b_large = self.large.folded()
        w_small, b_small = self.small.folded()
        self.fused = conv_like(self.large.conv, w_large + pad_kernel(w_small, self.kernel), b_large + b_small)
        self.large, self.small = None, None


class TokenMixer(nn.Module):
    """FFNified attention: key 1x1 Conv+BN, query-key depthwise conv, GELU (the softmax), value depthwise conv."""

    def __init__(self, dim: int, kernel: int = 7):
        super().__init__()
        self.key = ConvBN(dim, dim, 1)
        self.key_dw = RepDW(dim, dim, kernel)
        self.act = nn.GELU()
        self.value_dw = RepDW(dim, dim, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value_dw(self.act(self.key_dw(self.key(x))))


class ChannelMixer(nn.Module):
    """Depthwise conv then an inverted-bottleneck FFN of 1x1 Conv+BN around a GELU."""

    def __init__(self, dim: int, expansion: int = 3, kernel: int = 7):
        super().__init__()
        self.dw = RepDW(dim, dim, kernel)
        self.fc1 = ConvBN(dim, expansion * dim, 1)
        self.act = nn.GELU()
        self.fc2 = ConvBN(expansion * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.dw(x))))


class FFBlock(nn.Module):
    def __init__(self, dim: int, expansion: int = 3, kernel: int = 7):
        super().__init__()
        self.token_mixer = TokenMixer(dim, kernel)
        self.channel_mixer = ChannelMixer(dim, expansion, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mixer(x)
        return x + self.channel_mixer(x)


class Downsample(nn.Module):
    """Strided depthwise RepDW widening the channels, then x + Conv1x1+BN(x); deploy form: two convs."""

    def __init__(self, cin: int, cout: int, kernel: int = 7):
        super().__init__()
        self.dw = RepDW(cin, cout, kernel, stride=2)
        self.proj = ConvBN(cout, cout, 1)
        self.skip = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(x)
        return x + self.proj(x) if self.skip else self.proj(x)

    def reparameterize(self) -> None:
        """The skip is the identity 1x1 conv: add it to the (BN-folded) projection's kernel."""
        if not self.skip:
            return
        weight, bias = self.proj.folded()
        eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)[:, :, None, None]
        self.proj.conv = conv_like(self.proj.conv, weight + eye, bias)
        self.proj.bn = nn.Identity()
        self.skip = False


class FFNet(nn.Module):
    def __init__(self, stages: list[tuple[int, int]], num_classes: int = 10, expansion: int = 3, kernel: int = 7, in_channels: int = 3):
        super().__init__()
        first = stages[0][0]
        self.stem = nn.Sequential(ConvBN(in_channels, first // 2, 3, stride=2), nn.GELU(), ConvBN(first // 2, first, 3))
        layers: list[nn.Module] = []
        cin = first
        for i, (dim, depth) in enumerate(stages):
            if i:
                layers.append(Downsample(cin, dim, kernel))
            layers += [FFBlock(dim, expansion, kernel) for _ in range(depth)]
            cin = dim
        self.features = nn.Sequential(*layers)
        self.norm: nn.Module = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.features(self.stem(image)))
        return self.head(self.pool(x).flatten(1))

    def reparameterize(self) -> None:
        """BN is per channel and the pool is a mean, so BN commutes with the pool and folds into the head."""
        if isinstance(self.norm, nn.BatchNorm2d):
            scale, shift = bn_scale_shift(self.norm)
            head = nn.Linear(self.head.in_features, self.head.out_features)
            with torch.no_grad():
                head.weight.copy_(self.head.weight * scale)
                head.bias.copy_(self.head.bias + self.head.weight @ shift)
            self.head, self.norm = head, nn.Identity()


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def ffnet_tiny(num_classes: int = 10) -> FFNet:
    """FFNet (MetaMixer), FFNified attention + FFN over 16-32-64-128 channels, 7x7+3x3 depthwise (~227 K params)."""
    return FFNet(TINY_STAGES, num_classes, expansion=2)


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def ffnet_small(num_classes: int = 10) -> FFNet:
    """FFNet (MetaMixer), FFNified attention + FFN over 32-64-128-256 channels, 7x7+3x3 depthwise (~1.15 M params)."""
    return FFNet(SMALL_STAGES, num_classes)
