"""``edgekit inspect --quant-debug``: which layer broke the quantized model?

For a quantize.ptq / quantize.qat step (its step folder or artifact folder):
the per-layer table the pass measured on the recipe's calibration and eval
data, when the step folder has it; otherwise it is measured now on synthetic
inputs from the model's input specs (size named dims with --dim).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekit.artifact import ARTIFACT_FILE, Artifact
from edgekit.errors import UserError
from edgekit.report_quant import layer_table, worst_layers

MANIFEST = "manifest.json"


def quant_debug_report(target: str, dims: dict[str, int]) -> dict[str, Any]:
    folder = Path(target).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; --quant-debug takes a quantize step's folder (runs/NAME/steps/NN-quantize.ptq)")
    step = folder if (folder / MANIFEST).is_file() else folder.parent
    rows, source = None, None
    if (step / MANIFEST).is_file():
        q = (json.loads((step / MANIFEST).read_text()).get("metrics") or {}).get("quantize") or {}
        rows, source = q.get("layers"), "measured by the pass on the recipe's calibration data (drop: eval split)"
    if not rows:
        rows, source = _measure(folder, dims), "measured now on synthetic inputs from the input specs"
    worst = worst_layers(rows)
    lines = [f"Per-layer quantization error of {folder} ({source}).", ""]
    lines += layer_table(rows, set(worst))
    if worst:
        lines += ["", "Where the error enters (largest SQNR falls): " + ", ".join(worst)]
    return {"target": str(folder), "source": source, "layers": rows, "worst": worst, "text": "\n".join(lines)}


def _measure(folder: Path, dims: dict[str, int]) -> list[dict[str, Any]]:
    art_dir = folder if (folder / ARTIFACT_FILE).is_file() else folder / "artifact"
    artifact = Artifact.load(art_dir)
    transforms = [t.get("kind") for t in (artifact.builder or {}).get("transforms", [])]
    if artifact.format != "torch" or "quantize" not in transforms:
        raise UserError(f"{folder} is not a quantized torch model; point --quant-debug at a quantize.ptq or quantize.qat step")
    from edgekit.compress.quantize.analysis import debug_table, layer_sqnr

    model = artifact.torch_module()
    all_dims = {**dict(artifact.meta.get("dims", {})), **dims}
    feeds = [{s.name: s.random(all_dims, seed=i) for s in artifact.inputs} for i in range(8)]
    return debug_table(model, layer_sqnr(model, feeds, [s.name for s in artifact.inputs]))
