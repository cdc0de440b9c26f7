"""HorNet (g^n Conv): the recursive gating, each deploy fold on its own, whole-model parity, exports."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.models import create_model
from edgekit.models.hornet import Downsample, GnConv, HorBlock, HorNet, LayerNorm2d
from edgekit.models.reparam import deploy
from tests.conftest import randomize_norms, rel_diff

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAM_RANGES = {"hornet_tiny": (150_000, 300_000), "hornet_small": (800_000, 1_500_000)}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random layer scales, LayerNorm affines and BatchNorm statistics (the defaults make the folds trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HorBlock) and m.gamma1 is not None:
                m.gamma1.copy_(torch.rand(m.gamma1.shape, generator=gen) * 2 - 1)
                m.gamma2.copy_(torch.rand(m.gamma2.shape, generator=gen) * 2 - 1)
            if isinstance(m, LayerNorm2d) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return randomize_norms(model, seed)




def _reparameterized(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of ``module`` before and after its own ``reparameterize`` (no children's)."""
    with torch.no_grad():
        before = module(x)
        module.reparameterize()
        return before, module(x)


def test_gnconv_is_the_paper_recursion():
    torch.manual_seed(0)
    g = GnConv(16, order=3).eval()
    assert g.widths == [4, 8, 16] and g.proj_in.out_channels == 32 and g.dwconv.in_channels == 28
    assert [(pw.in_channels, pw.out_channels) for pw in g.pws] == [(4, 8), (8, 16)]
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        z = g.proj_in(x)
        p0, rest = z[:, :4], z[:, 4:]
        q = g.dwconv(rest) / 3
        p1 = p0 * q[:, :4]
        p2 = g.pws[0](p1) * q[:, 4:12]
        p3 = g.pws[1](p2) * q[:, 12:]
        assert torch.allclose(g(x), g.proj_out(p3), atol=1e-6)


def test_gnconv_order_must_divide_channels():
    with pytest.raises(ValueError, match="divide by 16"):
        GnConv(24, order=5)
    with pytest.raises(ValueError, match=">= 1"):
        GnConv(16, order=0)


def test_scale_folds_into_dwconv():
    torch.manual_seed(0)
    g = GnConv(16, order=4).eval()
    before, after = _reparameterized(g, torch.randn(2, 16, 5, 5))
    assert g.scale == 1.0 and rel_diff(before, after) < 1e-6
    weight = g.dwconv.weight.clone()
    g.reparameterize()  # twice is a no-op
    assert torch.equal(weight, g.dwconv.weight)


def test_layer_scales_and_norm_affines_fold_into_the_block():
    torch.manual_seed(0)
    block = randomize(HorBlock(16, order=2, gate_scale=0.5))
    before, after = _reparameterized(block, torch.randn(2, 16, 6, 6))
    assert block.gamma1 is None and block.gamma2 is None
    assert block.norm1.weight is None and block.norm2.weight is None
    assert rel_diff(before, after) < 1e-5
    state = {k: v.clone() for k, v in block.state_dict().items()}
    block.reparameterize()
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in state.items())


def test_bn_folds_into_strided_downsample_and_through_the_pool_into_the_head():
    torch.manual_seed(0)
    down = randomize(Downsample(8, 16))
    before, after = _reparameterized(down, torch.randn(2, 8, 6, 6))
    assert down.norm is None and rel_diff(before, after) < 1e-6
    model = randomize(HorNet([(16, 1, 2)], num_classes=4))
    before, after = _reparameterized(model, torch.rand(2, 3, 32, 32))
    assert model.norm is None and rel_diff(before, after) < 1e-6


def test_norm_affine_refuses_a_padded_conv():
    from edgekit.models.hornet import _fold_norm_affine

    with pytest.raises(ValueError, match="without padding"):
        _fold_norm_affine(randomize(LayerNorm2d(4)), nn.Conv2d(4, 4, 3, padding=1))


@pytest.mark.parametrize("name", sorted(PARAM_RANGES))
def test_variant_params(name):
    """Sizes in the stated range (deploy parity, shapes and class counts: tests/test_zoo.py)."""
    model = create_model(name)
    low, high = PARAM_RANGES[name]
    assert low <= sum(p.numel() for p in model.parameters()) <= high
    assert [b.gnconv.order for b in model.modules() if isinstance(b, HorBlock)][-1] == 5


def test_deploy_drops_layer_scales_and_affines():
    model = create_model("hornet_tiny")
    deployed = deploy(model)
    blocks = [m for m in deployed.modules() if isinstance(m, HorBlock)]
    assert blocks and all(b.gamma1 is None and b.gamma2 is None and b.gnconv.scale == 1.0 for b in blocks)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    norms = [m for m in deployed.modules() if isinstance(m, LayerNorm2d)]
    assert sum(n.weight is not None for n in norms) == 1  # only the stem's norm feeds the residual stream
    assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in model.parameters())
    dwconvs = [m for m in deployed.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dwconvs) == len(blocks) and all(c.kernel_size == (7, 7) for c in dwconvs)


def test_deploy_form_exports_to_onnx_with_parity(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = deploy(randomize(create_model("hornet_tiny")))
    x = torch.rand(2, 3, 32, 32)
    path = tmp_path / "hornet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["image"], dynamic_axes={"image": {0: "batch"}}, opset_version=17, dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and not ops & {"BatchNormalization", "DFT", "Unfold"}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
