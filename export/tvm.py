"""Export to Apache TVM (Relax): host and cross-compiled libraries, optional
MetaSchedule tuning, parity verified on the TVM runtime.

The model goes through ONNX: an ONNX artifact is imported as it is; a torch
artifact is first exported by ``export.onnx`` (its ``onnx:`` settings, always
with fixed shapes) into a subfolder of the step. TVM builds have static
shapes: named dims come from the recipe's ``model.dims`` (1 when unset) and
the artifact's input specs record the concrete shapes.

Quantized models keep their integer weights: ``tvm_onnx.prepare`` rewrites the
ops TVM 0.27 cannot import (MatMulNBits, GatherBlockQuantized, ...) into ones
it can, from the same integer weights, scales and zero points, and the int8 /
4-bit weights stay integers in the library (TVM's constant folding would
otherwise turn them into float); they are dequantized in the kernels at run
time.

Untuned builds are TVM's default lowering of the legalized and fused module.
TVM 0.27 offers no other untuned CPU schedules than the dlight CPU rules
(GEMV, Reduction), and those made the digits CNN 2x and MiniLM slower here,
so they are not applied; tuning is what makes TVM fast on CPU.

Targets: ``host`` (LLVM for this CPU, what the runtime adapter loads and
verifies) and cross builds for ``aarch64-linux-gnu`` and
``armv7a-linux-gnueabihf`` (NEON), linked with the Debian cross compilers.
With ``tune.trials`` > 0 the host build is tuned with MetaSchedule; the
records live under the run folder (``tvm-tuning/<hash>``), so rerunning the
recipe reuses them instead of tuning again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgekit.artifact import Artifact
from edgekit.errors import EdgekitError, StepFailed, UserError
from edgekit.export.onnx import QUANTIZED_REL_L2, OnnxConfig
from edgekit.export.verify import VerifySettings, batch_of, require_parity, sample_rows, short_reason, verify_export
from edgekit.passes import Pass, PassConfig, PassContext

HOST_FILE = "model.so"
TUNING_DIR = "tvm-tuning"
TUNING_RECORD = "tuning.json"
OPT_LEVEL = 3  # as MetaSchedule's compile_relax; 2 and 3 built equally fast code in TVM 0.27 (measured)
TargetName = Literal["host", "aarch64-linux-gnu", "armv7a-linux-gnueabihf"]
# cross targets: LLVM target, the g++ that links the library, its Debian package, the ELF machine it makes
CROSS = {
    "aarch64-linux-gnu": {
        "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        "cc": "aarch64-linux-gnu-g++", "package": "g++-aarch64-linux-gnu", "machine": "AArch64",
    },
    "armv7a-linux-gnueabihf": {
        "target": {"kind": "llvm", "mtriple": "armv7a-linux-gnueabihf", "mattr": ["+neon"], "mfloat-abi": "hard"},
        "cc": "arm-linux-gnueabihf-g++", "package": "g++-arm-linux-gnueabihf", "machine": "ARM",
    },
}


class TuneSettings(PassConfig):
    trials: int = Field(0, ge=0, le=1_000_000, description="MetaSchedule trials for the host build over all kernels; 0 builds untuned (TVM's default schedules)")
    trials_per_task: int = Field(16, ge=1, description="most trials one kernel (a fused TIR function) gets")
    timeout_s: float = Field(
        300, gt=0, description="builder and runner timeout per candidate, in seconds (the first one also starts a builder process, ~10 s)"
    )


class TvmConfig(PassConfig):
    targets: list[TargetName] = Field(
        default_factory=lambda: ["host"], min_length=1,
        description="libraries to build: host (this CPU; verified and benchmarked here), aarch64-linux-gnu, armv7a-linux-gnueabihf (cross-compiled with NEON)",
    )
    tune: TuneSettings = Field(default_factory=TuneSettings, description="MetaSchedule tuning of the host build")
    integer_weights: bool = Field(
        True, description="an integer model keeps its int8 / 4-bit weights as integers in the library (dequantized in the kernels at run time); "
        "false lets TVM fold them to float at build time (bigger library, no per-call dequantization)",
    )
    onnx: OnnxConfig = Field(
        default_factory=lambda: OnnxConfig(dynamic=False),
        description="how a torch model is exported to ONNX on the way to TVM (dynamic is always false here: TVM builds have fixed shapes)",
    )
    verify: VerifySettings = Field(default_factory=VerifySettings)

    @field_validator("targets")
    @classmethod
    def _unique(cls, targets: list[str]) -> list[str]:
        twice = sorted({t for t in targets if targets.count(t) > 1})
        if twice:
            raise ValueError(f"target {twice[0]} is listed twice; list each target once")
        return targets

    @model_validator(mode="after")
    def _fixed_onnx(self) -> "TvmConfig":
        if self.onnx.dynamic:
            if "dynamic" in self.onnx.model_fields_set:
                raise ValueError("onnx.dynamic must be false: TVM builds have fixed shapes; set the sizes in model.dims")
            self.onnx = self.onnx.model_copy(update={"dynamic": False})
        return self


class ExportTvm(Pass):
    """Export to TVM (Relax from ONNX): host and cross builds, MetaSchedule tuning; parity-verified on TVM."""

    name = "export.tvm"
    kind = "export"
    Config = TvmConfig
    accepts = ("torch", "onnx")
    produces = "tvm"

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        cfg: TvmConfig = self.config
        where = ctx.path or "export[i].tvm"
        started = time.perf_counter()
        compilers = {t: _cross_compiler(t) for t in cfg.targets if t != "host"}  # a missing one fails before any work
        tvm = _require_tvm()
        from edgekit.export import tvm_onnx

        dims = {**(artifact.meta.get("dims") or {}), **ctx.dims}
        ctx = dataclasses.replace(ctx, dims=dims)  # the same metrics dict; samples and sub-exports see every dim
        proto, specs, outputs, onnx_metrics = _onnx_model(artifact, ctx, cfg, dims, where)
        if onnx_metrics:
            ctx.metrics["onnx"] = onnx_metrics
        shapes = {s.name: list(s.shape) for s in specs}
        prepared = tvm_onnx.prepare(proto, shapes, lift_weights=cfg.integer_weights)
        del proto
        mod = _import(tvm, prepared, shapes, where)
        fused = _fuse(tvm, mod, host_target())
        imported_s = time.perf_counter() - started

        builds, files, constants = _build_all(tvm, fused, prepared, cfg, ctx, compilers, where)
        host = next((b for b in builds if b["target"] == "host"), None)
        info = {
            "tvm_version": tvm.__version__,
            "builds": builds,
            "tuned": bool(host and host["tuned"]),
            "trials": host.get("trials", 0) if host else 0,
            "tuning_seconds": host.get("tuning_seconds", 0.0) if host else 0.0,
            "tuning_reused": bool(host and host.get("tuning_reused")),
            # the library holds the model's integer weights as integers (not folded to float by TVM)
            "integer_weights": bool(constants.get("int8", 0) + constants.get("uint8", 0) >= prepared.integer_weight_bytes > 0),
            "constant_bytes": constants,
            **prepared.summary(),
            "input_order": prepared.inputs,
            "import_seconds": round(imported_s, 3),
        }
        meta = dict(artifact.meta)
        meta["tvm"] = info
        exported = artifact.derive(
            format="tvm", folder=ctx.workdir, files=files, builder=None, module=None, inputs=specs, outputs=outputs, meta=meta,
        )
        ctx.metrics["tvm"] = {**info, "seconds": round(time.perf_counter() - started, 3)}

        if cfg.verify.enabled and host is None:
            ctx.log(f"  [yellow]not verified: no host build to run here (add host to {where}.targets to verify parity)[/yellow]")
        elif cfg.verify.enabled:
            ctx.metrics["verify"] = _verify(artifact, exported, ctx, cfg.verify, where)
            require_parity(ctx.metrics["verify"], self.name, where)
        return exported


# -- targets --------------------------------------------------------------------


def host_target_json() -> dict[str, Any]:
    """LLVM for this machine's CPU, with all its cores (MetaSchedule needs num-cores)."""
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": os.cpu_count() or 1}


def host_target():
    import tvm

    return tvm.target.Target(host_target_json())


def _cross_compiler(name: str) -> str:
    spec = CROSS[name]
    if shutil.which(spec["cc"]) is None:
        raise UserError(
            f"the {name} target needs the cross compiler {spec['cc']}, which is not installed; "
            f"install it with: sudo apt-get install {spec['package']}"
        )
    return spec["cc"]


def _require_tvm():
    from edgekit.runtimes.tvm import size_threadpool

    size_threadpool()  # before TVM starts its thread pool in this process (verification runs the library here)
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError:
        raise UserError("export.tvm needs Apache TVM; pip install 'edgekit[tvm]' (apache-tvm 0.27)") from None
    return tvm


# -- ONNX in --------------------------------------------------------------------


def _onnx_model(artifact: Artifact, ctx: PassContext, cfg: TvmConfig, dims: dict[str, int], where: str):
    """(ModelProto, input specs with fixed shapes, output names, ONNX export metrics or None)."""
    import onnx

    if artifact.format == "onnx":
        specs = [s.model_copy(update={"shape": s.concrete_shape(dims)}) for s in artifact.inputs]
        proto = onnx.load(str(artifact.path("model")))
        outputs = [o.name for o in proto.graph.output]
        return proto, specs, outputs, None
    from edgekit.export.onnx import ExportOnnx

    sub_dir = ctx.workdir / "onnx"
    sub_dir.mkdir(exist_ok=True)
    sub = PassContext(
        workdir=sub_dir, data=ctx.data, dims=dims, seed=ctx.seed, cache_dir=ctx.cache_dir, run_dir=ctx.run_dir, key=ctx.key,
        progress=ctx.progress, log=ctx.log, samples=ctx.samples, source=ctx.source, path=f"{where}.onnx",
    )
    ctx.log("  exporting to ONNX first (fixed shapes)")
    try:
        exported = ExportOnnx(cfg.onnx).run(artifact, sub)
        proto = onnx.load(str(exported.path("model")))
    finally:
        shutil.rmtree(sub_dir, ignore_errors=True)  # an intermediate: the artifact is the TVM libraries
    return proto, exported.inputs, exported.outputs, sub.metrics


def _import(tvm, prepared, shapes: dict[str, list[int]], where: str):
    from tvm.relax.frontend.onnx import from_onnx

    from edgekit.export.onnx import _quiet_output

    try:
        with warnings.catch_warnings(), _quiet_output():  # the importer prints the graph of a failing node
            warnings.simplefilter("ignore")
            return from_onnx(prepared.model, shape_dict=shapes, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as e:
        ops = str(e).split(":", 1)[-1].strip().rstrip(".")
        raise UserError(
            f"TVM {tvm.__version__}'s ONNX importer has no converter for {ops}; replace the op in the model "
            f"or export another format"
        ) from None
    except EdgekitError:
        raise
    except Exception as e:
        raise StepFailed(f"TVM could not import the ONNX model ({short_reason(e)}); check {where} settings or export another format") from None


# -- build ----------------------------------------------------------------------


def _build_all(tvm, fused, prepared, cfg: TvmConfig, ctx: PassContext, compilers: dict[str, str], where: str):
    """Build every target's library into the work dir: (build records, file roles, constant bytes by dtype)."""
    builds, files, constants = [], {}, None
    for name in cfg.targets:
        target_json = host_target_json() if name == "host" else CROSS[name]["target"]
        role, file = ("model", HOST_FILE) if name == "host" else (f"lib_{name}", f"model-{name}.so")
        database, tuning = None, None
        if name == "host" and cfg.tune.trials > 0:
            database, tuning = _tuning(tvm, fused, prepared, cfg, ctx)
        started = time.perf_counter()
        built = _bind(tvm, fused, prepared, database, target_json)
        if constants is None:
            constants = _constant_bytes(tvm, built)
        _build(tvm, built, target_json, ctx.workdir / file, compilers.get(name), where)
        build = {"target": name, "role": role, "file": file, "target_json": target_json, "tuned": tuning is not None, **(tuning or {})}
        build["build_seconds"] = round(time.perf_counter() - started, 3)
        builds.append(build)
        files[role] = file
        ctx.log(f"  built {file} for {name} in {build['build_seconds']:.1f} s" + (" (tuned)" if tuning else ""))
    if "model" not in files:  # cross builds only: the first one is the artifact's model
        files["model"] = files.pop(f"lib_{cfg.targets[0]}")
        builds[0]["role"] = "model"
    return builds, files, constants or {}


def _fuse(tvm, mod, target):
    """Legalize and fuse (the module MetaSchedule tunes); integer weights are still function inputs here."""
    from tvm import relax

    T = relax.transform
    seq = tvm.transform.Sequential([
        T.DecomposeOpsForInference(), T.CanonicalizeBindings(),
        T.LegalizeOps(), T.AnnotateTIROpPattern(), T.FoldConstant(), T.FuseOps(), T.FuseTIR(),
    ])
    with target, tvm.transform.PassContext(opt_level=OPT_LEVEL):
        return seq(mod)


def _bind(tvm, fused, prepared, database, target_json: dict[str, Any]):
    """Tuned schedules applied (when there is a database), then the lifted integer weights bound as constants."""
    from tvm import relax

    mod = fused
    if database is not None:
        with tvm.target.Target(target_json), database, tvm.transform.PassContext(opt_level=OPT_LEVEL):
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    if prepared.weights:
        n = len(prepared.inputs)
        params = list(mod["main"].params)[n:]
        mod = relax.transform.BindParams("main", {p: tvm.runtime.tensor(v) for p, v in zip(params, prepared.weights.values())})(mod)
        mod["main"] = mod["main"].with_attr("num_input", n)
    return mod


def _build(tvm, mod, target_json: dict[str, Any], path: Path, cc: str | None, where: str) -> None:
    from edgekit.fsio import atomic_path

    try:
        with tvm.transform.PassContext(opt_level=OPT_LEVEL):
            ex = tvm.compile(mod, target=tvm.target.Target(target_json))
        with atomic_path(path) as tmp:
            ex.export_library(str(tmp), **({"cc": cc} if cc else {}))
    except EdgekitError:
        raise
    except Exception as e:
        raise StepFailed(f"TVM failed to build {path.name} for {target_json.get('mtriple', 'host')} ({short_reason(e)}); check {where}.targets") from None


def _constant_bytes(tvm, mod) -> dict[str, int]:
    """Bytes of the constants the library will hold, by dtype (shows whether weights stayed integer)."""
    from tvm import relax

    sizes: dict[str, int] = {}

    def visit(e) -> None:
        value = getattr(e, "value", None) if isinstance(e, tvm.ir.expr.GenericConst) else None
        if value is not None and hasattr(value, "numpy"):
            arr = value.numpy()
            sizes[str(arr.dtype)] = sizes.get(str(arr.dtype), 0) + int(arr.nbytes)

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return dict(sorted(sizes.items()))


# -- tuning ---------------------------------------------------------------------


def _tuning(tvm, fused, prepared, cfg: TvmConfig, ctx: PassContext):
    """(database, tuning info): the records of an earlier identical tuning, or a new MetaSchedule run."""
    from tvm.s_tir import meta_schedule as ms

    from edgekit import fsio

    target_json = host_target_json()
    folder = tuning_folder(ctx, prepared, target_json, cfg.tune)
    record = folder / TUNING_RECORD
    if record.is_file():
        done = json.loads(record.read_text())
        ctx.log(f"  reusing MetaSchedule records from {folder} ({done['trials']} trials, tuned in {done['tuning_seconds']:.0f} s)")
        db = ms.database.JSONDatabase(work_dir=str(folder), allow_missing=False)
        return db, {**done, "tuning_reused": True, "tuning_dir": str(folder)}

    target = tvm.target.Target(target_json)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    ctx.log(
        f"  tuning {len(tasks)} kernels with MetaSchedule, {cfg.tune.trials} trials "
        f"(at most {cfg.tune.trials_per_task} per kernel)"
    )
    started = time.perf_counter()
    with fsio.atomic_dir(folder) as tmp:
        try:
            with _quiet_logs(), _host_tensor_intrinsics():
                ms.relax_integration.tune_relax(
                    mod=fused, params={}, target=target, work_dir=str(tmp),
                    max_trials_global=cfg.tune.trials, max_trials_per_task=cfg.tune.trials_per_task,
                    num_trials_per_iter=min(64, cfg.tune.trials_per_task),
                    builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=cfg.tune.timeout_s, initializer=_builder_worker_init),
                    runner=ms.runner.LocalRunner(timeout_sec=cfg.tune.timeout_s),
                    measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), _progress(cfg.tune.trials, ctx.log)],
                    seed=ctx.seed,
                )
        except EdgekitError:
            raise
        except Exception as e:
            raise StepFailed(f"MetaSchedule tuning failed ({short_reason(e)}); set tune.trials: 0 to build untuned") from None
        seconds = round(time.perf_counter() - started, 3)
        records = _count_lines(tmp / "database_tuning_record.json")
        done = {"trials": cfg.tune.trials, "trials_per_task": cfg.tune.trials_per_task, "tasks": len(tasks),
                "records": records, "tuning_seconds": seconds, "target_json": target_json}
        fsio.write_json(tmp / TUNING_RECORD, done)
    ctx.log(f"  tuned in {seconds:.0f} s ({records} measured schedules kept in {folder})")
    db = ms.database.JSONDatabase(work_dir=str(folder), allow_missing=False)
    return db, {**done, "tuning_reused": False, "tuning_dir": str(folder)}


def tuning_folder(ctx: PassContext, prepared, target_json: dict[str, Any], tune: TuneSettings) -> Path:
    """``<run dir>/tvm-tuning/<hash of the model, target and budget>`` (else under the cache or work dir)."""
    import tvm

    h = hashlib.sha256()
    h.update(prepared.model.SerializeToString(deterministic=True))
    for name, value in prepared.weights.items():
        h.update(name.encode())
        h.update(value.tobytes())
    h.update(json.dumps([target_json, tune.trials, tune.trials_per_task, tvm.__version__], sort_keys=True).encode())
    base = ctx.run_dir or ctx.cache_dir or ctx.workdir
    return Path(base) / TUNING_DIR / h.hexdigest()[:16]


def _progress(total: int, log):
    """A MeasureCallback that logs trials done and elapsed time about every 10% of the budget."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    started = time.perf_counter()
    state = {"done": 0, "next": max(1, total // 10)}

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            state["done"] += len(runner_results)
            if state["done"] >= state["next"] or state["done"] >= total:
                state["next"] = state["done"] + max(1, total // 10)
                elapsed = time.perf_counter() - started
                eta = elapsed / state["done"] * max(total - state["done"], 0)
                log(f"  tuning: {min(state['done'], total)}/{total} trials, {elapsed:.0f} s, about {eta:.0f} s left")

    return Progress()


_INTRINSICS = "tvm.s_tir.tensor_intrin"


def _intrinsics_stub():
    """Make ``import tvm.s_tir.tensor_intrin`` register only this CPU's tensor intrinsics.

    MetaSchedule imports that package in the tuning process and in every builder
    process (a new one per batch of candidates); registering all of its
    intrinsics, CUDA's included, takes about 80 s on a small CPU, and only the
    host's (x86 VNNI, Arm NEON / dot product) can appear in a CPU schedule.
    Returns the stub package module (None if the real one is already loaded).
    """
    import importlib
    import importlib.util
    import platform
    import sys

    if _INTRINSICS in sys.modules:
        return None
    stub = importlib.util.module_from_spec(importlib.util.find_spec(_INTRINSICS))  # a package, not executed
    sys.modules[_INTRINSICS] = stub
    arch = platform.machine().lower()
    sub = "arm_cpu" if arch.startswith(("aarch64", "arm")) else "riscv_cpu" if arch.startswith("riscv") else "x86"
    importlib.import_module(f"{_INTRINSICS}.{sub}")
    return stub


def _builder_worker_init() -> None:
    """Initializer of MetaSchedule's builder processes (see :func:`_intrinsics_stub`)."""
    _intrinsics_stub()


class _host_tensor_intrinsics:
    """:func:`_intrinsics_stub` for the duration of tuning in this process; the real package can load later."""

    def __enter__(self):
        self._stub = _intrinsics_stub()
        return self

    def __exit__(self, *exc) -> None:
        import sys

        if self._stub is not None and sys.modules.get(_INTRINSICS) is self._stub:
            del sys.modules[_INTRINSICS]


class _quiet_logs:
    """MetaSchedule logs every task table at INFO to the console; keep its warnings only (the records hold the rest)."""

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("tvm.s_tir.meta_schedule")
        self._level = self._logger.level
        self._logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.setLevel(self._level)


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# -- verification ---------------------------------------------------------------


def _verify(source: Artifact, exported: Artifact, ctx: PassContext, settings: VerifySettings, where: str) -> dict[str, Any]:
    """Parity of the host library against the source at the exported (fixed) batch."""
    if source.meta.get("quantized") and settings.rel_l2 is None:
        # integer kernels round differently from the torch simulation; judge the error as a whole
        settings = settings.model_copy(update={"rel_l2": QUANTIZED_REL_L2})
    batch = exported.inputs[0].shape[0] if exported.inputs and exported.inputs[0].shape else 1
    rows = sample_rows(source, ctx, max(settings.samples * batch, batch + 1))
    feeds = [batch_of(rows[i * batch :] + rows, batch) for i in range(settings.samples)]
    return verify_export(source, exported, feeds, settings, where)
