"""tokens.transform: schedules, the compressed blocks on edgekit's ViT and a Hugging Face ViT, and their ONNX export."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.artifact import Artifact
from edgekit.compress.tokens.accounting import token_flops
from edgekit.compress.tokens.transform import (
    TokenTransform,
    TokenTransformConfig,
    apply_token_schedule,
    block_macs,
    explicit_schedule,
    model_dims,
    schedule_macs,
    solve_schedule,
)
from edgekit.errors import UserError
from edgekit.export.onnx import ExportOnnx, OnnxConfig
from edgekit.models.hf_vision import HFImageClassifier, is_vision_folder
from edgekit.models.vit import image_inputs, vit_micro
from edgekit.passes import PassContext


def _vit():
    torch.manual_seed(0)
    return vit_micro().eval()


def _artifact(module, inputs, builder=None):
    return Artifact(format="torch", inputs=inputs, task="classification", module=module, builder=builder)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64, num_labels=5)
    folder = tmp_path_factory.mktemp("hf_vit")
    ViTForImageClassification(config).eval().save_pretrained(folder)
    return folder


def _pixels(n=2, side=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((n, 3, side, side), dtype=np.float32))


def test_a_zero_schedule_leaves_the_logits_unchanged():
    model = _vit()
    x = _pixels()
    wrapped = apply_token_schedule(copy.deepcopy(model), "transform", [0, 0, 0, 0])
    torch.testing.assert_close(wrapped(x), model(x), atol=1e-6, rtol=0)


def test_hf_wrapper_matches_transformers_and_compresses_the_same_way(hf_folder):
    from transformers import ViTForImageClassification

    assert is_vision_folder(hf_folder)
    ref = ViTForImageClassification.from_pretrained(str(hf_folder), attn_implementation="eager").eval()
    model = HFImageClassifier.from_folder(hf_folder)
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(pixel_values=x).logits, atol=1e-5, rtol=0)
        wrapped = apply_token_schedule(copy.deepcopy(model), "tome", [0, 0, 0])
        torch.testing.assert_close(wrapped(x), model(x), atol=1e-5, rtol=0)
    assert model_dims(model) == {"tokens": 65, "dim": 32, "hidden": 64, "heads": 2, "depth": 3}


@pytest.mark.parametrize("anchors", ["attention", "matching"])
def test_flops_cut_schedule_meets_the_target_and_the_measured_tokens_follow_it(anchors):
    model = _vit()
    d = model_dims(model)
    key = "transform" if anchors == "attention" else "transform:matching"
    removes = solve_schedule(d["tokens"], d["depth"], d["dim"], d["hidden"], d["heads"], 0.3, 1, key)
    assert removes[0] == 0 and all(r > 0 for r in removes[1:])
    dense = schedule_macs(d["tokens"], [0] * 4, d["dim"], d["hidden"], d["heads"])
    assert schedule_macs(d["tokens"], removes, d["dim"], d["hidden"], d["heads"], key) <= 0.7 * dense
    wrapped = apply_token_schedule(copy.deepcopy(model), "transform", removes, anchors=anchors)
    measured = token_flops(wrapped, {"pixel_values": _pixels(1).numpy()})
    n = d["tokens"]
    for row, r in zip(measured["layers"], removes):
        assert row["tokens"] == n  # tokens entering the block
        assert row["macs"] == block_macs(n, n - r, d["dim"], d["hidden"], d["heads"], key)
        n -= r


def test_explicit_schedule_takes_token_counts_and_keep_ratios():
    assert explicit_schedule(65, 4, {1: 8, 2: 0.5}) == [0, 8, 28, 0]
    with pytest.raises(UserError, match="at most half"):
        explicit_schedule(65, 4, {0: 40})
    with pytest.raises(UserError, match="layers 0..3"):
        explicit_schedule(65, 4, {7: 2})


def test_config_takes_one_schedule():
    assert TokenTransformConfig(layers={1: 4}).flops_cut is None
    with pytest.raises(ValueError, match="not both"):
        TokenTransformConfig(layers={1: 4}, flops_cut=0.3)


def test_pass_records_schedule_and_accounting_and_rebuilds_from_its_builder(tmp_path):
    art = _artifact(_vit(), image_inputs(32), {"kind": "zoo", "name": "vit_micro", "args": {}})
    ctx = PassContext(workdir=tmp_path, log=lambda s: None)
    out = TokenTransform(TokenTransformConfig(method="prune", flops_cut=0.4)).run(art, ctx)
    info = ctx.metrics["tokens"]
    assert out.meta["tokens"] == info and info["method"] == "prune"
    assert info["block_macs_cut"] >= 0.4 and abs(info["block_macs_cut"] - info["analytic_block_cut"]) < 1e-3
    assert [row["tokens"] for row in info["layers"]] == info["tokens_in"]
    step = out.builder["transforms"][-1]
    assert step["kind"] == "tokens.transform"
    rebuilt = apply_token_schedule(vit_micro(), **step["args"])
    rebuilt.load_state_dict(out.module.state_dict())
    x = _pixels()
    torch.testing.assert_close(rebuilt.eval()(x), out.module(x))


def test_unsupported_models_are_named():
    from edgekit.models.digits_cnn import digits_cnn

    art = _artifact(digits_cnn(), [])
    with pytest.raises(UserError, match="DigitsCNN"):
        TokenTransform(TokenTransformConfig()).run(art, PassContext(workdir=Path(".")))


def _export_and_verify(artifact, tmp_path):
    tmp_path.mkdir()
    ctx = PassContext(workdir=tmp_path, dims={"batch": 1}, log=lambda s: None)
    ExportOnnx(OnnxConfig(verify={"samples": 3})).run(artifact, ctx)  # raises unless ONNX Runtime matches torch (atol 1e-4)
    return ctx.metrics["verify"]


@pytest.mark.parametrize("method", ["transform", "tome"])
def test_compressed_edgekit_vit_exports_and_matches_torch(method, tmp_path):
    art = _artifact(_vit(), image_inputs(32))
    out = TokenTransform(TokenTransformConfig(method=method, flops_cut=0.4)).run(art, PassContext(workdir=tmp_path, log=lambda s: None))
    verify = _export_and_verify(out, tmp_path / "onnx")
    assert verify["passed"] and verify["max_abs"] < 1e-4


def test_compressed_hf_vit_exports_and_matches_torch(hf_folder, tmp_path):
    model = HFImageClassifier.from_folder(hf_folder)
    art = _artifact(model, model.input_specs())
    out = TokenTransform(TokenTransformConfig(method="transform", layers={0: 16, 1: 0.6})).run(art, PassContext(workdir=tmp_path, log=lambda s: None))
    assert out.meta["tokens"]["tokens_in"] == [65, 49, 30]
    verify = _export_and_verify(out, tmp_path / "onnx")
    assert verify["passed"] and verify["max_abs"] < 1e-4
