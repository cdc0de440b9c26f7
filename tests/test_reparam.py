"""The shared deploy-time arithmetic (models/reparam.py) and the ``reparam`` pass on any model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekit.artifact import Artifact, TensorSpec
from edgekit.errors import StepFailed, UserError
from edgekit.models.reparam import deploy, dilate_kernel, fold_bn_sequentials, fuse_conv_bn, identity_kernel, pad_kernel
from edgekit.passes import PassContext

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bn(channels: int, seed: int) -> nn.BatchNorm2d:
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=gen))
        bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.3)
        bn.weight.copy_(torch.randn(channels, generator=gen))
        bn.bias.copy_(torch.randn(channels, generator=gen))
    return bn.eval()


@pytest.mark.parametrize("groups, bias", [(1, False), (4, True), (8, False)])
def test_fuse_conv_bn_equals_conv_then_bn(groups, bias):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=groups, bias=bias), _bn(8, 1)
    x = torch.randn(2, 8, 9, 9)
    fused = fuse_conv_bn(conv, bn)
    assert fused.stride == (2, 2) and fused.groups == groups and fused.bias is not None
    torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k, rate", [(3, 2), (3, 3), (5, 2), (3, 1)])
def test_dilated_kernel_as_dense_kernel(k, rate):
    torch.manual_seed(0)
    w = torch.randn(4, 1, k, k)
    x = torch.randn(1, 4, 15, 15)
    dense = dilate_kernel(w, rate)
    size = rate * (k - 1) + 1
    assert dense.shape[-2:] == (size, size)
    expected = F.conv2d(x, w, padding=rate * (k // 2), dilation=rate, groups=4)
    torch.testing.assert_close(F.conv2d(x, dense, padding=size // 2, groups=4), expected, rtol=1e-5, atol=1e-5)


def test_padded_small_kernel_sums_into_large_one():
    torch.manual_seed(0)
    big, small = torch.randn(4, 1, 7, 7), torch.randn(4, 1, 3, 3)
    x = torch.randn(1, 4, 12, 12)
    branches = F.conv2d(x, big, padding=3, groups=4) + F.conv2d(x, small, padding=1, groups=4) + x
    merged = big + pad_kernel(small, 7) + identity_kernel(4, 7)
    torch.testing.assert_close(F.conv2d(x, merged, padding=3, groups=4), branches, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot centre"):
        pad_kernel(small, 6)


def test_deploy_folds_plain_sequentials_and_keeps_the_original():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8, 2), nn.ReLU(), nn.Conv2d(8, 8, 1), _bn(8, 3))
    x = torch.randn(2, 3, 10, 10)
    deployed = deploy(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2  # a copy was rewritten
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    torch.testing.assert_close(deployed(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert fold_bn_sequentials(deployed) == 0


class _Branches(nn.Module):
    """A 5x5 and a 3x3 depthwise branch with a skip; reparameterize() merges them into one conv."""

    def __init__(self):
        super().__init__()
        self.large = nn.Conv2d(4, 4, 5, padding=2, groups=4)
        self.small = nn.Conv2d(4, 4, 3, padding=1, groups=4)

    def forward(self, x):
        return self.large(x) + (self.small(x) if self.small is not None else 0) + (x if self.small is not None else 0)

    def reparameterize(self):
        if self.small is None:
            return
        w = self.large.weight + pad_kernel(self.small.weight, 5) + identity_kernel(4, 5)
        self.large.weight.copy_(w)
        self.large.bias.add_(self.small.bias)
        self.small = None


def _artifact(module) -> Artifact:
    return Artifact(format="torch", inputs=[TensorSpec(name="image", shape=["batch", 4, 8, 8])], task="classification", module=module)


def test_reparam_pass_checks_parity_and_rejects_models_without_a_deploy_form(tmp_path):
    from edgekit.compress.reparam import Reparam, ReparamConfig

    ctx = PassContext(workdir=tmp_path, dims={"batch": 1}, log=lambda _m: None)
    out = Reparam(ReparamConfig()).run(_artifact(_Branches()), ctx)
    assert out.module.small is None and ctx.metrics["reparam"]["max_rel_diff"] <= 1e-6
    with pytest.raises(UserError, match="nothing to re-parameterize"):
        Reparam(ReparamConfig()).run(_artifact(nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())), ctx)

    class Wrong(_Branches):
        def reparameterize(self):
            self.small = None  # drops a branch instead of merging it

    with pytest.raises(StepFailed, match="deploy form differs"):
        Reparam(ReparamConfig()).run(_artifact(Wrong()), ctx)
