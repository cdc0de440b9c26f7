"""Lower a quantized CoDeNet from torch to the integer IR (``edgekit.fpga.ir``).

Two steps share one reading of the model:

- :func:`plan_model` traces the (BatchNorm-folded) model with torch.fx and
  turns its nodes into a list of :class:`Op` over named tensors: a conv with
  its folded bias and ReLU is one op, a square integer deformable layer is two
  (its offset conv, which produces the dilation map, and the window itself),
  chunk / cat / shuffle / upsample move tensors. Calibration and the
  fake-quant model (``edgekit.fpga.quantize``) run on the same plan, so the IR,
  the fake-quant torch model and the integer reference see the same tensors.
- :func:`lower` writes that plan with the quantization parameters as a
  :class:`~edgekit.fpga.ir.Graph`.

Anything the hardware cannot run is refused by name (fx node and module).

Graph outputs: the three CenterNet head convs end in ``torch.cat`` in the
float model. Their int32 accumulators have per-channel scales, so a concat of
them would not be a scale-preserving move; the graph's outputs are therefore
the head tensors themselves, in the order of that cat, and
``graph.meta["output_scales"]`` holds each one's per-channel dequantization
scale (``scale_in * scale_w[c]``). Concatenating the dequantized outputs in
order gives the float model's output.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from edgekit.fpga.ir import Graph, Layer, Tensor
from torch import fx, nn

from edgekit.errors import UserError

SUPPORTED = (
    "the FPGA flow supports Conv2d (kernel 1 or 3, stride 1 or 2, padding kernel // 2, no dilation, groups 1 or depthwise) "
    "with folded BatchNorm and ReLU, DeformConv3x3 as conv3x3, dw3x3 or dcn_dw_square_int (square depthwise window, "
    "integer dilation bounded by N), torch.chunk / torch.cat in two halves along channels, ChannelShuffle and nearest 2x nn.Upsample"
)
HARDWARE_VARIANTS = ("conv3x3", "dw3x3", "dcn_dw_square_int")
MOVES = ("upsample", "concat", "split", "shuffle")  # ops that move integers unchanged


class ChannelBias(nn.Module):
    """A per-channel bias: what is left of a BatchNorm folded into a layer that has no bias of its own."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(1, -1, 1, 1)


def _codenet_classes() -> tuple[type, type]:
    from edgekit.models.codenet import ChannelShuffle, DeformConv3x3

    return DeformConv3x3, ChannelShuffle


class _Tracer(fx.Tracer):
    """Leaves: torch.nn layers (the default), the deformable 3x3, the shuffle and a folded bias."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        deform, shuffle = _codenet_classes()
        return isinstance(m, (deform, shuffle, ChannelBias)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """The fx graph of ``model`` with the CoDeNet leaves kept whole."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for data-dependent control flow
        raise UserError(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "the FPGA flow needs a model without data-dependent control flow, such as edgekit's CoDeNet"
        ) from exc
    return fx.GraphModule(model, graph)


# -- the plan --------------------------------------------------------------------------

@dataclass
class Op:
    """One IR layer, still in torch terms (module names instead of integer arrays).

    kind: ``conv`` | ``deform_dw`` | ``deform_float`` (a deformable variant the
    FPGA cannot run; only the fake-quant model executes it) | a move
    (``upsample``, ``concat``, ``split``, ``shuffle``).
    """

    name: str
    kind: str
    inputs: list[str]
    outputs: list[str]
    module: str = ""  # qualified name of the Conv2d / DeformConv3x3 / its offset conv
    bias_module: str = ""  # a ChannelBias folded into this layer
    relu: bool = False
    requant: bool = True  # False: the head convs, which hand on int32 accumulators
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    bound: int = 0  # deform_dw and the offset conv: the largest dilation N
    dilation: bool = False  # the offset conv of a square window: output is the dilation map


@dataclass
class Plan:
    input: str
    outputs: list[str]  # graph outputs in the order of the model's output cat / tuple
    output_concat: bool  # the float model concatenates ``outputs`` along channels
    ops: list[Op]
    value_node: dict[str, str] = field(default_factory=dict)  # tensor -> fx node holding its final value
    refusals: list[str] = field(default_factory=list)  # why the FPGA cannot run it (empty: it can)

    def producer(self, tensor: str) -> Op | None:
        return next((op for op in self.ops if tensor in op.outputs), None)

    def tensors(self) -> list[str]:
        names = [self.input]
        for op in self.ops:
            names += [n for n in op.outputs if n not in names]
        return names


def _refuse(node: fx.Node, what: str) -> str:
    return f"{what} at fx node {node.name!r} cannot run on the FPGA: {SUPPORTED}"


def _check_conv(node: fx.Node, name: str, conv: nn.Conv2d) -> str | None:
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    problems = []
    if k[0] != k[1] or k[0] not in (1, 3):
        problems.append(f"kernel {tuple(k)}")
    if s[0] != s[1] or s[0] not in (1, 2):
        problems.append(f"stride {tuple(s)}")
    if not isinstance(p, tuple) or tuple(p) != (k[0] // 2, k[1] // 2):
        problems.append(f"padding {p}")
    if tuple(d) != (1, 1):
        problems.append(f"dilation {tuple(d)}")
    if conv.groups != 1 and not (conv.groups == conv.in_channels == conv.out_channels):
        problems.append(f"groups {conv.groups}")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode {conv.padding_mode}")
    if problems:
        return _refuse(node, f"Conv2d {name!r} with {', '.join(problems)}")
    return None


def _deform_variant(spec) -> str:
    """The preset name of a DeformSpec (``edgekit.models.codenet.VARIANTS``), or its fields."""
    from edgekit.models.codenet import VARIANTS

    for name, v in VARIANTS.items():
        if (v.depthwise, v.shape, v.integer, v.bound is None) == (spec.depthwise, spec.shape, spec.integer, spec.bound is None):
            return name
    return f"shape={spec.shape}, depthwise={spec.depthwise}, bound={spec.bound}, integer={spec.integer}"


def _deform_obstacles(spec, stride: int) -> str:
    """Why the hardware cannot run a deformable layer, as a short list."""
    why = []
    if spec.shape == "free":
        why.append("free per-tap offsets (random access to the feature map)")
    if not spec.integer:
        why.append("bilinear sampling")
    if spec.bound is None:
        why.append("unbounded offsets")
    if not spec.depthwise:
        why.append("a full (not depthwise) deformable window")
    if stride != 1:
        why.append(f"stride {stride}")
    return ", ".join(why)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in (torch.relu, F.relu)
    return node.op == "call_method" and node.target == "relu"


def _arg(node: fx.Node, position: int, keyword: str, default=None):
    if keyword in node.kwargs:
        return node.kwargs[keyword]
    return node.args[position] if len(node.args) > position else default


def plan_model(model: nn.Module, strict: bool = True) -> tuple[fx.GraphModule, Plan]:
    """Trace ``model`` (BatchNorm already folded) and read it as FPGA ops.

    With ``strict`` every unsupported construct raises :class:`UserError`;
    without, float-only deformable variants become ``deform_float`` ops (for
    the fake-quant model) and their refusal is kept in ``plan.refusals``.
    """
    DeformConv3x3, ChannelShuffle = _codenet_classes()
    gm = trace(model)
    modules = dict(gm.named_modules())
    ops: list[Op] = []
    alias: dict[str, str] = {}  # fx node -> tensor it holds
    nodes_of: dict[str, list[fx.Node]] = {}  # tensor -> fx nodes holding it (an alias chain)
    producer: dict[str, Op] = {}
    refusals: list[str] = []
    input_name = ""
    outputs: list[str] = []
    output_concat = False

    def fail(message: str) -> None:
        raise UserError(message)

    def tensor_of(arg) -> str:
        if not isinstance(arg, fx.Node) or not alias.get(arg.name):
            fail(f"fx node argument {arg!r} is not a tensor the FPGA flow knows (a constant, or a tuple used whole); {SUPPORTED}")
        return alias[arg.name]

    def new_tensor(node: fx.Node, name: str | None = None) -> str:
        name = name or node.name
        alias[node.name] = name
        nodes_of[name] = [node]
        return name

    def same_tensor(node: fx.Node, tensor: str) -> None:
        alias[node.name] = tensor
        nodes_of[tensor].append(node)

    def single_use(tensor: str) -> bool:
        return all(len(n.users) == 1 for n in nodes_of[tensor])

    def add(op: Op) -> None:
        for t in op.outputs:
            if t in producer or t == input_name:
                fail(f"tensor name {t!r} is produced twice while lowering {op.name}; rename the module")
            producer[t] = op
        ops.append(op)

    def fuse_target(node: fx.Node, what: str) -> tuple[str, Op]:
        """The layer a bias / ReLU node folds into: the only reader of a conv's output."""
        src = tensor_of(node.args[0])
        op = producer.get(src)
        if op is None or op.kind not in ("conv", "deform_dw", "deform_float") or op.relu or not single_use(src):
            fail(_refuse(node, f"a {what} that does not directly follow a conv or deformable layer"))
        return src, op

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if input_name:
                fail(f"the model takes more than one input ({node.name!r}); the FPGA flow runs single-image models")
            input_name = new_tensor(node)
        elif node.op == "get_attr":
            fail(_refuse(node, f"a parameter read in forward ({node.target})"))
        elif node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Conv2d):
                problem = _check_conv(node, node.target, mod)
                if problem:
                    fail(problem)
                add(Op(node.name, "conv", [tensor_of(node.args[0])], [new_tensor(node)], module=node.target,
                       kernel=mod.kernel_size[0], stride=mod.stride[0], groups=mod.groups))
            elif isinstance(mod, DeformConv3x3):
                x = tensor_of(node.args[0])
                variant = _deform_variant(mod.spec)
                if mod.spec.shape == "none":
                    if mod.stride not in (1, 2):
                        fail(_refuse(node, f"DeformConv3x3 {node.target!r} with stride {mod.stride}"))
                    add(Op(node.name, "conv", [x], [new_tensor(node)], module=node.target, kernel=3, stride=mod.stride, groups=mod.groups))
                elif variant == "dcn_dw_square_int" and mod.stride == 1:
                    dil = f"{node.name}_dilation"
                    nodes_of[dil] = []
                    add(Op(f"{node.name}_offset", "conv", [x], [dil], module=f"{node.target}.offset", kernel=3,
                           stride=1, groups=1, bound=mod.spec.bound, dilation=True))
                    add(Op(node.name, "deform_dw", [x, dil], [new_tensor(node)], module=node.target, kernel=3,
                           groups=mod.groups, bound=mod.spec.bound))
                else:
                    why = (
                        f"DeformConv3x3 {node.target!r} at fx node {node.name!r} is variant {variant} "
                        f"({_deform_obstacles(mod.spec, mod.stride)}), which the FPGA cannot run; the FPGA flow lowers "
                        f"only the deformable variants {', '.join(HARDWARE_VARIANTS)}"
                    )
                    if strict:
                        fail(why)
                    refusals.append(why)
                    add(Op(node.name, "deform_float", [x], [new_tensor(node)], module=node.target, groups=mod.groups))
            elif isinstance(mod, ChannelBias):
                src, op = fuse_target(node, "folded bias")
                if op.bias_module:
                    fail(_refuse(node, "a second folded bias"))
                op.bias_module = node.target
                same_tensor(node, src)
            elif type(mod) is nn.ReLU:
                src, op = fuse_target(node, "ReLU")
                op.relu = True
                same_tensor(node, src)
            elif isinstance(mod, nn.Identity) or (isinstance(mod, nn.Dropout) and not mod.training):
                same_tensor(node, tensor_of(node.args[0]))
            elif isinstance(mod, ChannelShuffle):
                add(Op(node.name, "shuffle", [tensor_of(node.args[0])], [new_tensor(node)], module=node.target, groups=mod.groups))
            elif isinstance(mod, nn.Upsample):
                if mod.mode != "nearest" or mod.size is not None or float(mod.scale_factor or 0) != 2.0:
                    fail(_refuse(node, f"nn.Upsample {node.target!r} (mode {mod.mode}, scale {mod.scale_factor}, size {mod.size})"))
                add(Op(node.name, "upsample", [tensor_of(node.args[0])], [new_tensor(node)], module=node.target))
            elif isinstance(mod, nn.BatchNorm2d):
                fail(_refuse(node, f"BatchNorm2d {node.target!r} that does not follow a conv (it cannot be folded)"))
            else:
                fail(_refuse(node, f"module {node.target!r} of type {type(mod).__name__}"))
        elif node.op in ("call_function", "call_method"):
            target = node.target
            name = getattr(target, "__name__", str(target))
            if _is_relu(node, modules):
                src, op = fuse_target(node, "ReLU")
                op.relu = True
                same_tensor(node, src)
            elif target in (torch.chunk, "chunk"):
                chunks = _arg(node, 1, "chunks")
                dim = _arg(node, 2, "dim", 0)
                if chunks != 2 or dim not in (1, -3):
                    fail(_refuse(node, f"chunk into {chunks} along dim {dim} (only 2 halves along channels)"))
                x = tensor_of(node.args[0])
                halves = [f"{node.name}_first", f"{node.name}_second"]  # fx's own names end in digits
                for h in halves:
                    nodes_of[h] = []
                alias[node.name] = ""  # a tuple; its halves are read through getitem
                add(Op(node.name, "split", [x], halves))
            elif target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0].name in alias:
                parent = node.args[0]
                op = producer.get(f"{parent.name}_first")
                if op is None or op.kind != "split" or node.args[1] not in (0, 1):
                    fail(_refuse(node, "indexing a tensor"))
                same_tensor(node, op.outputs[node.args[1]])
            elif target is torch.cat:
                parts = node.args[0] if node.args else node.kwargs["tensors"]
                dim = _arg(node, 1, "dim", 0)
                if dim not in (1, -3):
                    fail(_refuse(node, f"torch.cat along dim {dim} (only channels)"))
                names = [tensor_of(p) for p in parts]
                heads = all(
                    producer.get(t) is not None and producer[t].kind == "conv" and not producer[t].relu and single_use(t)
                    for t in names
                )
                if heads and list(node.users) and all(u.op == "output" for u in node.users):
                    # the heads' final cat: their int32 accumulators become the graph outputs
                    output_concat = True
                    for t in names:
                        producer[t].requant = False
                    outputs = names
                    alias[node.name] = ""
                else:
                    add(Op(node.name, "concat", names, [new_tensor(node)]))
            else:
                fail(_refuse(node, f"{node.op} {name}"))
        elif node.op == "output":
            value = node.args[0]
            if output_concat:
                continue
            items = list(value) if isinstance(value, (tuple, list)) else [value]
            outputs = [tensor_of(v) for v in items]
            for t in outputs:
                op = producer.get(t)
                if op is not None and op.kind == "conv" and not op.relu and single_use(t):
                    op.requant = False  # a raw head output
    if not input_name:
        fail("the model has no input; the FPGA flow runs single-image models")
    value_node = {t: ns[-1].name for t, ns in nodes_of.items() if ns}
    return gm, Plan(input_name, outputs, output_concat, ops, value_node, refusals)


# -- to the IR ------------------------------------------------------------------------

def _image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 1 or w < 1:
        raise UserError(f"image_size must be positive, got {image_size!r}")
    return int(h), int(w)


def lower(model: nn.Module, quant, image_size: int | tuple[int, int]) -> Graph:
    """The integer IR of ``model`` for ``image_size`` (int or (H, W)) input images.

    ``quant`` is a :class:`edgekit.fpga.quantize.QuantParams` from
    ``calibrate(model, ...)``, or calibration images (float, [B, 3, H, W] in
    [0, 1]) to calibrate with the defaults. Float-only deformable variants and
    any op the hardware lacks are refused before calibration.
    """
    from edgekit.fpga.quantize import QuantParams, calibrate, fold_batchnorm

    if isinstance(quant, QuantParams):
        qp = quant
        if qp.plan.refusals:
            raise UserError(qp.plan.refusals[0])
    else:
        plan_model(fold_batchnorm(model), strict=True)  # refuse before any calibration work
        qp = calibrate(model, quant)
    h, w = _image_hw(image_size)
    shapes = qp.shapes((h, w))
    plan = qp.plan
    tensors: dict[str, Tensor] = {}
    for name in plan.tensors():
        tq = qp.tensors[name]
        c, th, tw = shapes[name]
        tensors[name] = Tensor(name, (c, th, tw), tq.bits, tq.signed, float(tq.scale))
    layers: list[Layer] = []
    weights = {}
    for op in plan.ops:
        layer = Layer(op.name, op.kind, list(op.inputs), list(op.outputs), kernel=op.kernel, stride=op.stride,
                      groups=op.groups, relu=op.relu, requant=op.requant, bound=op.bound, source=op.module)
        if op.kind in ("conv", "deform_dw"):
            lq = qp.layers[op.name]
            layer.clamp = lq.clamp
            weights[f"{op.name}.weight"] = lq.weight.astype("int8")
            weights[f"{op.name}.bias"] = lq.bias.astype("int32")
            if op.requant:
                weights[f"{op.name}.multiplier"] = lq.multiplier.astype("int32")
                weights[f"{op.name}.shift"] = lq.shift.astype("int32")
        layers.append(layer)
    spec = qp.deform_spec
    graph = Graph(plan.input, list(plan.outputs), tensors, layers, weights)
    graph.meta = {
        "model": type(model).__name__,
        "variant": getattr(model, "variant", None),
        "bound": spec.bound if spec is not None and spec.shape == "square" else None,
        "image_size": [h, w],
        "num_classes": getattr(model, "num_classes", None),
        "input_scale": tensors[plan.input].scale,
        "output_concat": plan.output_concat,
        "output_channels": {n: tensors[n].shape[0] for n in plan.outputs},
        "output_scales": {n: [float(s) for s in qp.output_scales[n]] for n in plan.outputs},
        "calibration": qp.calibration,
    }
    graph.validate()
    return graph


def bits_for(bound: int) -> int:
    """Bits of an unsigned dilation map in [0, bound]."""
    return max(1, math.ceil(math.log2(bound + 1)))
