"""Each bad input ends with exit code 2, one line naming problem and fix, no
traceback, and nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.cli import main
from tests.conftest import TINY_DIGITS, write_recipe


def run_cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    return e.value.code, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def compress(tmp_path, recipe_text, capsys, *extra):
    recipe = write_recipe(tmp_path, recipe_text)
    run_dir = tmp_path / "run"
    code, err = run_cli(["compress", str(recipe), "--run-dir", str(run_dir), "--quiet", *extra], capsys)
    return code, err, run_dir


def test_malformed_yaml(tmp_path, capsys):
    code, err, run_dir = compress(tmp_path, "name: x\nmodel: [unclosed\n", capsys)
    assert_user_error(code, err, "not valid YAML", "line")
    assert not run_dir.exists()


def test_unknown_key(tmp_path, capsys):
    code, err, run_dir = compress(tmp_path, TINY_DIGITS.replace("report:", "reprot:"), capsys)
    assert_user_error(code, err, "reprot: unknown key", "'report'")
    assert not run_dir.exists()


def test_unknown_pass(tmp_path, capsys):
    code, err, run_dir = compress(tmp_path, TINY_DIGITS.replace("train.supervised", "train.superviced"), capsys)
    assert_user_error(code, err, "compress[0]", "did you mean 'train.supervised'")
    assert not run_dir.exists()


def test_missing_model_file(tmp_path, capsys):
    code, err, run_dir = compress(tmp_path, TINY_DIGITS.replace("zoo:digits_cnn_tiny", "onnx:missing.onnx").replace("  - train.supervised: {epochs: 2}\n", "").replace("compress:\n", "").replace("export:\n  - onnx: {opset: 17}\n", ""), capsys)
    assert_user_error(code, err, "missing.onnx does not exist")
    assert not run_dir.exists()


def test_wrong_format_onnx_file(tmp_path, capsys):
    (tmp_path / "model.onnx").write_text("this is not a protobuf\n")
    text = "name: bad\nmodel: {source: onnx:model.onnx}\n"
    code, err, run_dir = compress(tmp_path, text, capsys)
    assert_user_error(code, err, "is not an ONNX model")
    assert not run_dir.exists()


def test_wrong_format_torch_file(tmp_path, capsys):
    (tmp_path / "weights.pt").write_text("plain text, not a state dict")
    text = "name: bad\nmodel: {source: torch:weights.pt, arch: digits_cnn}\n"
    code, err, run_dir = compress(tmp_path, text, capsys)
    assert_user_error(code, err, "not a torch state dict")
    assert not run_dir.exists()


def test_state_dict_of_other_architecture(tmp_path, capsys):
    import torch

    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "weights.pt")
    text = "name: bad\nmodel: {source: torch:weights.pt, arch: digits_cnn}\n"
    code, err, run_dir = compress(tmp_path, text, capsys)
    assert_user_error(code, err, "does not fit model.arch digits_cnn")


def test_pickled_object_is_refused(tmp_path, capsys):
    import torch

    from tests.factories import NotATensor

    torch.save({"x": NotATensor()}, tmp_path / "weights.pt")
    text = "name: bad\nmodel: {source: torch:weights.pt, arch: digits_cnn}\n"
    code, err, run_dir = compress(tmp_path, text, capsys)
    assert_user_error(code, err, "objects other than tensors")


def test_input_shape_mismatch(tmp_path, capsys):
    text = TINY_DIGITS.replace(
        "source: zoo:digits_cnn_tiny",
        "source: zoo:digits_cnn_tiny\n  inputs: [{name: input, shape: [batch, 3, 8, 8], dtype: float32}]",
    )
    code, err, run_dir = compress(tmp_path, text, capsys)
    assert_user_error(code, err, "do not fit", "[1, 3, 8, 8]")
    assert not run_dir.exists()


def test_python_source_not_opted_in(tmp_path, capsys):
    code, err, run_dir = compress(tmp_path, TINY_DIGITS.replace("zoo:digits_cnn_tiny", "python:tests.factories:mlp"), capsys)
    assert_user_error(code, err, "trust_python")
    assert not run_dir.exists()


def test_run_dir_of_another_recipe(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "steps").mkdir(parents=True)
    (run_dir / "run.json").write_text('{"name": "someone-else"}')
    before = sorted(p.name for p in run_dir.rglob("*"))
    code, err, _ = compress(tmp_path, TINY_DIGITS, capsys)
    assert_user_error(code, err, "someone-else", "--force")
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_non_run_folder_is_never_deleted(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("keep me")
    code, err, _ = compress(tmp_path, TINY_DIGITS, capsys, "--force")
    assert_user_error(code, err, "not an edgekit run")
    assert (run_dir / "precious.txt").read_text() == "keep me"


def test_pass_on_wrong_format(tmp_path, capsys):
    import torch

    m = torch.nn.Linear(4, 2)
    torch.onnx.export(m, (torch.zeros(1, 4),), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"])
    text = "name: bad\nmodel: {source: onnx:m.onnx}\nexport:\n  - onnx: {}\n"
    code, err, run_dir = compress(tmp_path, text, capsys)
    assert_user_error(code, err, "export[0].onnx", "torch")


def test_data_file_missing(tmp_path, capsys):
    code, err, run_dir = compress(tmp_path, TINY_DIGITS.replace("sklearn:digits", "npz:nothere.npz"), capsys)
    assert_user_error(code, err, "nothere.npz")
    assert not run_dir.exists()


def test_no_traceback_from_real_process(tmp_path):
    recipe = write_recipe(tmp_path, TINY_DIGITS.replace("epochs", "epoch"))
    proc = subprocess.run(
        [sys.executable, "-m", "edgekit", "compress", str(recipe), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "compress[0].train.supervised.epoch: unknown key; did you mean 'epochs'?" in proc.stderr


@pytest.mark.parametrize("name", ["quickstart.yaml", "minilm_onnx.yaml", "minilm_int8.yaml"])
def test_validate_command(tmp_path, capsys, root, name):
    with pytest.raises(SystemExit) as e:
        main(["recipe", "validate", str(root / "examples/recipes" / name)])
    assert e.value.code == 0
    assert "valid" in capsys.readouterr().out


def test_help_is_fast_and_light():
    code = "import sys, edgekit.cli; assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    proc = subprocess.run([sys.executable, "-m", "edgekit", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "compress" in proc.stdout


def test_hf_folder_that_transformers_cannot_load(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    code, err, run_dir = compress(tmp_path, "name: bad\nmodel: {source: 'hf:hf'}\n", capsys)
    assert_user_error(code, err, "cannot load a transformers model")
    assert not run_dir.exists()


def test_text_data_needs_a_tokenizer(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("a sentence\n")
    text = TINY_DIGITS.replace("sklearn:digits", "text:corpus.txt")
    code, err, run_dir = compress(tmp_path, text, capsys)
    assert_user_error(code, err, "needs a tokenizer")
    assert not run_dir.exists()
