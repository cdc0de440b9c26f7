"""Recipe schema: valid recipes load, bad ones fail with the YAML path and a fix."""

from pathlib import Path

import pytest

from edgekit.errors import UserError
from edgekit.recipe import apply_override, load_recipe, schema_reference
from tests.conftest import TINY_DIGITS, write_recipe


def test_bundled_recipes_validate(root):
    for path in (root / "examples" / "recipes").glob("*.yaml"):
        r = load_recipe(path)
        assert r.name and r.model.source


def test_steps_are_typed_pass_configs(tmp_path):
    r = load_recipe(write_recipe(tmp_path, TINY_DIGITS))
    assert [s.name for s in r.steps()] == ["train.supervised", "export.onnx"]
    assert r.compress[0].config.epochs == 2
    assert r.export[0].config.opset == 17
    assert r.canonical()["export"][0]["export.onnx"]["opset"] == 17


def _error(tmp_path, text, overrides=()):
    with pytest.raises(UserError) as e:
        load_recipe(write_recipe(tmp_path, text), list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_path_and_nearest(tmp_path):
    msg = _error(tmp_path, TINY_DIGITS.replace("samples: 16", "sample: 16"))
    assert "data.calibration.sample: unknown key" in msg and "'samples'" in msg


def test_unknown_top_level_key(tmp_path):
    msg = _error(tmp_path, TINY_DIGITS + "exports: []\n")
    assert "exports: unknown key" in msg and "'export'" in msg


def test_unknown_pass_suggests_nearest(tmp_path):
    msg = _error(tmp_path, TINY_DIGITS.replace("train.supervised:", "train.supervisd:"))
    assert "compress[0]" in msg and "train.supervised" in msg


def test_unknown_export_format(tmp_path):
    msg = _error(tmp_path, TINY_DIGITS.replace("- onnx:", "- onx:"))
    assert "export[0]" in msg and "'onnx'" in msg


def test_pass_config_error_has_full_path(tmp_path):
    msg = _error(tmp_path, TINY_DIGITS.replace("epochs: 2", "epochs: lots"))
    assert msg.startswith(str(tmp_path / "recipe.yaml") + ": compress[0].train.supervised.epochs")


def test_pass_config_unknown_key(tmp_path):
    msg = _error(tmp_path, TINY_DIGITS.replace("opset: 17", "opsett: 17"))
    assert "export[0].onnx.opsett: unknown key" in msg and "'opset'" in msg


def test_literal_error_lists_choices(tmp_path):
    msg = _error(tmp_path, TINY_DIGITS.replace("runtimes: [onnxruntime]", "runtimes: [tensorrt]"))
    assert "bench.runtimes[0]" in msg and "onnxruntime" in msg


def test_malformed_yaml_names_line(tmp_path):
    msg = _error(tmp_path, "name: x\nmodel: {source: zoo:digits_cnn\n")
    assert "not valid YAML" in msg and "line" in msg


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_python_source_needs_opt_in(tmp_path):
    text = TINY_DIGITS.replace("zoo:digits_cnn_tiny", "python:os.path:join")
    msg = _error(tmp_path, text)
    assert "trust_python" in msg and msg.count(":") >= 2


def test_python_source_with_opt_in_validates(tmp_path):
    text = TINY_DIGITS.replace("source: zoo:digits_cnn_tiny", "source: python:mypkg.mod:build\n  trust_python: true")
    r = load_recipe(write_recipe(tmp_path, text))
    assert r.model.kind == "python"


def test_unknown_source_kind(tmp_path):
    msg = _error(tmp_path, TINY_DIGITS.replace("zoo:digits_cnn_tiny", "zo:digits_cnn_tiny"))
    assert "model.source" in msg and "'zoo'" in msg


def test_set_overrides(tmp_path):
    path = write_recipe(tmp_path, TINY_DIGITS)
    r = load_recipe(path, ["compress[0].train.supervised.epochs=5", "bench.threads=[1, 2]", "export[0].onnx.opset=18"])
    assert r.compress[0].config.epochs == 5
    assert r.bench.threads == [1, 2]
    assert r.export[0].config.opset == 18


def test_set_override_bad_index(tmp_path):
    with pytest.raises(UserError, match=r"index \[3\]"):
        load_recipe(write_recipe(tmp_path, TINY_DIGITS), ["compress[3].x=1"])


def test_set_override_validated(tmp_path):
    msg = _error(tmp_path, TINY_DIGITS, ["bench.repeats=0"])
    assert "bench.repeats" in msg


def test_apply_override_creates_missing_mapping():
    raw = {"name": "x"}
    apply_override(raw, "model.dims.seq=64")
    assert raw["model"]["dims"]["seq"] == 64


def test_pkg_paths_resolve_inside_installed_packages(tmp_path):
    r = load_recipe(write_recipe(tmp_path, TINY_DIGITS))
    assert (r.resolve("pkg:edgekit/recipe.py")).is_file()
    with pytest.raises(UserError, match="not installed"):
        r.resolve("pkg:no_such_package_xyz/model")


def test_relative_paths_start_at_recipe_folder(tmp_path):
    r = load_recipe(write_recipe(tmp_path, TINY_DIGITS))
    assert r.resolve("data/x.txt") == (tmp_path / "data" / "x.txt").resolve()


def test_schema_reference_covers_every_field(root):
    ref = schema_reference()
    for key in ("`model.source`", "`bench.threads`", "`data.eval.metric`", "`opset`", "`epochs`"):
        assert key in ref
    # The README's recipe reference is generated from the schema and must stay in step.
    readme = (root / "README.md").read_text()
    start = readme.index("<!-- recipe-reference:start -->") + len("<!-- recipe-reference:start -->")
    end = readme.index("<!-- recipe-reference:end -->")
    assert readme[start:end].strip() == ref.strip(), "README recipe reference is stale: run `python -m edgekit.docs`"
