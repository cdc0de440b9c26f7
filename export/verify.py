"""Parity verification: run an export and its source on the same inputs and compare.

A failed check fails the export step with the numbers; nothing is kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from edgekit import metrics
from edgekit.artifact import Artifact
from edgekit.errors import StepFailed
from edgekit.passes import PassConfig


class VerifySettings(PassConfig):
    enabled: bool = Field(True, description="compare the export with its source before the step counts as done")
    samples: int = Field(8, ge=1, description="inputs to compare on (calibration data when the recipe has it)")
    atol: float = Field(1e-4, ge=0, description="largest absolute difference allowed")
    rtol: float | None = Field(None, ge=0, description="largest difference allowed relative to the source's largest output magnitude")
    min_top1_agreement: float = Field(0.99, ge=0, le=1, description="classification only: share of samples with the same top-1 class")


def check_parity(
    source: Artifact,
    exported: Artifact,
    feeds: list[dict[str, np.ndarray]],
    settings: VerifySettings,
    runtime: str | None = None,
) -> dict[str, Any]:
    """Compare every output of ``exported`` with ``source`` over ``feeds``.

    ``max_rel`` is max |a - b| divided by max |b| (b = source): a scale-relative
    error that near-zero elements cannot blow up.
    """
    from edgekit.runtimes import default_runtime, load_session

    runtime = runtime or default_runtime(exported.format)
    ref_session = load_session(source)
    session = load_session(exported, runtime)
    ref_outs: list[list[np.ndarray]] = []
    outs: list[list[np.ndarray]] = []
    for f in feeds:
        r, o = ref_session.run(f), session.run(f)
        if len(r) != len(o):
            raise StepFailed(f"the export has {len(o)} outputs but its source has {len(r)}; check the output names")
        ref_outs.append(r)
        outs.append(o)
    worst = {"max_abs": 0.0, "mean_abs": 0.0, "max_rel": 0.0}
    for k in range(len(ref_outs[0])):
        a = np.concatenate([o[k] for o in outs]).astype(np.float64)
        b = np.concatenate([r[k] for r in ref_outs]).astype(np.float64)
        if a.shape != b.shape:
            raise StepFailed(f"output {k} of the export has shape {list(a.shape)} but the source gives {list(b.shape)}")
        worst["max_abs"] = max(worst["max_abs"], metrics.max_abs(a, b))
        worst["mean_abs"] = max(worst["mean_abs"], metrics.mean_abs(a, b))
        worst["max_rel"] = max(worst["max_rel"], metrics.max_rel(a, b))
    agreement = None
    if source.task == "classification":
        a = np.concatenate([o[0] for o in outs])
        b = np.concatenate([r[0] for r in ref_outs])
        if a.ndim == 2 and a.shape[1] > 1:
            agreement = metrics.top1_agreement(a, b)
    passed = worst["max_abs"] <= settings.atol
    if settings.rtol is not None:
        passed = passed and worst["max_rel"] <= settings.rtol
    if agreement is not None:
        passed = passed and agreement >= settings.min_top1_agreement
    return {
        "samples": len(feeds),
        **worst,
        "top1_agreement": agreement,
        "atol": settings.atol,
        "rtol": settings.rtol,
        "passed": bool(passed),
        "runtime": runtime,
    }


def require_parity(result: dict[str, Any], step: str) -> None:
    """Raise StepFailed with the numbers when a parity check did not pass."""
    if result["passed"]:
        return
    parts = [f"max abs error {result['max_abs']:.2e} (atol {result['atol']:.1e})"]
    if result.get("rtol") is not None:
        parts.append(f"max rel error {result['max_rel']:.2e} (rtol {result['rtol']:.1e})")
    if result.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {result['top1_agreement']:.3f}")
    raise StepFailed(
        f"parity check failed for {step} on {result['runtime']}: {', '.join(parts)}; "
        f"find the diverging op, or loosen {step}.verify.atol if the difference is acceptable"
    )
