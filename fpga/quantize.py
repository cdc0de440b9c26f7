"""W4A8 post-training quantization of a CoDeNet for the FPGA, and its fake-quant twin.

- :func:`fold_batchnorm`: every BatchNorm2d goes into the conv before it (a
  deep copy; the float output is unchanged).
- :func:`calibrate`: activation scales from sample images, 4-bit per-channel
  weights, int32 biases and fixed-point requantization (M, S) per channel, all
  over the tensors of the FPGA plan (``edgekit.fpga.lower.plan_model``).
- :func:`fake_quant_model`: a torch module that computes the integer
  semantics of ``edgekit.fpga.ir`` on integer-valued float64 tensors, batched,
  so W4A8 accuracy can be measured with torch. For the variants the FPGA runs
  it equals the numpy integer reference bit for bit; float-only deformable
  variants run their float sampling on dequantized inputs with fake-quantized
  weights and quantize the output, so their W4A8 accuracy can be reported too.

Rounding conventions: weights and biases round half away from zero onto their
grids; requantization (and so every 8-bit activation, and the dilation map)
rounds half up, ``floor(acc * M / 2^S + 1/2)``; the input image is
``floor(255 x + 1/2)``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from edgekit.compress.quantize.bn_fold import bn_affine
from edgekit.errors import UserError
from edgekit.fpga.ir import MULTIPLIER_BITS, WEIGHT_MAX
from edgekit.fpga.lower import MOVES, ChannelBias, Plan, bits_for, plan_model, trace

INPUT_SCALE = 1.0 / 255.0
MAX_SHIFT = 62  # (acc * M) >> S on a 64-bit product
INT32 = (-(2**31), 2**31 - 1)
BIAS_LIMIT = 2.0**30


# -- BatchNorm folding ------------------------------------------------------------------

def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy with each BatchNorm2d folded into the Conv2d / DeformConv3x3 that feeds it.

    A Conv2d takes the bias; a DeformConv3x3 has none, so its BatchNorm is
    replaced by a :class:`~edgekit.fpga.lower.ChannelBias`. Folded BNs become
    ``nn.Identity``. A BN whose input is read by anything else stays (and
    lowering refuses it).
    """
    from edgekit.models.codenet import DeformConv3x3

    folded = copy.deepcopy(model).eval()
    gm = trace(folded)
    modules = dict(folded.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer = modules[prev.target]
        if not isinstance(layer, (nn.Conv2d, DeformConv3x3)) or layer.weight.shape[0] != modules[node.target].num_features:
            continue
        bn = modules[node.target]
        if bn.running_mean is None or bn.running_var is None:
            raise UserError(f"BatchNorm2d {node.target!r} keeps no running statistics, so it cannot be folded; build it with track_running_stats=True")
        scale, shift = bn_affine(bn)
        w = layer.weight
        w.copy_((w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype))
        old_bias = layer.bias.double() if getattr(layer, "bias", None) is not None else torch.zeros_like(scale)
        new_bias = (old_bias * scale + shift).to(w.dtype)
        if isinstance(layer, nn.Conv2d):
            layer.bias = nn.Parameter(new_bias)
            _set_module(folded, node.target, nn.Identity())
        else:
            if getattr(layer, "bias", None) is not None:
                layer.bias = None
            _set_module(folded, node.target, ChannelBias(new_bias))
    return folded


# -- integer parameters ---------------------------------------------------------------

def round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_weight(weight: np.ndarray, min_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """4-bit symmetric per output channel: (integers in [-7, 7], scale per channel).

    ``min_scale`` raises a channel's scale where its bias would not fit int32
    otherwise (a layer whose input is vanishingly small next to its bias). A
    channel of zeros gets the largest scale of the layer (1.0 if all are
    zero): its output is then the bias alone, still representable.
    """
    w = np.asarray(weight, dtype=np.float64)
    peak = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = peak / WEIGHT_MAX
    if min_scale is not None:
        scale = np.maximum(scale, min_scale)
    fallback = scale.max() if scale.max() > 0 else 1.0
    scale = np.where(scale > 0, scale, fallback)
    q = round_half_away(w / scale.reshape(-1, *([1] * (w.ndim - 1))))
    return np.clip(q, -WEIGHT_MAX, WEIGHT_MAX).astype(np.int64), scale


def requant_multiplier(real: float, name: str = "layer") -> tuple[int, int]:
    """(M, S) with M in [2^14, 2^15), S >= 1 and M / 2^S the nearest to ``real`` that 15 bits give."""
    if not (real > 0 and math.isfinite(real)):
        raise UserError(f"{name}: requantization ratio {real!r} is not a positive number; check the calibration images and weights")
    mant, exp = math.frexp(real)  # real = mant * 2^exp, mant in [0.5, 1)
    m = math.floor(mant * 2**MULTIPLIER_BITS + 0.5)
    s = MULTIPLIER_BITS - exp
    if m == 2**MULTIPLIER_BITS:
        m, s = m // 2, s - 1
    if s < 1:
        raise UserError(f"{name}: requantization ratio {real:.3g} needs a left shift (S < 1); the output scale is far too small for its input, recalibrate")
    if s > MAX_SHIFT:
        raise UserError(f"{name}: requantization ratio {real:.3g} needs a shift of {s} > {MAX_SHIFT} bits; the layer's weights or input are vanishingly small, retrain or drop it")
    return m, s


@dataclass
class TensorQuant:
    scale: float
    signed: bool
    bits: int = 8

    @property
    def range(self) -> tuple[int, int]:
        if self.bits >= 32:
            return INT32
        if self.signed:
            return (-(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1)
        return (0, 2**self.bits - 1)


@dataclass
class LayerQuant:
    weight: np.ndarray  # int64 in [-7, 7]
    weight_scale: np.ndarray  # float64 per output channel
    bias: np.ndarray  # int64 (int32 range)
    input_scale: float
    output_scale: float | None  # None: raw int32 accumulator
    multiplier: np.ndarray | None = None
    shift: np.ndarray | None = None
    clamp: tuple[int, int] | None = None


@dataclass
class QuantParams:
    model: nn.Module  # the BN-folded float model
    plan: Plan
    tensors: dict[str, TensorQuant]
    layers: dict[str, LayerQuant]
    output_scales: dict[str, np.ndarray]  # per-channel dequantization scale of each graph output
    ranges: dict[str, float]  # calibrated |x| range of each tensor
    calibration: dict = field(default_factory=dict)
    deform_spec: object = None  # the model's DeformSpec (first DeformConv3x3), if any

    def shapes(self, image_hw: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) of every tensor for one image of ``image_hw``."""
        with torch.no_grad():
            values = FakeQuantModel(self).integer_forward(torch.zeros(1, 3, *image_hw))
        return {k: tuple(v.shape[1:]) for k, v in values.items()}


# -- calibration --------------------------------------------------------------------

def _as_batch(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(np.asarray(i)) for i in images])
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise UserError("calibration images must be a float batch [B, 3, H, W] in [0, 1] (or a list of CHW images)")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


class _RangeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: dict[str, list[str]], method: str, percentile: float):
        super().__init__(gm)
        self.wanted, self.method, self.percentile = wanted, method, percentile
        self.stats: dict[str, list[float]] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        for tensor in self.wanted.get(n.name, []):
            mag = value.detach().abs().double()
            if self.method == "max":
                stat = float(mag.max())
            else:
                stat = float(np.percentile(mag.flatten().numpy(), self.percentile))
            self.stats.setdefault(tensor, []).append(stat)
        return value


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _first_deform_spec(model: nn.Module):
    from edgekit.models.codenet import DeformConv3x3

    return next((m.spec for m in model.modules() if isinstance(m, DeformConv3x3)), None)


def _float_params(model: nn.Module, op) -> tuple[np.ndarray, np.ndarray]:
    mod = model.get_submodule(op.module)
    weight = mod.weight.detach().double().numpy()
    bias = np.zeros(weight.shape[0])
    if getattr(mod, "bias", None) is not None and isinstance(mod.bias, torch.Tensor):
        bias = bias + mod.bias.detach().double().numpy()
    if op.bias_module:
        bias = bias + model.get_submodule(op.bias_module).bias.detach().double().numpy()
    return weight, bias


@torch.no_grad()
def calibrate(
    model: nn.Module,
    images,
    method: str = "max",
    percentile: float = 99.99,
    batch_size: int = 16,
) -> QuantParams:
    """W4A8 quantization parameters of ``model`` from calibration ``images`` ([B, 3, H, W] floats in [0, 1]).

    Activation ranges are the max of |x| over the images (``method="max"``)
    or the mean over batches of its ``percentile``-th percentile. Tensors
    joined by concat / split / shuffle / upsample share the largest range of
    their group. After ReLU scale = range / 255 (unsigned), otherwise
    range / 127 (signed); the input is 1/255.
    """
    if method not in ("max", "percentile"):
        raise UserError(f"calibration method {method!r} is unknown; use max or percentile")
    if method == "percentile" and not 50 < percentile <= 100:
        raise UserError(f"calibration percentile {percentile} must be in (50, 100], e.g. 99.99")
    batch = _as_batch(images)
    folded = fold_batchnorm(model)
    gm, plan = plan_model(folded, strict=False)

    # ranges of every tensor the plan reads or writes
    wanted: dict[str, list[str]] = {}
    for tensor, node in plan.value_node.items():
        wanted.setdefault(node, []).append(tensor)
    recorder = _RangeRecorder(gm, wanted, method, percentile)
    for start in range(0, batch.shape[0], batch_size):
        recorder.run(batch[start : start + batch_size])
    reduce = max if method == "max" else (lambda v: sum(v) / len(v))
    ranges = {t: reduce(v) for t, v in recorder.stats.items()}

    # which tensors are signed, and which share a scale
    uf = _UnionFind()
    signed_made: dict[str, bool] = {plan.input: False}
    head_outputs: set[str] = set()
    dilations: set[str] = set()
    for op in plan.ops:
        if op.kind in MOVES:
            for t in op.inputs + op.outputs:
                uf.union(op.inputs[0], t)
        elif op.dilation:
            dilations.add(op.outputs[0])
        elif not op.requant:
            head_outputs.add(op.outputs[0])
        else:
            signed_made[op.outputs[0]] = not op.relu
    groups: dict[str, list[str]] = {}
    for t in plan.tensors():
        if t not in dilations and t not in head_outputs:
            groups.setdefault(uf.find(t), []).append(t)

    tensors: dict[str, TensorQuant] = {}
    for members in groups.values():
        signed = any(signed_made.get(t, False) for t in members)
        peak = max((ranges.get(t, 0.0) for t in members), default=0.0)
        if plan.input in members:
            if signed:
                raise UserError(f"the input image shares a scale with signed tensor(s) {members}; the FPGA flow needs the image in an unsigned group")
            scale = INPUT_SCALE
        else:
            scale = (peak / (127 if signed else 255)) if peak > 0 else 1.0 / 255
        for t in members:
            tensors[t] = TensorQuant(scale, signed)

    layers: dict[str, LayerQuant] = {}
    output_scales: dict[str, np.ndarray] = {}
    for op in plan.ops:
        if op.kind in MOVES:
            continue
        s_in = tensors[op.inputs[0]].scale
        weight, bias = _float_params(folded, op)
        # the bias must fit int32 with headroom for the products: |b| / (s_in * s_w) <= 2^30
        w_int, s_w = quantize_weight(weight, np.abs(bias) / (s_in * BIAS_LIMIT))
        b_int = round_half_away(bias / (s_in * s_w))
        lq = LayerQuant(w_int, s_w, b_int.astype(np.int64), s_in, None)
        out = op.outputs[0]
        if op.dilation:
            tensors[out] = TensorQuant(1.0, False, bits_for(op.bound))
            lq.output_scale, lq.clamp = 1.0, (0, op.bound)
        elif not op.requant:
            tensors[out] = TensorQuant(s_in, True, 32)
            output_scales[out] = s_in * s_w
        else:
            lo, hi = tensors[out].range
            lq.output_scale, lq.clamp = tensors[out].scale, ((0, hi) if op.relu else (lo, hi))
        if op.requant and op.kind != "deform_float":
            pairs = [requant_multiplier(s_in * sw / lq.output_scale, f"layer {op.name} ({op.module}) channel {c}") for c, sw in enumerate(s_w)]
            lq.multiplier = np.array([m for m, _ in pairs], dtype=np.int64)
            lq.shift = np.array([s for _, s in pairs], dtype=np.int64)
        layers[op.name] = lq
    for t in plan.outputs:
        if t not in output_scales:  # an 8-bit graph output
            output_scales[t] = np.full(1, tensors[t].scale)
    calibration = {"method": method, "images": int(batch.shape[0])}
    if method == "percentile":
        calibration["percentile"] = percentile
    return QuantParams(folded, plan, tensors, layers, output_scales, ranges, calibration, _first_deform_spec(folded))


# -- the fake-quant model ----------------------------------------------------------------

def _floor_requant(acc: torch.Tensor, m: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """clamp(floor((acc * M + 2^(S-1)) / 2^S)) on float64; exact while |acc * M| < 2^53."""
    scale = torch.pow(2.0, -s.double()).view(1, -1, 1, 1)
    half = torch.pow(2.0, s.double() - 1).view(1, -1, 1, 1)
    out = torch.floor((acc * m.double().view(1, -1, 1, 1) + half) * scale)
    return out.clamp(lo, hi)


def square_window(x: torch.Tensor, dilation: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bound: int) -> torch.Tensor:
    """Depthwise 3x3 with per-pixel integer dilation: tap (i, j) reads x[y + i*d, x + j*d], 0 outside (batched)."""
    b, c, h, w = x.shape
    xp = F.pad(x, (bound, bound, bound, bound)).reshape(b, c, -1)
    wp = w + 2 * bound
    d = dilation[:, 0].long()
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    acc = bias.view(1, c, 1, 1).expand(b, c, h, w).clone()
    for i in (-1, 0, 1):
        for j in (-1, 0, 1):
            index = ((rows + i * d + bound) * wp + (cols + j * d + bound)).view(b, 1, h * w).expand(b, c, h * w)
            acc += weight[:, 0, i + 1, j + 1].view(1, c, 1, 1) * xp.gather(2, index).view(b, c, h, w)
    return acc


class FakeQuantModel(nn.Module):
    """The W4A8 integer network on torch: integer values held in float64.

    ``forward(images)`` takes what the float model takes (floats in [0, 1])
    and returns what it returns (the dequantized head outputs, concatenated
    along channels when the float model concatenates them), so it drops into
    the same evaluation. ``integer_forward`` gives every tensor of the plan
    as integers (int32 accumulators for the heads).
    """

    def __init__(self, qparams: QuantParams):
        super().__init__()
        self.qp = qparams
        self.plan = qparams.plan
        self.params: dict[str, dict[str, torch.Tensor]] = {}
        floats = {}
        for op in self.plan.ops:
            if op.name not in qparams.layers:
                continue
            lq = qparams.layers[op.name]
            p = {"weight": torch.from_numpy(lq.weight.astype(np.float64)), "bias": torch.from_numpy(lq.bias.astype(np.float64))}
            if lq.multiplier is not None:
                p["multiplier"], p["shift"] = torch.from_numpy(lq.multiplier), torch.from_numpy(lq.shift)
            self.params[op.name] = p
            if op.kind == "deform_float":
                floats[op.name] = self._float_deform(qparams, op, lq)
        self.float_layers = nn.ModuleDict(floats)
        self.eval()

    @staticmethod
    def _float_deform(qp: QuantParams, op, lq: LayerQuant) -> nn.Module:
        """A copy of a float-only deformable layer with its weights (and its offset conv's) on the 4-bit grid."""
        mod = copy.deepcopy(qp.model.get_submodule(op.module)).eval()
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(lq.weight * lq.weight_scale.reshape(-1, 1, 1, 1)).to(mod.weight.dtype))
            if getattr(mod, "offset", None) is not None:
                q, s = quantize_weight(mod.offset.weight.detach().double().numpy())
                mod.offset.weight.copy_(torch.from_numpy(q * s.reshape(-1, 1, 1, 1)).to(mod.offset.weight.dtype))
        return mod

    def _layer(self, op, x: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
        p, lq = self.params[op.name], self.qp.layers[op.name]
        if op.kind == "conv":
            acc = F.conv2d(x, p["weight"], p["bias"], op.stride, op.kernel // 2, 1, op.groups)
        elif op.kind == "deform_dw":
            acc = square_window(x, inputs[1], p["weight"], p["bias"], op.bound)
        else:  # float-only deformable: float sampling between quantized tensors
            real = self.float_layers[op.name](x.float() * lq.input_scale).double()
            real = real + (p["bias"] * lq.input_scale * torch.from_numpy(lq.weight_scale)).view(1, -1, 1, 1)
            return torch.floor(real / lq.output_scale + 0.5).clamp(*lq.clamp)
        if not op.requant:
            return acc
        return _floor_requant(acc, p["multiplier"], p["shift"], *lq.clamp)

    @torch.no_grad()
    def integer_forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.floor(images.double() * 255.0 + 0.5).clamp(0, 255)
        env = {self.plan.input: x}
        for op in self.plan.ops:
            ins = [env[n] for n in op.inputs]
            if op.kind == "upsample":
                outs = [ins[0].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)]
            elif op.kind == "concat":
                outs = [torch.cat(ins, dim=1)]
            elif op.kind == "split":
                outs = list(torch.chunk(ins[0], 2, dim=1))
            elif op.kind == "shuffle":
                b, c, h, w = ins[0].shape
                outs = [ins[0].view(b, op.groups, c // op.groups, h, w).transpose(1, 2).reshape(b, c, h, w)]
            else:
                outs = [self._layer(op, ins[0], ins)]
            env.update(zip(op.outputs, outs))
        return env

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        env = self.integer_forward(images)
        outs = [
            (env[n] * torch.from_numpy(self.qp.output_scales[n]).view(1, -1, 1, 1)).float()
            for n in self.plan.outputs
        ]
        if self.plan.output_concat:
            return torch.cat(outs, dim=1)
        return outs[0] if len(outs) == 1 else tuple(outs)


def fake_quant_model(qparams: QuantParams) -> FakeQuantModel:
    """The torch model that computes ``qparams``' integer network (see :class:`FakeQuantModel`)."""
    return FakeQuantModel(qparams)


def quantize_model(model: nn.Module, images, **calibration) -> tuple[QuantParams, FakeQuantModel]:
    """Calibrate ``model`` on ``images`` and build its fake-quant twin in one call."""
    qp = calibrate(model, images, **calibration)
    return qp, FakeQuantModel(qp)
