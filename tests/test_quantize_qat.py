"""quantize.qat: STE gradients, BatchNorm folded while training, the pass end to end with resume,
and the pipeline pieces quantization brought (export of: STEP, report section, inspect --quant-debug)."""

import json

import numpy as np
import torch
from torch import nn

from edgekit.compress.quantize.modules import LayerConfig, QuantConv2d, QuantLinear, fake_quant
from edgekit.compress.quantize.qat_train import QuantConvBn2d
from edgekit.pipeline import Pipeline
from edgekit.progress import Reporter
from edgekit.recipe import load_recipe
from tests.conftest import TINY_DIGITS, write_recipe


def test_ste_gradient_is_one_inside_the_range_and_zero_outside():
    x = torch.tensor([-3.0, -0.4, 0.0, 0.7, 3.0], requires_grad=True)
    y = fake_quant(x, torch.tensor(0.1), torch.tensor(0.0), -10, 10, ste=True)  # range [-1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # the forward value is the quantized one, not x
    assert torch.allclose(y.detach(), torch.tensor([-1.0, -0.4, 0.0, 0.7, 1.0]))


def test_gradient_flows_through_a_quantized_linear_in_training_mode():
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(8, 4), LayerConfig("static", reduce_range=True))
    layer.calibrate_weight()
    layer.set_act_qparams(-2.0, 2.0)
    layer.train()
    x = torch.randn(16, 8, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def _conv_bn(seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    qconv = QuantConv2d(conv, LayerConfig("static", out_quant=False))
    qconv.set_act_qparams(-4.0, 4.0)
    return conv, bn, QuantConvBn2d(qconv, bn)


def test_folded_while_training_layer_deploys_as_the_same_folded_conv():
    _, _, layer = _conv_bn()
    layer.calibrate_weight()  # scales of the folded weight, as the pass sets them
    layer.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        training_form = layer(x)
        deployed = layer.to_folded().eval()(x)
    assert torch.allclose(training_form, deployed, atol=1e-5)


def test_before_freeze_batch_statistics_normalise_the_output():
    conv, bn, layer = _conv_bn()
    layer.train()
    x = torch.randn(8, 3, 8, 8) * 1.2 + 0.5  # inside the input range, so clipping does not bias it
    with torch.no_grad():
        out = layer(x)
    # per channel the output has BN's batch-normalised statistics: mean ~ beta, std ~ gamma
    mean = out.mean(dim=(0, 2, 3))
    std = out.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, bn.bias, atol=0.05)
    assert torch.allclose(std, bn.weight.abs(), rtol=0.05)
    # running statistics moved towards the batch's
    assert layer.bn.num_batches_tracked.item() == 1


QAT_DIGITS = TINY_DIGITS.replace(
    "  - train.supervised: {epochs: 2}\n",
    "  - train.supervised: {epochs: 3}\n"
    "  - quantize.qat: {weights: {bits: 4}, latency_aware: false, sensitivity: false, train: {epochs: 2, freeze_bn_after: 5}}\n",
).replace("  - onnx: {opset: 17}\n", "  - onnx: {opset: 17}\n    of: train.supervised\n  - onnx: {opset: 17}\n")


def _run(tmp_path, text, **kw):
    recipe = load_recipe(write_recipe(tmp_path, text))
    p = Pipeline(recipe, tmp_path / "run", reporter=Reporter(quiet=True), **kw)
    p.prepare()
    return p.run()


def test_qat_pass_exports_integer_onnx_beside_the_float_one_and_resumes(tmp_path):
    report = _run(tmp_path, QAT_DIGITS)
    ids = [s["id"] for s in report["steps"]]
    assert ids == ["00-source", "01-train.supervised", "02-quantize.qat", "03-export.onnx", "04-export.onnx"]
    trained, qat, float_onnx, int_onnx = report["steps"][1:]
    q = qat["metrics"]["quantize"]
    assert q["qat"]["epochs"] == 2 and q["qat"]["loss"] == "labels" and len(q["qat"]["loss_per_epoch"]) == 2
    assert q["integer"]["integer_layers"] == 4 and q["integer"]["float_layers"] == 0  # 3 convs W4A8, the 4-bit classifier
    assert float_onnx["of"] == "train.supervised"
    # the float export carries no integer kernels; the QAT export runs its layers in integer
    import onnx

    def ops(step):
        return {n.op_type for n in onnx.load(str(tmp_path / "run" / "steps" / step["id"] / "artifact" / "model.onnx")).graph.node}

    assert "DequantizeLinear" not in ops(float_onnx)
    assert {"DequantizeLinear", "MatMulNBits"} <= ops(int_onnx)
    assert int_onnx["metrics"]["verify"]["passed"]
    assert abs(int_onnx["metrics"]["accuracy"]["value"] - qat["metrics"]["accuracy"]["value"]) <= 0.02

    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Quantization (02-quantize.qat)" in md and "03-export.onnx of train.supervised" in md

    # the checkpoint of the last epoch makes a forced rerun resume instead of training again
    again = _run(tmp_path, QAT_DIGITS, force=True)
    assert again["steps"][2]["metrics"]["quantize"]["qat"]["resumed_from_epoch"] == 2


def test_inspect_quant_debug_names_layers(tmp_path, capsys):
    from edgekit.cli import main

    text = TINY_DIGITS.replace(
        "  - train.supervised: {epochs: 2}\n",
        "  - train.supervised: {epochs: 2}\n  - quantize.ptq: {latency_aware: false}\n",
    )
    _run(tmp_path, text)
    step = tmp_path / "run" / "steps" / "02-quantize.ptq"
    try:
        main(["inspect", "--quant-debug", "--json", str(step)])
    except SystemExit as e:
        assert e.code in (0, None)
    info = json.loads(capsys.readouterr().out)
    layers = [r["layer"] for r in info["layers"]]
    assert layers and all(np.isfinite(r["sqnr_db"]) and r["sqnr_db"] > 10 for r in info["layers"])
    assert set(info["worst"]) <= set(layers)
    # without the manifest's table it measures on synthetic inputs
    (step / "manifest.json").unlink()
    try:
        main(["inspect", "--quant-debug", "--json", str(step / "artifact")])
    except SystemExit as e:
        assert e.code in (0, None)
    live = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in live["layers"]] == layers and "synthetic" in live["source"]
