"""SGConv: the multi-scale decaying kernel, its frozen deploy forms (direct / monarch / fft), the classifier variants."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekit.models import create_model, model_info
from edgekit.models.fftconv import MODES, LongConv1d
from edgekit.models.reparam import deploy
from edgekit.models.sgconv import SGConv, SGConvNet, num_scales

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAM_RANGES = {"sgconv_tiny": (50_000, 300_000), "sgconv_small": (300_000, 2_000_000)}


def images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_scale_count_covers_the_sequence():
    assert [num_scales(L, 32) for L in (16, 32, 33, 64, 256, 1024, 1000)] == [1, 1, 2, 2, 4, 6, 6]
    for length in (40, 256, 1000):
        layer = SGConv(4, length, kernel_dim=32)
        assert layer.kernel().shape == (4, length)
        assert sum(32 * 2 ** max(0, i - 1) for i in range(len(layer.kernels))) >= length


def test_kernel_is_interpolated_decayed_concatenated_and_normalised():
    torch.manual_seed(0)
    layer = SGConv(3, 64, kernel_dim=16, alpha=0.5)  # 3 scales: 16 + 16 + 32 taps = 64
    subs = list(layer.kernels)
    expected = torch.cat(
        [F.interpolate(s.detach().unsqueeze(0), size=16 * 2 ** max(0, i - 1), mode="linear")[0] * 0.5**i for i, s in enumerate(subs)], dim=-1
    )[:, :64]
    torch.testing.assert_close(layer.kernel().detach(), expected / expected.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)
    # normalised at initialisation: unit norm per channel, and the norm stays a constant afterwards
    torch.testing.assert_close(layer.kernel().detach().norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        layer.kernels[0].mul_(2.0)
    assert float(layer.kernel().detach().norm(dim=-1).min()) > 1.0


@pytest.mark.parametrize("mode", MODES)
def test_layer_deploy_parity_and_frozen_kernel(mode):
    torch.manual_seed(1)
    layer = SGConv(6, 100, kernel_dim=8, deploy_mode=mode).eval()
    x = torch.randn(2, 6, 100)
    with torch.no_grad():
        ref = layer(x)
        layer.train()
        train_out = layer(x)  # the FFT training path computes the same thing
        layer.eval()
        layer.reparameterize()
        got = layer(x)
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 1e-5 * scale and float((train_out - ref).abs().max()) <= 1e-5 * scale
    assert list(layer.parameters()) == [] and isinstance(layer.conv, LongConv1d) and layer.conv.mode == mode
    assert not any(name.startswith(("interp", "kernel_norm")) for name, _ in layer.named_buffers())
    frozen = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.reparameterize()  # a second call changes nothing
    assert all(torch.equal(frozen[k], v) for k, v in layer.state_dict().items())


def test_skip_is_folded_into_tap_zero():
    torch.manual_seed(2)
    layer = SGConv(4, 32, kernel_dim=8).eval()
    k, skip = layer.kernel().detach(), layer.skip.detach().clone()
    layer.reparameterize()
    weight = layer.conv.weight[:, 0].flip(-1)  # direct stores the flipped kernel
    torch.testing.assert_close(weight[:, 0], k[:, 0] + skip)
    torch.testing.assert_close(weight[:, 1:], k[:, 1:])


@pytest.mark.parametrize("mode", MODES)
def test_model_deploy_parity_per_mode(mode):
    torch.manual_seed(0)
    model = create_model("sgconv_tiny", deploy_mode=mode).eval()
    deployed = deploy(model)
    x = images(3)
    with torch.no_grad():
        ref, got = model(x), deployed(x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert not any(isinstance(m, SGConv) and m.conv is None for m in deployed.modules())
    generator = [n for n, _ in deployed.named_parameters() if "sgconv" in n]
    assert generator == []  # no kernel-generator parameters left


@pytest.mark.parametrize("name", sorted(PARAM_RANGES))
def test_variants_shapes_and_params(name):
    model = create_model(name)
    low, high = PARAM_RANGES[name]
    assert low <= sum(p.numel() for p in model.parameters()) <= high
    assert model.eval()(images(2)).shape == (2, 10)
    assert create_model(name, num_classes=3).eval()(images(1)).shape == (1, 3)
    info = model_info(name)
    assert info.inputs[0].shape == ["batch", 3, 32, 32] and info.description.startswith("SGConv")


def test_bad_settings_give_clear_errors():
    with pytest.raises(ValueError, match="deploy_mode"):
        SGConv(4, 64, deploy_mode="winograd")
    with pytest.raises(ValueError, match="even image size"):
        SGConvNet(16, 1, image_size=31)


def test_monarch_deploy_form_exports_to_onnx_opset17(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = deploy(SGConvNet(16, 2, image_size=16, deploy_mode="monarch"))
    x = images(2, size=16)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["image"], dynamic_axes={"image": {0: "batch"}})
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(images(3, seed=4, size=16)).numpy()
    np.testing.assert_allclose(sess.run(None, {"image": images(3, seed=4, size=16).numpy()})[0], expected, atol=1e-5)
    assert "MatMul" in ops and "DFT" not in ops


def test_a_few_adam_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = SGConvNet(32, 2, image_size=16).train()
    x, y = images(32, size=16), torch.randint(0, 6, (32,), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
