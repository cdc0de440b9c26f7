"""Parity verification: run an export and its source on the same inputs and compare.

Every exporter calls :func:`verify_export` (or :func:`check_parity`) after
writing its model and :func:`require_parity` on the result, so a failed check
fails the export step with the numbers instead of leaving a silently wrong
model behind.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import Field

from edgekit import metrics
from edgekit.artifact import Artifact
from edgekit.errors import EdgekitError, StepFailed
from edgekit.passes import PassConfig, PassContext


class VerifySettings(PassConfig):
    enabled: bool = Field(True, description="compare the export with its source before the step counts as done")
    samples: int = Field(8, ge=1, le=10000, description="inputs to compare on (calibration data when the recipe has it, else synthetic)")
    atol: float = Field(1e-4, ge=0, description="largest absolute difference allowed in any output")
    rtol: float | None = Field(
        None, ge=0, description="if set, an output also passes when its largest difference is within rtol of its largest source magnitude"
    )
    rel_l2: float | None = Field(
        None, ge=0, description="if set, an output also passes when ||export - source|| / ||source|| is within it "
        "(quantized models: rounding differs between runtimes, so errors are judged as a whole; default 0.1 for them)"
    )
    min_top1_agreement: float = Field(
        0.99, ge=0, le=1, description="classification only: share of samples whose top-1 class must match the source"
    )


def check_parity(
    source: Artifact,
    exported: Artifact,
    feeds: list[dict[str, np.ndarray]],
    settings: VerifySettings,
    runtime: str | None = None,
) -> dict[str, Any]:
    """Run ``source`` (torch eager) and ``exported`` on ``feeds`` and compare every output.

    Per output (all feeds concatenated along the batch axis):

    - ``max_abs`` = max |e - s| and ``mean_abs`` = mean |e - s|, with e the
      export's output and s the source's;
    - ``max_rel`` = max |e - s| / (max |s| + 1e-12): the largest error relative
      to the output's own scale. Unlike an element-wise relative error it
      cannot blow up on elements that happen to be near zero.

    An output passes when ``max_abs <= atol``, or, with ``rtol`` set, when
    ``max_rel <= rtol``. For classification models whose first output is
    ``[batch, classes]`` the share of samples with the same top-1 class must
    also reach ``min_top1_agreement``. The result reports the worst output.
    """
    from edgekit.runtimes import default_runtime, load_session

    if not feeds:
        raise ValueError("check_parity needs at least one feed")
    runtime = runtime or default_runtime(exported.format)
    reference = load_session(source)
    candidate = load_session(exported, runtime)
    ref_outs: list[list[np.ndarray]] = []
    outs: list[list[np.ndarray]] = []
    for feed in feeds:
        r, o = reference.run(feed), candidate.run(feed)
        if len(r) != len(o):
            raise StepFailed(
                f"the {exported.format} export has {len(o)} outputs but its source has {len(r)}; "
                "the export must return the same outputs in the same order"
            )
        ref_outs.append(r)
        outs.append(o)

    names = exported.outputs if len(exported.outputs) == len(outs[0]) else [f"output_{k}" for k in range(len(outs[0]))]
    per_output = []
    for k, name in enumerate(names):
        e = np.concatenate([np.asarray(o[k]) for o in outs])
        s = np.concatenate([np.asarray(r[k]) for r in ref_outs])
        if e.shape != s.shape:
            raise StepFailed(f"output {name} of the export has shape {list(e.shape)} but the source's has {list(s.shape)}")
        row = {"name": name, "max_abs": metrics.max_abs(e, s), "mean_abs": metrics.mean_abs(e, s), "max_rel": metrics.max_rel(e, s)}
        diff = np.asarray(e, np.float64) - np.asarray(s, np.float64)
        row["rel_l2"] = float(np.linalg.norm(diff) / (np.linalg.norm(np.asarray(s, np.float64)) + 1e-12))
        within_rel = settings.rtol is not None and row["max_rel"] <= settings.rtol
        within_l2 = settings.rel_l2 is not None and row["rel_l2"] <= settings.rel_l2
        row["passed"] = bool(row["max_abs"] <= settings.atol or within_rel or within_l2)
        per_output.append(row)

    agreement = None
    if source.task == "classification":
        e = np.concatenate([np.asarray(o[0]) for o in outs])
        s = np.concatenate([np.asarray(r[0]) for r in ref_outs])
        if e.ndim == 2 and e.shape[1] > 1:
            agreement = metrics.top1_agreement(e, s)
    passed = all(r["passed"] for r in per_output) and (agreement is None or agreement >= settings.min_top1_agreement)
    return {
        "samples": len(feeds),
        "max_abs": max(r["max_abs"] for r in per_output),
        "mean_abs": max(r["mean_abs"] for r in per_output),
        "max_rel": max(r["max_rel"] for r in per_output),
        "rel_l2": max(r["rel_l2"] for r in per_output),
        "top1_agreement": agreement,
        "min_top1_agreement": settings.min_top1_agreement if agreement is not None else None,
        "atol": settings.atol,
        "rtol": settings.rtol,
        "rel_l2_tol": settings.rel_l2,
        "passed": bool(passed),
        "runtime": runtime,
        "outputs": per_output,
    }


def require_parity(result: dict[str, Any], step_name: str, where: str | None = None) -> None:
    """Raise StepFailed with the numbers when a :func:`check_parity` result did not pass.

    ``where`` is the step's recipe path (e.g. ``export[0].onnx``) used to name
    the setting to change; it defaults to ``step_name``.
    """
    if result["passed"]:
        return
    where = where or step_name
    failing = [r for r in result.get("outputs", []) if not r["passed"]]
    problems, fixes = [], []
    if failing:
        worst = max(failing, key=lambda r: r["max_abs"])
        label = f" in output {worst['name']}" if len(result.get("outputs", [])) > 1 else ""
        text = f"max abs error {worst['max_abs']:.1e} > atol {result['atol']:.1e}{label}"
        if result.get("rtol") is not None:
            text += f" and max rel error {worst['max_rel']:.1e} > rtol {result['rtol']:.1e}"
        if result.get("rel_l2_tol") is not None:
            text += f" and relative L2 error {worst['rel_l2']:.1e} > rel_l2 {result['rel_l2_tol']:.1e}"
        problems.append(text)
        fixes.append(f"loosen {where}.verify.atol (or set {where}.verify.rtol)")
    ref = result.get("float_reference")
    if ref:
        problems.append(f"against the float model the export's relative L2 error is {ref['export_rel_l2']:.1e}, the simulation's {ref['simulation_rel_l2']:.1e}")
    agreement = result.get("top1_agreement")
    if agreement is not None:
        low = agreement < result.get("min_top1_agreement", 0.0)
        problems.append(f"top-1 agreement {agreement:.3f}" + (f" < {result['min_top1_agreement']:.3f}" if low else ""))
        if low:
            fixes.append(f"lower {where}.verify.min_top1_agreement")
    raise StepFailed(
        f"parity check failed for {step_name} on {result['runtime']} over {result['samples']} samples: "
        f"{'; '.join(problems)}; {' and '.join(fixes)} if this difference is acceptable, else find the op that diverges"
    )


# -- inputs ---------------------------------------------------------------------

def sample_rows(artifact: Artifact, ctx: PassContext, n: int) -> list[dict[str, np.ndarray]]:
    """``n`` batch-1 feeds: the recipe's calibration data if any, else synthetic from the specs."""
    if ctx.samples is not None:
        feeds = list(ctx.samples(n))
    else:
        feeds = [{s.name: s.random(ctx.dims, seed=ctx.seed + i) for s in artifact.inputs} for i in range(n)]
    # split any multi-sample feed, so batches of any size can be built from the rows
    rows = [{k: v[i : i + 1] for k, v in f.items()} for f in feeds for i in range(len(next(iter(f.values()))))]
    return rows[:n]


def batch_of(rows: list[dict[str, np.ndarray]], batch: int) -> dict[str, np.ndarray]:
    """One feed of ``batch`` samples, cycling through ``rows``."""
    picked = [rows[i % len(rows)] for i in range(batch)]
    return {k: np.concatenate([f[k] for f in picked]) for k in rows[0]}


# -- an export's full check -----------------------------------------------------

def verify_export(
    source: Artifact,
    exported: Artifact,
    feeds: list[dict[str, np.ndarray]],
    settings: VerifySettings,
    where: str,
    trace_feed: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """:func:`check_parity` on ``feeds``; for a batch-dynamic export also at batch 3.

    ``trace_feed`` is the batch-2 feed a batch-dynamic export was traced with
    (None for a fixed batch). It tells a model that only works at the batch it
    was traced at (a StepFailed saying so) from one that is wrong at every batch
    (the parity numbers, for :func:`require_parity`). ``where`` is the step's
    recipe path for messages. Errors of the runtime become StepFailed.
    """
    try:
        result, error = check_parity(source, exported, feeds, settings), None
    except Exception as e:
        result, error = None, e
    if trace_feed is not None and (error is not None or not result["passed"]):
        problem = short_reason(error) if error is not None else f"max abs error {result['max_abs']:.1e}"
        _blame_batch(source, exported, trace_feed, settings, where, 1, problem)
    if error is not None:
        if isinstance(error, EdgekitError):
            raise error
        raise StepFailed(f"the {exported.format} export fails in its runtime ({short_reason(error)}); try other {where} settings") from None
    if trace_feed is not None and result["passed"]:
        batch = 3
        try:
            at_batch = check_parity(source, exported, [batch_of(feeds, batch)], settings)
            problem = None if at_batch["passed"] else f"max abs error {at_batch['max_abs']:.1e} > atol {settings.atol:.1e}, relative L2 {at_batch['rel_l2']:.1e}"
        except Exception as e:
            problem = short_reason(e)
        if problem:
            _blame_batch(source, exported, trace_feed, settings, where, batch, problem)
            raise StepFailed(
                f"the {exported.format} export matches its source at batch 1 but not at batch {batch} ({problem}); "
                f"set {where}.dynamic: false"
            )
        result["batch_check"] = {"batch": batch, "max_abs": at_batch["max_abs"], "passed": True}
    return result


def _blame_batch(source, exported, trace_feed, settings, where: str, batch: int, problem: str) -> None:
    """Raise the not-batch-dynamic error if the export does match at the batch it was traced at.

    Not for quantized models: their integer kernels' error depends on the inputs,
    so passing on the trace feed alone says nothing about batch handling.
    """
    if source.meta.get("quantized"):
        return
    try:
        at_trace = check_parity(source, exported, [trace_feed], settings)
    except Exception:
        return
    if at_trace["passed"]:
        traced = next(iter(trace_feed.values())).shape[0]
        raise StepFailed(
            f"the {exported.format} export matches its source at batch {traced}, the batch it was traced at, but not at "
            f"batch {batch} ({problem}): the model is not batch-dynamic (often a Python int taken from a tensor's shape); "
            f"set {where}.dynamic: false to export a fixed batch, or fix the model"
        )


_ORT_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)'")


def short_reason(e: BaseException) -> str:
    """An exception's first line; ONNX Runtime node errors are cut down to the node and what went wrong."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    node = _ORT_NODE.search(text)
    if node:
        detail = text.split(" was false. ", 1)[1] if " was false. " in text else text.split("Status Message: ", 1)[-1]
        return f"ONNX Runtime {node.group(1)} node {node.group(2)!r}: {detail.splitlines()[0][:160]}"
    return text.splitlines()[0][:200]
