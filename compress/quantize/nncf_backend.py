"""``quantize.ptq`` with ``backend: nncf``: NNCF's ONNX post-training quantization.

For users who want NNCF's algorithms from the same recipe and data. NNCF's
PyTorch backend does not work with torch 2.13, so a torch model is exported to
float ONNX first; the result is an ONNX artifact (QDQ for int8, NNCF's
weight compression for 4-bit), probed like any other step.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import tempfile
from pathlib import Path

from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.passes import PassContext

from .config import QuantizeSettings


def quantize_with_nncf(artifact: Artifact, cfg: QuantizeSettings, ctx: PassContext) -> Artifact:
    try:
        import nncf
    except ImportError:
        raise UserError("backend: nncf needs NNCF: pip install 'edgekit[nncf]' (or remove backend: nncf)") from None
    import onnx

    from edgekit.export.onnx import EXTERNAL_DATA_BYTES, _save

    if cfg.max_drop is not None or cfg.size_budget is not None:
        raise UserError("max_drop and size_budget are edgekit-backend features; remove them or the backend: nncf line")
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as scratch:
        model = _float_onnx(artifact, ctx, Path(scratch))
        feeds = ctx.samples(cfg.activations.samples) if ctx.samples else []
        if not feeds:
            raise UserError("backend: nncf needs calibration samples; add a data: section (data.calibration)")
        ignored = _ignored_scope(model, cfg.skip, nncf)
        if cfg.weights.bits == 4:
            mode = nncf.CompressWeightsMode.INT4_SYM if cfg.weights.symmetric else nncf.CompressWeightsMode.INT4_ASYM
            result = nncf.compress_weights(model, mode=mode, group_size=cfg.weights.group_size, ratio=1.0, ignored_scope=ignored)
            how = f"weight compression {mode.value}, group {cfg.weights.group_size}"
        else:
            preset = nncf.QuantizationPreset.PERFORMANCE if cfg.activations.symmetric else nncf.QuantizationPreset.MIXED
            model_type = nncf.ModelType.TRANSFORMER if _looks_like_transformer(model) else None
            result = nncf.quantize(
                model, nncf.Dataset(feeds), preset=preset, subset_size=len(feeds), model_type=model_type, ignored_scope=ignored,
            )
            how = f"int8 {preset.value}" + (", transformer" if model_type else "")
    files = _save(result, ctx.workdir, large=result.ByteSize() > EXTERNAL_DATA_BYTES)
    onnx.checker.check_model(str(ctx.workdir / files["model"]))
    ctx.metrics["quantize"] = {"backend": "nncf", "nncf": nncf.__version__, "method": how, "calibration_samples": len(feeds)}
    return artifact.derive(format="onnx", folder=ctx.workdir, files=files, builder=None, module=None)


def _float_onnx(artifact: Artifact, ctx: PassContext, scratch: Path):
    import onnx

    if artifact.format == "onnx":
        return onnx.load(str(artifact.path("model")))
    from edgekit.export.onnx import ExportOnnx, OnnxConfig

    sub = dataclasses.replace(ctx, workdir=scratch, metrics={})
    exported = ExportOnnx(OnnxConfig(verify={"enabled": False})).run(artifact, sub)
    return onnx.load(str(exported.path("model")))


def _ignored_scope(model, patterns: list[str], nncf):
    if not patterns:
        return None
    names = [n.name for n in model.graph.node if any(fnmatch.fnmatchcase(n.name, p) for p in patterns)]
    if not names:
        raise UserError(f"skip patterns {patterns} match no node of the ONNX model NNCF quantizes; use ONNX node names with backend: nncf")
    return nncf.IgnoredScope(names=names)


def _looks_like_transformer(model) -> bool:
    ops = {n.op_type for n in model.graph.node}
    return "Softmax" in ops and ("LayerNormalization" in ops or "ReduceMean" in ops) and "Conv" not in ops
