"""Fold BatchNorm into the preceding conv / linear layer (whitepaper 3.2, figure 6).

In eval mode BN is an affine map per channel, so it can live in the layer's weight
and bias: quantizing the folded weights is what an integer runtime will execute.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# (layer, BN) pairs whose output channel is axis 0 of the weight and axis 1 of the activation.
_PAIRS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Linear, nn.BatchNorm1d),
)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if not any(isinstance(layer, lt) and type(bn) is bt for lt, bt in _PAIRS):
        return False
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    # Without running stats BN normalises with batch statistics, which no weight can hold.
    return bn.running_mean is not None and bn.num_features == out


@torch.no_grad()
def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor, shift) in float64 with BN(x) = x * factor + shift per channel (eval mode, running stats)."""
    # float64 so the folded layer matches BN to rounding error of float32.
    factor = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        factor = factor * bn.weight.double()
    shift = -bn.running_mean.double() * factor
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return factor, shift


@torch.no_grad()
def _fold_into(layer: nn.Conv1d | nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> None:
    w = layer.weight
    factor, shift = bn_affine(bn)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(factor)
    shape = [-1] + [1] * (w.ndim - 1)
    layer.weight.copy_((w.double() * factor.reshape(shape)).to(w.dtype))
    new_bias = (bias * factor + shift).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A deep copy with each Conv1d/Conv2d/Linear + BatchNorm pair of an ``nn.Sequential`` folded.

    The BN becomes ``nn.Identity``; the copy computes what the original computes in eval
    mode (BN with running statistics). Pairs split across attributes of a custom block are
    left alone: only ``nn.Sequential`` order says for sure that one feeds the other.
    Linear + BatchNorm1d assumes 2-D [batch, features] activations.
    """
    folded = copy.deepcopy(module)
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            layer, bn = seq[i], seq[i + 1]
            if _foldable(layer, bn):
                _fold_into(layer, bn)
                seq[i + 1] = nn.Identity()
    return folded
