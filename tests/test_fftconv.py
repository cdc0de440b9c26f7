"""Long causal depthwise convolution: FFT, direct and matmul-FFT (monarch) agree, and what exports where."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from edgekit.models.fftconv import (
    MODES,
    LongConv1d,
    MonarchDFT,
    direct_conv,
    fft_conv,
    long_conv,
    monarch_conv,
    monarch_factors,
    monarch_size,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (length, kernel taps): powers of two, odd sizes, a short kernel, a kernel longer than the input
SHAPES = [(64, 64), (100, 37), (1000, 1000), (300, 1000), (17, 5), (1024, 1024)]


def reference(x: torch.Tensor, k: torch.Tensor) -> np.ndarray:
    """float64 causal convolution by numpy, one channel at a time."""
    xs, ks = x.double().numpy(), k.double().numpy()
    out = np.zeros_like(xs)
    for b in range(xs.shape[0]):
        for c in range(xs.shape[1]):
            out[b, c] = np.convolve(xs[b, c], ks[c])[: xs.shape[-1]]
    return out


def inputs(length: int, taps: int, channels: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, length, generator=gen), torch.randn(channels, taps, generator=gen) / taps**0.5


def rel_err(got: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(got.detach().double().numpy() - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("length,taps", SHAPES)
def test_every_implementation_equals_the_float64_reference(length, taps):
    x, k = inputs(length, taps)
    ref = reference(x, k)
    for mode in MODES:
        assert rel_err(long_conv(x, k, mode), ref) < 1e-5, mode
        assert rel_err(LongConv1d(k, length, mode)(x), ref) < 1e-5, f"frozen {mode}"


def test_convolution_is_causal():
    x, k = inputs(50, 50)
    y = monarch_conv(x, k)
    x2 = x.clone()
    x2[..., 30:] += 1.0  # changing the future must not change the past
    for conv in (fft_conv, direct_conv, monarch_conv):
        torch.testing.assert_close(conv(x2, k)[..., :30], y[..., :30], atol=1e-5, rtol=0)


def test_fft_training_path_has_the_direct_gradients():
    x, k = inputs(40, 40)
    grads = []
    for conv in (fft_conv, direct_conv):
        kk = k.clone().requires_grad_(True)
        (conv(x, kk) * torch.linspace(-1, 1, 40)).sum().backward()
        grads.append(kk.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,radix", [(8, 32), (512, 32), (2048, 32), (2**17, 32), (64, 4)])
def test_monarch_factors_are_balanced_powers_of_two(n, radix):
    factors = monarch_factors(n, radix)
    assert int(np.prod(factors)) == n and max(factors) <= radix
    assert max(factors) <= 2 * min(factors)
    assert len(factors) == max(1, int(np.ceil(np.log2(n) / np.log2(radix))))


def test_monarch_size_is_the_next_power_of_two_without_wraparound():
    # the linear convolution has L + L_k - 1 samples (taps past L are dropped)
    assert monarch_size(1024, 1024) == 2048 and monarch_size(300, 1000) == 1024
    assert monarch_size(1000, 25) == 1024 and monarch_size(1000, 26) == 2048
    assert monarch_size(513, 1) == 1024 and monarch_size(1, 1) == 1


@pytest.mark.parametrize("n", [16, 256, 2048])
def test_monarch_dft_equals_numpy_fft_for_complex_input(n):
    gen = torch.Generator().manual_seed(n)
    xr, xi = torch.randn(3, n, generator=gen), torch.randn(3, n, generator=gen)
    yr, yi = MonarchDFT(n, radix=16)(xr, xi)
    ref = np.fft.fft(xr.double().numpy() + 1j * xi.double().numpy())
    got = yr.double().numpy() + 1j * yi.double().numpy()
    assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max()
    real_only, none = MonarchDFT(n, radix=16)(xr, xi, real_only=True)
    assert none is None and torch.allclose(real_only, yr, atol=1e-5)


def test_bad_settings_give_clear_errors():
    x, k = inputs(16, 16)
    with pytest.raises(ValueError, match="mode"):
        long_conv(x, k, "winograd")
    with pytest.raises(ValueError, match="mode"):
        LongConv1d(k, 16, "winograd")
    with pytest.raises(ValueError, match="powers of two"):
        monarch_factors(48)
    with pytest.raises(ValueError, match="same C"):
        fft_conv(x, k[:2])


def _onnx_run(module: torch.nn.Module, x: torch.Tensor, path, dynamo: bool = False, opset: int = 17) -> tuple[np.ndarray, set[str]]:
    import onnx
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, (x,), dynamo=True, opset_version=opset, input_names=["x"], verbose=False).save(str(path))
        else:
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})[0], {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("mode", ["monarch", "direct"])
def test_monarch_and_direct_export_to_onnx_opset17_with_parity(tmp_path, mode):
    x, k = inputs(300, 300, channels=4)
    module = LongConv1d(k, 300, mode).eval()
    got, ops = _onnx_run(module, x, tmp_path / "m.onnx")
    assert rel_err(torch.from_numpy(got), reference(x, k)) < 1e-5
    assert "DFT" not in ops and ("MatMul" in ops if mode == "monarch" else "Conv" in ops)


def test_fft_does_not_export_with_torchscript(tmp_path):
    x, k = inputs(64, 64)
    with pytest.raises(Exception, match="fft_rfft"):
        _onnx_run(LongConv1d(k, 64, "fft"), x, tmp_path / "f.onnx")


@pytest.mark.slow
def test_fft_exports_with_dynamo_as_onnx_dft(tmp_path):
    pytest.importorskip("onnxscript")
    x, k = inputs(64, 64)
    got, ops = _onnx_run(LongConv1d(k, 64, "fft"), x, tmp_path / "f.onnx", dynamo=True, opset=18)
    assert "DFT" in ops and rel_err(torch.from_numpy(got), reference(x, k)) < 1e-5


@pytest.mark.slow
def test_monarch_converts_to_tflite_with_parity():
    litert_torch = pytest.importorskip("litert_torch")
    x, k = inputs(200, 200, channels=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edge = litert_torch.convert(LongConv1d(k, 200, "monarch").eval(), (x,))
    assert rel_err(torch.from_numpy(np.asarray(edge(x))), reference(x, k)) < 1e-5
