"""CLI commands other than compress: inspect, passes, models, recipe schema."""

import json

import pytest

from edgekit.cli import main


def run(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_inspect_onnx_with_dims(tmp_path, capsys):
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    torch.onnx.export(m, (torch.zeros(1, 5, 16),), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 1: "seq"}})
    code, out, _ = run(["inspect", str(tmp_path / "m.onnx"), "--json", "--dim", "seq=10"], capsys)
    info = json.loads(out)
    assert code == 0
    assert info["inputs"][0]["shape"] == ["batch", "seq", 16]
    assert info["params"] == 16 * 32 + 32 + 32 * 4 + 4
    assert info["macs"] == 10 * (16 * 32 + 32 * 4)


def test_inspect_zoo_table(capsys):
    code, out, _ = run(["inspect", "zoo:digits_cnn"], capsys)
    assert code == 0 and "params" in out and "Conv2d" in out


def test_inspect_bad_dim_is_usage_error(capsys):
    code, _, err = run(["inspect", "zoo:digits_cnn", "--dim", "seq"], capsys)
    assert code == 2 and "NAME=SIZE" in err


def test_passes_models_schema(capsys):
    assert run(["passes"], capsys)[1].count("export.onnx") == 1
    assert "digits_cnn" in run(["models", "digits*"], capsys)[1]
    assert "`model.source`" in run(["recipe", "schema"], capsys)[1]
