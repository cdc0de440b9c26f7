"""ConvFirst: the residual block of "On the Efficiency of Convolutional Neural Networks" (Andrew Lavin, 2024, arXiv 2404.03617).

The block puts the spatial mixing first, as a *grouped* k x k convolution (group
width of 8 or 16 channels rather than depthwise, so it does enough arithmetic per
byte to be compute-bound), then an inverted bottleneck of two 1x1 convolutions:

    x -> grouped kxk conv -> BN -> 1x1 expand (4x) -> ReLU -> 1x1 project -> BN -> + x

The paper's point is that such a block can be run as one fused kernel that keeps
the expanded activations on chip; ``edgekit.runtimes.convfirst`` does that on CPU.
Our reading of the norms: one BatchNorm after the grouped conv (where ConvNeXt-like
blocks normalise after spatial mixing), one on the residual branch's output (a
learned per-channel scale, the role a layer scale plays). ReLU by default; GELU is
available (``act="gelu"``). The classifier for 32x32 inputs: a stride-2 3x3 conv stem, three
stages of blocks separated by 2x2 stride-2 conv downsampling, global mean, linear.

Deploy form: ``ConvFirstBlock.reparameterize()`` folds each BatchNorm into the
conv before it (exact: BN in eval mode is per-channel affine), leaving
conv -> 1x1 -> act -> 1x1 -> add; ``reparam.deploy`` also folds the stem's and the
downsampling layers' Conv+BN pairs. Every op (conv, grouped conv, ReLU/GELU, add,
mean, linear) exports to ONNX, TFLite and TVM in both forms.
"""

from __future__ import annotations

import torch
from torch import nn

from edgekit.models.registry import image_inputs, register_model
from edgekit.models.reparam import fuse_conv_bn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class ConvFirstBlock(nn.Module):
    """x + BN(project(act(expand(BN(gconv(x)))))); stride 1, channels unchanged."""

    def __init__(self, dim: int, kernel_size: int = 3, group_width: int = 8, expansion: int = 4, act: str = "relu") -> None:
        super().__init__()
        if group_width < 1 or dim % group_width:
            raise ValueError(f"dim {dim} is not a multiple of group_width {group_width}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size output with padding k // 2), got {kernel_size}")
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        if expansion < 1:
            raise ValueError(f"expansion must be >= 1, got {expansion}")
        hidden = dim * expansion
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim // group_width, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.expand = nn.Conv2d(dim, hidden, 1)
        self.act = ACTIVATIONS[act]()
        self.project = nn.Conv2d(hidden, dim, 1, bias=False)
        self.scale = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale(self.project(self.act(self.expand(self.norm(self.conv(x))))))

    def reparameterize(self) -> None:
        """Fold both BatchNorms into the conv before each (the norm slots become Identity); a second call does nothing."""
        if isinstance(self.norm, nn.BatchNorm2d):
            self.conv, self.norm = fuse_conv_bn(self.conv, self.norm), nn.Identity()
        if isinstance(self.scale, nn.BatchNorm2d):
            self.project, self.scale = fuse_conv_bn(self.project, self.scale), nn.Identity()


class ConvFirstStage(nn.Module):
    """Optional 2x2 stride-2 conv + BN downsampling (when the width changes), then blocks."""

    def __init__(self, cin: int, cout: int, depth: int, **block: object) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout)) if cin != cout else nn.Identity()
        self.blocks = nn.Sequential(*[ConvFirstBlock(cout, **block) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.down(x))


class Head(nn.Module):
    """Global mean over H, W, then a linear classifier."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ConvFirst(nn.Module):
    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], num_classes: int = 10, kernel_size: int = 3,
                 group_width: int = 8, expansion: int = 4, act: str = "relu") -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {widths} and depths {depths} must have one entry per stage")
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        block = dict(kernel_size=kernel_size, group_width=group_width, expansion=expansion, act=act)
        ins = (widths[0],) + tuple(widths[:-1])
        self.stages = nn.ModuleList(ConvFirstStage(cin, cout, d, **block) for cin, cout, d in zip(ins, widths, depths))
        self.head = Head(widths[-1], num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(image)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def convfirst_tiny(num_classes: int = 10) -> ConvFirst:
    """ConvFirst, grouped 3x3 (width 8) + 4x 1x1 bottleneck blocks, 32-64-96 at 16/8/4 px (~200 K params)."""
    return ConvFirst((32, 64, 96), (1, 2, 1), num_classes, group_width=8)


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def convfirst_small(num_classes: int = 10) -> ConvFirst:
    """ConvFirst, grouped 3x3 (width 16) + 4x 1x1 bottleneck blocks, 48-96-192 at 16/8/4 px (~0.97 M params)."""
    return ConvFirst((48, 96, 192), (2, 2, 2), num_classes, group_width=16)
