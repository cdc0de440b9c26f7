"""Integer TFLite models with ai-edge-quantizer, and edgekit-quantized models
carried over with their own plan and scales.

An edgekit-quantized module is first turned into its *deploy form*: every
quantized layer becomes a plain float layer holding its dequantized weight
(``dequantized_layer()``, a SmoothQuant divisor as an explicit multiply). The
float TFLite model converted from it is then quantized op by op:

- each FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D / EMBEDDING_LOOKUP op is
  matched to its edgekit layer by the values of its weight (layout-free: the
  sorted values are equal), so branches and reordering do not matter;
- the op gets the layer's mode: static -> int8 weights and activations,
  dynamic -> dynamic-range int8, weight-only -> int4/int8 weight blocks, a layer
  edgekit kept in float -> no quantization;
- weights are on edgekit's grid already, so per-channel symmetric min/max
  quantization recovers the same integers and scales (checked and reported:
  ``same_weight_scales``);
- a static layer's input range is edgekit's calibrated one (not a new min/max),
  written over the calibration result before quantization; the rest of the
  integer chain (activations, pooling, reshapes) is calibrated on the same data.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import StepFailed

WEIGHT_OPS = {"FULLY_CONNECTED": 1, "CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "EMBEDDING_LOOKUP": 1}
SIGNATURE = "serving_default"


class PositionalInputs:
    """Calls a model with the artifact's inputs given positionally in spec order (litert-torch traces args)."""

    def __new__(cls, module, names: list[str]):
        import torch

        from edgekit.runtimes.torch_eager import call_module

        class _Positional(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, *args):
                return call_module(self.inner, dict(zip(names, args)), names)

        return _Positional()


@dataclass
class DeployLayer:
    name: str
    mode: str  # static | dynamic | weight_only | float
    bits: int
    group_size: int
    symmetric: bool
    reduce_range: bool  # 7-bit weights for x86 without VNNI: LiteRT requantizes them to full int8
    input_range: tuple[float, float] | None
    weight: np.ndarray  # dequantized, as the float layer holds it
    w_scale: np.ndarray  # edgekit's scales, flattened


def deploy_form(module) -> tuple[Any, list[DeployLayer]]:
    """A float copy of ``module`` with quantized layers replaced by their dequantized float layers."""
    model = copy.deepcopy(module).eval()
    found: list[tuple[str, Any]] = [(n, m) for n, m in model.named_modules() if hasattr(m, "dequantized_layer")]
    layers = []
    for name, layer in found:
        float_layer = layer.dequantized_layer()
        weight_holder = float_layer[-1] if hasattr(float_layer, "__getitem__") else float_layer
        cfg = layer.cfg
        layers.append(
            DeployLayer(
                name=name,
                mode=cfg.mode if layer.enabled else "float",
                bits=cfg.bits,
                group_size=cfg.group_size,
                symmetric=cfg.symmetric,
                reduce_range=cfg.reduce_range,
                input_range=layer.input_range(),
                weight=weight_holder.weight.detach().numpy().copy(),
                w_scale=layer.w_scale.detach().numpy().ravel().copy(),
            )
        )
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, float_layer)
    return model, layers


# -- reading TFLite models ---------------------------------------------------------

def _interpreter(path: Path):
    from edgekit.runtimes.litert import find_interpreter

    module = find_interpreter()[0]
    it = module.Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it


def op_summary(path: Path) -> dict[str, Any]:
    """Op counts of a TFLite model and the storage types of its weight ops' weights (INT8, INT4, FLOAT32...)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    counts: dict[str, int] = {}
    weights: dict[str, int] = {}
    for sg in model.subgraphs:
        for op in sg.operators:
            code = model.operatorCodes[op.opcodeIndex]
            name = op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
            counts[name] = counts.get(name, 0) + 1
            if name in WEIGHT_OPS and len(op.inputs) > 1 and op.inputs[1] >= 0:
                kind = type_names.get(sg.tensors[op.inputs[1]].type, "?")
                weights[kind] = weights.get(kind, 0) + 1
    integer = sum(n for k, n in weights.items() if k.startswith(("INT", "UINT")))
    return {"op_counts": dict(sorted(counts.items())), "weight_types": weights, "integer_weight_ops": integer}


def _weight_ops(it) -> list[dict[str, Any]]:
    """Weight-carrying ops: name, op type, input / output tensor names and the weight's values."""
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    ops = []
    for op in it._get_ops_details():
        if op["op_name"] not in WEIGHT_OPS or len(op["inputs"]) < 2:
            continue
        w_idx = int(op["inputs"][WEIGHT_OPS[op["op_name"]]])
        try:
            values = it.get_tensor(w_idx)
        except ValueError:
            continue  # not a constant
        data_idx = int(op["inputs"][0])
        ops.append(
            {
                "type": op["op_name"],
                "input": tensors[data_idx]["name"],
                "output": tensors[int(op["outputs"][0])]["name"],
                "weight_name": tensors[w_idx]["name"],
                "values": np.asarray(values, np.float32),
            }
        )
    return ops


def match_layers(ops: list[dict[str, Any]], layers: list[DeployLayer]) -> dict[int, DeployLayer]:
    """Op index -> edgekit layer, by equal weight values (sorted, so layouts do not matter)."""
    keyed = [(np.sort(lay.weight.ravel().astype(np.float32)), lay) for lay in layers]
    matched: dict[int, DeployLayer] = {}
    used: set[int] = set()
    for i, op in enumerate(ops):
        values = np.sort(op["values"].ravel())
        for j, (key, lay) in enumerate(keyed):
            if j in used or key.shape != values.shape:
                continue
            tol = 1e-6 * (float(np.abs(key).max()) + 1e-12)
            if np.allclose(key, values, rtol=0, atol=tol):
                matched[i] = lay
                used.add(j)
                break
    return matched


# -- quantization --------------------------------------------------------------

def quantize(
    float_path: Path,
    target: Path,
    mode: str,
    input_names: list[str],
    calibration: list[dict[str, np.ndarray]],
    layers: list[DeployLayer],
    where: str,
) -> dict[str, Any]:
    """Quantize a float TFLite model to ``target``; returns what was done, for the report."""
    from ai_edge_quantizer import qtyping, quantizer, recipe

    q = quantizer.Quantizer(str(float_path))
    info: dict[str, Any] = {}
    overrides: dict[str, tuple[float, float]] = {}
    if mode == "int8":
        q.load_quantization_recipe(recipe.static_wi8_ai8())
    elif mode == "dynamic_int8":
        q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    elif mode == "int4_weights":
        # LiteRT's 4-bit kernels: symmetric blocks, activations quantized at run time
        for op in (qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.EMBEDDING_LOOKUP):
            q.add_dynamic_config(".*", op, 4, qtyping.QuantGranularity.BLOCKWISE_32)
    elif mode == "edgekit":
        overrides, info = _edgekit_recipe(q, float_path, layers, qtyping)
    else:
        raise ValueError(f"unknown TFLite quantization mode {mode!r}")

    result = None
    if q.need_calibration:
        # int64 inputs (token ids) become int32 in the TFLite model
        dtypes = {k: d["dtype"] for k, d in _interpreter(float_path).get_signature_runner().get_input_details().items()}
        data = {
            SIGNATURE: [
                {f"args_{i}": row[n].astype(dtypes.get(f"args_{i}", row[n].dtype), copy=False) for i, n in enumerate(input_names)}
                for row in calibration
            ]
        }
        try:
            result = q.calibrate(data, num_threads=1)
        except (ValueError, RuntimeError) as e:
            raise StepFailed(f"calibrating the TFLite model failed ({str(e).strip().splitlines()[0][:200]}); try another {where}.quantize") from None
        for tensor, (lo, hi) in overrides.items():
            if tensor in result:
                result[tensor] = {"min": np.array([lo], np.float32), "max": np.array([hi], np.float32)}
        info["calibration_samples"] = len(calibration)
        info["ranges_from_edgekit"] = sum(t in result for t in overrides)
    try:
        quantized = q.quantize(result, enable_progress_report=False)
    except Exception as e:
        raise StepFailed(f"ai-edge-quantizer failed ({str(e).strip().splitlines()[0][:200]}); try another {where}.quantize") from None
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(bytes(quantized.quantized_model))
    tmp.replace(target)
    if mode == "edgekit":
        present = [lay for lay in layers if lay.name not in info.get("folded_or_unused_layers", [])]
        info["same_weight_scales"] = _same_scales(target, present)
    return info


def _edgekit_recipe(q, float_path: Path, layers: list[DeployLayer], qtyping) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """Per-op configs from the edgekit plan; returns the input ranges to impose and a summary."""
    ops = _weight_ops(_interpreter(float_path))
    matched = match_layers(ops, layers)
    # a layer with no weight op left was folded into a constant (e.g. position embeddings read at fixed
    # positions) or removed as unused (e.g. a pooler whose output the model never returns): it stays as the
    # converter made it, with its dequantized values, and the report lists it
    unmatched = [lay.name for lay in layers if lay not in matched.values() and lay.mode != "float"]
    op_name = qtyping.TFLOperationName
    static = any(lay.mode == "static" for lay in matched.values())
    if static:
        # the whole chain in int8, as a full-integer TFLite model runs fastest; weight ops below get their own mode
        q.add_static_config(".*", op_name.ALL_SUPPORTED, 8, 8)
    overrides: dict[str, tuple[float, float]] = {}
    modes: dict[str, int] = {}
    regridded: list[str] = []  # asymmetric blocks or 7-bit weights: LiteRT requantizes them on its own grid
    for i, lay in matched.items():
        op = ops[i]
        scope = "^" + re.escape(op["output"] + ";") + "$"  # ai-edge-quantizer's scope: output names, each ended by ";"
        tfl_op = getattr(op_name, op["type"])
        modes[lay.mode] = modes.get(lay.mode, 0) + 1
        if lay.mode == "float":
            q.update_quantization_recipe(scope, tfl_op, None, algorithm_key="no_quantize")
        elif lay.mode == "static":
            q.add_static_config(scope, tfl_op, 8, lay.bits)
            if lay.input_range is not None:
                overrides[op["input"]] = lay.input_range
        elif lay.mode == "dynamic":
            q.add_dynamic_config(scope, tfl_op, lay.bits)
        else:  # weight_only: LiteRT's block kernels are symmetric with run-time activation quantization
            granularity = getattr(qtyping.QuantGranularity, f"BLOCKWISE_{lay.group_size}", None) if lay.group_size else None
            try:
                q.add_dynamic_config(scope, tfl_op, lay.bits, granularity or qtyping.QuantGranularity.CHANNELWISE)
                same_grid = lay.symmetric and (granularity is not None or not lay.group_size)
            except ValueError:
                # LiteRT has blocks only for 4-bit weights: other widths go per channel
                q.add_dynamic_config(scope, tfl_op, lay.bits, qtyping.QuantGranularity.CHANNELWISE)
                same_grid = False
            if not same_grid:
                regridded.append(lay.name)
        if lay.mode in ("static", "dynamic") and lay.reduce_range:
            regridded.append(lay.name)
    summary = {
        "matched_layers": len(matched), "layers": len(layers), "layer_modes": modes,
        "regridded_layers": regridded, "folded_or_unused_layers": unmatched,
    }
    return overrides, summary


def _same_scales(path: Path, layers: list[DeployLayer]) -> dict[str, int]:
    """How many edgekit layers' weight scales the integer TFLite model holds unchanged (per-channel int8)."""
    it = _interpreter(path)
    tensors = it.get_tensor_details()
    by_scales = [np.sort(np.asarray(t["quantization_parameters"]["scales"], np.float64)) for t in tensors if np.dtype(t["dtype"]).kind == "i"]
    checked = same = 0
    for lay in layers:
        if lay.mode in ("float", "weight_only"):
            continue
        checked += 1
        ours = np.sort(lay.w_scale.astype(np.float64))
        if any(s.shape == ours.shape and np.allclose(s, ours, rtol=1e-5, atol=0) for s in by_scales):
            same += 1
    return {"checked": checked, "same": same}
