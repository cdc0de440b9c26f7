"""The mobile CNN family: inverted residuals plus one attention block."""

import pytest

from edgekit.models import create_model, list_models, model_info

PARAM_RANGES = {"mobile_cnn_tiny": (30_000, 60_000), "mobile_cnn_small": (150_000, 300_000)}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_listed_with_digits_inputs():
    assert list_models("*mobile*") == ["mobile_cnn_small", "mobile_cnn_tiny"]
    info = model_info("mobile_cnn_tiny")
    assert info.task == "classification" and info.inputs[0].shape == ["batch", 1, 8, 8] and info.description


@pytest.mark.parametrize("name", sorted(PARAM_RANGES))
def test_forward_shape_and_size(name):
    import torch

    model = create_model(name)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert create_model(name, num_classes=4)(torch.rand(2, 1, 8, 8)).shape == (2, 4)
    low, high = PARAM_RANGES[name]
    assert low <= _count(model) <= high


def test_has_depthwise_convs_and_linear_attention():
    from torch import nn

    from edgekit.models.mobile_cnn import SelfAttention

    model = create_model("mobile_cnn_tiny")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs)
    attention = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert len(attention) == 1
    assert sum(isinstance(m, nn.Linear) for m in attention[0].modules()) == 4  # q, k, v, out


@pytest.mark.parametrize("name", sorted(PARAM_RANGES))
def test_exports_to_onnx(tmp_path, name):
    import warnings

    import numpy as np
    import onnxruntime as ort
    import torch

    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.rand(2, 1, 8, 8)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), input_names=["input"], dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], expected, atol=1e-4)


def test_a_few_adam_steps_reduce_the_loss():
    import torch

    torch.manual_seed(0)
    model = create_model("mobile_cnn_tiny").train()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
