"""UniRepLKNet: dilated branches merged into one large depthwise kernel, and the block's BN/GRN/layer-scale folds."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgekit.models.unireplknet as unireplknet
from edgekit.models.reparam import dilate_kernel, pad_kernel
from edgekit.models.unireplknet import DILATED_BRANCHES, GRN, DilatedReparamBlock, UniRepLKNet, UniRepLKNetBlock
from tests.conftest import randomize_norms

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAM_RANGES = {"unireplknet_tiny": (50_000, 300_000), "unireplknet_small": (300_000, 2_000_000), "unireplknet_base": (1_000_000, 3_000_000)}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BN statistic and affine term, GRN gamma/beta and layer scale far from init, so each fold is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GRN):
                m.gamma.copy_(torch.randn(m.gamma.shape, generator=gen) * 0.5)
                m.beta.copy_(torch.randn(m.beta.shape, generator=gen) * 0.5)
            elif isinstance(m, UniRepLKNetBlock):
                m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=gen) + 0.5)
    return randomize_norms(model, seed)


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    diff, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert scale > 0 and diff <= rel * scale, (diff, scale)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


BRANCHES = [(K, k, r) for K, (sizes, rates) in DILATED_BRANCHES.items() for k, r in zip(sizes, rates)]


@pytest.mark.parametrize("K,k,r", BRANCHES)
def test_dilated_branch_equals_its_dense_kernel_padded_to_the_large_size(K, k, r):
    torch.manual_seed(0)
    w, x = torch.randn(4, 1, k, k), torch.randn(2, 4, 12, 12)
    span = r * (k - 1) + 1
    dilated = F.conv2d(x, w, padding=span // 2, dilation=r, groups=4)
    dense = dilate_kernel(w, r)
    assert dense.shape[-1] == span <= K
    torch.testing.assert_close(F.conv2d(x, dense, padding=span // 2, groups=4), dilated, rtol=0, atol=1e-5)
    torch.testing.assert_close(F.conv2d(x, pad_kernel(dense, K), padding=K // 2, groups=4), dilated, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", sorted(DILATED_BRANCHES))
def test_dilated_reparam_block_merges_into_one_depthwise_conv(kernel):
    torch.manual_seed(0)
    block = randomize(DilatedReparamBlock(8, kernel))
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        got = block(x)
    assert_close_rel(got, ref)
    assert block.bn is None and len(block.branch_convs) == len(block.branch_bns) == 0
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (kernel, kernel) and convs[0].groups == 8 and convs[0].bias is not None
    assert convs[0].dilation == (1, 1)
    before = {n: t.clone() for n, t in block.state_dict().items()}
    block.reparameterize()  # second call: no-op
    assert all(torch.equal(before[n], t) for n, t in block.state_dict().items())


def test_each_branch_contributes_to_the_merged_kernel():
    """Dropping one branch's merge would still pass a test where that branch is zero: here every branch changes the kernel."""
    torch.manual_seed(0)
    block = randomize(DilatedReparamBlock(4, 7))
    full, _ = block.merged_kernel()
    for conv in block.branch_convs:
        with torch.no_grad():
            saved = conv.weight.clone()
            conv.weight.zero_()
            assert not torch.allclose(block.merged_kernel()[0], full)
            conv.weight.copy_(saved)


@pytest.mark.parametrize("kernel", [3, 7])
def test_block_folds_each_step_exactly(kernel):
    torch.manual_seed(0)
    block = randomize(UniRepLKNetBlock(8, kernel))
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        mixed_ref = block.norm(block.dwconv(x))  # spatial mixing + its BN
        z = torch.randn(2, 32, 8, 8)  # a GRN input
        tail_ref = block.pw2_norm(block.pw2(block.grn(z))) * block.layer_scale.view(1, -1, 1, 1)
        ref = block(x)
        block.reparameterize()
        assert_close_rel(block.dwconv(x), mixed_ref)
        assert_close_rel(block.pw2(block.grn(z)), tail_ref)
        assert_close_rel(block(x), ref)
    assert isinstance(block.dwconv, nn.Conv2d) and block.dwconv.bias is not None
    assert isinstance(block.norm, nn.Identity) and isinstance(block.pw2_norm, nn.Identity)
    assert block.grn.beta is None and block.layer_scale is None and block.pw2.bias is not None
    assert isinstance(block.grn.gamma, nn.Parameter)  # the data-dependent GRN product stays


def test_grn_matches_the_paper_formula_on_nhwc():
    torch.manual_seed(0)
    grn = GRN(6)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(2, 6, 5, 5)
    nhwc = x.permute(0, 2, 3, 1)
    g = torch.linalg.vector_norm(nhwc, dim=(1, 2), keepdim=True)
    n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
    expected = (grn.gamma.view(1, 1, 1, -1) * n + 1) * nhwc + grn.beta.view(1, 1, 1, -1)
    torch.testing.assert_close(grn(x), expected.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["unireplknet_tiny", "unireplknet_small"])
def test_whole_model_deploy_parity_and_structure(name):
    from edgekit.models.reparam import deploy

    torch.manual_seed(0)
    model = randomize(getattr(unireplknet, name)())
    deployed = deploy(model)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref, got = model(x), deployed(x)
    assert_close_rel(got, ref)
    assert not any(isinstance(m, (nn.BatchNorm2d, DilatedReparamBlock)) for m in deployed.modules())
    blocks = [m for m in deployed.modules() if isinstance(m, UniRepLKNetBlock)]
    assert len(blocks) == sum(len(stage) for stage in model.stages)
    for block in blocks:
        depthwise = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert depthwise == [block.dwconv] and block.dwconv.dilation == (1, 1)
    assert _count(deployed) < _count(model)
    # deploying the deployed form again is a no-op
    again = deploy(deployed)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), deployed.state_dict().values()))


@pytest.mark.parametrize("name", sorted(PARAM_RANGES))
def test_variants_shapes_and_params(name):
    from edgekit.models.registry import model_info

    factory = getattr(unireplknet, name)
    model = factory().eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
        assert factory(num_classes=4).eval()(torch.rand(1, 3, 32, 32)).shape == (1, 4)
    low, high = PARAM_RANGES[name]
    assert low <= _count(model) <= high
    info = model_info(name)
    assert info.inputs[0].shape == ["batch", 3, 32, 32] and info.task == "classification" and info.description


def test_bad_settings_raise_value_error():
    with pytest.raises(ValueError, match="no default dilated branches"):
        DilatedReparamBlock(4, 11)
    with pytest.raises(ValueError, match="spans 9 > kernel 7"):
        DilatedReparamBlock(4, 7, branches=((5, 3), (1, 4)))
    with pytest.raises(ValueError, match="odd kernel"):
        DilatedReparamBlock(4, 8, branches=((3,), (1,)))
    with pytest.raises(ValueError, match="one kernel tuple per stage"):
        UniRepLKNet((8, 16), ((3,),))


def test_deploy_form_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgekit.models.reparam import deploy

    torch.manual_seed(0)
    deployed = deploy(randomize(unireplknet.unireplknet_tiny()))
    x = torch.rand(2, 3, 32, 32)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(deployed, (x,), str(path), input_names=["image"], dynamic_axes={"image": {0: "batch"}}, opset_version=17, dynamo=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = deployed(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"image": x.numpy()})[0], expected, atol=1e-4 * float(np.abs(expected).max()))
