"""Quantized layers that PTQ and QAT put in place of Linear, Conv2d and Embedding.

Each layer keeps its float weight and the scales and zero points chosen for it.
In eager mode its forward *simulates* integer inference (fake quantization, with
a straight-through gradient while training). When the torchscript ONNX exporter
traces it, it writes the integer ONNX ops instead, with integer weights computed
from the same scales, so the export is the model that was evaluated:

- ``dynamic`` Linear: DynamicQuantizeLinear -> MatMulInteger -> rescale (ONNX
  Runtime fuses this into its integer MatMul kernels);
- ``static`` Linear / Conv2d: QuantizeLinear/DequantizeLinear on the input and
  DequantizeLinear on int8 weights (QDQ, which ONNX Runtime fuses into
  QLinearConv / integer MatMul);
- ``weight_only`` Linear: com.microsoft MatMulNBits (4 or 8-bit blocks);
- ``weight_only`` Embedding: com.microsoft GatherBlockQuantized.

The layer configs are plain dicts so they fit in an artifact's builder; a
rebuilt model gets the same layers back from :func:`apply_plan`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .primitives import fake_quant

MODES = ("dynamic", "static", "weight_only")
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class LayerConfig:
    """How one layer is quantized."""

    mode: Literal["dynamic", "static", "weight_only"]
    bits: int = 8
    group_size: int = 0  # weights in blocks of this many input elements; 0: one scale per output channel
    symmetric: bool = True  # weights
    act_symmetric: bool = False  # static activations: int8 around 0 instead of uint8 with a zero point
    reduce_range: bool = False  # int8 weights in -63..63 (x86 without VNNI, see primitives.QuantSpec)
    smooth: bool = False  # Linear: divide the input per feature by a factor that the weight absorbs (SmoothQuant)
    out_quant: bool = False  # static: also quantize the output, so runtimes fuse DQ -> op -> Q into one integer kernel

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def w_qrange(self) -> tuple[int, int]:
        """Integer range of weights (signed when symmetric, unsigned with a zero point otherwise)."""
        bits = self.bits - 1 if (self.reduce_range and self.bits == 8 and self.mode != "weight_only") else self.bits
        if self.symmetric:
            return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        return 0, 2**bits - 1

    @property
    def a_qrange(self) -> tuple[int, int]:
        return (-127, 127) if self.act_symmetric else (0, 255)


# -- fake quantization ------------------------------------------------------------

def dynamic_act_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point as ONNX DynamicQuantizeLinear computes them (uint8, range widened to 0)."""
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    scale = torch.clamp((hi - lo) / 255.0, min=torch.finfo(torch.float32).eps)
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    return scale, zero


def weight_grid_qparams(
    w: torch.Tensor, qmin: int, qmax: int, symmetric: bool, importance: torch.Tensor | None = None, search: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale/zero for ``w`` of shape [rows, n] with a clipping search.

    Shrinking the range clips a few large weights but refines the grid for all
    others; the factor per row minimises the squared error weighted by
    ``importance`` (the mean squared input of each column on calibration data,
    so errors on busy inputs count more). Without ``search`` the full range is used.
    """
    w = w.detach().float()
    imp = torch.ones(w.shape[1]) if importance is None else importance.float().clamp_min(1e-12)  # [n] or [rows, n]
    lo_full = w.amin(dim=1).clamp(max=0.0)
    hi_full = w.amax(dim=1).clamp(min=0.0)
    best_scale = best_zero = None
    best_err = torch.full((w.shape[0],), float("inf"))
    factors = torch.linspace(1.0, 0.5, 21) if search else torch.ones(1)
    eps = torch.finfo(torch.float32).eps
    for f in factors:
        lo, hi = lo_full * f, hi_full * f
        if symmetric:
            scale = torch.clamp(torch.maximum(-lo, hi) / qmax, min=eps)
            zero = torch.zeros_like(scale)
        else:
            scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
            zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
        err = ((fake_quant(w, scale[:, None], zero[:, None], qmin, qmax) - w) ** 2 * imp).sum(dim=1)
        better = err < best_err
        if best_scale is None:
            best_scale, best_zero = scale.clone(), zero.clone()
        best_scale[better], best_zero[better] = scale[better], zero[better]
        best_err = torch.minimum(best_err, err)
    return best_scale, best_zero


# -- layers -------------------------------------------------------------------------

class _QuantBase(nn.Module):
    """Shared weight handling: grouped scales, fake-quantized weight, integer weight."""

    cfg: LayerConfig
    weight: nn.Parameter
    enabled: bool = True  # False: the layer runs in float (calibration, sensitivity analysis)

    @property
    def onnx_domains(self) -> tuple[str, ...]:
        """ONNX op domains this layer's export writes (exporters register them; see export.onnx)."""
        return (MS_DOMAIN,) if self.enabled and self.cfg.mode == "weight_only" else ()

    def _init_weight_qparams(self, rows: int, cols: int) -> None:
        groups = cols // self.cfg.group_size if self.cfg.group_size else 1
        self.register_buffer("w_scale", torch.ones(rows, groups))
        self.register_buffer("w_zero", torch.zeros(rows, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.float_forward(x)
        if torch.jit.is_tracing():
            return _export_node(x, self)
        return self.simulate(x)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original float layer."""
        raise NotImplementedError

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """Integer inference simulated in float (fake quantization)."""
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        """The weight the integer kernel sees (smoothing folded in when the layer has it)."""
        return self.weight

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        """Weight as [rows, groups, group_len] (rows = output channels)."""
        flat = w.reshape(w.shape[0], -1)
        return flat.reshape(flat.shape[0], self.w_scale.shape[1], -1)

    def calibrate_weight(self, importance: torch.Tensor | None = None, search: bool = True) -> None:
        """Choose weight scales (per output channel or per group) from the current weight."""
        g = self._grouped(self.effective_weight().detach())
        rows, groups, length = g.shape
        imp = None
        if importance is not None and importance.numel() == groups * length:
            # per input feature (Linear): the same weighting for every output row
            imp = importance.float().reshape(groups, length).repeat(rows, 1)
        qmin, qmax = self.cfg.w_qrange
        scale, zero = weight_grid_qparams(
            g.reshape(rows * groups, length), qmin, qmax, self.cfg.symmetric, imp, search
        )
        self.w_scale.copy_(scale.reshape(rows, groups))
        self.w_zero.copy_(zero.reshape(rows, groups))

    def quant_weight(self, ste: bool = False) -> torch.Tensor:
        """The fake-quantized weight, in the weight's own shape."""
        qmin, qmax = self.cfg.w_qrange
        g = self._grouped(self.effective_weight())
        out = fake_quant(g, self.w_scale[..., None], self.w_zero[..., None], qmin, qmax, ste)
        return out.reshape(self.weight.shape)

    def int_weight(self) -> np.ndarray:
        """Integer weight values (int64 numpy) in the weight's shape."""
        qmin, qmax = self.cfg.w_qrange
        g = self._grouped(self.effective_weight().detach())
        q = torch.clamp(torch.round(g / self.w_scale[..., None]) + self.w_zero[..., None], qmin, qmax)
        return q.reshape(self.weight.shape).to(torch.int64).numpy()

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.smooth:
            x = x / self.smooth
        if self.cfg.mode == "dynamic":
            scale, zero = dynamic_act_qparams(x)
            return fake_quant(x, scale, zero, 0, 255, self.training)
        if self.cfg.mode == "static":
            qmin, qmax = self.cfg.a_qrange
            return fake_quant(x, self.a_scale, self.a_zero, qmin, qmax, self.training)
        return x

    def _quant_output(self, y: torch.Tensor) -> torch.Tensor:
        if not self.cfg.out_quant:
            return y
        qmin, qmax = self.cfg.a_qrange
        return fake_quant(y, self.o_scale, self.o_zero, qmin, qmax, self.training)

    def _act_qparams(self, lo: float, hi: float) -> tuple[float, float]:
        qmin, qmax = self.cfg.a_qrange
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        eps = float(torch.finfo(torch.float32).eps)
        if self.cfg.act_symmetric:
            return max(max(-lo, hi) / qmax, eps), 0.0
        scale = max((hi - lo) / (qmax - qmin), eps)
        return scale, float(min(max(qmin - round(lo / scale), qmin), qmax))

    def set_act_qparams(self, lo: float, hi: float) -> None:
        """Static input range -> scale / zero point (range widened to include 0)."""
        scale, zero = self._act_qparams(lo, hi)
        self.a_scale.fill_(scale)
        self.a_zero.fill_(zero)

    def set_out_qparams(self, lo: float, hi: float) -> None:
        scale, zero = self._act_qparams(lo, hi)
        self.o_scale.fill_(scale)
        self.o_zero.fill_(zero)

    # -- deploy form: for converters that quantize from plain float layers (LiteRT) --
    def input_range(self) -> tuple[float, float] | None:
        """The static input range (lo, hi) the integer kernel represents; None unless static."""
        if not self.enabled or self.cfg.mode != "static":
            return None
        qmin, qmax = self.cfg.a_qrange
        scale, zero = float(self.a_scale), float(self.a_zero)
        return (qmin - zero) * scale, (qmax - zero) * scale

    def dequantized_layer(self) -> nn.Module:
        """A float layer holding the dequantized weight (the original layer when disabled).

        Its weight sits exactly on this layer's integer grid, so a converter that
        quantizes it per channel recovers the same integers and scales.
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        c = self.cfg
        group = f", group={c.group_size}" if c.group_size else ""
        return f"mode={c.mode}, bits={c.bits}{group}, symmetric={c.symmetric}"


class QuantLinear(_QuantBase):
    def __init__(self, linear: nn.Linear, cfg: LayerConfig):
        super().__init__()
        self.cfg = cfg
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_weight_qparams(self.out_features, self.in_features)
        if cfg.mode == "static":
            self.register_buffer("a_scale", torch.tensor(1.0))
            self.register_buffer("a_zero", torch.tensor(0.0))
        if cfg.smooth:
            self.register_buffer("smooth", torch.ones(self.in_features))

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.smooth if self.cfg.smooth else self.weight

    def set_smoothing(self, input_absmax: torch.Tensor, alpha: float, weight_absmax: torch.Tensor | None = None) -> None:
        """SmoothQuant (Xiao et al. 2023): s_j = max|x_j|^alpha / max|w_j|^(1-alpha).

        Dividing input feature j by s_j and multiplying weight column j by s_j leaves
        the product unchanged but moves outlier features' range into the weights,
        which are quantized per output channel and absorb it far better than a
        per-tensor activation scale. Layers reading the same input (q, k, v) pass the
        column maxima of all their weights, so they share one factor and one
        quantized input at run time.
        """
        w_absmax = (self.weight.detach().abs().amax(dim=0) if weight_absmax is None else weight_absmax).clamp_min(1e-5)
        s = input_absmax.float().clamp_min(1e-5) ** alpha / w_absmax ** (1 - alpha)
        self.smooth.copy_(s.clamp(1e-2, 1e2))

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dequantized_layer(self) -> nn.Module:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.quant_weight() if self.enabled else self.weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        if self.enabled and self.cfg.smooth:
            return nn.Sequential(_Scale(1.0 / self.smooth), layer)
        return layer

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.quant_weight(self.training), self.bias)


class QuantConv2d(_QuantBase):
    """Static int8 (or 4-bit-grid) convolution; activations per tensor, weights per output channel."""

    def __init__(self, conv: nn.Conv2d, cfg: LayerConfig):
        super().__init__()
        if cfg.mode != "static":
            raise ValueError("convolutions are quantized statically (calibrated input range)")
        self.cfg = cfg
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._init_weight_qparams(conv.out_channels, self.weight[0].numel())
        self.register_buffer("a_scale", torch.tensor(1.0))
        self.register_buffer("a_zero", torch.tensor(0.0))
        if cfg.out_quant:
            self.register_buffer("o_scale", torch.tensor(1.0))
            self.register_buffer("o_zero", torch.tensor(0.0))

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def dequantized_layer(self) -> nn.Module:
        out_ch, in_per_group = self.weight.shape[:2]
        layer = nn.Conv2d(
            in_per_group * self.groups, out_ch, tuple(self.weight.shape[2:]), self.stride, self.padding,
            self.dilation, self.groups, bias=self.bias is not None,
        )
        with torch.no_grad():
            layer.weight.copy_(self.quant_weight() if self.enabled else self.weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def quant_bias(self) -> torch.Tensor | None:
        """The bias on the int32 grid of input scale x weight scale, as integer runtimes add it."""
        if self.bias is None:
            return None
        step = self.a_scale * self.w_scale[:, 0]
        return fake_quant(self.bias, step, torch.zeros_like(step), -(2**31), 2**31 - 1, self.training)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(
            self._quant_input(x), self.quant_weight(self.training), self.quant_bias(),
            self.stride, self.padding, self.dilation, self.groups,
        )
        return self._quant_output(y)


class QuantEmbedding(_QuantBase):
    """Weight-only embedding table, blocks of ``group_size`` along the embedding dim."""

    def __init__(self, emb: nn.Embedding, cfg: LayerConfig):
        super().__init__()
        if cfg.mode != "weight_only" or not cfg.group_size:
            raise ValueError("embeddings are quantized weight-only in blocks (group_size > 0)")
        self.cfg = cfg
        self.weight = emb.weight
        self.bias = None
        self.padding_idx = emb.padding_idx
        self._init_weight_qparams(emb.num_embeddings, emb.embedding_dim)

    def float_forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def simulate(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.quant_weight(self.training), self.padding_idx)

    def dequantized_layer(self) -> nn.Module:
        weight = self.quant_weight() if self.enabled else self.weight
        return nn.Embedding.from_pretrained(weight.detach().clone(), freeze=True, padding_idx=self.padding_idx)


class _Scale(nn.Module):
    """Multiplies by a per-feature factor (a SmoothQuant divisor in the deploy form)."""

    def __init__(self, factor: torch.Tensor):
        super().__init__()
        self.register_buffer("factor", factor.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


QUANT_TYPES = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d, nn.Embedding: QuantEmbedding}


def quantizable(module: nn.Module) -> bool:
    return type(module) in QUANT_TYPES


def wrap(module: nn.Module, cfg: LayerConfig) -> _QuantBase:
    return QUANT_TYPES[type(module)](module, cfg)


def apply_plan(model: nn.Module, layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace the named layers of ``model`` (in place) by quantized layers with these configs."""
    for name, cfg in layers.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, wrap(getattr(owner, attr), LayerConfig(**cfg)))
    return model


def quant_layers(model: nn.Module) -> dict[str, _QuantBase]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantBase)}


# -- ONNX export ------------------------------------------------------------------

def _export_node(x: torch.Tensor, layer: "_QuantBase") -> torch.Tensor:
    # The simulated output gives the tracer the node's shape and dtype; the exporter
    # drops the simulation's own nodes as dead code, since the symbolic ignores them.
    return _IntegerLayer.apply(x, layer.simulate(x), _Ref(layer))


class _Ref:
    """Hands the layer to the traced function as a plain object (not a module argument)."""

    def __init__(self, layer: "_QuantBase"):
        self.layer = layer


class _IntegerLayer(torch.autograd.Function):
    """Traced as one node whose ONNX form the layer writes (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, simulated, ref):  # type: ignore[override]
        return simulated.clone()

    @staticmethod
    def symbolic(g, x, simulated, ref):  # type: ignore[override]
        layer = ref.layer
        if isinstance(layer, QuantEmbedding):
            return _onnx_gather(g, x, layer)
        if layer.cfg.mode == "weight_only":
            return _onnx_matmul_nbits(g, x, layer)
        if isinstance(layer, QuantConv2d):
            return _onnx_conv(g, x, layer)
        if layer.cfg.mode == "dynamic":
            return _onnx_dynamic_linear(g, x, layer)
        return _onnx_static_linear(g, x, layer)


def _const(g, array: np.ndarray | torch.Tensor):
    return g.op("Constant", value_t=torch.as_tensor(np.ascontiguousarray(array)))


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().astype(np.float32)


def _int_store(q: np.ndarray, cfg: LayerConfig) -> np.ndarray:
    return q.astype(np.int8 if cfg.symmetric else np.uint8)


def _onnx_qdq(g, x, scale_t: torch.Tensor, zero_t: torch.Tensor, symmetric: bool):
    scale = _const(g, np.float32(scale_t.item()))
    zero = _const(g, np.array(int(zero_t.item()), dtype=np.int8 if symmetric else np.uint8))
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero), scale, zero)


def _onnx_input_qdq(g, x, layer: _QuantBase):
    return _onnx_qdq(g, x, layer.a_scale, layer.a_zero, layer.cfg.act_symmetric)


def _onnx_weight_dq(g, layer: _QuantBase, q: np.ndarray, axis: int):
    """DequantizeLinear of a per-channel int8 weight whose channel axis is ``axis``."""
    zeros = layer.w_zero[:, 0].to(torch.int64).numpy()
    return g.op(
        "DequantizeLinear", _const(g, _int_store(q, layer.cfg)), _const(g, _f32(layer.w_scale[:, 0])),
        _const(g, _int_store(zeros, layer.cfg)), axis_i=axis,
    )


def _onnx_smooth(g, x, layer: QuantLinear):
    return g.op("Mul", x, _const(g, _f32(1.0 / layer.smooth))) if layer.cfg.smooth else x


def _onnx_dynamic_linear(g, x, layer: QuantLinear):
    if not layer.cfg.symmetric:
        raise ValueError("dynamic linear layers export with symmetric weights only")
    x = _onnx_smooth(g, x, layer)
    wq = _int_store(layer.int_weight().T, layer.cfg)  # [K, N]
    xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
    acc = g.op("MatMulInteger", xq, _const(g, wq), xz, _const(g, np.zeros(wq.shape[1], np.int8)))
    scale = g.op("Mul", xs, _const(g, _f32(layer.w_scale[:, 0])))
    y = g.op("Mul", g.op("Cast", acc, to_i=1), scale)  # to_i=1: FLOAT
    return g.op("Add", y, _const(g, _f32(layer.bias))) if layer.bias is not None else y


def _onnx_static_linear(g, x, layer: QuantLinear):
    w = _onnx_weight_dq(g, layer, layer.int_weight().T, axis=1)
    y = g.op("MatMul", _onnx_input_qdq(g, _onnx_smooth(g, x, layer), layer), w)
    return g.op("Add", y, _const(g, _f32(layer.bias))) if layer.bias is not None else y


def _onnx_conv(g, x, layer: QuantConv2d):
    w = _onnx_weight_dq(g, layer, layer.int_weight(), axis=0)
    inputs = [_onnx_input_qdq(g, x, layer), w]
    if layer.bias is not None:
        step = (layer.a_scale * layer.w_scale[:, 0]).detach()
        qb = torch.round(layer.bias.detach() / step).to(torch.int64).numpy().astype(np.int32)
        inputs.append(g.op("DequantizeLinear", _const(g, qb), _const(g, _f32(step)), _const(g, np.zeros_like(qb)), axis_i=0))
    kh, kw = layer.weight.shape[2:]
    ph, pw = layer.padding if isinstance(layer.padding, tuple) else (layer.padding, layer.padding)
    y = g.op(
        "Conv", *inputs, kernel_shape_i=[kh, kw], strides_i=list(layer.stride),
        pads_i=[ph, pw, ph, pw], dilations_i=list(layer.dilation), group_i=layer.groups,
    )
    if not layer.cfg.out_quant:
        return y
    return _onnx_qdq(g, y, layer.o_scale, layer.o_zero, layer.cfg.act_symmetric)


def _unsigned_blocks(layer: _QuantBase) -> tuple[np.ndarray, np.ndarray]:
    """Weight as unsigned block values [rows, blocks, len] and zero points [rows, blocks] (symmetric: 2^(b-1))."""
    bits = layer.cfg.bits
    q = layer._grouped(torch.from_numpy(layer.int_weight())).numpy()
    zero = layer.w_zero.to(torch.int64).numpy()
    if layer.cfg.symmetric:
        offset = 2 ** (bits - 1)
        return (q + offset).astype(np.uint8), np.full(zero.shape, offset, np.uint8)
    return q.astype(np.uint8), zero.astype(np.uint8)


def _pack4(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, low nibble first (padded with 0)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _onnx_matmul_nbits(g, x, layer: QuantLinear):
    bits, block = layer.cfg.bits, layer.cfg.group_size
    q, zero = _unsigned_blocks(layer)  # [N, blocks, block]
    packed = _pack4(q) if bits == 4 else q
    inputs = [x, _const(g, packed), _const(g, _f32(layer.w_scale).reshape(-1))]
    if not layer.cfg.symmetric:
        inputs.append(_const(g, (_pack4(zero) if bits == 4 else zero).reshape(-1)))
    y = g.op(
        f"{MS_DOMAIN}::MatMulNBits", *inputs, K_i=layer.in_features, N_i=layer.out_features,
        bits_i=bits, block_size_i=block,
    )
    # the bias is a separate Add: MatMulNBits' own bias input sits behind optional inputs
    return g.op("Add", y, _const(g, _f32(layer.bias))) if layer.bias is not None else y


def _onnx_gather(g, ids, layer: QuantEmbedding):
    bits, block = layer.cfg.bits, layer.cfg.group_size
    q, zero = _unsigned_blocks(layer)  # [V, blocks, block]
    data = q.reshape(q.shape[0], -1)
    inputs = [
        _const(g, _pack4(data) if bits == 4 else data), ids, _const(g, _f32(layer.w_scale)),
    ]
    if not layer.cfg.symmetric:
        inputs.append(_const(g, _pack4(zero) if bits == 4 else zero))
    return g.op(
        f"{MS_DOMAIN}::GatherBlockQuantized", *inputs, gather_axis_i=0, quantize_axis_i=1,
        block_size_i=block, bits_i=bits,
    )


def needs_ms_domain(model: nn.Module) -> bool:
    """Whether the export uses com.microsoft ops (MatMulNBits, GatherBlockQuantized)."""
    return any(MS_DOMAIN in m.onnx_domains for m in quant_layers(model).values())
