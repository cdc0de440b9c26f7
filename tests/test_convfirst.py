"""ConvFirst (models/convfirst.py) and its block kernels (runtimes/convfirst): BN folding is exact, the fused C
kernel equals the layer-by-layer C kernel and the torch deploy block, a whole model through the kernels equals torch."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.models.convfirst import ConvFirst, ConvFirstBlock, convfirst_small, convfirst_tiny
from edgekit.models.reparam import deploy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Random running stats and affine parameters, so folding really changes the weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def deployed_block(C: int, gw: int, k: int = 3, act: str = "relu", seed: int = 0) -> ConvFirstBlock:
    torch.manual_seed(seed)
    block = randomize_bn(ConvFirstBlock(C, kernel_size=k, group_width=gw, act=act), seed)
    block.reparameterize()
    return block


# -- model --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory, low, high", [(convfirst_tiny, 50e3, 300e3), (convfirst_small, 300e3, 2e6)])
def test_variants_shapes_and_sizes(factory, low, high):
    model = factory().eval()
    params = sum(p.numel() for p in model.parameters())
    assert low <= params <= high, params
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert factory(num_classes=3)(torch.rand(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("factory", [convfirst_tiny, convfirst_small])
def test_deploy_equals_eval_form_and_removes_every_batchnorm(factory):
    model = randomize_bn(factory(), seed=1)
    x = torch.rand(2, 3, 32, 32)
    dep = deploy(model)
    with torch.no_grad():
        ref, out = model(x), dep(x)
    assert rel(out, ref) < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # deploy copied, the original is untouched


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_block_reparameterize_folds_both_norms_exactly_and_twice_is_a_noop(act):
    block = randomize_bn(ConvFirstBlock(32, group_width=16, act=act), seed=2)
    x = torch.randn(2, 32, 7, 9)
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        assert isinstance(block.norm, nn.Identity) and isinstance(block.scale, nn.Identity)
        assert block.conv.bias is not None and block.project.bias is not None
        assert rel(block(x), ref) < 1e-5
        state = {k: v.clone() for k, v in block.state_dict().items()}
        block.reparameterize()
        assert all(torch.equal(v, block.state_dict()[k]) for k, v in state.items())


def test_block_structure_is_grouped_conv_then_bottleneck():
    block = ConvFirstBlock(64, kernel_size=5, group_width=16, expansion=4)
    assert block.conv.groups == 4 and block.conv.kernel_size == (5, 5) and block.conv.padding == (2, 2)
    assert (block.expand.in_channels, block.expand.out_channels) == (64, 256)
    assert (block.project.in_channels, block.project.out_channels) == (256, 64)


def test_invalid_settings_raise_value_error():
    with pytest.raises(ValueError, match="group_width"):
        ConvFirstBlock(20, group_width=8)
    with pytest.raises(ValueError, match="odd"):
        ConvFirstBlock(16, kernel_size=4)
    with pytest.raises(ValueError, match="act"):
        ConvFirstBlock(16, act="silu")
    with pytest.raises(ValueError, match="one entry per stage"):
        ConvFirst((16, 32), (1,))


def test_deploy_form_exports_to_onnx_and_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = randomize_bn(convfirst_tiny(), seed=3)
    x = torch.rand(1, 3, 32, 32)
    for name, m in (("train", model), ("deploy", deploy(model))):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(m, (x,), str(path), input_names=["image"], opset_version=17, dynamo=False)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = m(x)
        assert rel(torch.from_numpy(sess.run(None, {"image": x.numpy()})[0]), ref) < 1e-4


# -- kernels ------------------------------------------------------------------------------------------

@needs_gcc
@pytest.mark.parametrize("C, gw, k, act, N, H, W, tile", [
    (16, 8, 3, "relu", 1, 5, 7, None),    # odd H and W, default tile larger than the image
    (32, 16, 3, "relu", 2, 9, 11, 7),     # tiles of 7 pixels straddle rows, the last one partial; batch 2
    (64, 8, 3, "relu", 1, 14, 14, 6),     # tile = one register tile
    (24, 8, 5, "gelu", 1, 6, 5, 1),       # C not a multiple of 16 (scalar column tail), 5x5 kernel, GELU, one-pixel tiles
    (12, 4, 3, "relu", 1, 3, 3, 4),       # group width 4 (scalar grouped conv), image smaller than the kernel's reach
    (32, 32, 1, "relu", 1, 4, 4, None),   # 1x1 "grouped" conv, one group
])
def test_fused_equals_unfused_equals_torch_deploy_block(C, gw, k, act, N, H, W, tile):
    from edgekit.runtimes.convfirst import FusedConvFirstBlock

    block = deployed_block(C, gw, k, act)
    x = torch.randn(N, C, H, W)
    with torch.no_grad():
        ref = block(x)
    fb = FusedConvFirstBlock.from_block(block, tile=tile)
    fused, unfused = fb(x), fb(x, fused=False)
    assert isinstance(fused, torch.Tensor) and fused.shape == ref.shape
    assert float((fused - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))
    # same micro-kernels and summation order per output: the two paths agree bit for bit
    assert torch.equal(fused, unfused)
    two = fb(x.numpy(), threads=2)
    assert isinstance(two, np.ndarray) and np.array_equal(two, fused.numpy())


@needs_gcc
def test_nhwc_entry_skips_conversion_and_reports_intermediate_bytes():
    from edgekit.runtimes.convfirst import FusedConvFirstBlock

    block = deployed_block(16, 8)
    x = torch.randn(1, 16, 6, 6)
    fb = FusedConvFirstBlock.from_block(block)
    y = fb.nhwc(x.numpy().transpose(0, 2, 3, 1))
    assert np.array_equal(y.transpose(0, 3, 1, 2), fb(x.numpy()))
    assert fb.intermediate_bytes(1, 6, 6) == 4 * 36 * (16 + 64)


@needs_gcc
@pytest.mark.parametrize("factory", [convfirst_tiny, convfirst_small])
def test_whole_model_through_the_kernels_equals_torch(factory):
    from edgekit.runtimes.convfirst import run_fused

    torch.manual_seed(4)
    dep = deploy(randomize_bn(factory(), seed=4))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = dep(x)
    assert rel(run_fused(dep, x), ref) < 1e-4
    assert rel(run_fused(dep, x, fused=False), ref) < 1e-4


@needs_gcc
def test_unsupported_block_settings_raise_value_error_naming_them():
    from edgekit.runtimes.convfirst import FusedConvFirstBlock

    with pytest.raises(ValueError, match="not folded.*reparameterize"):
        FusedConvFirstBlock.from_block(ConvFirstBlock(16).eval())
    strided = deployed_block(16, 8)
    strided.conv.stride = (2, 2)
    with pytest.raises(ValueError, match=r"stride \(2, 2\).*stride 1 only"):
        FusedConvFirstBlock.from_block(strided)
    dilated = deployed_block(16, 8)
    dilated.conv.dilation = (2, 2)
    with pytest.raises(ValueError, match="dilation"):
        FusedConvFirstBlock.from_block(dilated)
    silu = deployed_block(16, 8)
    silu.act = nn.SiLU()
    with pytest.raises(ValueError, match="SiLU"):
        FusedConvFirstBlock.from_block(silu)
    b = deployed_block(16, 8)
    args = (b.conv.weight.detach().numpy(), np.zeros(16), b.expand.weight.detach().numpy(), np.zeros(64),
            b.project.weight.detach().numpy(), np.zeros(16))
    with pytest.raises(ValueError, match="stride 2"):
        FusedConvFirstBlock(*args, groups=2, stride=2)
    with pytest.raises(ValueError, match="groups=4"):
        FusedConvFirstBlock(*args, groups=4)
    with pytest.raises(ValueError, match="threads"):
        FusedConvFirstBlock(*args, groups=2, threads=0)
    with pytest.raises(ValueError, match="tile"):
        FusedConvFirstBlock(*args, groups=2, tile=0)
    with pytest.raises(ValueError, match=r"NHWC \(N, H, W, 16\)"):
        FusedConvFirstBlock(*args, groups=2).nhwc(np.zeros((1, 16, 4, 4), np.float32))
