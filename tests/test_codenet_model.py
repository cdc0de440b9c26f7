"""CoDeNet detector: deformable sampling geometry per variant, the model, the shapes dataset, CenterNet and AP50."""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from edgekit.models.centernet import (
    Detections,
    average_precision_50,
    centernet_loss,
    class_average_precisions,
    decode,
    encode_targets,
    evaluate_ap50,
    train_detector,
)
from edgekit.models.codenet import (
    VARIANTS,
    ChannelShuffle,
    CoDeNet,
    DeformConv3x3,
    DeformSpec,
    ShuffleUnit,
    count_macs,
    make_spec,
    model_size_bytes,
)
from edgekit.models.shapes_detection import make_dataset, render_scene
from torch import nn

from edgekit.errors import UserError

TINY = {"widths": (8, 16, 32, 64), "repeats": (1, 1, 1), "decoder_channels": (32, 24, 16), "head_channels": 16}
DEFORMABLE = [v for v, s in VARIANTS.items() if s.shape != "none"]


def _layer(variant: str, channels: int = 2, bound: int = 3, stride: int = 1) -> DeformConv3x3:
    torch.manual_seed(0)
    spec = make_spec(variant, bound)
    return DeformConv3x3(channels, channels, spec, stride).eval()


def _set_dilation_from_channel0(layer: DeformConv3x3) -> None:
    """Make the square window's raw dilation equal input channel 0 at the output pixel."""
    with torch.no_grad():
        layer.offset.weight.zero_()
        layer.offset.weight[0, 0, 1, 1] = 1.0
        layer.offset.bias.zero_()


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return ys, xs


TAPS = [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]


def _bilinear(image: np.ndarray, r: float, c: float) -> float:
    """Reference bilinear read of a 2D map with zeros outside."""
    r0, c0 = int(np.floor(r)), int(np.floor(c))
    fr, fc = r - r0, c - c0
    total = 0.0
    for dr, dc, wt in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rr, cc = r0 + dr, c0 + dc
        if 0 <= rr < image.shape[0] and 0 <= cc < image.shape[1]:
            total += wt * image[rr, cc]
    return total


def _reference_depthwise(x: np.ndarray, weight: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """out[c, y, x] = sum_k w[c, k] * bilinear(x[c], positions[k, y, x]) for batch item 0."""
    c, h, w = x.shape
    out = np.zeros((c, h, w))
    for ch in range(c):
        for y in range(h):
            for xx in range(w):
                for k in range(9):
                    out[ch, y, xx] += weight[ch, 0].reshape(-1)[k] * _bilinear(x[ch], *positions[k, y, xx])
    return out


# -- the variant table -------------------------------------------------------------

def test_variant_presets_match_the_paper_comparison():
    assert VARIANTS["conv3x3"] == DeformSpec(depthwise=False, shape="none")
    assert VARIANTS["dw3x3"] == DeformSpec(depthwise=True, shape="none")
    assert VARIANTS["dcn"] == DeformSpec(depthwise=False, shape="free", bound=None, integer=False)
    assert VARIANTS["dcn_dw"] == DeformSpec(depthwise=True, shape="free", bound=None, integer=False)
    assert VARIANTS["dcn_dw_bound"] == DeformSpec(depthwise=True, shape="free", bound=3, integer=False)
    assert VARIANTS["dcn_dw_square"] == DeformSpec(depthwise=True, shape="square", bound=3, integer=False)
    assert VARIANTS["dcn_dw_square_int"] == DeformSpec(depthwise=True, shape="square", bound=3, integer=True)
    assert make_spec("dcn_dw_square_int", 5).bound == 5 and make_spec("dcn_dw", 5).bound is None
    with pytest.raises(UserError, match="unknown deformable variant"):
        make_spec("dcn_square")
    with pytest.raises(UserError, match="bound"):
        make_spec("dcn_dw_square", 0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weight_and_offset_shapes(variant):
    spec = make_spec(variant)
    layer = DeformConv3x3(6, 6, spec)
    assert layer.weight.shape == ((6, 1, 3, 3) if spec.depthwise else (6, 6, 3, 3)) and layer.bias is None
    expected_offsets = {"none": None, "free": 18, "square": 1}[spec.shape]
    assert (layer.offset.out_channels if layer.offset is not None else None) == expected_offsets
    if spec.depthwise:
        with pytest.raises(UserError, match="depthwise"):
            DeformConv3x3(6, 8, spec)


# -- geometry: plain windows --------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("stride", [1, 2])
def test_initial_window_is_the_plain_3x3(variant, stride):
    """Fresh layers (zero offset weights) sample exactly the 3x3 grid and compute a plain (depthwise) conv."""
    layer = _layer(variant, channels=4, stride=stride)
    x = torch.randn(2, 4, 7, 9)
    pos = layer.sampling_positions(x)
    ho, wo = (7 - 1) // stride + 1, (9 - 1) // stride + 1
    assert pos.shape == (2, 9, ho, wo, 2)
    ys, xs = _grid(ho, wo)
    for k, (i, j) in enumerate(TAPS):
        assert torch.equal(pos[:, k, ..., 0], (ys * stride + i).expand(2, ho, wo))
        assert torch.equal(pos[:, k, ..., 1], (xs * stride + j).expand(2, ho, wo))
    reference = F.conv2d(x, layer.weight, None, stride, 1, 1, layer.groups)
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=2e-6)


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (16, 16), (12, 20)])
def test_whole_pixel_positions_read_exact_pixels(size):
    """Sampling at integer positions returns the pixel values bit for bit (0 outside), any map size."""
    h, w = size
    layer = _layer("dcn_dw", channels=3)
    x = torch.randn(1, 3, h, w)
    rng = np.random.default_rng(0)
    positions = torch.from_numpy(rng.integers(-3, max(h, w) + 3, (1, 9, h, w, 2)).astype(np.float32))
    samples = layer.sample(x, positions).view(1, 3, 9, h, w)
    padded = F.pad(x, (5, 5, 5, 5))
    rows, cols = positions[..., 0].long() + 5, positions[..., 1].long() + 5
    rows, cols = rows.clamp(0, h + 9), cols.clamp(0, w + 9)
    expected = padded[0][:, rows[0], cols[0]]  # (3, 9, h, w)
    assert torch.equal(samples[0], expected)


# -- geometry: square windows -------------------------------------------------------

@pytest.mark.parametrize("variant", ["dcn_dw_square", "dcn_dw_square_int"])
def test_square_window_taps_follow_the_per_pixel_dilation(variant):
    layer = _layer(variant, channels=2, bound=3)
    _set_dilation_from_channel0(layer)
    h, w = 6, 7
    raw = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.4, 1.6, 2.5, 2.49, 3.0001, 4.0, 7.5, -0.6, -3.0, 2.7])
    d_raw = raw.repeat(3)[: h * w].view(h, w)
    x = torch.zeros(1, 2, h, w)
    x[0, 0] = d_raw
    d = layer.dilation(x)[0, 0]
    clamped = d_raw.clamp(0, 3)
    expected = torch.floor(clamped + 0.5) if layer.spec.integer else clamped
    assert torch.equal(d, expected)
    assert d.max() == 3 and d.min() == 0  # N itself is reachable, beyond N and below 0 are clamped
    if layer.spec.integer:
        assert torch.equal(d, torch.round(d)) and d[0, 6] == 3 and d[1, 0] == 2  # 2.5 rounds up, 2.49 down
    pos = layer.sampling_positions(x)[0]
    ys, xs = _grid(h, w)
    for k, (i, j) in enumerate(TAPS):
        torch.testing.assert_close(pos[k, ..., 0], ys + i * d, rtol=0, atol=1e-6)
        torch.testing.assert_close(pos[k, ..., 1], xs + j * d, rtol=0, atol=1e-6)


def test_integer_square_window_matches_the_hardware_formula():
    """acc[c, y, x] = sum_ij w[c, i, j] * x[c, y + i d, x + j d] (0 outside), d = N included."""
    layer = _layer("dcn_dw_square_int", channels=3, bound=3)
    _set_dilation_from_channel0(layer)
    rng = np.random.default_rng(1)
    h, w = 8, 8
    x = torch.from_numpy(rng.normal(size=(1, 3, h, w)).astype(np.float32))
    x[0, 0] = torch.from_numpy(rng.choice([0.0, 1.0, 2.0, 3.0, 4.2, 2.6], size=(h, w)).astype(np.float32))
    x[0, 0, 3, 3] = 3.0  # the largest window, fully inside at the centre ...
    x[0, 0, 0, 7] = 3.0  # ... and hanging off the corner
    d = np.clip(np.floor(x[0, 0].numpy() + 0.5), 0, 3).astype(int)
    weight = layer.weight.detach().numpy()
    xn = x[0].numpy()
    expected = np.zeros((3, h, w))
    for c in range(3):
        for y in range(h):
            for xx in range(w):
                for i, j in TAPS:
                    r, col = y + i * d[y, xx], xx + j * d[y, xx]
                    if 0 <= r < h and 0 <= col < w:
                        expected[c, y, xx] += weight[c, 0, i + 1, j + 1] * xn[c, r, col]
    with torch.no_grad():
        out = layer(x)[0].numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_fractional_square_window_interpolates_bilinearly():
    layer = _layer("dcn_dw_square", channels=2, bound=3)
    _set_dilation_from_channel0(layer)
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(1, 2, 6, 6)).astype(np.float32))
    x[0, 0] = torch.from_numpy(rng.uniform(-0.5, 3.5, (6, 6)).astype(np.float32))
    with torch.no_grad():
        pos = layer.sampling_positions(x)[0].numpy()
        out = layer(x)[0].numpy()
    expected = _reference_depthwise(x[0].numpy(), layer.weight.detach().numpy(), pos)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


# -- geometry: free offsets ---------------------------------------------------------

def _free_offsets(layer: DeformConv3x3, dy: list[float], dx: list[float]) -> None:
    with torch.no_grad():
        layer.offset.weight.zero_()
        layer.offset.bias.copy_(torch.tensor([v for pair in zip(dy, dx) for v in pair]))


@pytest.mark.parametrize("variant", ["dcn", "dcn_dw"])
def test_free_offsets_are_unbounded(variant):
    layer = _layer(variant)
    dy = [0.5, -2.25, 10.0, 0.0, 0.0, -7.5, 1.0, 0.3, -0.3]
    dx = [-2.3, 0.0, 0.75, 20.0, 0.0, 0.0, -1.0, 4.0, 0.125]
    _free_offsets(layer, dy, dx)
    pos = layer.sampling_positions(torch.zeros(1, 2, 5, 6))[0]
    ys, xs = _grid(5, 6)
    for k, (i, j) in enumerate(TAPS):
        torch.testing.assert_close(pos[k, ..., 0], ys + i + dy[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(pos[k, ..., 1], xs + j + dx[k], rtol=0, atol=1e-5)


def test_bounded_free_offsets_clamp_each_displacement_to_n():
    layer = _layer("dcn_dw_bound", bound=3)
    dy = [0.5, -2.5, 10.0, 0.0, 2.0, -7.5, 2.5, 1.9, -0.3]
    dx = [-2.3, 0.0, 0.75, 20.0, 3.0, 0.0, -1.0, 4.0, -2.0]
    _free_offsets(layer, dy, dx)
    pos = layer.sampling_positions(torch.zeros(1, 2, 5, 6))[0]
    ys, xs = _grid(5, 6)
    for k, (i, j) in enumerate(TAPS):
        disp_y, disp_x = float(np.clip(i + dy[k], -3, 3)), float(np.clip(j + dx[k], -3, 3))
        torch.testing.assert_close(pos[k, ..., 0], ys + disp_y, rtol=0, atol=1e-5)
        torch.testing.assert_close(pos[k, ..., 1], xs + disp_x, rtol=0, atol=1e-5)
    # spot checks of the rule "displacement from the output pixel, not from the tap"
    assert pos[6, 0, 0, 0] == 3.0  # tap row +1 moved by 2.5: 3.5 -> 3
    assert pos[4, 0, 0, 0] == 2.0 and pos[4, 0, 0, 1] == 3.0  # centre tap moved by (2, 3): exactly N, kept
    assert pos[3, 2, 2, 1] == 2 + 3.0  # column -1 + 20 -> +3


def test_free_offsets_sample_bilinearly_with_zeros_outside():
    layer = _layer("dcn_dw_bound", channels=2, bound=3)
    rng = np.random.default_rng(3)
    with torch.no_grad():
        layer.offset.weight.normal_(0, 0.5)
        layer.offset.bias.normal_(0, 1.5)
    x = torch.from_numpy(rng.normal(size=(1, 2, 5, 6)).astype(np.float32))
    with torch.no_grad():
        pos = layer.sampling_positions(x)[0].numpy()
        out = layer(x)[0].numpy()
    assert (pos < 0).any() and (np.abs(pos - np.round(pos)) > 0.01).any()  # off the image and between pixels
    np.testing.assert_allclose(out, _reference_depthwise(x[0].numpy(), layer.weight.detach().numpy(), pos), rtol=0, atol=1e-5)


def test_full_deformable_conv_mixes_channels_with_shared_offsets():
    torch.manual_seed(0)
    layer = DeformConv3x3(3, 5, make_spec("dcn")).eval()
    with torch.no_grad():
        layer.offset.bias.normal_(0, 1.0)
    x = torch.randn(1, 3, 4, 5)
    with torch.no_grad():
        pos = layer.sampling_positions(x)[0].numpy()
        out = layer(x)[0].numpy()
    assert out.shape == (5, 4, 5)
    w = layer.weight.detach().numpy()
    xn = x[0].numpy()
    expected = np.zeros((5, 4, 5))
    for o in range(5):
        for y in range(4):
            for xx in range(5):
                for c in range(3):
                    for k in range(9):
                        expected[o, y, xx] += w[o, c].reshape(-1)[k] * _bilinear(xn[c], *pos[k, y, xx])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_integer_square_dilation_gets_a_straight_through_gradient():
    layer = _layer("dcn_dw_square_int", channels=2)
    x = torch.randn(1, 2, 8, 8)
    layer(x).square().sum().backward()
    assert layer.offset.weight.grad is not None and layer.offset.weight.grad.abs().sum() > 0


# -- the model ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_output_is_stride_4_with_classes_plus_4_channels(variant):
    torch.manual_seed(0)
    model = CoDeNet(num_classes=3, variant=variant, **TINY).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 7, 16, 16)
    assert torch.allclose(model.heatmap.out.bias, torch.full((3,), -2.19))
    deforms = [m for m in model.modules() if isinstance(m, DeformConv3x3)]
    assert len(deforms) == 3 and all(m.spec == VARIANTS[variant] for m in deforms)


@pytest.mark.parametrize("skips", [False, True])
def test_model_uses_only_the_lowerable_vocabulary(skips):
    """torch.fx with the three leaves sees only the modules and functions edgekit.fpga lowers."""
    from torch import fx

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, (DeformConv3x3, ChannelShuffle, nn.Upsample)) or super().is_leaf_module(m, name)

    model = CoDeNet(**TINY, skips=skips)
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 7, 16, 16)
    graph = Tracer().trace(model)
    allowed_modules = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Identity, nn.Upsample, ChannelShuffle, DeformConv3x3)
    functions = set()
    for node in graph.nodes:
        assert node.op in ("placeholder", "output", "call_module", "call_function"), node.format_node()
        if node.op == "call_module":
            assert isinstance(model.get_submodule(node.target), allowed_modules), node.target
        elif node.op == "call_function":
            functions.add(node.target)
    assert functions == {torch.cat, torch.chunk, operator.getitem}
    units = sum(isinstance(m, ShuffleUnit) for m in model.modules())
    concats = sum(node.target is torch.cat for node in graph.nodes)
    assert units == 6 and concats == units + 1 + 2 * skips  # one per shuffle unit, the heads, the skips
    ups = [m for m in model.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == 3 and all(u.scale_factor == 2 and u.mode == "nearest" for u in ups)


def test_channel_shuffle_permutation():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert ChannelShuffle(2)(x).flatten().tolist() == [0, 3, 1, 4, 2, 5]  # k reads (k % 2) * 3 + k // 2


def test_zoo_entries():
    from edgekit.models import create_model, list_models, model_info

    assert {"codenet_tiny", "codenet_conv3x3_tiny"} <= set(list_models("codenet*"))
    info = model_info("codenet_tiny")
    assert info.task == "detection" and info.inputs[0].name == "image" and info.inputs[0].shape == ["batch", 3, 128, 128]
    assert create_model("codenet_tiny").spec == VARIANTS["dcn_dw_square_int"]
    assert create_model("codenet_conv3x3_tiny").spec == VARIANTS["conv3x3"]
    model = create_model("codenet_tiny", variant="dcn_dw_bound", bound=2, num_classes=5)
    assert model.spec.bound == 2 and model.heatmap.out.out_channels == 5


def test_macs_and_size_by_hand():
    plain = CoDeNet(variant="dw3x3", **TINY)
    square = CoDeNet(variant="dcn_dw_square", **TINY)
    square_int = CoDeNet(variant="dcn_dw_square_int", **TINY)
    full = CoDeNet(variant="conv3x3", **TINY)
    p, s, si, f = (count_macs(m, 64) for m in (plain, square, square_int, full))
    # decoder maps at 64 x 64 input: 2x2 (64 ch), 4x4 (32 ch), 8x8 (24 ch)
    maps = [(64, 2 * 2), (32, 4 * 4), (24, 8 * 8)]
    offset_convs = sum(c * 9 * hw for c, hw in maps)  # one output channel, 3x3 over c inputs
    assert si.total - p.total == offset_convs and si.sampling == 0
    assert s.sampling == sum(3 * 9 * c * hw for c, hw in maps) and s.total == si.total + s.sampling
    assert f.total - p.total == sum((c * c * 9 - c * 9) * hw for c, hw in maps)
    deform = next(r for r in s.layers if r.kind == "deform")
    assert deform.macs == 64 * 9 * 4
    layer = DeformConv3x3(8, 8, make_spec("dcn_dw_square_int"))
    # weights 8*9 at 4 bits + offset conv 8*9 at 4 bits, one 32-bit bias per output channel (8 + 1)
    assert model_size_bytes(layer, 4) == (8 * 9 * 4 + 8 * 9 * 4 + 9 * 32) // 8
    assert model_size_bytes(layer, 8) == (8 * 9 * 8 * 2 + 9 * 32) // 8


# -- the dataset ----------------------------------------------------------------------

def test_dataset_is_deterministic_from_its_seed():
    a, b, c = make_dataset(12, seed=5, image_size=64), make_dataset(12, seed=5, image_size=64), make_dataset(12, seed=6, image_size=64)
    assert a.images.shape == (12, 64, 64, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images)
    assert all(np.array_equal(x, y) for x, y in zip(a.boxes, b.boxes)) and all(np.array_equal(x, y) for x, y in zip(a.labels, b.labels))
    assert not np.array_equal(a.images, c.images)
    t = a.tensor([0, 3])
    assert t.shape == (2, 3, 64, 64) and t.dtype == torch.float32 and torch.equal(t[1], torch.from_numpy(a.images[3]).permute(2, 0, 1).float() / 255)


def test_boxes_are_tight_around_the_drawn_objects():
    data = make_dataset(30, seed=7, image_size=128, max_objects=4)
    counts = [len(b) for b in data.boxes]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1
    assert set(np.concatenate(data.labels).tolist()) == {0, 1, 2}
    for i in range(30):
        scene = render_scene(7, i, 128, 4)
        assert np.array_equal(scene.image, data.images[i]) and np.array_equal(scene.boxes, data.boxes[i])
        for k, box in enumerate(scene.boxes):
            rows, cols = np.nonzero(scene.instances == k + 1)
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert 6 <= box[2] - box[0] <= 49 and 6 <= box[3] - box[1] <= 49
        for a in range(len(scene.boxes)):
            for b in range(a + 1, len(scene.boxes)):
                ba, bb = scene.boxes[a], scene.boxes[b]
                assert ba[2] <= bb[0] or bb[2] <= ba[0] or ba[3] <= bb[1] or bb[3] <= ba[1]  # objects never overlap


# -- CenterNet -----------------------------------------------------------------------

def _perfect_output(targets) -> torch.Tensor:
    b, c, h, w = targets.heatmap.shape
    out = torch.zeros(b, c + 4, h, w)
    out[:, :c] = torch.logit(targets.heatmap.clamp(1e-4, 1 - 1e-4))
    for i in range(b):
        for j in torch.nonzero(targets.mask[i]).flatten():
            y, x = divmod(int(targets.indices[i, j]), w)
            out[i, c : c + 2, y, x] = targets.wh[i, j]
            out[i, c + 2 :, y, x] = targets.offset[i, j]
    return out


def test_targets_decode_back_to_the_boxes():
    data = make_dataset(20, seed=3, image_size=128)
    targets = encode_targets(data.boxes, data.labels, 3, 128)
    assert targets.heatmap.shape == (20, 3, 32, 32)
    assert int(targets.heatmap.eq(1).sum()) == int(targets.mask.sum()) == sum(len(b) for b in data.boxes)
    detections = decode(_perfect_output(targets))
    assert average_precision_50(detections, data.boxes, data.labels, 3) == 1.0
    best = detections[0].boxes[0]
    assert np.abs(data.boxes[0] - best).sum(axis=1).min() < 1e-3  # the top detection is a true box, to the pixel
    loss = centernet_loss(_perfect_output(targets), targets)
    assert loss.size == 0 and loss.offset == 0 and loss.heatmap < 0.1
    bad = centernet_loss(torch.zeros_like(_perfect_output(targets)), targets)
    assert bad.total > 10 * loss.total


class _Oracle(nn.Module):
    """Serves precomputed outputs in order, one batch per call (stands in for a perfect detector)."""

    stride = 4

    def __init__(self, outputs: torch.Tensor):
        super().__init__()
        self.outputs, self.served = outputs, 0

    def forward(self, images):
        out = self.outputs[self.served : self.served + len(images)]
        self.served += len(images)
        return out


def test_evaluate_ap50_runs_the_model_in_batches():
    data = make_dataset(10, seed=4, image_size=64)
    perfect = _perfect_output(encode_targets(data.boxes, data.labels, 3, 64))
    assert evaluate_ap50(_Oracle(perfect), data, batch_size=4) == 1.0
    shifted = perfect.clone()
    shifted[:, 3:5] *= 3  # boxes 3x too large: IoU 1/9 everywhere
    assert evaluate_ap50(_Oracle(shifted), data, batch_size=4) == 0.0


def test_decode_keeps_local_peaks_only():
    out = np.full((1, 6, 8, 8), -10.0, np.float32)  # 2 classes
    out[0, 0, 2, 2], out[0, 0, 2, 3] = 3.0, 2.0  # a neighbour of a stronger peak is suppressed ...
    out[0, 1, 2, 3] = 2.5  # ... but not in another class
    out[0, 0, 6, 6] = 1.0
    out[0, 2:4] = 2.0  # w, h = 2 cells = 8 pixels
    out[0, 4:6] = 0.5  # centre offset half a cell
    det = decode(out, k=3)[0]
    assert det.labels.tolist() == [0, 1, 0]
    np.testing.assert_allclose(det.scores, 1 / (1 + np.exp(-np.array([3.0, 2.5, 1.0]))), rtol=1e-6)
    np.testing.assert_allclose(det.boxes, [[6, 6, 14, 14], [10, 6, 18, 14], [22, 22, 30, 30]], atol=1e-5)
    torch_det = decode(torch.from_numpy(out), k=3)[0]
    assert np.array_equal(torch_det.boxes, det.boxes) and np.array_equal(torch_det.labels, det.labels)


def _dets(boxes, scores, labels) -> Detections:
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32), np.asarray(labels, np.int64))


def test_ap50_hand_cases():
    gt_boxes = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([[5, 5, 15, 15]], np.float32)]
    gt_labels = [np.array([0, 0]), np.array([0])]
    perfect = [_dets(gt_boxes[0], [0.9, 0.8], [0, 0]), _dets(gt_boxes[1], [0.7], [0])]
    assert average_precision_50(perfect, gt_boxes, gt_labels, 1) == 1.0
    # ranked: TP (0.9), FP (0.8, wrong place), TP (0.7), FP (0.6, duplicate of a matched box); one box missed.
    # precision/recall: 1/1 @ 1/3, 1/2 @ 1/3, 2/3 @ 2/3, 2/4 @ 2/3 -> AP = 1/3 * 1 + 1/3 * 2/3 = 5/9
    mixed = [
        _dets([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8, 0.6], [0, 0, 0]),
        _dets([[5, 5, 15, 15]], [0.7], [0]),
    ]
    assert average_precision_50(mixed, gt_boxes, gt_labels, 1) == pytest.approx(5 / 9, abs=1e-12)
    # IoU exactly 0.5 counts (a 10x10 box against a 10x20 box containing it); just below does not
    half = [np.array([[0, 0, 10, 20]], np.float32)]
    assert average_precision_50([_dets([[0, 0, 10, 10]], [1.0], [0])], half, [np.array([0])], 1) == 1.0
    assert average_precision_50([_dets([[0, 0, 10, 9.9]], [1.0], [0])], half, [np.array([0])], 1) == 0.0
    # classes: a wrong label is a miss for both classes; a class without ground truth is left out of the mean
    two = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)]
    labels = [np.array([0, 1])]
    dets = [_dets([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 0])]
    aps = class_average_precisions(dets, two, labels, 3)
    assert aps[0] == pytest.approx(1.0) and aps[1] == 0.0 and np.isnan(aps[2])
    assert average_precision_50(dets, two, labels, 3) == pytest.approx(0.5)


# -- training ------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """Training is small: extra OpenMP threads only contend on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_short_training_lowers_the_loss_deterministically(one_thread):
    data = make_dataset(256, seed=0, image_size=64)
    torch.manual_seed(0)
    model = CoDeNet(variant="dcn_dw_square_int", **TINY)
    log = train_detector(model, data, steps=60, batch_size=16, lr=3e-3, seed=0)
    assert len(log.losses) == 60 and all(np.isfinite(log.losses))
    first, last = log.mean_loss(0, 5), log.mean_loss(-10, None)
    assert last < 0.8 * first, (first, last)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(0)
        runs.append(train_detector(CoDeNet(variant="dcn_dw_square_int", **TINY), data, steps=3, batch_size=16, lr=3e-3, seed=seed).losses)
    assert runs[0] == runs[1] and runs[0] != runs[2]  # the seed fixes batches, flips and so the whole run


# -- export --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dcn_dw_square_int", "dcn"])
def test_exports_to_onnx(tmp_path, variant):
    import warnings

    import onnxruntime as ort

    torch.manual_seed(0)
    model = CoDeNet(variant=variant, **TINY).eval()
    for m in model.modules():  # non-trivial windows, so the exported sampling is exercised
        if isinstance(m, DeformConv3x3):
            with torch.no_grad():
                m.offset.weight.normal_(0, 0.05)
    x = torch.rand(1, 3, 64, 64)
    path = tmp_path / "codenet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["image"], opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected, rtol=1e-3, atol=1e-3)
