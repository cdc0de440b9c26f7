"""The model zoo registry and the digits CNN."""

import subprocess
import sys

import pytest

from edgekit.errors import UserError
from edgekit.models import create_model, list_models, model_info


def test_list_and_info():
    assert {"digits_cnn", "digits_cnn_tiny"} <= set(list_models())
    assert list_models("digits*tiny") == ["digits_cnn_tiny"]
    info = model_info("digits_cnn")
    assert info.task == "classification" and info.inputs[0].shape == ["batch", 1, 8, 8] and info.description


def test_unknown_name_suggests_nearest():
    with pytest.raises(UserError, match="did you mean 'digits_cnn'"):
        create_model("digit_cnn")


def test_bad_argument_is_user_error():
    with pytest.raises(UserError, match="model.args"):
        create_model("digits_cnn", depth=3)


def test_digits_cnn_forward_and_sizes():
    import torch

    big, tiny = create_model("digits_cnn"), create_model("digits_cnn_tiny", num_classes=4)
    x = torch.rand(3, 1, 8, 8)
    assert big(x).shape == (3, 10) and tiny(x).shape == (3, 4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(tiny) < count(big) < 50_000


def test_import_stays_light():
    # importing the package must not import torch; the families load on first lookup
    out = subprocess.run([sys.executable, "-c", "import sys, edgekit.models; print('torch' in sys.modules)"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["digits_cnn", "digits_cnn_tiny"])
def test_digits_cnn_exports_to_onnx(tmp_path, name):
    import warnings

    import numpy as np
    import onnxruntime as ort
    import torch

    model = create_model(name).eval()
    x = torch.rand(2, 1, 8, 8)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), input_names=["input"], dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x[:1].numpy()})[0]  # batch is dynamic
    np.testing.assert_allclose(out, model(x[:1]).detach().numpy(), atol=1e-5)
