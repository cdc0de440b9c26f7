"""Export a torch artifact to ONNX, check it, and verify parity with its source.

The export is traced on real calibration samples when the recipe has data.
Named dims of the input specs become dynamic axes. A model whose batch dim is
dynamic is traced at batch 2 (tracing at batch 1 lets ops such as
``squeeze()`` bake the batch size in) and verified at batch 1 and 3.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from edgekit.artifact import Artifact, TensorSpec
from edgekit.errors import StepFailed, UserError
from edgekit.export.verify import VerifySettings, batch_of, require_parity, sample_rows, short_reason, verify_export
from edgekit.passes import Pass, PassConfig, PassContext

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TORCHSCRIPT_MAX_OPSET = 20  # torch 2.13: torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
DYNAMO_MAX_OPSET = 23  # torch 2.13: torch.onnx._constants.ONNX_MAX_OPSET
# A protobuf message cannot exceed 2 GiB, so bigger models keep weights in DATA_FILE.
EXTERNAL_DATA_BYTES = 2**31 - 2**26
QUANTIZED_REL_L2 = 0.1  # default parity bound of quantized exports vs their torch simulation


class OnnxConfig(PassConfig):
    exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript", description="torch.onnx exporter: torchscript (tracing) or dynamo (torch.export; needs onnxscript)"
    )
    opset: int = Field(17, ge=9, le=DYNAMO_MAX_OPSET, description=f"ONNX opset (torchscript exporter: 9 to {TORCHSCRIPT_MAX_OPSET})")
    dynamic: bool = Field(True, description="export the input specs' named dims (batch, seq, ...) as dynamic axes; false fixes every dim")
    simplify: bool = Field(False, description="simplify the graph with onnxslim (the unsimplified model is kept if that fails)")
    verify: VerifySettings = Field(default_factory=VerifySettings)

    @field_validator("opset")
    @classmethod
    def _opset_fits_exporter(cls, opset: int, info: ValidationInfo) -> int:
        if info.data.get("exporter", "torchscript") == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
            raise ValueError(
                f"opset {opset} is above {TORCHSCRIPT_MAX_OPSET}, the newest the torchscript exporter writes; lower it or set exporter: dynamo"
            )
        return opset


class ExportOnnx(Pass):
    """Export to ONNX with dynamic axes from the input specs; checked and parity-verified."""

    name = "export.onnx"
    kind = "export"
    Config = OnnxConfig
    accepts = ("torch",)
    produces = "onnx"

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import onnx

        cfg: OnnxConfig = self.config
        where = _where(ctx)
        started = time.perf_counter()
        if artifact.meta.get("quantized") and (cfg.exporter != "torchscript" or cfg.opset < 13):
            raise UserError(
                f"a quantized model exports with {where}.exporter: torchscript and opset 13 or higher "
                "(its layers write integer ops that need per-channel DequantizeLinear); change those settings"
            )
        if getattr(artifact.torch_module(), "kind", None) in ("decoder", "encdec"):
            # language models export as generation graphs with a key/value cache
            from edgekit.export.encdec_onnx import export_generation_artifact

            return export_generation_artifact(artifact, ctx, cfg)
        module = artifact.torch_module().eval()
        specs = artifact.inputs
        batch_dynamic = cfg.dynamic and isinstance(specs[0].shape[0], str)
        # batch-1 rows; a fixed-batch export is traced and verified at its own batch
        batch = 2 if batch_dynamic else specs[0].concrete_shape(ctx.dims)[0]
        n_verify = cfg.verify.samples if cfg.verify.enabled else 0
        rows = sample_rows(artifact, ctx, max(n_verify * (1 if batch_dynamic else batch), batch + 1))
        trace_feed = batch_of(rows, batch)
        n_out = _count_outputs(module, specs, trace_feed, batch_dynamic, where)
        outputs = _output_names(artifact.outputs, n_out)
        dynamic_axes = _dynamic_axes(specs, outputs) if cfg.dynamic else {}

        proto = _export(module, specs, trace_feed, outputs, dynamic_axes, cfg, ctx.workdir, where)
        if artifact.meta.get("quantized"):
            from edgekit.export.dedupe import dedupe_nodes, drop_unused
            from edgekit.export.qdq_chain import join_integer_chains

            ctx.metrics["deduplicated_nodes"] = dedupe_nodes(proto)
            ctx.metrics["integer_chains"] = join_integer_chains(proto)
            drop_unused(proto)
        simplify_info = None
        if cfg.simplify:
            proto, simplify_info = _simplify(proto, ctx)
        files = _save(proto, ctx.workdir, large=_state_bytes(module) > EXTERNAL_DATA_BYTES)
        try:
            onnx.checker.check_model(str(ctx.workdir / MODEL_FILE), full_check=True)
        except Exception as e:
            raise StepFailed(f"the exported model fails onnx.checker ({short_reason(e)}); try another {where}.opset or exporter") from None

        inputs = specs if cfg.dynamic else [s.model_copy(update={"shape": s.concrete_shape(ctx.dims)}) for s in specs]
        exported = artifact.derive(
            format="onnx", folder=ctx.workdir, files=files, builder=None, module=None, outputs=outputs, inputs=inputs
        )
        ctx.metrics["export"] = {
            "opset": cfg.opset,
            "exporter": cfg.exporter,
            "dynamic_axes": {k: {str(a): v for a, v in d.items()} for k, d in dynamic_axes.items()},
            "trace_batch": batch,
            "external_data": DATA_FILE in files.values(),
            "simplified": bool(simplify_info and simplify_info["status"] == "ok"),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if simplify_info is not None:
            ctx.metrics["export"]["simplify"] = simplify_info

        if cfg.verify.enabled:
            settings = cfg.verify
            if artifact.meta.get("quantized") and settings.rel_l2 is None:
                # integer kernels round differently from the torch simulation; judge the error as a whole
                settings = settings.model_copy(update={"rel_l2": QUANTIZED_REL_L2})
            step = 1 if batch_dynamic else batch
            feeds = [batch_of(rows[i * step :] + rows, step) for i in range(n_verify)]
            result = verify_export(artifact, exported, feeds, settings, where, trace_feed if batch_dynamic else None)
            if not result["passed"] and artifact.meta.get("quantized") and sum(ctx.metrics["integer_chains"].values()):
                from edgekit.export.qdq_chain import float_reference

                # joined chains round less than the simulation: judge them by the float model instead
                result["float_reference"] = float_reference(artifact, exported, feeds)
                result["passed"] = result["float_reference"]["passed"]
            ctx.metrics["verify"] = result
            require_parity(result, self.name, where)
        return exported


# -- inputs and names ---------------------------------------------------------

def _where(ctx: PassContext) -> str:
    """The step's recipe path for messages, when the pipeline provides it."""
    return getattr(ctx, "path", None) or "export[i].onnx"


def _count_outputs(module, specs: list[TensorSpec], feed: dict[str, np.ndarray], batch_dynamic: bool, where: str) -> int:
    """Run the module once in eager mode; a model that fails here would fail to trace too."""
    import torch

    from edgekit.runtimes.torch_eager import call_module, flatten_outputs

    names = [s.name for s in specs]
    tensors = {n: torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names}
    try:
        with torch.inference_mode():
            return len(flatten_outputs(call_module(module, tensors, names)))
    except Exception as e:
        if batch_dynamic:
            raise UserError(
                f"the model does not run at batch 2 in PyTorch ({short_reason(e)}); declare a fixed batch in "
                f"model.inputs (e.g. shape [1, ...]) or set {where}.dynamic: false"
            ) from None
        raise StepFailed(f"the model fails on its sample inputs before export ({short_reason(e)})") from None


def _output_names(declared: list[str], n_out: int) -> list[str]:
    if len(declared) == n_out:
        return list(declared)
    return ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]


def _dynamic_axes(specs: list[TensorSpec], outputs: list[str]) -> dict[str, dict[int, str]]:
    axes = {s.name: s.dynamic_dims() for s in specs if s.dynamic_dims()}
    batch = specs[0].shape[0] if specs else None
    if isinstance(batch, str):
        # outputs follow the inputs' batch; their other dims are inferred by the exporter
        axes.update({o: {0: batch} for o in outputs})
    return axes


# -- export -------------------------------------------------------------------

def _export(module, specs, feed, outputs, dynamic_axes, cfg: OnnxConfig, workdir: Path, where: str):
    """Run the torch exporter and return the ModelProto (weights loaded, external or not)."""
    import onnx
    import torch

    names = [s.name for s in specs]
    target = _positional(module, names)
    args = tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", suffix=".tmp", dir=workdir))
    try:
        with warnings.catch_warnings(), _quiet_output():
            # tracer and deprecation warnings are noise here: the parity and batch checks catch what they warn about
            warnings.simplefilter("ignore")
            try:
                if cfg.exporter == "dynamo":
                    _require_onnxscript()
                    program = torch.onnx.export(
                        target, args, dynamo=True, opset_version=cfg.opset, input_names=names,
                        output_names=outputs, dynamic_shapes=_dynamic_shapes(specs, dynamic_axes), verbose=False,
                    )
                    return program.model_proto
                path = scratch / MODEL_FILE
                torch.onnx.export(
                    target, args, str(path), dynamo=False, opset_version=cfg.opset, input_names=names,
                    output_names=outputs, dynamic_axes=dynamic_axes or None, do_constant_folding=True,
                    **_custom_opsets(module),
                )
            except UserError:
                raise
            except Exception as e:
                raise _explain(e, cfg.opset, where) from None
        return onnx.load(str(path))  # also reads any external weight files the exporter wrote
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _custom_opsets(module) -> dict[str, Any]:
    """Custom ONNX domains that submodules declare they write (``onnx_domains``), e.g. the
    com.microsoft MatMulNBits of 4-bit quantized layers; version 1 of each."""
    domains = {d for m in module.modules() for d in getattr(m, "onnx_domains", ())}
    return {"custom_opsets": {d: 1 for d in sorted(domains)}} if domains else {}


def _positional(module, names: list[str]):
    """``module`` taking its inputs positionally in spec order, so the graph inputs get the spec names.

    ``call_module`` (shared with the torch runtime) decides keyword or positional
    calling, so the export and the eager baseline call the model the same way.
    The wrapper shares the model's parameter registries instead of holding the
    model as a child, so ONNX initializers keep the model's own names
    (``conv1.weight``, not ``model.conv1.weight``).
    """
    import torch

    from edgekit.runtimes.torch_eager import call_module

    class PositionalInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._modules = module._modules
            self._parameters = module._parameters
            self._buffers = module._buffers
            self._non_persistent_buffers_set = module._non_persistent_buffers_set
            object.__setattr__(self, "inner", module)  # not registered: it would enter the shared registry

        def forward(self, *args):
            return call_module(self.inner, dict(zip(names, args)), names)

    return PositionalInputs().eval()


def _dynamic_shapes(specs: list[TensorSpec], dynamic_axes: dict[str, dict[int, str]]):
    """torch.export's form of the dynamic axes: one Dim per name, shared across inputs.

    The wrapper's ``forward(*args)`` takes one tuple, hence the extra nesting.
    """
    import torch

    if not dynamic_axes:
        return None
    dims: dict[str, Any] = {}
    per_input = []
    for s in specs:
        axes = dynamic_axes.get(s.name, {})
        per_input.append({a: dims.setdefault(n, torch.export.Dim(n)) for a, n in axes.items()} or None)
    return (tuple(per_input),)


def _require_onnxscript() -> None:
    import importlib.util

    if importlib.util.find_spec("onnxscript") is None:
        raise UserError("the dynamo exporter needs onnxscript: pip install onnxscript, or set exporter: torchscript")


@contextlib.contextmanager
def _quiet_output() -> Iterator[None]:
    """Hold back what the exporters write straight to file descriptors 1 and 2.

    The TorchScript exporter in torch 2.13 dumps its whole IR graph to stdout on
    any failure (its log switch is always on) and the dynamo exporter logs
    skipped torchvision ops; the error we raise says what failed.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with contextlib.ExitStack() as stack:
        for fd in (1, 2):
            try:
                saved = os.dup(fd)
            except OSError:  # no such descriptor (embedded interpreter): nothing to hide
                continue
            sink = stack.enter_context(tempfile.TemporaryFile())
            os.dup2(sink.fileno(), fd)
            stack.callback(_restore_fd, fd, saved)
        yield


def _restore_fd(fd: int, saved: int) -> None:
    (sys.stdout if fd == 1 else sys.stderr).flush()
    os.dup2(saved, fd)
    os.close(saved)


_OP = re.compile(r"operator '([\w:.]+)'|\b(aten[:.]{1,2}\w+(?:\.\w+)?)")
_ADDED_IN = re.compile(r"added in version (\d+)")


def _explain(e: Exception, opset: int, where: str) -> Exception:
    """Turn an exporter exception into one sentence, naming the operator when there is one."""
    text = str(e)
    op = _OP.search(text)
    if op:
        name = op.group(1) or op.group(2)
        added = _ADDED_IN.search(text)
        if added:
            fix = f"set {where}.opset: {added.group(1)} or higher"
        else:
            fix = f"try a higher {where}.opset, {where}.exporter: dynamo, or replace the op in the model"
        return UserError(f"ONNX export failed: operator {name} is not supported in opset {opset}; {fix}")
    return StepFailed(f"ONNX export failed ({type(e).__name__}: {short_reason(e)}); try {where}.exporter: dynamo or another opset")


# -- save, simplify -----------------------------------------------------------

def _save(proto, workdir: Path, large: bool) -> dict[str, str]:
    """Write the model atomically; weights go to one side file when the model is too big for protobuf."""
    import onnx

    from edgekit.fsio import atomic_path

    files = {"model": MODEL_FILE}
    with atomic_path(workdir / MODEL_FILE) as tmp:
        if large:
            # the data file lands first, so a model file never points at missing weights
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
            files["weights"] = DATA_FILE
        else:
            onnx.save_model(proto, str(tmp))
    return files


def _simplify(proto, ctx: PassContext) -> tuple[Any, dict[str, Any]]:
    """onnxslim's result, or the original model when onnxslim fails or breaks the graph."""
    import onnx

    before = len(proto.graph.node)
    try:
        import onnxslim

        slim = onnxslim.slim(proto)
        onnx.checker.check_model(slim)
    except Exception as e:
        ctx.log(f"  [yellow]onnxslim failed ({short_reason(e)}); keeping the unsimplified model[/yellow]")
        return proto, {"status": "failed", "error": short_reason(e), "nodes_before": before, "nodes_after": before}
    return slim, {"status": "ok", "nodes_before": before, "nodes_after": len(slim.graph.node)}


def _state_bytes(module) -> int:
    from edgekit.artifact import torch_state_bytes

    return torch_state_bytes(module)
