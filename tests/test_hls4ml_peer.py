"""The hls4ml peer of the CoDeNet side-by-side: hls4ml's C-simulation equals the fixed-point reference bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("hls4ml", reason="hls4ml is not installed (pip install edgekit[fpga]); the hls4ml peer needs it")

from bench.hls4ml_peer import (
    fixed_point_reference,
    plan_fixed_point,
    run_hls4ml_peer,
    small_conv_net,
)


def kernel_matched_image(net, size: int = 16) -> np.ndarray:
    """An image tiled with the sign pattern of the strongest first-layer filter, to drive its ReLU into saturation."""
    weight = net[0].weight.detach().numpy()
    bias = net[0].bias.detach().numpy()
    channel = int(np.argmax(np.clip(weight, 0, None).sum(axis=(1, 2, 3)) + bias))
    rows, cols = np.indices((size, size))
    planes = [(weight[channel, c][(rows + 1) % 3, (cols + 1) % 3] > 0) * 255 for c in range(weight.shape[1])]
    return np.stack(planes)[None]


@pytest.mark.slow
def test_hls4ml_csim_matches_fixed_point_reference(tmp_path):
    net = small_conv_net(seed=0)
    random_images = np.random.default_rng(1).integers(0, 256, size=(3, 3, 16, 16))
    pixels = np.concatenate([random_images, kernel_matched_image(net)])

    # Activation ranges come from the random images only, so the matched image saturates.
    result = run_hls4ml_peer(net, pixels, str(tmp_path), calibration_pixels=random_images)

    plan = plan_fixed_point(net, random_images)
    trace: list[np.ndarray] = []
    fixed_point_reference(plan, pixels, trace)
    assert (trace[0][3] == 255).sum() > 0, "the matched image should exercise AP_SAT on the first ReLU"
    assert "AP_RND,AP_SAT" in result.precisions[0]["relu"]

    # hls4ml's C-simulation is bit-exact to the numpy model of its fixed-point types.
    assert result.hls4ml_out.shape == (4, 4, 16, 16)
    assert result.mismatches_vs_reference == 0
    np.testing.assert_array_equal(result.hls4ml_out, result.reference_out)
    assert np.abs(result.hls4ml_out).max() > 1.0  # not a degenerate all-zero network

    # Where nothing saturates, 8-bit activations stay close to the float model.
    float_peak = np.abs(result.float_out[:3]).max()
    assert np.abs(result.hls4ml_out[:3] - result.float_out[:3]).max() < 0.03 * float_peak
    assert result.max_abs_err_hls_vs_float > 0  # activations really were quantized

    assert any(name.endswith(".txt") for name in result.weight_files)
    assert result.estimates is not None and result.estimates.synthesis_report is None
