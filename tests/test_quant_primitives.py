"""Quantization building blocks: primitives, observers, BatchNorm folding."""

import pytest
import torch
from torch import nn

from edgekit.compress.quantize import (
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    fold_batchnorm,
    make_observer,
    quantize,
    weight_qparams,
)
from edgekit.errors import UserError

SPECS = [
    QuantSpec(bits=b, symmetric=sym, signed=signed)
    for b in (4, 8)
    for sym in (True, False)
    for signed in (True, False)
    if signed or not sym
]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_round_trip_error_is_at_most_half_a_step(spec):
    x = torch.linspace(-3.0, 5.0, 1001)
    scale, zp = compute_qparams(x.min(), x.max(), spec)
    q = quantize(x, scale, zp, spec)
    assert q.dtype == spec.dtype
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    back = dequantize(q, scale, zp, spec)
    lo, hi = float((spec.qmin - zp) * scale), float((spec.qmax - zp) * scale)
    inside = (x >= lo) & (x <= hi)
    assert inside.float().mean() > 0.6  # the range really covers the data it was made from
    assert float((x - back)[inside].abs().max()) <= float(scale) / 2 + 1e-6
    assert torch.allclose(fake_quantize(x, scale, zp, spec), back)


def test_restricted_and_full_ranges():
    assert (QuantSpec(bits=8, symmetric=True).qmin, QuantSpec(bits=8, symmetric=True).qmax) == (-127, 127)
    assert (QuantSpec(bits=8).qmin, QuantSpec(bits=8).qmax) == (-128, 127)
    assert (QuantSpec(bits=4, signed=False).qmin, QuantSpec(bits=4, signed=False).qmax) == (0, 15)
    assert (QuantSpec(bits=4, symmetric=True).qmin, QuantSpec(bits=4, symmetric=True).qmax) == (-7, 7)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_zero_is_exact_asymmetric(bits, signed):
    spec = QuantSpec(bits=bits, signed=signed)
    for lo, hi in [(-0.37, 2.91), (0.5, 3.0), (-4.0, -1.0), (-1e-3, 1e3)]:
        scale, zp = compute_qparams(lo, hi, spec)
        assert spec.qmin <= int(zp) <= spec.qmax
        zero = torch.zeros(3)
        assert torch.equal(fake_quantize(zero, scale, zp, spec), zero)


def test_zero_range_gives_positive_scale():
    for spec in (QuantSpec(), QuantSpec(symmetric=True)):
        scale, zp = compute_qparams(0.0, 0.0, spec)
        assert float(scale) > 0
        assert torch.equal(fake_quantize(torch.zeros(4), scale, zp, spec), torch.zeros(4))


def test_per_channel_weight_scales():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).reshape(6, 1, 1, 1)
    spec = QuantSpec(bits=8, symmetric=True, per_channel=True)
    scale, zp = weight_qparams(w, spec)
    assert scale.shape == (6,) and torch.equal(zp, torch.zeros(6, dtype=torch.int64))
    assert torch.allclose(scale, w.abs().amax(dim=(1, 2, 3)) / 127)
    q = quantize(w, scale, zp, spec)
    back = dequantize(q, scale, zp, spec)
    assert torch.all((w - back).abs() <= scale.reshape(6, 1, 1, 1) / 2 + 1e-6)
    # the largest weight of each channel lands exactly on +-127
    assert torch.equal(q.abs().amax(dim=(1, 2, 3)), torch.full((6,), 127, dtype=torch.int8))


def test_per_channel_other_axis_and_per_tensor():
    w = torch.randn(4, 5)
    scale, _ = weight_qparams(w, QuantSpec(symmetric=True, per_channel=True, axis=1))
    assert torch.allclose(scale, w.abs().amax(dim=0) / 127)
    scale, _ = weight_qparams(w, QuantSpec(symmetric=True))
    assert scale.ndim == 0 and torch.isclose(scale, w.abs().max() / 127)


def test_ste_gradient_inside_and_outside():
    spec = QuantSpec(bits=8)
    scale, zp = compute_qparams(-1.0, 1.0, spec)
    x = torch.tensor([-5.0, -0.9, 0.0, 0.3, 0.99, 5.0], requires_grad=True)
    y = fake_quantize_ste(x, scale, zp, spec)
    assert torch.allclose(y, fake_quantize(x.detach(), scale, zp, spec))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_bad_bits():
    with pytest.raises(ValueError, match="4, 8"):
        QuantSpec(bits=16)


@pytest.fixture(scope="module")
def outlier_data():
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(500_000, generator=g), torch.tensor([25.0, -25.0])])


def _calibrate(method, data):
    obs = make_observer(method)
    for batch in data.split(100_000):  # the outliers arrive last: the histogram must grow
        obs.observe(batch)
    return obs


def _qmse(data, obs, spec):
    scale, zp = obs.qparams(spec)
    return float(((fake_quantize(data, scale, zp, spec) - data) ** 2).mean())


def test_minmax_keeps_outliers(outlier_data):
    assert _calibrate("minmax", outlier_data).range() == (-25.0, 25.0)


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_clipping_observers_drop_outliers(method, outlier_data):
    lo, hi = _calibrate(method, outlier_data).range()
    assert -20 < lo < -3 and 3 < hi < 20, (lo, hi)
    if method != "mse":  # percentile 99.99 and KL land near the Gaussian's tail
        assert 3.4 < hi < 4.5 and 3.4 < -lo < 4.5, (lo, hi)


def test_mse_beats_minmax_on_outliers(outlier_data):
    spec = QuantSpec(bits=8)
    mse = _qmse(outlier_data, _calibrate("mse", outlier_data), spec)
    assert mse < _qmse(outlier_data, _calibrate("minmax", outlier_data), spec)
    assert mse <= _qmse(outlier_data, _calibrate("percentile", outlier_data), spec)


def test_mse_clips_harder_at_4_bits(outlier_data):
    obs = _calibrate("mse", outlier_data)
    assert obs.range_for(QuantSpec(bits=4))[1] < obs.range_for(QuantSpec(bits=8))[1]


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_observers_on_nonnegative_data(method):
    x = torch.rand(20_000) * 6.0  # like ReLU outputs
    obs = make_observer(method)
    obs.observe(x)
    lo, hi = obs.range()
    assert lo >= 0 and 4.0 < hi <= 6.0 + 1e-6
    scale, zp = obs.qparams(QuantSpec(signed=False))
    assert int(zp) == 0 and float(scale) > 0


def test_observer_without_data():
    with pytest.raises(UserError, match="no finite values"):
        make_observer("mse").range()


def test_unknown_method_suggests():
    with pytest.raises(UserError, match="did you mean 'entropy'") as info:
        make_observer("entropie")
    assert "minmax, percentile, mse, entropy" in str(info.value)


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))


def test_fold_batchnorm_digits_cnn():
    from edgekit.models import create_model

    torch.manual_seed(0)
    model = create_model("digits_cnn").eval()
    _randomise_bn(model)
    folded = fold_batchnorm(model).eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())  # original untouched
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert float((model(x) - folded(x)).abs().max()) < 1e-5


def test_fold_linear_conv1d_and_skips():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3, bias=True),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24, 5),
        nn.BatchNorm1d(5, affine=False),
        nn.ReLU(),
        nn.BatchNorm1d(5),  # not after a layer: stays
    ).eval()
    _randomise_bn(model)
    folded = fold_batchnorm(model).eval()
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[5], nn.Identity)
    assert isinstance(folded[7], nn.BatchNorm1d)
    x = torch.randn(4, 3, 8)
    with torch.no_grad():
        assert float((model(x) - folded(x)).abs().max()) < 1e-5
