"""hls4ml as the peer for the CoDeNet FPGA flow: the same quantized conv net through hls4ml's C-simulation.

The network is an `nn.Sequential` of stride-1 `Conv2d` layers, each optionally followed by
`ReLU`, whose weights are already quantized: per tensor, w = w_int * 2**-k with w_int in
[-7, 7] (`snap_to_pow2_grid` puts any such model on that grid). Power-of-two scales are what
makes the comparison fair: hls4ml only has fixed-point types, and w_int * 2**-k is exactly an
`ap_fixed<4, 4-k>`. The fixed-point plan (`plan_fixed_point`) picks every hls4ml type so that:

- the input is uint8 pixels p read as ap_ufixed<8,0>, i.e. the value p / 256;
- accumulators (and the conv result type) are wide enough that the sum is exact;
- each ReLU output is ap_ufixed<8, I, AP_RND, AP_SAT>: an 8-bit unsigned integer with scale
  2**(I-8), rounded half up and clamped to [0, 255]; this is exactly edgekit's requantization
  (acc * M + 2**(S-1)) >> S with M / 2**S a power of two, so both tools see the same integers;
- a conv without ReLU (the last one) outputs the raw accumulator.

`fixed_point_reference` is a numpy integer model of those same types (AP_TRN/AP_RND rounding,
AP_WRAP/AP_SAT overflow) and `run_hls4ml_peer` builds the net with hls4ml's PyTorch frontend
(Vitis backend, io_stream by default), runs `compile()` + `predict()` (hls4ml's C-simulation,
g++ only, no Vivado/Vitis) and compares hls4ml with that reference and with the float model.

Layout: the torch model stays channels-first. hls4ml is configured with
ChannelsLastConversion='internal' (it converts weights and layers itself, but with io_stream it
cannot transpose the input), so this module transposes the input NCHW -> NHWC before
`predict()` and the flat NHWC output back to NCHW.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekit.errors import UserError

WEIGHT_BITS = 4
ACTIVATION_BITS = 8
INPUT_BITS = 8
# A bias is put on the 2**-(k + BIAS_EXTRA_FRAC) grid by `snap_to_pow2_grid`: that grid lies on
# the accumulator grid 2**-(f_in + k) whenever the layer input has >= 4 fractional bits, which
# holds for 8-bit activations with at most 4 integer bits (and for the 8-fractional-bit input).
BIAS_EXTRA_FRAC = 4

# What Vitis/Vivado HLS synthesis would add; hls4ml 1.3 has no estimator of its own.
SYNTHESIS_REPORT_FIELDS = (
    "<project>_prj/solution1/syn/report/<top>_csynth.xml, read by hls4ml.report.parse_vivado_report: "
    "BestLatency, WorstLatency, IntervalMin, IntervalMax (cycles), EstimatedClockPeriod, "
    "BRAM_18K, DSP, FF, LUT, URAM and the part's Available* counts; vivado_synth.rpt for post-synthesis "
    "LUT/FF/DSP/BRAM when the Vivado synthesis step is run"
)


@dataclass(frozen=True)
class FixedType:
    """An ap_fixed / ap_ufixed type: `width` bits, `integer` of them above the binary point."""

    width: int
    integer: int
    signed: bool = True
    rounding: str = "AP_TRN"
    saturation: str = "AP_WRAP"

    @property
    def frac(self) -> int:
        return self.width - self.integer

    def hls(self) -> str:
        """The C++ type name, which is also what hls4ml's config accepts."""
        base = "ap_fixed" if self.signed else "ap_ufixed"
        if self.rounding == "AP_TRN" and self.saturation == "AP_WRAP":
            return f"{base}<{self.width},{self.integer}>"
        return f"{base}<{self.width},{self.integer},{self.rounding},{self.saturation}>"

    def int_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.width - 1)), (1 << (self.width - 1)) - 1
        return 0, (1 << self.width) - 1

    def cast(self, value: np.ndarray, frac_in: int) -> np.ndarray:
        """Cast integers meaning value * 2**-frac_in to this type; returns integers at 2**-self.frac.

        Follows the ap_fixed rules: quantize first (AP_TRN = floor, AP_RND = floor(x + half LSB)),
        then handle overflow (AP_WRAP = two's complement wrap, AP_SAT = clamp).
        """
        v = np.asarray(value, dtype=np.int64)
        shift = frac_in - self.frac
        if shift > 0:
            if self.rounding == "AP_RND":
                v = (v + (1 << (shift - 1))) >> shift
            elif self.rounding == "AP_TRN":
                v = v >> shift
            else:
                raise ValueError(f"rounding mode {self.rounding} is not modelled")
        elif shift < 0:
            v = v << -shift
        lo, hi = self.int_range()
        if self.saturation == "AP_SAT":
            return np.clip(v, lo, hi)
        if self.saturation == "AP_WRAP":
            return (v - lo) % (1 << self.width) + lo
        raise ValueError(f"saturation mode {self.saturation} is not modelled")


@dataclass
class ConvPlan:
    """One Conv2d (+ optional ReLU) with its integer data and the hls4ml types that carry it."""

    weight_int: np.ndarray  # (O, C, kh, kw), value = weight_int * 2**-weight_frac
    weight_frac: int
    bias_int: np.ndarray  # (O,), value = bias_int * 2**-bias_t.frac
    padding: int
    input_t: FixedType
    weight_t: FixedType
    bias_t: FixedType
    accum_t: FixedType  # also the conv's result type, so the cast after the sum is exact
    relu_t: FixedType | None  # None: the layer outputs the raw accumulator


@dataclass
class FixedPointPlan:
    input_t: FixedType
    layers: list[ConvPlan]

    def precisions(self) -> list[dict[str, str]]:
        rows = []
        for layer in self.layers:
            row = {"weight": layer.weight_t.hls(), "bias": layer.bias_t.hls(), "accum": layer.accum_t.hls(), "result": layer.accum_t.hls()}
            if layer.relu_t is not None:
                row["relu"] = layer.relu_t.hls()
            rows.append(row)
        return rows


@dataclass
class Hls4mlEstimates:
    """What hls4ml can say about resources and latency without Vivado/Vitis HLS."""

    hls4ml_estimator: str
    synthesis_report: dict[str, Any] | None
    would_read: str
    # hls4ml's DSP-aware-pruning objective (VivadoDSPEstimator.layer_resources) reimplemented,
    # because that module imports tensorflow: DSP = n_weights / reuse_factor if weight width >= 9
    # else 0 (narrow products go to LUTs). A pruning heuristic, not a synthesis estimate.
    dsp_pruning_heuristic: dict[str, int]
    # Derived by this bench from the generated pragmas, not by hls4ml: each io_stream conv reads
    # one (zero-padded) pixel per PIPELINE II=reuse_factor cycles, and DATAFLOW overlaps layers,
    # so the design interval is at least the largest per-layer pixel count times reuse_factor.
    stream_interval_lower_bound_cycles: int | None


@dataclass
class PeerResult:
    hls4ml_out: np.ndarray  # (N, C, H, W) float64, hls4ml C-simulation
    reference_out: np.ndarray  # the numpy fixed-point reference of the same types
    float_out: np.ndarray  # the float torch model (same quantized weights, float activations)
    max_abs_err_hls_vs_reference: float
    mismatches_vs_reference: int
    output_lsb: float
    max_abs_err_hls_vs_float: float
    max_abs_err_reference_vs_float: float
    float_output_max_abs: float
    convert_seconds: float
    compile_seconds: float  # hls_model.compile(): writes the project and runs g++ (build_lib.sh)
    predict_seconds: float
    precisions: list[dict[str, str]]
    input_type: str
    io_type: str
    backend: str
    output_dir: str
    weight_files: dict[str, int] = field(default_factory=dict)  # path relative to output_dir -> bytes
    estimates: Hls4mlEstimates | None = None

    @property
    def bit_exact(self) -> bool:
        return self.mismatches_vs_reference == 0


def small_conv_net(seed: int = 0, channels: tuple[int, int, int, int] = (3, 8, 8, 4)) -> nn.Sequential:
    """The side-by-side network: conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv1x1, weights on the grid.

    Every output channel holds a weight of magnitude 7 * 2**-k, so edgekit's per-channel
    max|w|/7 quantizer finds the same integers and scale 2**-k as the per-tensor grid here.
    """
    c0, c1, c2, c3 = channels
    net = nn.Sequential(
        nn.Conv2d(c0, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c2, c3, 1),
    )
    rng = np.random.default_rng(seed)
    weight_fracs = (3, 4, 3)  # keep activations a few units wide for 3x3x3, 3x3x8 and 1x1x8 fan-ins
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv, k in zip(convs, weight_fracs):
            w_int = rng.integers(-7, 8, size=tuple(conv.weight.shape))
            flat = w_int.reshape(w_int.shape[0], -1)
            flat[np.arange(flat.shape[0]), rng.integers(0, flat.shape[1], flat.shape[0])] = rng.choice([-7, 7], flat.shape[0])
            conv.weight.copy_(torch.from_numpy(flat.reshape(w_int.shape) * 2.0**-k))
            b_int = rng.integers(-16, 17, size=conv.out_channels)
            conv.bias.copy_(torch.from_numpy(b_int * 2.0 ** -(k + BIAS_EXTRA_FRAC)))
    return net.eval()


def snap_to_pow2_grid(model: nn.Sequential, weight_bits: int = WEIGHT_BITS) -> nn.Sequential:
    """A copy of `model` whose conv weights are w_int * 2**-k per tensor (|w_int| <= 2**(bits-1) - 1).

    k is the largest exponent that keeps max|w| * 2**k within the integer range; biases go to the
    2**-(k + BIAS_EXTRA_FRAC) grid.
    """
    snapped = copy.deepcopy(model).eval()
    qmax = (1 << (weight_bits - 1)) - 1
    with torch.no_grad():
        for conv in _convs(snapped):
            w = conv.weight.double()
            peak = float(w.abs().max())
            k = math.floor(math.log2(qmax / peak)) if peak > 0 else 0
            conv.weight.copy_((torch.round(w * 2.0**k).clamp(-qmax, qmax) * 2.0**-k).float())
            if conv.bias is not None:
                grid = 2.0 ** (k + BIAS_EXTRA_FRAC)
                conv.bias.copy_((torch.round(conv.bias.double() * grid) / grid).float())
    return snapped


def plan_fixed_point(
    model: nn.Sequential,
    calibration_pixels: np.ndarray,
    act_int_bits: list[int] | None = None,
    weight_bits: int = WEIGHT_BITS,
) -> FixedPointPlan:
    """Choose every fixed-point type so hls4ml computes exactly the integers of the shared semantics.

    `calibration_pixels` (N, C, H, W) uint8 pick each ReLU output's integer bits I (smallest with
    255 * 2**(I-8) >= the float model's max activation) unless `act_int_bits` gives them.
    """
    stages = _stages(model)
    if act_int_bits is None:
        act_int_bits = _calibrate_int_bits(model, calibration_pixels)
    relu_count = sum(1 for _, relu in stages if relu)
    if len(act_int_bits) != relu_count:
        raise UserError(f"act_int_bits has {len(act_int_bits)} entries but the model has {relu_count} ReLUs; give one per ReLU.")

    input_t = FixedType(INPUT_BITS, 0, signed=False)
    current = input_t
    relu_index = 0
    layers = []
    for conv, relu in stages:
        w = conv.weight.detach().double().numpy()
        weight_frac, w_int = _pow2_integers(w, weight_bits, what="weight")
        b = conv.bias.detach().double().numpy() if conv.bias is not None else np.zeros(conv.out_channels)
        bias_frac, b_int = _exact_frac(b)
        weight_t = FixedType(weight_bits, weight_bits - weight_frac)
        bias_width = max(2, int(np.abs(b_int).max()).bit_length() + 1)
        bias_t = FixedType(bias_width, bias_width - bias_frac)

        product_frac = current.frac + weight_frac
        acc_frac = max(product_frac, bias_frac)
        # Largest |acc| over any input the input type can hold, at the accumulator's LSB.
        x_peak = max(abs(v) for v in current.int_range())
        sum_peak = (np.abs(w_int).reshape(w_int.shape[0], -1).sum(axis=1) * x_peak) << (acc_frac - product_frac)
        bias_peak = np.abs(b_int) << (acc_frac - bias_frac)
        acc_width = int((sum_peak + bias_peak).max()).bit_length() + 1
        if acc_width > 48:
            raise UserError(f"layer {len(layers)} needs a {acc_width}-bit accumulator; use smaller weights or fewer channels.")
        accum_t = FixedType(acc_width, acc_width - acc_frac)

        relu_t = None
        if relu:
            bits = act_int_bits[relu_index]
            relu_index += 1
            relu_t = FixedType(ACTIVATION_BITS, bits, signed=False, rounding="AP_RND", saturation="AP_SAT")
        layers.append(ConvPlan(w_int, weight_frac, b_int, int(conv.padding[0]), current, weight_t, bias_t, accum_t, relu_t))
        current = relu_t if relu_t is not None else accum_t
    return FixedPointPlan(input_t, layers)


def fixed_point_reference(plan: FixedPointPlan, pixels: np.ndarray, trace: list[np.ndarray] | None = None) -> np.ndarray:
    """The network in exact integer arithmetic on the plan's types; returns real values (N, C, H, W).

    If `trace` is a list, each layer's output integers (after its ReLU, if any) are appended to it.
    """
    x = np.asarray(pixels, dtype=np.int64)  # ap_ufixed<8,0> holds p / 256 as the integer p
    frac = plan.input_t.frac
    for layer in plan.layers:
        product_frac = frac + layer.weight_frac
        acc = _conv2d_int(x, layer.weight_int, layer.padding)
        acc = layer.accum_t.cast(acc, product_frac)  # each product cast to accum_t (exact by construction)
        acc = acc + layer.accum_t.cast(layer.bias_int, layer.bias_t.frac)[None, :, None, None]
        acc = layer.accum_t.cast(acc, layer.accum_t.frac)  # the running sum lives in accum_t
        frac = layer.accum_t.frac
        x = acc
        if layer.relu_t is not None:
            # nnet::relu: res = data > 0 ? data : 0, the assignment casting to the ReLU type.
            x = np.where(acc > 0, layer.relu_t.cast(acc, frac), 0)
            frac = layer.relu_t.frac
        if trace is not None:
            trace.append(x)
    return x.astype(np.float64) * 2.0**-frac


def float_reference(model: nn.Module, pixels: np.ndarray) -> np.ndarray:
    """The float model on the same input values p / 256, in float64."""
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float64) / 2**INPUT_BITS)
    with torch.no_grad():
        return _float64_copy(model)(x).numpy()


def hls4ml_config(model: nn.Sequential, plan: FixedPointPlan, input_shape: tuple[int, int, int], backend: str = "Vitis") -> dict[str, Any]:
    """hls4ml's per-layer config with every precision pinned to the plan (no 'auto')."""
    import hls4ml

    with contextlib.redirect_stdout(io.StringIO()):
        config = hls4ml.utils.config_from_pytorch_model(
            model, input_shape, granularity="name", backend=backend, channels_last_conversion="internal",
            default_precision="ap_fixed<32,16>",
        )
    names = list(config["LayerName"])
    modules = list(model)
    if len(names) != len(modules) + 1:
        raise UserError(f"hls4ml parsed {len(names) - 1} layers from {len(modules)} modules; use an nn.Sequential of Conv2d and ReLU only.")
    config["LayerName"][names[0]]["Precision"]["result"] = plan.input_t.hls()
    layer_iter = iter(plan.layers)
    layer = None
    for name, module in zip(names[1:], modules):
        precision = config["LayerName"][name]["Precision"]
        if isinstance(module, nn.Conv2d):
            layer = next(layer_iter)
            precision.update(weight=layer.weight_t.hls(), bias=layer.bias_t.hls(), accum=layer.accum_t.hls(), result=layer.accum_t.hls())
        else:
            precision["result"] = layer.relu_t.hls()
    return config


def run_hls4ml_peer(
    model: nn.Sequential,
    pixels: np.ndarray,
    work_dir: str,
    *,
    io_type: str = "io_stream",
    backend: str = "Vitis",
    calibration_pixels: np.ndarray | None = None,
    act_int_bits: list[int] | None = None,
    project_name: str = "hls4ml_peer",
) -> PeerResult:
    """Build `model` with hls4ml, C-simulate it on `pixels` (N, C, H, W uint8) and compare.

    The project goes to `work_dir`/hls4ml_prj. Needs hls4ml and g++; no Vivado/Vitis, no network.
    """
    import hls4ml

    if shutil.which("g++") is None:
        raise UserError("g++ is not on PATH; install g++ to run hls4ml's C-simulation.")
    pixels = _check_pixels(pixels)
    model = model.eval()
    plan = plan_fixed_point(model, pixels if calibration_pixels is None else _check_pixels(calibration_pixels), act_int_bits)
    output_dir = os.path.join(work_dir, "hls4ml_prj")
    input_shape = tuple(int(d) for d in pixels.shape[1:])

    start = time.perf_counter()
    config = hls4ml_config(model, plan, input_shape, backend)
    with contextlib.redirect_stdout(io.StringIO()):
        hls_model = hls4ml.converters.convert_from_pytorch_model(
            model, output_dir=output_dir, project_name=project_name, backend=backend, io_type=io_type, hls_config=config,
        )
    convert_seconds = time.perf_counter() - start

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        hls_model.compile()
    compile_seconds = time.perf_counter() - start

    # float64 input selects the <project>_double entry point, so outputs come back without float32 rounding.
    x = np.ascontiguousarray((pixels.astype(np.float64) / 2**INPUT_BITS).transpose(0, 2, 3, 1))
    start = time.perf_counter()
    flat = np.asarray(hls_model.predict(x), dtype=np.float64)
    predict_seconds = time.perf_counter() - start

    reference = fixed_point_reference(plan, pixels)
    n, c, h, w = reference.shape
    hls_out = flat.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    float_out = float_reference(model, pixels)
    out_frac = plan.layers[-1].relu_t.frac if plan.layers[-1].relu_t is not None else plan.layers[-1].accum_t.frac

    return PeerResult(
        hls4ml_out=hls_out,
        reference_out=reference,
        float_out=float_out,
        max_abs_err_hls_vs_reference=float(np.abs(hls_out - reference).max()),
        mismatches_vs_reference=int(np.count_nonzero(hls_out != reference)),
        output_lsb=2.0**-out_frac,
        max_abs_err_hls_vs_float=float(np.abs(hls_out - float_out).max()),
        max_abs_err_reference_vs_float=float(np.abs(reference - float_out).max()),
        float_output_max_abs=float(np.abs(float_out).max()),
        convert_seconds=convert_seconds,
        compile_seconds=compile_seconds,
        predict_seconds=predict_seconds,
        precisions=plan.precisions(),
        input_type=plan.input_t.hls(),
        io_type=io_type,
        backend=backend,
        output_dir=output_dir,
        weight_files=weight_files(output_dir),
        estimates=hls4ml_estimates(output_dir, hls_model, io_type),
    )


def weight_files(output_dir: str) -> dict[str, int]:
    """The generated weight files a user must ship, relative path -> bytes.

    firmware/weights/*.h carry the values as C initializers, used by HLS synthesis; in C-simulation
    the arrays are instead loaded at run time from the *.txt next to them, through the absolute
    WEIGHTS_DIR path compiled into the shared library (so the compiled .so is not relocatable).
    """
    files = sorted(glob.glob(os.path.join(output_dir, "firmware", "weights", "*")))
    return {os.path.relpath(p, output_dir): os.path.getsize(p) for p in files}


def hls4ml_estimates(output_dir: str, hls_model: Any, io_type: str) -> Hls4mlEstimates:
    """hls4ml 1.3 has no analytical resource/latency estimator: only synthesis reports give numbers."""
    import hls4ml

    reports = glob.glob(os.path.join(output_dir, "*_prj", "solution*", "syn", "report", "*_csynth.xml"))
    synthesis = None
    if reports:
        with contextlib.redirect_stdout(io.StringIO()):
            synthesis = hls4ml.report.parse_vivado_report(output_dir)

    dsp: dict[str, int] = {}
    pixels_per_layer = []
    for layer in hls_model.get_layers():
        if "Conv" in layer.class_name:
            weight = layer.weights["weight"]
            reuse = int(layer.get_attr("reuse_factor", 1))
            width = weight.type.precision.width
            dsp[layer.name] = int(weight.data_length // reuse) if width >= 9 else 0
            pixels_per_layer.append(int(layer.get_attr("in_height")) * int(layer.get_attr("in_width")) * reuse)
    interval = max(pixels_per_layer) if io_type == "io_stream" and pixels_per_layer else None
    return Hls4mlEstimates(
        hls4ml_estimator="none: not available without Vitis/Vivado HLS synthesis (hls4ml 1.3 only parses synthesis reports)",
        synthesis_report=synthesis,
        would_read=SYNTHESIS_REPORT_FIELDS,
        dsp_pruning_heuristic=dsp,
        stream_interval_lower_bound_cycles=interval,
    )


# --- helpers -----------------------------------------------------------------------------------


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _stages(model: nn.Module) -> list[tuple[nn.Conv2d, bool]]:
    """(conv, followed_by_relu) pairs; anything else is a user error."""
    if not isinstance(model, nn.Sequential):
        raise UserError("the hls4ml peer takes an nn.Sequential of Conv2d and ReLU layers; rebuild the model as one.")
    stages: list[tuple[nn.Conv2d, bool]] = []
    for module in model:
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise UserError("hls4ml's PyTorch frontend rejects grouped/depthwise Conv2d (groups != 1); use groups=1 for the peer.")
            if isinstance(module.padding, str) or module.padding[0] != module.padding[1] or module.stride != (1, 1) or module.dilation != (1, 1):
                raise UserError("the hls4ml peer models stride-1, dilation-1 convs with equal integer padding only; change the Conv2d.")
            stages.append((module, False))
        elif isinstance(module, nn.ReLU) and stages and not stages[-1][1]:
            stages[-1] = (stages[-1][0], True)
        else:
            raise UserError(f"the hls4ml peer cannot take {type(module).__name__} here; use Conv2d, each optionally followed by one ReLU.")
    if not stages:
        raise UserError("the model has no Conv2d layer; give the hls4ml peer a conv net.")
    return stages


def _pow2_integers(values: np.ndarray, bits: int, what: str) -> tuple[int, np.ndarray]:
    """(k, ints) with values == ints * 2**-k exactly and |ints| <= 2**(bits-1) - 1."""
    frac, ints = _exact_frac(values)
    qmax = (1 << (bits - 1)) - 1
    if np.abs(ints).max() > qmax:
        raise UserError(f"a {what} tensor is not {bits}-bit integers times one power of two; call snap_to_pow2_grid(model) first.")
    return frac, ints


def _exact_frac(values: np.ndarray, max_frac: int = 24) -> tuple[int, np.ndarray]:
    """Smallest f with values * 2**f all integers."""
    for frac in range(max_frac + 1):
        scaled = values * 2.0**frac
        if np.all(scaled == np.round(scaled)):
            return frac, scaled.astype(np.int64)
    raise UserError("a weight or bias is not on a power-of-two grid; call snap_to_pow2_grid(model) first.")


def _conv2d_int(x: np.ndarray, w: np.ndarray, padding: int) -> np.ndarray:
    """Exact integer conv2d, stride 1, zero padding: (N, C, H, W) x (O, C, kh, kw) -> (N, O, H', W')."""
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    kh, kw = w.shape[2:]
    out_h, out_w = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    acc = np.zeros((x.shape[0], w.shape[0], out_h, out_w), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            acc += np.einsum("nchw,oc->nohw", xp[:, :, i:i + out_h, j:j + out_w], w[:, :, i, j])
    return acc


def _float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def _calibrate_int_bits(model: nn.Sequential, pixels: np.ndarray) -> list[int]:
    """Integer bits of each ReLU output from the float model's largest activation."""
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float64) / 2**INPUT_BITS)
    bits = []
    with torch.no_grad():
        for module in _float64_copy(model):
            x = module(x)
            if isinstance(module, nn.ReLU):
                peak = float(x.max())
                # smallest I with the top code 255 * 2**(I-8) >= peak
                bits.append(math.ceil(math.log2(peak * 2**ACTIVATION_BITS / 255)) if peak > 0 else 0)
    return bits


def _check_pixels(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.min() < 0 or pixels.max() > 255 or not np.all(pixels == np.round(pixels)):
        raise UserError("pixels must be an (N, C, H, W) array of integers in [0, 255] (uint8 images, channels first).")
    return pixels.astype(np.int64)
