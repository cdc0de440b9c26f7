"""UniRepLKNet: a large-kernel ConvNet whose dilated branches merge into one depthwise conv at deploy time.

Ding et al., "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point Cloud,
Time-Series and Image Recognition" (CVPR 2024). Scaled down here for 32x32 images: a stride-2 stem
(16x16), three stages of UniRepLKNet blocks with stride-2 conv downsampling between them (16, 8, 4),
global average pool, LayerNorm, linear head. Like the paper, the first stage uses a small (3x3)
depthwise kernel and later stages large ones (7 or 9 here instead of 13, since the maps are 8x8 and 4x4).

Block (training form), residual ``x + block(x)``::

    DilatedReparamBlock(K) -> BN -> SE -> 1x1 conv -> GELU -> GRN -> 1x1 conv (no bias) -> BN -> layer scale

``DilatedReparamBlock``: a KxK depthwise conv + BN in parallel with depthwise k_i x k_i convs at dilation
r_i, each with its own BN (K=7: k=(5,3,3), r=(1,2,3); K=9: k=(5,5,3,3), r=(1,2,3,4); K=5: k=(3,3), r=(1,2)).

Deploy form (``reparameterize``), all folds exact in eval mode:

* each branch's BN folds into its conv; each dilated k x k kernel becomes the dense kernel of size
  r(k-1)+1 with zeros between taps (``reparam.dilate_kernel``), is zero-padded to KxK and summed into the
  large kernel (and the biases summed): the block's spatial mixing is ONE depthwise KxK conv with bias;
* the BN after it folds into that same conv (it follows a linear conv directly; the SE after it is not
  linear, so nothing folds past the SE);
* GRN is ``(gamma * N(x) + 1) * x + beta`` with ``N(x)`` the per-channel spatial L2 norm divided by its
  channel mean. ``N`` depends on the data, so the ``x * (1 + gamma * N(x))`` part stays an op; the additive
  ``beta`` is constant and passes through the next 1x1 conv as the bias ``W2 @ beta``;
* the 1x1 conv -> BN -> layer scale tail is linear per output channel and folds into the second 1x1 conv
  (``W2 * bn_scale * ls``, bias ``(W2 @ beta * bn_scale + bn_shift) * ls``);
* stem and downsampling use Conv + BN (the paper uses LayerNorm there) so that ``reparam.deploy`` folds them
  too; the head's LayerNorm is kept (it normalises a data-dependent statistic).

What remains per block: depthwise conv, SE (pool, two 1x1 convs, sigmoid, multiply), 1x1 conv, GELU,
GRN without beta, 1x1 conv, add. Everything is plain Conv2d / reductions / elementwise ops (1x1 convs
instead of the paper's Linear on NHWC, so no transposes), and both forms export to ONNX, TFLite and TVM.
"""

from __future__ import annotations

import torch
from torch import nn

from edgekit.models.reparam import bn_scale_shift, conv_like, dilate_kernel, fold_bn, fuse_conv_bn, pad_kernel
from edgekit.models.registry import image_inputs, register_model

# Dilated branches (kernel sizes, rates) per large kernel, the paper's K=13 recipe scaled down so every
# branch's dense size r(k-1)+1 fits inside K.
DILATED_BRANCHES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    5: ((3, 3), (1, 2)),
    7: ((5, 3, 3), (1, 2, 3)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
}


def _dw_conv(channels: int, kernel: int, dilation: int = 1) -> nn.Conv2d:
    """A 'same'-padded depthwise conv without bias (a BN follows it)."""
    span = dilation * (kernel - 1) + 1
    return nn.Conv2d(channels, channels, kernel, padding=span // 2, dilation=dilation, groups=channels, bias=False)


class DilatedReparamBlock(nn.Module):
    """A KxK depthwise conv + BN plus parallel dilated depthwise conv + BN branches; deploys as one KxK conv."""

    def __init__(self, channels: int, kernel: int, branches: tuple[tuple[int, ...], tuple[int, ...]] | None = None):
        super().__init__()
        if branches is None:
            if kernel not in DILATED_BRANCHES:
                raise ValueError(f"no default dilated branches for kernel {kernel}; pick one of {sorted(DILATED_BRANCHES)} or pass branches")
            branches = DILATED_BRANCHES[kernel]
        sizes, rates = branches
        if kernel % 2 == 0 or len(sizes) != len(rates):
            raise ValueError(f"need an odd kernel and one rate per branch kernel, got kernel {kernel}, branches {branches}")
        for k, r in zip(sizes, rates):
            if k % 2 == 0 or r < 1 or r * (k - 1) + 1 > kernel:
                raise ValueError(f"branch k={k} r={r} spans {r * (k - 1) + 1} > kernel {kernel} (or k is even / r < 1)")
        self.kernel, self.sizes, self.rates = kernel, tuple(sizes), tuple(rates)
        self.conv = _dw_conv(channels, kernel)
        self.bn: nn.BatchNorm2d | None = nn.BatchNorm2d(channels)
        self.branch_convs = nn.ModuleList(_dw_conv(channels, k, r) for k, r in zip(sizes, rates))
        self.branch_bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None:  # deploy form
            return self.conv(x)
        out = self.bn(self.conv(x))
        for conv, bn in zip(self.branch_convs, self.branch_bns):
            out = out + bn(conv(x))
        return out

    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The KxK depthwise kernel and bias equal to the sum of all branches (eval-mode BN)."""
        weight, bias = fold_bn(self.conv.weight, self.conv.bias, self.bn)
        for conv, bn, r in zip(self.branch_convs, self.branch_bns, self.rates):
            w, b = fold_bn(conv.weight, None, bn)
            weight = weight + pad_kernel(dilate_kernel(w, r), self.kernel)
            bias = bias + b
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.bn is None:
            return
        weight, bias = self.merged_kernel()
        self.conv = conv_like(self.conv, weight, bias)
        self.bn = None
        self.branch_convs, self.branch_bns = nn.ModuleList(), nn.ModuleList()


class SE(nn.Module):
    """Squeeze-and-excitation: channel gates from the spatial mean (two 1x1 convs, ReLU, sigmoid)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.up(torch.relu(self.down(x.mean(dim=(2, 3), keepdim=True)))))
        return x * gate


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt V2) on NCHW: ``(gamma * N(x) + 1) * x + beta``.

    ``N(x)`` = per-channel L2 norm over space, divided by its mean over channels. ``beta`` becomes
    ``None`` once the owning block has folded it into the next 1x1 conv.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta: nn.Parameter | None = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sqrt((x * x).sum(dim=(2, 3), keepdim=True))  # explicit sum of squares: exports as plain ops everywhere
        out = x * (self.gamma * (g / (g.mean(dim=1, keepdim=True) + self.eps)) + 1)
        return out if self.beta is None else out + self.beta


class UniRepLKNetBlock(nn.Module):
    """dw conv (dilated reparam if kernel >= 5) -> BN -> SE -> FFN with GELU + GRN -> BN -> layer scale, residual."""

    def __init__(self, dim: int, kernel: int, ffn_ratio: int = 4, layer_scale: float = 0.1):
        super().__init__()
        self.dwconv: nn.Module = DilatedReparamBlock(dim, kernel) if kernel >= 5 else _dw_conv(dim, kernel)
        self.norm: nn.Module = nn.BatchNorm2d(dim)
        self.se = SE(dim, max(dim // 4, 1))
        hidden = ffn_ratio * dim
        self.pw1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.grn = GRN(hidden)
        self.pw2 = nn.Conv2d(hidden, dim, 1, bias=False)
        self.pw2_norm: nn.Module = nn.BatchNorm2d(dim)
        self.layer_scale: nn.Parameter | None = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pw2_norm(self.pw2(self.grn(self.act(self.pw1(y)))))
        if self.layer_scale is not None:
            y = y * self.layer_scale.view(1, -1, 1, 1)
        return x + y

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.layer_scale is None:
            return
        # spatial mixing: merge the dilated branches, then fold the BN that follows into the one dw conv
        if isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.reparameterize()
            self.dwconv = self.dwconv.conv
        self.dwconv = fuse_conv_bn(self.dwconv, self.norm)
        self.norm = nn.Identity()
        # FFN tail: GRN beta -> W2 @ beta, then BN and layer scale scale each output channel of pw2
        weight = self.pw2.weight
        bias = weight.flatten(1) @ self.grn.beta.flatten()
        scale, shift = bn_scale_shift(self.pw2_norm)
        self.pw2 = conv_like(self.pw2, weight * (scale * self.layer_scale).view(-1, 1, 1, 1), (bias * scale + shift) * self.layer_scale)
        self.grn.beta = None
        self.pw2_norm = nn.Identity()
        self.layer_scale = None


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]


class UniRepLKNet(nn.Module):
    """Stem (two 3x3 convs, the first stride 2), stages of blocks with stride-2 conv downsampling, pool, LayerNorm, head.

    ``kernels[i]`` lists the depthwise kernel of every block of stage ``i`` (3: plain dw conv; 5/7/9: dilated reparam).
    """

    def __init__(self, dims: tuple[int, ...], kernels: tuple[tuple[int, ...], ...], num_classes: int = 10, in_channels: int = 3,
                 layer_scale: float = 0.1):
        super().__init__()
        if len(dims) != len(kernels):
            raise ValueError(f"one kernel tuple per stage: {len(dims)} dims but {len(kernels)} kernel tuples")
        self.stem = nn.Sequential(*_conv_bn(in_channels, dims[0] // 2, 2), nn.GELU(), *_conv_bn(dims[0] // 2, dims[0], 1))
        self.downsample = nn.ModuleList(nn.Sequential(*_conv_bn(a, b, 2)) for a, b in zip(dims, dims[1:]))
        self.stages = nn.ModuleList(nn.Sequential(*(UniRepLKNetBlock(d, k, layer_scale=layer_scale) for k in ks)) for d, ks in zip(dims, kernels))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stages[0](self.stem(image))
        for down, stage in zip(self.downsample, self.stages[1:]):
            x = stage(down(x))
        return self.head(self.norm(x.mean(dim=(2, 3))))


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def unireplknet_tiny(num_classes: int = 10) -> UniRepLKNet:
    """UniRepLKNet, dilated reparam 7x7 depthwise blocks, 16-32-64 channels (~140 K params)."""
    return UniRepLKNet((16, 32, 64), ((3,), (7, 7), (7, 7)), num_classes)


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def unireplknet_small(num_classes: int = 10) -> UniRepLKNet:
    """UniRepLKNet, dilated reparam 9x9/7x7 depthwise blocks (paper's large/3x3 interleave), 32-64-160 channels (~1.1 M params)."""
    return UniRepLKNet((32, 64, 160), ((3, 3), (9, 9), (7, 3, 7, 3)), num_classes)


@register_model(inputs=image_inputs(32), task="classification", dims={"batch": 1})
def unireplknet_base(num_classes: int = 10) -> UniRepLKNet:
    """UniRepLKNet for benchmarks, dilated reparam 9x9/7x7 depthwise blocks, 48-96-224 channels (~2.3 M params)."""
    return UniRepLKNet((48, 96, 224), ((3, 3), (9, 9, 9), (7, 3, 7, 3)), num_classes)
