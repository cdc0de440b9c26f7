"""Export a torch artifact to TFLite with litert-torch, optionally integer, and
verify parity on LiteRT.

- ``quantize: none`` keeps float32.
- ``dynamic_int8`` stores int8 weights per channel; activations are quantized
  at run time (TFLite's dynamic-range kernels).
- ``int8`` is full integer: int8 weights per channel and int8 activations per
  tensor, calibrated on the recipe's calibration split; the model's inputs and
  outputs are int8 too (the LiteRT adapter quantizes and dequantizes them).
- ``int4_weights`` stores symmetric 4-bit weight blocks of 32 (Linear and
  embedding tables); activations are quantized at run time.
- ``auto`` (default): float for a float model; for a model quantized by
  edgekit, the same plan and the same scales (see ``export/tflite_quant.py``).

TFLite models have fixed shapes: named dims are resolved from the recipe's
``model.dims`` (1 when unset) and recorded in the artifact's input specs.
With ``layout: NHWC`` 4-D inputs are taken channels-last, TFLite's native
layout, and the specs say so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from edgekit.artifact import Artifact
from edgekit.errors import StepFailed, UserError
from edgekit.export.verify import VerifySettings, batch_of, require_parity, sample_rows, short_reason, check_parity
from edgekit.passes import Pass, PassConfig, PassContext
from edgekit.runtimes import channels_last

MODEL_FILE = "model.tflite"
QUANTIZED_REL_L2_TFLITE = 0.25  # default parity bound of integer TFLite exports (see run())


class TfliteConfig(PassConfig):
    quantize: Literal["auto", "none", "dynamic_int8", "int8", "int4_weights"] = Field(
        "auto",
        description="auto: float, or an edgekit-quantized model's own plan and scales; none; dynamic_int8 (int8 weights, "
        "activations quantized at run time); int8 (full integer, calibrated); int4_weights (symmetric 4-bit blocks of 32, "
        "activations quantized at run time)",
    )
    layout: Literal["NCHW", "NHWC"] = Field("NCHW", description="layout of 4-D inputs; NHWC is TFLite's own (no transposes at the edges)")
    calibration_samples: int = Field(64, ge=1, le=100000, description="calibration inputs for int8 (the recipe's calibration split)")
    verify: VerifySettings = Field(default_factory=VerifySettings)


class ExportTflite(Pass):
    """Export to TFLite (litert-torch; integer via ai-edge-quantizer); parity-verified on LiteRT."""

    name = "export.tflite"
    kind = "export"
    Config = TfliteConfig
    accepts = ("torch", "onnx")
    produces = "tflite"

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        cfg: TfliteConfig = self.config
        where = ctx.path or "export[i].tflite"  # the step's YAML path, for messages
        if artifact.format == "onnx":
            raise UserError(
                f"{where} converts torch models, and this model is ONNX only; give the recipe the torch model, or convert "
                "the ONNX file with onnx2tf in its own virtualenv (it pins TensorFlow 2.19; see docs/tflite.md)"
            )
        quantized = bool(artifact.meta.get("quantized"))
        mode = cfg.quantize
        if quantized and mode != "auto":
            raise UserError(
                f"{where}.quantize: {mode} applies to float models; this model is already quantized by edgekit, "
                "so use quantize: auto (its own scales), or export the float step with of:"
            )
        if mode == "auto":
            mode = "edgekit" if quantized else "none"
        started = time.perf_counter()
        _require_converter()

        from edgekit.export import tflite_quant

        module = artifact.torch_module().eval()
        layers = []
        if mode == "edgekit":
            module, layers = tflite_quant.deploy_form(module)
            if not any(lay.mode != "float" for lay in layers):
                ctx.log("  every layer of this model was kept in float by its quantizer: exporting float")
                mode = "none"
        specs = artifact.inputs
        n_verify = cfg.verify.samples if cfg.verify.enabled else 0
        rows = sample_rows(artifact, ctx, max(n_verify, cfg.calibration_samples if mode in ("int8", "edgekit") else 1, 1))
        channel_last = _channel_last_inputs(specs, rows[0]) if cfg.layout == "NHWC" else []
        float_path = ctx.workdir / "float.tflite"
        _convert(module, specs, rows[0], channel_last, float_path, where)

        target = ctx.workdir / MODEL_FILE
        quant_info: dict = {}
        if mode == "none":
            float_path.replace(target)
        else:
            calib = [channels_last(r, channel_last) for r in rows[: cfg.calibration_samples]]
            quant_info = tflite_quant.quantize(float_path, target, mode, [s.name for s in specs], calib, layers, where)
            float_path.unlink()

        inputs = []
        for s in specs:
            shape = list(rows[0][s.name].shape)
            if s.name in channel_last:
                shape = [shape[0], *shape[2:], shape[1]]
            inputs.append(s.model_copy(update={"shape": shape, "layout": "NHWC" if s.name in channel_last else s.layout}))
        meta = {k: v for k, v in artifact.meta.items()}
        if channel_last:
            meta["channel_last_inputs"] = channel_last  # probes feed NCHW data; the runtime layer transposes it
        meta["tflite_quantize"] = mode
        exported = artifact.derive(format="tflite", folder=ctx.workdir, files={"model": MODEL_FILE}, builder=None, module=None, inputs=inputs, meta=meta)
        ctx.metrics["export"] = {
            "quantize": mode,
            "layout": cfg.layout,
            "channel_last_inputs": channel_last,
            "ops": tflite_quant.op_summary(target),
            **quant_info,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if cfg.verify.enabled:
            settings = cfg.verify
            if mode != "none" and settings.rel_l2 is None:
                # a full-integer TFLite chain also quantizes the tensors between layers, which neither a float
                # source nor edgekit's simulation does: the bound is looser than for ONNX, and the accuracy probe
                # on the eval split shows what it really costs
                settings = settings.model_copy(update={"rel_l2": QUANTIZED_REL_L2_TFLITE})
            feeds = [batch_of(rows[i:] + rows, 1) for i in range(n_verify)]
            try:
                result = check_parity(artifact, exported, feeds, settings)
            except UserError:
                raise
            except Exception as e:
                raise StepFailed(f"the TFLite export fails in LiteRT ({short_reason(e)}); try other {where} settings") from None
            ctx.metrics["verify"] = result
            require_parity(result, self.name, where)
        return exported


def _require_converter() -> None:
    try:
        import litert_torch  # noqa: F401
    except ImportError:
        raise UserError(
            "export.tflite needs litert-torch; install edgekit's tflite extra and then "
            "pip install --no-deps litert-torch==0.10.0 litert-converter==0.5.0 xdsl==0.28.0 (as `make install` does)"
        ) from None


def _channel_last_inputs(specs, row: dict[str, np.ndarray]) -> list[str]:
    return [s.name for s in specs if row[s.name].ndim == 4 and s.dtype in ("float32", "float16")]


def _convert(module, specs, row: dict[str, np.ndarray], channel_last: list[str], path: Path, where: str) -> None:
    import litert_torch
    import torch

    from edgekit.export.tflite_quant import PositionalInputs

    wrapped = PositionalInputs(module, [s.name for s in specs])
    if channel_last:
        wrapped = litert_torch.to_channel_last_io(wrapped, args=[i for i, s in enumerate(specs) if s.name in channel_last])
        row = channels_last(row, channel_last)
    args = tuple(torch.from_numpy(np.ascontiguousarray(row[s.name])) for s in specs)
    try:
        edge_model = litert_torch.convert(wrapped.eval(), args)
        edge_model.export(str(path))
    except Exception as e:
        raise StepFailed(
            f"litert-torch could not convert the model ({short_reason(e)}); an op it does not lower is the usual cause: "
            f"replace it in the model, or export ONNX instead"
        ) from None
