"""Deploy-time re-parameterisation: turn a model's training form into the fast form it ships as.

Many edge architectures train with extra branches and normalisation (parallel
dilated kernels, Conv + BatchNorm, a 3x3 beside a 7x7 depthwise conv, layer
scales) that are linear and fold into one convolution once training is over.
A module that has such a form implements ``reparameterize(self) -> None``,
which rewrites it in place into its deploy form (same outputs, fewer ops).

:func:`deploy` applies every module's ``reparameterize`` children first, and
folds any BatchNorm that directly follows a convolution inside an
``nn.Sequential`` (the common pattern of models not written for edgekit).
The kernel helpers below are the arithmetic the families share.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = x * scale + shift`` (per channel)."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` for a conv with ``weight`` [out, ...] and ``bias``."""
    scale, shift = bn_scale_shift(bn)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    b = shift if bias is None else bias * scale + shift
    return weight * scale.reshape(shape), b


def fuse_conv_bn(conv: nn.Conv1d | nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv1d | nn.Conv2d:
    """A new convolution (with bias) equal to ``bn(conv(x))`` in eval mode."""
    weight, bias = fold_bn(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(), bn)
    return conv_like(conv, weight, bias)


def conv_like(conv: nn.Conv1d | nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, **changes) -> nn.Conv1d | nn.Conv2d:
    """A convolution with ``conv``'s geometry (overridable by ``changes``) and the given weight and bias."""
    kind = type(conv) if type(conv) in _CONVS else (nn.Conv2d if weight.dim() == 4 else nn.Conv1d)
    kernel = tuple(weight.shape[2:])
    args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode)
    args.update(changes)
    fused = kind(weight.shape[1] * args["groups"], weight.shape[0], kernel, bias=bias is not None, **args)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if bias is not None:
            fused.bias.copy_(bias)
    return fused.to(weight.device)


def pad_kernel(kernel: torch.Tensor, size: int | tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the spatial dims of ``kernel`` [out, in, *k] symmetrically to ``size``.

    A centred k x k kernel with padding k//2 and a centred K x K kernel with
    padding K//2 see the same neighbourhood once the smaller is padded, so
    parallel branches of different odd sizes sum into one kernel.
    """
    spatial = kernel.shape[2:]
    target = (size,) * len(spatial) if isinstance(size, int) else tuple(size)
    pads: list[int] = []
    for k, t in zip(reversed(spatial), reversed(target)):
        if t < k or (t - k) % 2:
            raise ValueError(f"cannot centre a kernel of size {k} in {t}: the target must be larger by an even amount")
        pads += [(t - k) // 2, (t - k) // 2]
    return F.pad(kernel, pads)


def dilate_kernel(kernel: torch.Tensor, rate: int) -> torch.Tensor:
    """The dense kernel [out, in, r(k-1)+1, ...] equal to ``kernel`` applied with dilation ``rate``."""
    if rate == 1:
        return kernel
    spatial = kernel.shape[2:]
    dense = kernel.new_zeros(kernel.shape[:2] + tuple(rate * (k - 1) + 1 for k in spatial))
    index = (slice(None), slice(None)) + tuple(slice(None, None, rate) for _ in spatial)
    dense[index] = kernel
    return dense


def identity_kernel(channels: int, size: int, dims: int = 2, dtype=torch.float32) -> torch.Tensor:
    """Depthwise kernel [channels, 1, size, ...] that copies its input (for merging a skip branch)."""
    kernel = torch.zeros((channels, 1) + (size,) * dims, dtype=dtype)
    kernel[(slice(None), 0) + (size // 2,) * dims] = 1.0
    return kernel


def fold_bn_sequentials(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a conv inside an ``nn.Sequential``; returns how many."""
    folded = 0
    for child in module.modules():
        if not isinstance(child, nn.Sequential):
            continue
        names = list(child._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = child._modules[a], child._modules[b]
            if isinstance(conv, _CONVS) and isinstance(bn, _NORMS) and bn.num_features == conv.out_channels and bn.track_running_stats:
                child._modules[a] = fuse_conv_bn(conv, bn)
                child._modules[b] = nn.Identity()
                folded += 1
    return folded


def deploy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The deploy form of ``model`` (a copy unless ``inplace``), in eval mode.

    Every module with a ``reparameterize()`` method is rewritten, deepest
    first, then remaining Conv + BatchNorm pairs in ``nn.Sequential`` are
    folded. The result computes what ``model.eval()`` computes.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    with torch.no_grad():
        for child in reversed(list(model.modules())):  # modules() is pre-order: reversed visits children first
            if hasattr(child, "reparameterize"):
                child.reparameterize()
        fold_bn_sequentials(model)
    model.eval()
    return model


def deploy_structure(model: nn.Module) -> nn.Module:
    """The deploy architecture of a freshly built model, for loading saved deploy-form weights into.

    Re-parameterisation changes structure the same way whatever the weights
    are, so deploying fresh weights gives the module a saved state dict fits.
    """
    return deploy(model, inplace=True)


def count_reparameterizable(model: nn.Module) -> int:
    """How many modules :func:`deploy` would rewrite (``reparameterize`` methods plus Conv + BN pairs)."""
    own = sum(1 for m in model.modules() if hasattr(m, "reparameterize"))
    pairs = 0
    for child in model.modules():
        if isinstance(child, nn.Sequential):
            mods = list(child._modules.values())
            pairs += sum(isinstance(a, _CONVS) and isinstance(b, _NORMS) for a, b in zip(mods, mods[1:]))
    return own + pairs
