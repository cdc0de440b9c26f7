"""Export a torch artifact to ONNX, check it, and verify parity with its source."""

from __future__ import annotations

import re
import time
import warnings
from typing import Literal

from pydantic import Field

from edgekit.artifact import Artifact
from edgekit.errors import StepFailed, UserError
from edgekit.export.verify import VerifySettings, check_parity, require_parity
from edgekit.passes import Pass, PassConfig, PassContext

MODEL_FILE = "model.onnx"


class OnnxConfig(PassConfig):
    opset: int = Field(17, ge=9, le=20, description="ONNX opset version")
    dynamic: bool = Field(True, description="export named dims of the input specs (e.g. batch, seq) as dynamic axes")
    simplify: bool = Field(False, description="simplify the graph with onnxslim (kept only if it still verifies)")
    exporter: Literal["torchscript", "dynamo"] = Field("torchscript", description="torch.onnx exporter (dynamo needs onnxscript)")
    verify: VerifySettings = Field(default_factory=VerifySettings)


class ExportOnnx(Pass):
    """Export to ONNX with dynamic axes from the input specs; checked and parity-verified."""

    name = "export.onnx"
    kind = "export"
    Config = OnnxConfig
    accepts = ("torch",)
    produces = "onnx"

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import onnx
        import torch

        from edgekit.fsio import atomic_path
        from edgekit.runtimes.torch_eager import flatten_outputs

        cfg: OnnxConfig = self.config
        started = time.perf_counter()
        module = artifact.torch_module().eval()
        feeds = ctx.samples(1)[0] if ctx.samples else {s.name: s.random(ctx.dims) for s in artifact.inputs}
        names = [s.name for s in artifact.inputs]
        args = tuple(torch.from_numpy(feeds[n]) for n in names)
        with torch.inference_mode():
            n_out = len(flatten_outputs(module(*args)))
        outputs = list(artifact.outputs) if len(artifact.outputs) == n_out else (
            ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        )
        dynamic_axes = {}
        if cfg.dynamic:
            for s in artifact.inputs:
                if s.dynamic_dims():
                    dynamic_axes[s.name] = s.dynamic_dims()
            first = artifact.inputs[0].shape[0]
            if isinstance(first, str):
                for o in outputs:
                    dynamic_axes[o] = {0: first}
        path = ctx.workdir / MODEL_FILE
        with atomic_path(path) as tmp, warnings.catch_warnings():
            try:
                if cfg.exporter == "dynamo":
                    self._dynamo(module, args, tmp, names, outputs, cfg)
                else:
                    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter is supported, just no longer default
                    torch.onnx.export(
                        module, args, str(tmp), dynamo=False, opset_version=cfg.opset, input_names=names,
                        output_names=outputs, dynamic_axes=dynamic_axes or None, do_constant_folding=True,
                    )
            except UserError:
                raise
            except Exception as e:
                raise _explain(e, cfg.opset) from None
            onnx.checker.check_model(str(tmp), full_check=True)
        simplified = False
        if cfg.simplify:
            simplified = self._simplify(path, ctx)
        exported = artifact.derive(format="onnx", folder=ctx.workdir, files={"model": MODEL_FILE}, builder=None, module=None, outputs=outputs)
        ctx.metrics["export"] = {
            "opset": cfg.opset,
            "exporter": cfg.exporter,
            "dynamic_axes": {k: {str(a): v for a, v in d.items()} for k, d in dynamic_axes.items()},
            "simplified": simplified,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if cfg.verify.enabled:
            samples = ctx.samples(cfg.verify.samples) if ctx.samples else [
                {s.name: s.random(ctx.dims, seed=i) for s in artifact.inputs} for i in range(cfg.verify.samples)
            ]
            result = check_parity(artifact, exported, samples, cfg.verify)
            if dynamic_axes and isinstance(artifact.inputs[0].shape[0], str):
                result["batch_dynamic"] = self._check_batch(artifact, exported, samples)
            ctx.metrics["verify"] = result
            require_parity(result, "export.onnx")
        return exported

    @staticmethod
    def _dynamo(module, args, path, names, outputs, cfg: OnnxConfig) -> None:
        import importlib.util

        import torch

        if importlib.util.find_spec("onnxscript") is None:
            raise UserError("the dynamo exporter needs onnxscript; pip install onnxscript, or use exporter: torchscript")
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=cfg.opset, input_names=names, output_names=outputs)
        prog.save(str(path))

    @staticmethod
    def _simplify(path, ctx: PassContext) -> bool:
        import onnx

        try:
            import onnxslim

            slim = onnxslim.slim(onnx.load(str(path)))
            from edgekit.fsio import atomic_path

            with atomic_path(path) as tmp:
                onnx.save(slim, str(tmp))
            return True
        except Exception as e:  # keep the unsimplified, already-checked model
            ctx.log(f"  [yellow]onnxslim failed ({type(e).__name__}); keeping the unsimplified model[/yellow]")
            return False

    @staticmethod
    def _check_batch(source: Artifact, exported: Artifact, samples) -> bool:
        """The export must run at a batch other than the traced one."""
        import numpy as np

        from edgekit.runtimes import load_session

        feeds = {k: np.concatenate([samples[0][k], samples[-1][k]]) for k in samples[0]}
        try:
            load_session(exported).run(feeds)
        except Exception as e:
            raise StepFailed(
                f"the ONNX export does not run at batch 2 ({str(e).splitlines()[0][:160]}); "
                "the model is not batch-dynamic: set export.onnx dynamic: false or fix the model"
            ) from None
        return True


_OP = re.compile(r"(aten::\w+|operator '?[\w:.]+'?)")


def _explain(e: Exception, opset: int) -> Exception:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    op = _OP.search(str(e))
    if op:
        return UserError(
            f"ONNX export failed: {op.group(1)} is not supported at opset {opset} ({msg[:160]}); "
            "try a higher export.onnx opset, the dynamo exporter, or replace the op in the model"
        )
    return StepFailed(f"ONNX export failed: {msg[:300]}")
