"""LSNet ("LSNet: See Large, Focus Small", Wang et al., CVPR 2025), scaled down to 32x32 images.

LSNet's token mixer is the LS convolution. *Large-kernel perception* (LKP) looks at a wide
neighbourhood cheaply (1x1 conv, 7x7 depthwise conv, 1x1 conv) and predicts, for every pixel,
the nine weights of a 3x3 kernel; the weights are shared by channel groups (``[B, G, 9, H, W]``,
one set per group). *Small-kernel aggregation* (SKA) then applies those per-pixel 3x3 kernels to
the input: a dynamic depthwise convolution. As in the official code, channel ``c`` uses weight set
``c % G``. Blocks alternate between a re-parameterizable depthwise mixer (3x3 dw + 1x1 dw +
identity, with squeeze-excite) and the LS convolution; each block ends with a residual 1x1 FFN.
The paper's last stage uses self-attention in place of the LS convolution; at 32x32 the last stage
is 4x4, so this version keeps the LS convolution in every stage.

The official SKA is a Triton kernel (GPU only). :func:`ls_aggregate` is the same arithmetic as
shift-and-multiply: pad once, take the nine shifted windows, multiply each by its per-pixel weight
broadcast over the group's channels, and sum. Pad, slice, reshape, mul and add export to ONNX,
TFLite and TVM.

Deploy form (``reparameterize``): every Conv+BN unit becomes one conv with bias; the RepVGG
depthwise mixer becomes one 3x3 depthwise conv; the BatchNorm after the aggregation becomes a
per-channel affine (Mul + Add); the BatchNorm1d before the classifier folds into the
Linear. The GroupNorm on the predicted kernel weights normalises with per-sample statistics, so it
stays. No BatchNorm is left; both forms export everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.models.reparam import bn_scale_shift, conv_like, fold_bn, fuse_conv_bn, identity_kernel, pad_kernel
from edgekit.models.registry import image_inputs, register_model


def ls_aggregate(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Small-kernel aggregation: a 3x3 convolution with per-pixel weights shared by channel groups.

    ``x`` [B, C, H, W]; ``weights`` [B, G, 9, H, W] with G dividing C (tap ``k`` is offset
    ``(k // 3 - 1, k % 3 - 1)``). Output channel ``c`` is ``sum_k weights[:, c % G, k] * shift_k(x)[:, c]``.
    """
    b, c, h, w = x.shape
    groups = weights.shape[1]
    if weights.dim() != 5 or weights.shape[2] != 9 or c % groups:
        raise ValueError(f"weights must be [B, G, 9, H, W] with G dividing the {c} channels, got {list(weights.shape)}")
    # [B, C/G, G, H+2, W+2]: channel r*G + g sits at [r, g], so weight set g broadcasts over r.
    padded = F.pad(x, (1, 1, 1, 1)).unflatten(1, (c // groups, groups))
    out = padded[..., 0:h, 0:w] * weights[:, None, :, 0]
    for k in range(1, 9):
        i, j = divmod(k, 3)
        out = out + padded[..., i : i + h, j : j + w] * weights[:, None, :, k]
    return out.flatten(1, 2)


class ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d; deploys as one conv with bias."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, bn_weight: float = 1.0):
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_weight)  # 0 makes a residual branch start as the identity

    def weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel and bias this unit computes in eval mode, folded or not."""
        if "bn" in self._modules:
            return fold_bn(self.c.weight, None, self.bn)
        return self.c.weight, self.c.bias

    def reparameterize(self) -> None:
        if "bn" in self._modules:
            self.c = fuse_conv_bn(self.c, self.bn)
            del self.bn


class BNLinear(nn.Sequential):
    """BatchNorm1d + Linear (the classifier); deploys as one Linear."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.l = nn.Linear(cin, cout)

    def reparameterize(self) -> None:
        if "bn" not in self._modules:
            return
        scale, shift = bn_scale_shift(self.bn)
        # l(x * scale + shift) = (W * scale) x + (W shift + b)
        fused = nn.Linear(self.l.in_features, self.l.out_features)
        fused.weight.copy_(self.l.weight * scale)
        fused.bias.copy_(self.l.bias + self.l.weight @ shift)
        self.l = fused
        del self.bn


class RepVGGDW(nn.Module):
    """3x3 depthwise + 1x1 depthwise + identity (each conv with BN); deploys as one 3x3 depthwise conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = ConvBN(dim, dim, 3, groups=dim)
        self.conv1: ConvBN | None = ConvBN(dim, dim, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1 is None:
            return self.conv(x)
        return self.conv(x) + self.conv1(x) + x

    def reparameterize(self) -> None:
        if self.conv1 is None:
            return
        w3, b3 = self.conv.weight_bias()
        w1, b1 = self.conv1.weight_bias()
        # All three branches see the same centred 3x3 window: their kernels add.
        kernel = w3 + pad_kernel(w1, 3) + identity_kernel(w3.shape[0], 3, dtype=w3.dtype).to(w3.device)
        self.conv = conv_like(self.conv.c, kernel, b3 + b1)
        self.conv1 = None


class SqueezeExcite(nn.Module):
    """Channel gate from the global mean: x * sigmoid(fc2(relu(fc1(mean(x)))))."""

    def __init__(self, dim: int, ratio: float = 0.25):
        super().__init__()
        hidden = max(8, int(dim * ratio + 4) // 8 * 8)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class LargeKernelPerception(nn.Module):
    """Predicts per-pixel 3x3 kernels [B, G, 9, H, W] from a 7x7 depthwise view of the input."""

    def __init__(self, dim: int, groups: int, large_kernel: int = 7):
        super().__init__()
        half = dim // 2
        self.cv1 = ConvBN(dim, half)
        self.cv2 = ConvBN(half, half, large_kernel, groups=half)
        self.cv3 = ConvBN(half, half)
        self.cv4 = nn.Conv2d(half, 9 * groups, 1)
        self.norm = nn.GroupNorm(groups, 9 * groups)  # normalises each group's nine taps together
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.cv3(self.cv2(F.relu(self.cv1(x)))))
        return self.norm(self.cv4(x)).unflatten(1, (self.groups, 9))


class ChannelAffine(nn.Module):
    """y = x * scale + shift per channel: an eval-mode BatchNorm2d as a plain Mul + Add."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(scale.detach().reshape(-1, 1, 1).clone())
        self.shift = nn.Parameter(shift.detach().reshape(-1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class LSConv(nn.Module):
    """LS convolution: see large (LKP predicts kernels), focus small (3x3 dynamic aggregation); BN, residual."""

    def __init__(self, dim: int, group_channels: int = 8):
        super().__init__()
        if dim % group_channels or dim % 2:
            raise ValueError(f"LSConv needs an even dim divisible by group_channels={group_channels}, got {dim}")
        self.lkp = LargeKernelPerception(dim, dim // group_channels)
        self.bn: nn.Module = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(ls_aggregate(x, self.lkp(x))) + x

    def reparameterize(self) -> None:
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        # Nothing linear precedes this BN (the aggregation's weights depend on x), so it stays as a per-channel affine.
        self.bn = ChannelAffine(*bn_scale_shift(self.bn))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvBN(dim, hidden)
        self.pw2 = ConvBN(hidden, dim, bn_weight=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(F.relu(self.pw1(x)))


class Block(nn.Module):
    """Even blocks mix with RepVGG depthwise + SE, odd blocks with the LS convolution; then a residual FFN."""

    def __init__(self, dim: int, index: int, group_channels: int = 8, ffn_ratio: int = 2):
        super().__init__()
        if index % 2 == 0:
            self.mixer: nn.Module = nn.Sequential(RepVGGDW(dim), SqueezeExcite(dim))
        else:
            self.mixer = LSConv(dim, group_channels)
        self.ffn = FFN(dim, ffn_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.mixer(x))


class LSNet(nn.Module):
    """Stem to 1/2 resolution, stages of LSNet blocks with depthwise stride-2 downsampling between them, pool, head."""

    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], num_classes: int = 10, group_channels: int = 8):
        super().__init__()
        if len(dims) != len(depths) or not dims:
            raise ValueError(f"dims {dims} and depths {depths} must be non-empty and the same length")
        self.stem = nn.Sequential(ConvBN(3, dims[0] // 2, 3, stride=2), nn.ReLU(), ConvBN(dims[0] // 2, dims[0], 3))
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers: list[nn.Module] = []
            if i:
                prev = dims[i - 1]
                layers += [ConvBN(prev, prev, 3, stride=2, groups=prev), ConvBN(prev, dim)]
            layers += [Block(dim, d, group_channels) for d in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head = BNLinear(dims[-1], num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(image))
        return self.head(x.mean((2, 3)))


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def lsnet_tiny(num_classes: int = 10) -> LSNet:
    """LSNet (CVPR 2025), LS convolution + RepVGG depthwise blocks, 32-64-96 x 2 blocks (~174 K params)."""
    return LSNet((32, 64, 96), (2, 2, 2), num_classes)


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def lsnet_small(num_classes: int = 10) -> LSNet:
    """LSNet (CVPR 2025), LS convolution + RepVGG depthwise blocks, 48-96-160 x 2-2-4 blocks (~580 K params)."""
    return LSNet((48, 96, 160), (2, 2, 4), num_classes)


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def lsnet_base(num_classes: int = 10) -> LSNet:
    """LSNet (CVPR 2025), LS convolution + RepVGG depthwise blocks, 64-128-256 x 2-4-4 blocks (~1.5 M params)."""
    return LSNet((64, 128, 256), (2, 4, 4), num_classes)
