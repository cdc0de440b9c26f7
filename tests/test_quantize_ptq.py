"""quantize.ptq from the layers up: weight grids, the integer ONNX forms of each
quantized layer against their torch simulation, the pass through the pipeline
(export, reload, max_drop), recipe errors, bias correction and SmoothQuant."""

import copy
import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgekit.artifact import Artifact
from edgekit.cli import main
from edgekit.compress.quantize.calibrate import InputStats, correct_bias, set_qparams
from edgekit.compress.quantize.modules import LayerConfig, QuantLinear, apply_plan, quant_layers
from edgekit.compress.quantize.ptq import QuantizePTQ
from edgekit.pipeline import Pipeline
from edgekit.progress import Reporter
from edgekit.recipe import load_recipe
from tests.conftest import TINY_DIGITS, write_recipe


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- 1. per-output-channel int8 weight scales ------------------------------------------

@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("reduce_range, qmax", [(False, 127), (True, 63)])
def test_int8_weight_scales_are_per_output_channel(mode, reduce_range, qmax):
    torch.manual_seed(0)
    linear = nn.Linear(48, 12)
    with torch.no_grad():  # rows of very different magnitude: one scale per tensor would not do
        linear.weight.mul_(torch.logspace(-2, 1, 12)[:, None])
    layer = QuantLinear(linear, LayerConfig(mode, reduce_range=reduce_range))
    assert layer.cfg.w_qrange == (-qmax, qmax)

    layer.calibrate_weight(search=False)

    w = linear.weight.detach()
    scale = layer.w_scale
    assert tuple(scale.shape) == (12, 1)
    assert torch.all(layer.w_zero == 0)
    torch.testing.assert_close(scale[:, 0], w.abs().amax(dim=1) / qmax, rtol=1e-6, atol=0)
    assert float(scale.max() / scale.min()) > 100  # really one scale per row
    q = layer.int_weight()
    assert q.shape == (12, 48)
    assert np.array_equal(np.abs(q).max(axis=1), np.full(12, qmax))  # each row reaches +-qmax exactly
    err = (layer.quant_weight() - w).abs().detach()
    assert torch.all(err <= scale / 2 * (1 + 1e-5))  # within half a step of its own row
    assert float(err.max()) > 0  # and the weights really were rounded

    # the clipping search only ever narrows a row's range, never widens it
    full = scale.clone()
    layer.calibrate_weight()
    assert torch.all(layer.w_scale <= full * (1 + 1e-6))
    assert np.abs(layer.int_weight()).max() <= qmax


# -- 2. 4-bit weight-only blocks ---------------------------------------------------------

@pytest.mark.parametrize("symmetric, lo, hi", [(True, -7, 7), (False, 0, 15)])
def test_4bit_weight_only_groups(symmetric, lo, hi):
    torch.manual_seed(1)
    linear = nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight[:, 32:] *= 10  # the second block of every row is 10x larger
    # reduce_range only narrows int8 weights of integer kernels, never weight-only blocks
    cfg = LayerConfig("weight_only", bits=4, group_size=32, symmetric=symmetric, reduce_range=True)
    layer = QuantLinear(linear, cfg)
    assert cfg.w_qrange == (lo, hi)

    layer.calibrate_weight(search=False)

    assert tuple(layer.w_scale.shape) == (16, 2) and tuple(layer.w_zero.shape) == (16, 2)
    ratio = layer.w_scale[:, 1] / layer.w_scale[:, 0]
    assert torch.all((ratio > 3) & (ratio < 30)), ratio  # blocks run along the input dim, in order
    q = layer.int_weight()
    assert q.shape == (16, 64) and q.min() >= lo and q.max() <= hi
    blocks = q.reshape(16, 2, 32)
    if symmetric:
        assert torch.all(layer.w_zero == 0)
        assert np.array_equal(np.abs(blocks).max(axis=2), np.full((16, 2), 7))
    else:
        zero = layer.w_zero
        assert torch.all((zero >= 0) & (zero <= 15)) and torch.all(zero == zero.round())
        assert np.array_equal(blocks.min(axis=2), np.zeros((16, 2)))  # every block uses its full grid
        assert np.array_equal(blocks.max(axis=2), np.full((16, 2), 15))
    err = (layer.quant_weight() - linear.weight.detach()).reshape(16, 2, 32).abs().detach()
    assert torch.all(err <= layer.w_scale[..., None] / 2 * (1 + 1e-5))

    layer.calibrate_weight()  # with the clipping search the values still stay on the grid
    q = layer.int_weight()
    assert q.min() >= lo and q.max() <= hi


# -- 3. ONNX export of every layer form vs the torch simulation ---------------------------

class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.fc1 = nn.Linear(64, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 16)

    def forward(self, ids):
        return self.fc2(self.act(self.fc1(self.emb(ids))))


class ConvModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.c2 = nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


def _cfg(**kw) -> dict:
    return LayerConfig(**kw).to_dict()


# Static int8 also uses 7-bit weights: ONNX Runtime fuses the QDQ pattern into u8 x s8 kernels,
# which saturate on x86 CPUs without VNNI (the plan's reduce_range: auto does the same).
_DYN = dict(mode="dynamic", reduce_range=True)
_STATIC = dict(mode="static", reduce_range=True)
_WO4 = dict(mode="weight_only", bits=4, group_size=32)
_CASES = {
    "dynamic-int8": ("token", {"fc1": _cfg(**_DYN), "fc2": _cfg(**_DYN)}),
    "static-int8": ("token", {"fc1": _cfg(**_STATIC), "fc2": _cfg(**_STATIC)}),
    "weight_only-4bit-sym": ("token", {"fc1": _cfg(**_WO4), "fc2": _cfg(**_WO4)}),
    "weight_only-4bit-asym": ("token", {"fc1": _cfg(**_WO4, symmetric=False), "fc2": _cfg(**_WO4, symmetric=False)}),
    "weight_only-8bit": ("token", {"fc1": _cfg(mode="weight_only", bits=8, group_size=32), "fc2": _cfg(mode="weight_only", bits=8, group_size=32)}),
    "embedding-4bit-sym": ("token", {"emb": _cfg(**_WO4)}),
    "embedding-4bit-asym": ("token", {"emb": _cfg(**_WO4, symmetric=False)}),
    "conv-static": ("conv", {"c1": _cfg(**_STATIC), "c2": _cfg(**_STATIC)}),
    "conv-static-out_quant": ("conv", {"c1": _cfg(**_STATIC, out_quant=True), "c2": _cfg(**_STATIC, out_quant=True)}),
}


def _io_ranges(model: nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    """Real input and output (min, max) of every Linear / Conv2d on ``x``."""
    ins, outs, hooks = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hooks.append(m.register_forward_pre_hook(lambda m, a, n=name: ins.__setitem__(n, (float(a[0].min()), float(a[0].max())))))
            hooks.append(m.register_forward_hook(lambda m, a, o, n=name: outs.__setitem__(n, (float(o.min()), float(o.max())))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return ins, outs


def _tensors(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant node values by output name."""
    found = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _export(model: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, custom_opsets={"com.microsoft": 1},
                          input_names=["x"], output_names=["y"])
    return buf.getvalue()


def _check_graph(case: str, proto: onnx.ModelProto) -> None:
    nodes = list(proto.graph.node)
    ops = [n.op_type for n in nodes]
    consts = _tensors(proto)
    if case == "dynamic-int8":
        mm = [n for n in nodes if n.op_type == "MatMulInteger"]
        assert len(mm) == 2 and ops.count("DynamicQuantizeLinear") == 2 and "MatMul" not in ops
        weights = sorted((consts[n.input[1]] for n in mm), key=lambda w: -w.shape[0])
        assert [(w.dtype, w.shape) for w in weights] == [(np.int8, (64, 32)), (np.int8, (32, 16))]
        assert all(np.abs(w.astype(np.int32)).max() == 63 for w in weights)  # 7-bit grid (reduce_range)
    elif case in ("static-int8", "conv-static", "conv-static-out_quant"):
        dq_weights = [consts[n.input[0]] for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in consts]
        int8 = sorted(w.shape for w in dq_weights if w.dtype == np.int8)
        expected = [(32, 16), (64, 32)] if case == "static-int8" else [(4, 8, 3, 3), (8, 3, 3, 3)]
        assert int8 == expected, [(w.dtype, w.shape) for w in dq_weights]
        assert all(np.abs(w.astype(np.int32)).max() == 63 for w in dq_weights if w.dtype == np.int8)
        assert ops.count("QuantizeLinear") == (4 if case.endswith("out_quant") else 2)
        assert ("Conv" if case.startswith("conv") else "MatMul") in ops
        if case.startswith("conv"):  # biases on the int32 grid
            assert sum(w.dtype == np.int32 for w in dq_weights) == 2
    elif case.startswith("weight_only"):
        nb = [n for n in nodes if n.op_type == "MatMulNBits"]
        assert len(nb) == 2 and all(n.domain == "com.microsoft" for n in nb) and "MatMul" not in ops
        bits = 8 if case.endswith("8bit") else 4
        assert all(_attrs(n)["bits"] == bits and _attrs(n)["block_size"] == 32 for n in nb)
        assert sorted((_attrs(n)["K"], _attrs(n)["N"]) for n in nb) == [(32, 16), (64, 32)]
        assert all(len(n.input) == (4 if case.endswith("asym") else 3) for n in nb)  # zero points only when asymmetric
        packed = sorted((consts[n.input[1]] for n in nb), key=lambda b: -b.shape[0])
        assert [(b.dtype, b.shape) for b in packed] == [(np.uint8, (32, 2, 4 * bits)), (np.uint8, (16, 1, 4 * bits))]
    else:
        gb = [n for n in nodes if n.op_type == "GatherBlockQuantized"]
        assert len(gb) == 1 and gb[0].domain == "com.microsoft" and "Gather" not in ops
        assert _attrs(gb[0])["bits"] == 4 and _attrs(gb[0])["block_size"] == 32
        data = consts[gb[0].input[0]]
        assert data.dtype == np.uint8 and data.shape == (50, 32)  # two 4-bit values per byte
        assert len(gb[0].input) == (4 if case.endswith("asym") else 3)


@pytest.mark.parametrize("case", list(_CASES))
def test_onnx_export_matches_the_torch_simulation(case):
    kind, plan = _CASES[case]
    torch.manual_seed(0)
    if kind == "token":
        model = TokenModel().eval()
        x = torch.randint(0, 50, (4, 7), generator=_gen(1))
    else:
        model = ConvModel().eval()
        x = torch.rand(2, 3, 12, 12, generator=_gen(2)) * 2 - 0.5
    ins, outs = _io_ranges(model, x)
    with torch.no_grad():
        float_out = model(x)
    apply_plan(model, plan)
    layers = quant_layers(model)
    assert sorted(layers) == sorted(plan)
    for name, layer in layers.items():
        layer.calibrate_weight()
        if layer.cfg.mode == "static":
            layer.set_act_qparams(*ins[name])
            if layer.cfg.out_quant:
                layer.set_out_qparams(*outs[name])
    with torch.no_grad():
        ref = model(x).numpy()
    # the simulation really quantizes (otherwise the comparison below says nothing)
    assert float(np.abs(ref - float_out.numpy()).max()) > 1e-4 * float(np.abs(ref).max())

    data = _export(model, x)
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto)
    _check_graph(case, proto)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    assert out.shape == ref.shape
    rel = float(np.abs(out - ref).max() / np.abs(ref).max())
    assert rel < 0.02, (case, rel)
    if case.startswith(("weight_only", "embedding")):
        assert rel < 1e-5, (case, rel)  # float math on the same dequantized grid
    elif case in ("dynamic-int8", "static-int8"):
        # exact integer products, rescaled once (no requantized output): an input zero point
        # off by one step already costs ~3e-3 here
        assert rel < 1e-3, (case, rel)


# -- 4. the pass end to end -----------------------------------------------------------

def _recipe(ptq: str, export: bool = True) -> str:
    text = TINY_DIGITS.replace(
        "  - train.supervised: {epochs: 2}\n", f"  - train.supervised: {{epochs: 2}}\n  - quantize.ptq: {ptq}\n"
    )
    if not export:
        text = text.replace("export:\n  - onnx: {opset: 17}\n", "")
    # no benchmark: these tests are about accuracy and files
    return text.partition("bench:\n")[0] + "report: {formats: [json]}\n"


def _pipeline(tmp_path, text, seed: int) -> tuple[Pipeline, dict]:
    """Run ``text`` with its own trained-weights cache and a seeded model init.

    The zoo source is built with the global torch RNG (the recipe seed only reaches
    training), and train.supervised caches weights by recipe, not by init: a cache
    shared with other tests could hand this test weights trained from another init.
    """
    torch.manual_seed(seed)
    p = Pipeline(load_recipe(write_recipe(tmp_path, text)), tmp_path / "run", reporter=Reporter(quiet=True),
                 cache_dir=tmp_path / "cache")
    p.prepare()
    return p, p.run()


@pytest.fixture
def live_ptq(monkeypatch):
    """Keeps the artifacts the quantize.ptq pass returns (with their live modules)."""
    returned = []
    run = QuantizePTQ.run

    def keep(self, artifact, ctx):
        out = run(self, artifact, ctx)
        returned.append(out)
        return out

    monkeypatch.setattr(QuantizePTQ, "run", keep)
    return returned


def test_ptq_pass_end_to_end_exports_integer_onnx_and_reloads(tmp_path, live_ptq):
    p, report = _pipeline(tmp_path, _recipe("{latency_aware: false, sensitivity: false}"), seed=0)
    ids = [s["id"] for s in report["steps"]]
    assert ids == ["00-source", "01-train.supervised", "02-quantize.ptq", "03-export.onnx"]
    trained, quant, exported = report["steps"][1:]

    q = quant["metrics"]["quantize"]
    assert q["quantized_layers"] == 4 and q["skipped"] == {}  # 3 convs + the classifier, none left float
    assert q["integer"]["float_layers"] == 0
    assert q["integer"]["by_mode"] == {"static-8bit": 3, "dynamic-8bit": 1}
    assert "sensitivity" not in q and "latency" not in q

    model = onnx.load(str(tmp_path / "run/steps/03-export.onnx/artifact/model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6 and ops.count("MatMulInteger") == 1
    assert exported["metrics"]["verify"]["passed"]
    float_top1 = trained["metrics"]["accuracy"]["value"]
    assert float_top1 > 0.3  # trained well enough for the comparison to mean something
    assert abs(exported["metrics"]["accuracy"]["value"] - float_top1) <= 0.03
    assert abs(quant["metrics"]["accuracy"]["value"] - float_top1) <= 0.03

    # the saved step rebuilds from its builder (zoo model -> fold_bn -> quantize) and weights
    folder = tmp_path / "run/steps/02-quantize.ptq/artifact"
    builder = json.loads((folder / "artifact.json").read_text())["builder"]
    assert [t["kind"] for t in builder["transforms"]] == ["fold_bn", "quantize"]
    assert sorted(builder["transforms"][1]["args"]["layers"]) == ["classifier", "features.0.0", "features.1.0", "features.2.0"]
    reloaded = Artifact.load(folder).torch_module()
    (live,) = live_ptq
    live_module = live.torch_module()
    assert reloaded is not live_module
    assert {n: m.cfg for n, m in quant_layers(reloaded).items()} == {n: m.cfg for n, m in quant_layers(live_module).items()}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in reloaded.modules())
    x = torch.from_numpy(p.data.split("eval").feeds(1, batch_size=32)[0]["input"])
    with torch.no_grad():
        a, b = reloaded(x), live_module(x)
    assert a.shape == (32, 10)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# -- 5. max_drop --------------------------------------------------------------------

# cosine to the float outputs: any quantization lowers it, so with a budget of 0 every layer must back
# off (top-1 on 120 samples is too coarse: whether 4 bits cost a sample depends on the model's init)
def test_max_drop_backs_layers_off_until_the_budget_holds(tmp_path):
    metric = "cosine"
    text = _recipe("{weights: {bits: 4}, max_drop: {absolute: 0.0}, latency_aware: false, sensitivity: false}", export=False)
    text = text.replace("eval: {samples: 120}", "eval: {samples: 120, metric: cosine}")
    _pipeline(tmp_path, text, seed=0)
    folder = tmp_path / "run/steps/02-quantize.ptq"
    manifest = json.loads((folder / "manifest.json").read_text())
    q = manifest["metrics"]["quantize"]
    md = q["max_drop"]
    assert q["accuracy"]["metric"] == metric
    assert isinstance(md["met"], bool)
    assert md["allowed"] == 0.0
    assert q["accuracy"]["all_integer"] < q["accuracy"]["float"]  # 4-bit everywhere does lose accuracy here...
    rounds = md["rounds"]
    assert rounds  # ...so layers were backed off
    planned = {r["layer"] for r in q["layers"]}
    assert planned == {"classifier", "features.0.0", "features.1.0", "features.2.0"}
    assert all(r["layer"] in planned and r["action"] in ("4-bit -> 8-bit", "8-bit -> float") for r in rounds)
    for i, r in enumerate(rounds):  # a layer goes 4 -> 8 bits, and straight on to float if that is not enough
        if r["action"] == "8-bit -> float":
            assert i > 0 and (rounds[i - 1]["layer"], rounds[i - 1]["action"]) == (r["layer"], "4-bit -> 8-bit")
    assert md["final_drop"] == rounds[-1]["drop"]
    assert q["accuracy"]["quantized"] == pytest.approx(q["accuracy"]["float"] - md["final_drop"], abs=2e-6)
    floated = {r["layer"] for r in rounds if r["action"] == "8-bit -> float"}
    raised = {r["layer"] for r in rounds if r["action"] == "4-bit -> 8-bit"} - floated
    if md["met"]:
        assert md["final_drop"] <= md["allowed"]
        assert all(r["drop"] > 0 for r in rounds[:-1])  # it stops as soon as the budget holds
    else:
        assert floated == planned  # it gives up only with every layer back to float
    assert len(rounds) == 8 and floated == planned
    assert md["final_drop"] < 1e-4  # all float again (BN folded), so the outputs are the float ones
    # the final plan is what the artifact records and rebuilds
    assert {n for n, why in q["skipped"].items() if why == "moved to float by max_drop"} == floated
    layers = json.loads((folder / "artifact/artifact.json").read_text())["builder"]["transforms"][-1]["args"]["layers"]
    assert set(layers) == planned - floated
    assert {n for n, c in layers.items() if c["bits"] == 8} == raised
    assert all(c["bits"] == 4 for n, c in layers.items() if n not in raised)
    reloaded = Artifact.load(folder / "artifact").torch_module()
    assert {n: m.cfg.bits for n, m in quant_layers(reloaded).items()} == {n: c["bits"] for n, c in layers.items()}
    assert q["integer"]["integer_layers"] == len(layers)


def test_max_drop_without_eval_split_is_a_one_line_user_error(tmp_path, capsys):
    text = """
name: no-eval
model: {source: zoo:digits_cnn_tiny}
data: {calibration: {source: sklearn:digits, samples: 8}}
compress:
  - quantize.ptq: {max_drop: {absolute: 0.01}, latency_aware: false, sensitivity: false}
report: {formats: [json]}
"""
    with pytest.raises(SystemExit) as e:
        main(["compress", str(write_recipe(tmp_path, text)), "--run-dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "max_drop" in err and "eval" in err and "Traceback" not in err
    assert not (tmp_path / "run/steps/01-quantize.ptq").exists()


# -- 6. bad configs -----------------------------------------------------------------

@pytest.mark.parametrize(
    "setting, path, needle",
    [
        ("{weights: {bits: 3}}", "compress[1].quantize.ptq.weights.bits", "3"),
        ("{activations: {granularity: per_channel}}", "compress[1].quantize.ptq.activations", "per_channel"),
        ("{activations: {calibration: kl_magic}}", "compress[1].quantize.ptq.activations.calibration", "kl_magic"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "compress"])
def test_bad_quantize_settings_are_one_line_errors_naming_the_yaml_path(tmp_path, capsys, setting, path, needle, command):
    recipe = str(write_recipe(tmp_path, _recipe(setting)))
    args = ["recipe", "validate", recipe] if command == "validate" else ["compress", recipe, "--run-dir", str(tmp_path / "run"), "--quiet"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert path in lines[0] and needle in lines[0] and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# -- 7. bias correction ----------------------------------------------------------------

@pytest.mark.parametrize("cfg", [LayerConfig("weight_only", bits=4, group_size=32), LayerConfig("static", reduce_range=True)])
def test_bias_correction_removes_the_mean_output_shift(cfg):
    torch.manual_seed(3)
    float_layer = nn.Linear(64, 24)
    model = nn.Sequential(copy.deepcopy(float_layer))
    x = torch.randn(512, 64, generator=_gen(4)) * 0.5 + torch.linspace(0.5, 3.0, 64)  # nonzero mean per feature
    apply_plan(model, {"0": cfg.to_dict()})
    layer = model[0]
    st = InputStats(observer=None)
    for chunk in x.split(128):
        st.add(chunk, -1)
    layer.calibrate_weight(st.mean_sq)
    if cfg.mode == "static":
        layer.set_act_qparams(float(x.min()), float(x.max()))

    with torch.no_grad():
        ref = float_layer(x)
        before = (layer(x) - ref).mean(dim=0)
        corrected = correct_bias(model, {"0": st})
        after = (layer(x) - ref).mean(dim=0)
    assert corrected == ["0"]
    assert not torch.equal(layer.bias, float_layer.bias)  # the quantized layer's own bias moved
    assert float(before.abs().mean()) > 1e-3
    assert float(after.abs().mean()) < 0.25 * float(before.abs().mean()), (before.abs().mean(), after.abs().mean())
    assert float(after.abs().max()) < float(before.abs().max())


# -- 8. SmoothQuant ------------------------------------------------------------------

def test_smoothquant_lowers_the_error_of_a_layer_with_an_outlier_feature():
    torch.manual_seed(5)
    float_layer = nn.Linear(64, 32)
    calib = torch.randn(256, 64, generator=_gen(6))
    calib[:, 0] *= 50
    test = torch.randn(256, 64, generator=_gen(7))
    test[:, 0] *= 50
    with torch.no_grad():
        ref = float_layer(test)

    errors, chosen = {}, {}
    for smooth in (False, True):
        model = apply_plan(nn.Sequential(copy.deepcopy(float_layer)), {"0": _cfg(mode="dynamic", reduce_range=True, smooth=smooth)})
        st = InputStats(observer=None)
        st.add(calib, -1)
        chosen[smooth] = set_qparams(model, {"0": st}, clip_search=False, smooth_alpha=0.5)
        with torch.no_grad():
            errors[smooth] = float(((model(test) - ref) ** 2).mean() / (ref**2).mean())
        if smooth:
            s = model[0].smooth
            assert float(s[0]) > 3 * float(s[1:].median())  # the outlier feature is divided down the most
            torch.testing.assert_close(model[0].effective_weight() / s, float_layer.weight.detach())
    assert chosen[False] == {}
    assert chosen[True]["0"] is not None  # a smoothing strength was chosen, not "none"
    assert errors[True] < 0.5 * errors[False], errors
