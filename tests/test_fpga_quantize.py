"""W4A8 quantization, lowering to the integer IR, and the fake-quant model against the integer reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from edgekit.fpga.ir import Graph
from edgekit.fpga.lower import ChannelBias, lower, plan_model
from edgekit.fpga.quantize import (
    INPUT_SCALE,
    calibrate,
    fake_quant_model,
    fold_batchnorm,
    quantize_weight,
    requant_multiplier,
)
from edgekit.fpga.reference import run_graph
from edgekit.models.codenet import CoDeNet, ConvBNAct, DeformConv3x3
from torch import nn

from edgekit.errors import UserError

SIZE = 64
SMALL = {"widths": (8, 16, 32, 64), "repeats": (1, 1, 1), "decoder_channels": (32, 16, 16), "head_channels": 16}


def tiny_codenet(variant: str, seed: int = 0) -> CoDeNet:
    """A small CoDeNet with BatchNorm statistics and offsets that look trained (untrained ones are near-constant)."""
    torch.manual_seed(seed)
    model = CoDeNet(3, variant, **SMALL)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
            if isinstance(mod, DeformConv3x3) and mod.offset is not None:
                mod.offset.weight.normal_(0, 0.05)
                mod.offset.bias.fill_(1.5 if mod.spec.shape == "square" else 0.0)
    return model.eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def square():
    model = tiny_codenet("dcn_dw_square_int")
    qp = calibrate(model, images(8, 1))
    return model, qp, lower(model, qp, SIZE)


@pytest.fixture(scope="module")
def conv3x3():
    model = tiny_codenet("conv3x3")
    qp = calibrate(model, images(8, 1))
    return model, qp, lower(model, qp, SIZE)


# -- BatchNorm folding ----------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dcn_dw_square_int", "dcn_dw"])
def test_fold_batchnorm_keeps_the_float_output(variant):
    model = tiny_codenet(variant)
    folded = fold_batchnorm(model)
    x = images(2, 5)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    # the deformable layer has no bias of its own: its BN leaves a ChannelBias
    assert isinstance(folded.decoder[0].bn, ChannelBias)
    assert folded.backbone.stem[0].conv.bias is not None


# -- integer parameters ----------------------------------------------------------------

def test_weights_are_4bit_per_channel_and_requant_matches_the_real_ratio(square):
    _, qp, _ = square
    checked = 0
    for lq in qp.layers.values():
        assert lq.weight.min() >= -7 and lq.weight.max() <= 7
        nonzero = np.abs(lq.weight.reshape(lq.weight.shape[0], -1)).max(axis=1)
        assert (nonzero[nonzero > 0] == 7).all()  # the channel's largest weight lands on the grid's end
        if lq.multiplier is None:
            continue
        assert lq.multiplier.min() >= 2**14 and lq.multiplier.max() < 2**15
        assert lq.shift.min() >= 1 and lq.shift.max() <= 62
        real = lq.input_scale * lq.weight_scale / lq.output_scale
        approx = lq.multiplier * np.power(2.0, -lq.shift.astype(np.float64))
        assert np.all(np.abs(approx - real) <= real * 2.0**-14)
        checked += 1
    assert checked > 20


def test_requant_multiplier_edges():
    assert requant_multiplier(1.0) == (2**14, 14)
    assert requant_multiplier(0.75) == (3 * 2**13, 15)
    m, s = requant_multiplier(2.0**-20 * (2**15 - 0.25) / 2**14)  # rounds up to 2^15: renormalised
    assert 2**14 <= m < 2**15 and m * 2.0**-s == pytest.approx(2.0**-19)
    with pytest.raises(UserError, match="shift"):
        requant_multiplier(2.0**-60)
    with pytest.raises(UserError, match="left shift"):
        requant_multiplier(2.0**15)


def test_zero_weight_channel_keeps_its_bias():
    w = np.zeros((3, 2, 1, 1))
    w[0, 0] = 0.7
    w[2, 1] = -0.35
    q, scale = quantize_weight(w)
    assert q[0, 0, 0, 0] == 7 and q[2, 1, 0, 0] == -7 and not q[1].any()
    assert scale[1] == pytest.approx(0.1) and np.isfinite(scale).all()


def test_tensors_joined_by_moves_share_one_scale(square):
    _, qp, graph = square
    moves = [op for op in qp.plan.ops if op.kind in ("concat", "split", "shuffle", "upsample")]
    assert {op.kind for op in moves} == {"concat", "split", "shuffle", "upsample"}
    for op in moves:
        scales = {qp.tensors[t].scale for t in op.inputs + op.outputs}
        assert len(scales) == 1, op.name
    # a concat's scale is the largest range of its group, not of one input
    cat = next(op for op in moves if op.kind == "concat")
    group = [t for t, tq in qp.tensors.items() if tq.scale == qp.tensors[cat.outputs[0]].scale]
    assert qp.tensors[cat.outputs[0]].scale == pytest.approx(max(qp.ranges.get(t, 0) for t in group) / 255)
    assert graph.tensor(graph.input).scale == INPUT_SCALE
    # a linear depthwise conv (no ReLU) is signed, a ReLU output unsigned
    dw = next(op for op in qp.plan.ops if op.kind == "conv" and op.groups > 1 and not op.relu)
    assert graph.tensor(dw.outputs[0]).signed and graph.layers[[la.name for la in graph.layers].index(dw.name)].clamp == (-127, 127)
    relu = next(op for op in qp.plan.ops if op.kind == "conv" and op.relu)
    assert not graph.tensor(relu.outputs[0]).signed


def test_percentile_calibration_clips_below_max():
    model = tiny_codenet("conv3x3")
    by_max = calibrate(model, images(4, 2))
    by_pct = calibrate(model, images(4, 2), method="percentile", percentile=99.0)
    ratios = [by_pct.tensors[t].scale / by_max.tensors[t].scale for t in by_max.tensors if by_max.tensors[t].bits == 8]
    assert max(ratios) <= 1.0 + 1e-12 and min(ratios) < 0.9
    with pytest.raises(UserError, match="method"):
        calibrate(model, images(2, 2), method="mse")


# -- lowering -------------------------------------------------------------------------

def test_lowered_square_graph_is_valid_and_complete(square, tmp_path):
    _, _, graph = square
    graph.validate()
    kinds = [la.kind for la in graph.layers]
    assert kinds.count("deform_dw") == 3 and {"conv", "split", "concat", "shuffle", "upsample"} <= set(kinds)
    deform = next(la for la in graph.layers if la.kind == "deform_dw")
    dil = graph.tensor(deform.inputs[1])
    assert (dil.bits, dil.signed, dil.scale, deform.bound) == (2, False, 1.0, 3)
    offset = next(la for la in graph.layers if deform.inputs[1] in la.outputs)
    assert offset.kind == "conv" and offset.clamp == (0, 3) and offset.kernel == 3
    assert graph.outputs == ["heatmap_out", "wh_out", "offset_out"]
    heads = [la for la in graph.layers if la.outputs[0] in graph.outputs]
    assert all(not la.requant and graph.tensor(la.outputs[0]).bits == 32 for la in heads)
    assert [graph.tensor(n).shape for n in graph.outputs] == [(3, 16, 16), (2, 16, 16), (2, 16, 16)]
    meta = graph.meta
    assert (meta["variant"], meta["bound"], meta["image_size"], meta["num_classes"]) == ("dcn_dw_square_int", 3, [64, 64], 3)
    assert [len(meta["output_scales"][n]) for n in graph.outputs] == [3, 2, 2]
    graph.save(tmp_path)
    again = Graph.load(tmp_path)
    assert [la.name for la in again.layers] == [la.name for la in graph.layers]


def test_lowered_conv3x3_graph_has_plain_convs(conv3x3):
    _, _, graph = conv3x3
    graph.validate()
    assert not any(la.kind == "deform_dw" for la in graph.layers)
    decoder = [la for la in graph.layers if la.source == "decoder.0.deform"]
    assert len(decoder) == 1 and decoder[0].kind == "conv" and decoder[0].kernel == 3 and decoder[0].groups == 1
    assert graph.meta["bound"] is None


def test_lower_calibrates_from_images():
    model = tiny_codenet("dw3x3")
    graph = lower(model, images(4, 3), SIZE)
    assert any(la.source == "decoder.0.deform" and la.groups == 64 for la in graph.layers)


# -- the fake-quant model against the integer reference ----------------------------------

def _uint8_images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("which", ["square", "conv3x3"])
def test_integer_reference_matches_fake_quant_within_one_lsb(which, request):
    _, qp, graph = request.getfixturevalue(which)
    fq = fake_quant_model(qp)
    imgs = _uint8_images(3, 7)
    out = fq(imgs.float() / 255).double().numpy()
    env_fq = fq.integer_forward(imgs.float() / 255)
    exact = 0
    for i in range(len(imgs)):
        env = run_graph(graph, imgs[i].numpy())
        ref = np.concatenate([env[n] * np.reshape(graph.meta["output_scales"][n], (-1, 1, 1)) for n in graph.outputs])
        lsb = np.concatenate([np.broadcast_to(np.reshape(graph.meta["output_scales"][n], (-1, 1, 1)), env[n].shape) for n in graph.outputs])
        assert np.all(np.abs(ref - out[i]) <= lsb * (1 + 1e-6))
        for name, value in env.items():  # every intermediate tensor too
            diff = np.abs(value - env_fq[name][i].numpy()).max()
            assert diff <= 1, name
            exact += diff == 0
    assert exact == len(imgs) * len(graph.tensors)  # in fact bit-exact


def test_fake_quant_tracks_the_float_model(square):
    model, qp, _ = square
    x = images(4, 9)
    with torch.no_grad():
        ref = model(x)
        err = (fake_quant_model(qp)(x) - ref).abs()
    assert err.mean().item() < 0.02 * ref.abs().mean().item()


def test_dilation_reaching_the_bound_is_identical_in_fake_quant_and_reference():
    model = tiny_codenet("dcn_dw_square_int", seed=3)
    bound = model.spec.bound
    calib = images(8, 4)
    # spread the first decoder layer's offset conv output over [0, N] and beyond
    deform = model.decoder[2].deform
    raw = []
    hook = deform.offset.register_forward_hook(lambda m, i, o: raw.append(o.detach() - m.bias.view(1, -1, 1, 1)))
    with torch.no_grad():
        model(calib)
        hook.remove()
        a = torch.cat(raw)
        k = bound / a.std().item()
        deform.offset.weight.mul_(k)
        deform.offset.bias.fill_(bound / 2 - k * a.mean().item())
    qp = calibrate(model, calib)
    graph = lower(model, qp, SIZE)
    layer = next(la for la in graph.layers if la.kind == "deform_dw" and la.source == "decoder.2.deform")
    dil = layer.inputs[1]
    fq = fake_quant_model(qp)
    imgs = _uint8_images(3, 11)
    env_fq = fq.integer_forward(imgs.float() / 255)
    # the float model's rule, round_half_up(clamp(conv, 0, N)), on the quantized input and 4-bit weights
    offset = next(op for op in qp.plan.ops if op.outputs == [dil])
    lq = qp.layers[offset.name]
    with torch.no_grad():
        q_conv = nn.Conv2d(deform.offset.in_channels, 1, 3, padding=1).double()
        q_conv.weight.copy_(torch.from_numpy(lq.weight * lq.weight_scale.reshape(-1, 1, 1, 1)))
        q_conv.bias.copy_(deform.offset.bias.double())
        rule_d = torch.floor(q_conv(env_fq[offset.inputs[0]] * lq.input_scale).clamp(0, bound) + 0.5).numpy()
    seen = set()
    for i in range(len(imgs)):
        env = run_graph(graph, imgs[i].numpy())
        np.testing.assert_array_equal(env[dil], env_fq[dil][i].numpy())
        np.testing.assert_array_equal(env[layer.outputs[0]], env_fq[layer.outputs[0]][i].numpy())
        seen |= set(np.unique(env[dil]).tolist())
        # M / 2^S differs from the real ratio by < 2^-15, so only values within that of a .5 can differ
        assert np.mean(env[dil] == rule_d[i]) > 0.95
    assert bound in seen and 0 in seen


# -- refusals ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dcn", "dcn_dw_bound", "dcn_dw_square"])
def test_float_only_variants_are_refused_but_fake_quantized(variant):
    model = tiny_codenet(variant)
    with pytest.raises(UserError, match=r"decoder\.0\.deform.*dcn_dw_square_int"):
        lower(model, images(2, 1), SIZE)
    qp = calibrate(model, images(4, 1))
    with pytest.raises(UserError, match=variant):
        lower(model, qp, SIZE)
    x = images(2, 9)
    with torch.no_grad():
        ref = model(x)
        err = (fake_quant_model(qp)(x) - ref).abs()
    assert err.mean().item() < 0.02 * ref.abs().mean().item()


class _Net(nn.Module):
    def __init__(self, body: nn.Module, fn=None):
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3)
        self.body = body
        self.fn = fn
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        y = self.body(y)
        if self.fn is not None:
            y = self.fn(y)
        return self.head(y)


@pytest.mark.parametrize(
    "body, fn, pattern",
    [
        (nn.Conv2d(8, 8, 5, padding=2), None, r"Conv2d 'body' with kernel \(5, 5\)"),
        (nn.Conv2d(8, 8, 3, stride=3, padding=1), None, r"Conv2d 'body' with stride \(3, 3\)"),
        (nn.Conv2d(8, 8, 3, padding=2, dilation=2), None, r"dilation \(2, 2\)"),
        (nn.Upsample(scale_factor=2, mode="bilinear"), None, r"nn.Upsample 'body' \(mode bilinear"),
        (nn.Sigmoid(), None, r"module 'body' of type Sigmoid"),
        (nn.Identity(), lambda y: torch.add(y, y), r"fx node 'add'"),
        (nn.Identity(), torch.sigmoid, r"fx node 'sigmoid'"),
    ],
)
def test_unsupported_ops_are_refused_by_name(body, fn, pattern):
    model = _Net(body, fn).eval()
    with pytest.raises(UserError, match=pattern) as info:
        plan_model(fold_batchnorm(model))
    assert "the FPGA flow supports" in str(info.value)


def test_relu_with_another_reader_is_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.act = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return torch.cat([self.act(y), y], dim=1)

    with pytest.raises(UserError, match="ReLU that does not directly follow"):
        plan_model(Branchy().eval())


def test_image_size_and_calibration_input_errors():
    model = tiny_codenet("conv3x3")
    with pytest.raises(UserError, match=r"\[B, 3, H, W\]"):
        calibrate(model, torch.rand(3, SIZE, SIZE))
    assert math.isclose(INPUT_SCALE, 1 / 255)
