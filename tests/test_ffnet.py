"""FFNet / MetaMixer: FFNified attention, each deploy fold on its own, whole-model parity, exports."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgekit.models import create_model
from edgekit.models.ffnet import ConvBN, Downsample, FFBlock, FFNet, RepDW, TokenMixer
from edgekit.models.reparam import deploy
from tests.conftest import randomize_norms, rel_diff

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAM_RANGES = {"ffnet_tiny": (150_000, 300_000), "ffnet_small": (800_000, 1_500_000)}






def _reparameterized(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of ``module`` before and after its own ``reparameterize`` (no children's)."""
    with torch.no_grad():
        before = module(x)
        module.reparameterize()
        return before, module(x)


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_token_mixer_is_ffnified_attention():
    torch.manual_seed(0)
    mixer = randomize_norms(TokenMixer(8))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        key = mixer.key.bn(F.conv2d(x, mixer.key.conv.weight))
        big, small = mixer.key_dw.large, mixer.key_dw.small
        qk = big.bn(F.conv2d(key, big.conv.weight, padding=3, groups=8)) + small.bn(F.conv2d(key, small.conv.weight, padding=1, groups=8))
        assert torch.allclose(mixer(x), mixer.value_dw(F.gelu(qk)), atol=1e-5)
    assert mixer.key.conv.kernel_size == (1, 1) and big.conv.kernel_size == (7, 7) and small.conv.kernel_size == (3, 3)


def test_conv_bn_folds():
    torch.manual_seed(0)
    pair = randomize_norms(nn.Sequential(ConvBN(6, 10, 3, stride=2))[0])
    before, after = _reparameterized(pair, torch.randn(2, 6, 9, 9))
    assert isinstance(pair.bn, nn.Identity) and pair.conv.bias is not None and rel_diff(before, after) < 1e-6
    weight = pair.conv.weight.clone()
    pair.reparameterize()  # twice is a no-op
    assert torch.equal(weight, pair.conv.weight)


@pytest.mark.parametrize("stride,mult", [(1, 1), (2, 2)])
def test_large_and_small_depthwise_merge_into_one(stride, mult):
    torch.manual_seed(0)
    dw = randomize_norms(RepDW(8, 8 * mult, 7, stride=stride))
    before, after = _reparameterized(dw, torch.randn(2, 8, 10, 10))
    assert dw.large is None and dw.small is None and _bns(dw) == 0
    fused = dw.fused
    assert fused.kernel_size == (7, 7) and fused.groups == 8 and fused.stride == (stride, stride) and fused.out_channels == 8 * mult
    assert rel_diff(before, after) < 1e-6
    dw.reparameterize()
    assert dw.fused is fused


def test_merge_works_on_branches_already_folded():
    """deploy() folds the ConvBN children first; the merge must give the same kernel either way."""
    torch.manual_seed(0)
    dw = randomize_norms(RepDW(4, 4, 5))
    direct = deploy(dw)
    dw.large.reparameterize()
    dw.small.reparameterize()
    dw.reparameterize()
    assert torch.allclose(direct.fused.weight, dw.fused.weight) and torch.allclose(direct.fused.bias, dw.fused.bias)


def test_downsample_skip_folds_into_the_projection():
    torch.manual_seed(0)
    down = randomize_norms(Downsample(8, 16))
    down.dw.reparameterize()
    before, after = _reparameterized(down, torch.randn(2, 8, 8, 8))
    assert not down.skip and isinstance(down.proj.bn, nn.Identity) and rel_diff(before, after) < 1e-6


def test_final_bn_folds_into_the_head():
    torch.manual_seed(0)
    model = randomize_norms(FFNet([(8, 1)], num_classes=4))
    before, after = _reparameterized(model, torch.rand(2, 3, 32, 32))
    assert isinstance(model.norm, nn.Identity) and rel_diff(before, after) < 1e-6


def test_rejects_kernels_that_cannot_merge():
    with pytest.raises(ValueError, match="odd kernel"):
        RepDW(8, 8, 6)
    with pytest.raises(ValueError, match="odd kernel"):
        RepDW(8, 8, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        RepDW(8, 12)


@pytest.mark.parametrize("name", sorted(PARAM_RANGES))
def test_variant_params(name):
    """Sizes in the stated range (deploy parity, shapes and class counts: tests/test_zoo.py)."""
    model = create_model(name)
    low, high = PARAM_RANGES[name]
    assert low <= sum(p.numel() for p in model.parameters()) <= high


def test_deploy_has_no_bn_and_one_depthwise_conv_per_repdw():
    model = create_model("ffnet_tiny")
    repdws = sum(isinstance(m, RepDW) for m in model.modules())
    deployed = deploy(model)
    assert _bns(model) > 0 and _bns(deployed) == 0
    dwconvs = [m for m in deployed.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dwconvs) == repdws and all(c.kernel_size == (7, 7) for c in dwconvs)
    for block in (m for m in deployed.modules() if isinstance(m, FFBlock)):  # key dw + value dw, then the FFN's dw
        assert sum(isinstance(c, nn.Conv2d) and c.groups > 1 for c in block.token_mixer.modules()) == 2
        assert sum(isinstance(c, nn.Conv2d) and c.groups > 1 for c in block.channel_mixer.modules()) == 1
    assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in model.parameters())


def test_deploy_form_exports_to_onnx_with_parity(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = deploy(randomize_norms(create_model("ffnet_tiny")))
    x = torch.rand(2, 3, 32, 32)
    path = tmp_path / "ffnet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["image"], dynamic_axes={"image": {0: "batch"}}, opset_version=17, dynamo=False)
    nodes = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in nodes
    assert nodes.count("Conv") == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
