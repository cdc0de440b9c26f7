"""A convolution-heavy edge classifier for scikit-learn's 8x8 digits.

The 8x8 input is upsampled to 32x32 so the convolutions do real work, then a
MobileNetV2 stack (inverted residuals: 1x1 expand, 3x3 depthwise, 1x1 project)
brings it down to 4x4. One pre-norm transformer block mixes the 16 spatial
positions, and the mean token feeds a linear classifier.

Only standard layers (Conv2d, BatchNorm2d, ReLU6, Linear, LayerNorm, GELU), and
attention is built from plain Linear layers rather than nn.MultiheadAttention,
so the model exports to ONNX opset 17 simply and every matmul stays a visible,
quantizable layer.
"""

from __future__ import annotations

import torch
from torch import nn

from edgekit.artifact import TensorSpec
from edgekit.models.registry import register_model

_INPUTS = [TensorSpec(name="input", shape=["batch", 1, 8, 8], dtype="float32", layout="NCHW", low=0, high=1)]

# One row per stage: (expansion, out_channels, repeats, first stride). Three
# stride-2 stages take the 32x32 stem output down to 4x4 (16 tokens).
TINY_STAGES = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 1, 2), (4, 48, 1, 2)]
SMALL_STAGES = [(1, 24, 1, 1), (4, 32, 2, 2), (4, 64, 3, 2), (4, 96, 1, 2)]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers = [_conv_bn(cin, hidden, 1)] if expansion != 1 else []
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            _conv_bn(hidden, cout, 1, act=False),  # linear bottleneck
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_residual else out


class SelfAttention(nn.Module):
    """Multi-head self-attention from separate q/k/v/out Linear layers."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split_heads(self, x):  # [B, N, C] -> [B, heads, N, head_dim]
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self._split_heads(self.q(x)), self._split_heads(self.k(x)), self._split_heads(self.v(x))
        weights = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(b, n, c)
        return self.out(mixed)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MobileCNN(nn.Module):
    def __init__(self, stages, num_classes: int = 10, stem: int = 16, heads: int = 4, in_channels: int = 1, upsample: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Upsample(scale_factor=upsample, mode="nearest"), _conv_bn(in_channels, stem, 3))
        blocks, cin = [], stem
        for expansion, cout, repeats, stride in stages:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        self.features = nn.Sequential(*blocks)
        self.transformer = TransformerBlock(cin, heads)
        self.norm = nn.LayerNorm(cin)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, input):  # noqa: A002 - named like the model input
        x = self.features(self.stem(input))  # [B, C, H, W]
        tokens = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        tokens = self.transformer(tokens)
        return self.classifier(self.norm(tokens.mean(dim=1)))


@register_model(inputs=_INPUTS, task="classification", dims={"batch": 1})
def mobile_cnn_tiny(num_classes: int = 10) -> MobileCNN:
    """Mobile CNN, inverted residuals 16-24-32-48 to 4x4 + one attention block (~48 K params)."""
    return MobileCNN(TINY_STAGES, num_classes, stem=16, heads=4)


@register_model(inputs=_INPUTS, task="classification", dims={"batch": 1})
def mobile_cnn_small(num_classes: int = 10) -> MobileCNN:
    """Mobile CNN, inverted residuals 24-32-64-96 to 4x4 + one attention block (~225 K params)."""
    return MobileCNN(SMALL_STAGES, num_classes, stem=24, heads=4)
