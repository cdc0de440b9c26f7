"""LSNet: the shift-and-multiply aggregation kernel, each deploy rewrite on its own, and the whole deploy form."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekit.models.lsnet import (
    BNLinear,
    ChannelAffine,
    ConvBN,
    LSConv,
    LSNet,
    RepVGGDW,
    lsnet_base,
    lsnet_small,
    lsnet_tiny,
    ls_aggregate,
)
from edgekit.models.reparam import deploy
from tests.conftest import randomize_norms

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAM_RANGES = {lsnet_tiny: (50_000, 300_000), lsnet_small: (300_000, 2_000_000), lsnet_base: (1_000_000, 3_000_000)}


def aggregate_reference(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The aggregation written plainly: im2col with F.unfold, then each channel's weight set picked by index (c % G)."""
    b, c, h, w = x.shape
    cols = F.unfold(x, 3, padding=1).reshape(b, c, 9, h, w)  # unfold orders its rows channel-major, then the 3x3 taps
    per_channel = weights[:, torch.arange(c) % weights.shape[1]]  # [B, C, 9, H, W]
    return (cols * per_channel).sum(2)




def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("channels,groups", [(16, 4), (16, 1), (12, 12), (24, 3)])
def test_aggregate_equals_unfold_reference(channels, groups):
    gen = torch.Generator().manual_seed(channels + groups)
    x = torch.randn(2, channels, 5, 7, generator=gen)
    weights = torch.randn(2, groups, 9, 5, 7, generator=gen)
    torch.testing.assert_close(ls_aggregate(x, weights), aggregate_reference(x, weights), rtol=0, atol=1e-6)


def test_aggregate_with_the_same_weights_everywhere_is_a_depthwise_conv():
    """An independent check of tap order and padding: per-pixel weights that do not vary are an ordinary 3x3 dw conv."""
    gen = torch.Generator().manual_seed(1)
    c, g = 8, 2
    x = torch.randn(1, c, 6, 6, generator=gen)
    kernels = torch.randn(g, 3, 3, generator=gen)
    weights = kernels.reshape(1, g, 9, 1, 1).expand(1, g, 9, 6, 6)
    dw = kernels[torch.arange(c) % g].unsqueeze(1)  # channel c uses set c % G
    torch.testing.assert_close(ls_aggregate(x, weights), F.conv2d(x, dw, padding=1, groups=c), rtol=0, atol=1e-6)


def test_weight_set_g_reaches_exactly_the_channels_c_mod_g():
    gen = torch.Generator().manual_seed(2)
    c, g = 12, 4
    x = torch.randn(1, c, 4, 4, generator=gen)
    weights = torch.randn(1, g, 9, 4, 4, generator=gen)
    changed = weights.clone()
    changed[:, 1] += 1.0
    moved = (ls_aggregate(x, changed) - ls_aggregate(x, weights)).abs().amax((0, 2, 3)) > 1e-4
    assert moved.tolist() == [ch % g == 1 for ch in range(c)]
    # channels sharing a weight set and holding the same input give the same output
    x[:, 5] = x[:, 1]
    out = ls_aggregate(x, weights)
    torch.testing.assert_close(out[:, 5], out[:, 1], rtol=0, atol=0)


def test_bad_shapes_raise_value_error():
    x = torch.randn(1, 10, 4, 4)
    with pytest.raises(ValueError, match="G dividing"):
        ls_aggregate(x, torch.randn(1, 4, 9, 4, 4))  # 4 does not divide 10
    with pytest.raises(ValueError, match="G dividing"):
        ls_aggregate(x, torch.randn(1, 5, 25, 4, 4))  # a 5x5 kernel is not this aggregation
    with pytest.raises(ValueError, match="group_channels"):
        LSConv(20, group_channels=8)
    with pytest.raises(ValueError, match="same length"):
        LSNet((32, 64), (2,))


def test_conv_bn_folds_into_one_conv():
    unit = randomize_norms(ConvBN(8, 16, 3, stride=2, groups=2))
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = unit(x)
        unit.reparameterize()
        torch.testing.assert_close(unit(x), ref, rtol=0, atol=1e-5)
        unit.reparameterize()  # a no-op the second time
        torch.testing.assert_close(unit(x), ref, rtol=0, atol=1e-5)
    assert list(unit) == [unit.c] and unit.c.bias is not None and unit.c.stride == (2, 2) and unit.c.groups == 2


def test_bn_linear_folds_into_one_linear():
    head = randomize_norms(BNLinear(24, 6))
    x = torch.randn(5, 24)
    with torch.no_grad():
        ref = head(x)
        head.reparameterize()
        head.reparameterize()
        torch.testing.assert_close(head(x), ref, rtol=0, atol=1e-5)
    assert list(head) == [head.l]


@pytest.mark.parametrize("fold_children_first", [False, True])
def test_repvgg_depthwise_merges_into_one_3x3_dw_conv(fold_children_first):
    """3x3 dw + 1x1 dw + identity, each BN randomized, equal one 3x3 dw conv (whether deploy folded the Conv+BN units first or not)."""
    block = randomize_norms(RepVGGDW(16), seed=3)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ref = block(x)
        if fold_children_first:  # deploy() visits the children before the block
            block.conv.reparameterize()
            block.conv1.reparameterize()
        block.reparameterize()
        torch.testing.assert_close(block(x), ref, rtol=0, atol=1e-5)
        block.reparameterize()
        torch.testing.assert_close(block(x), ref, rtol=0, atol=1e-5)
    assert block.conv1 is None and not has_bn(block)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (3, 3) and convs[0].groups == 16


def test_ls_conv_output_bn_becomes_a_channel_affine():
    torch.manual_seed(0)
    layer = randomize_norms(LSConv(32), seed=4)
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        ref = layer(x)
        layer.reparameterize()
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)
    assert isinstance(layer.bn, ChannelAffine)
    assert layer.lkp(x).shape == (2, 4, 9, 6, 6)  # 32 channels, 8 per weight set: G = 4


@pytest.mark.parametrize("factory", list(PARAM_RANGES))
def test_variant_shapes_and_params(factory):
    model = factory().eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
        assert factory(num_classes=3).eval()(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    low, high = PARAM_RANGES[factory]
    assert low <= sum(p.numel() for p in model.parameters()) <= high
    assert sum(isinstance(m, LSConv) for m in model.modules()) >= 3  # the LS convolution is in every stage


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    model = randomize_norms(lsnet_tiny(), seed=5)
    return model, deploy(model)


def test_full_deploy_parity_and_no_bn_left(tiny_pair):
    model, deployed = tiny_pair
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref, got = model(x), deployed(x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert has_bn(model) and not has_bn(deployed)
    assert sum(isinstance(m, RepVGGDW) and m.conv1 is None for m in deployed.modules()) == 3
    assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in model.parameters())


def test_deploy_form_exports_to_onnx_with_parity(tiny_pair, tmp_path):
    import onnx
    import onnxruntime as ort

    _, deployed = tiny_pair
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    path = tmp_path / "lsnet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(deployed, (x,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}}, opset_version=17, dynamo=False)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and not ops & {"Im2Col", "Col2Im"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = deployed(x).numpy()
    got = sess.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * float(np.abs(expected).max()))
