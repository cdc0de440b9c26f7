"""The quantization part of the report: what ran in integer, what it cost, which layer hurt.

Reads the ``quantize`` metrics that quantize.ptq / quantize.qat leave in a
step's manifest and renders them as markdown (and a per-layer plot), so a user
sees the culprit layer instead of guessing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

DASH = "–"


def quant_steps(steps: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(s.get("id", "?"), (s.get("metrics") or {}).get("quantize")) for s in steps if (s.get("metrics") or {}).get("quantize")]


def _fmt(v: Any, spec: str) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return format(v, spec)
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return DASH


def layer_table(rows: list[dict[str, Any]], worst: set[str] | None = None) -> list[str]:
    """Markdown rows for per-layer SQNR / sensitivity (also used by ``edgekit inspect --quant-debug``)."""
    worst = worst or set()
    has_drop = any(r.get("drop") is not None for r in rows)
    header = ["Layer", "Type", "Planned form", "SQNR dB"] + (["Metric drop alone"] if has_drop else []) + ["Final form"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        name = f"**{r['layer']}**" if r["layer"] in worst else r["layer"]
        cells = [name, r.get("type", DASH), f"{r.get('mode')} {r.get('bits')}-bit", _fmt(r.get("sqnr_db"), ".1f")]
        if has_drop:
            cells.append(_fmt(r.get("drop"), ".4f"))
        cells.append(r.get("final", DASH))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def render_quant_section(steps: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for sid, q in quant_steps(steps):
        lines += ["", f"## Quantization ({sid})", ""]
        if q.get("backend") in ("nncf", "edgekit-onnx"):
            lines.append(f"Backend {q['backend']}: {q.get('method') or ''} {q.get('integer') or ''}".rstrip())
            if q.get("skipped"):
                lines.append("Left float: " + "; ".join(f"{k} ({v})" for k, v in q["skipped"].items()))
            continue
        integer = q.get("integer") or {}
        forms = ", ".join(f"{n} {k}" for k, n in (integer.get("by_mode") or {}).items())
        lines.append(f"{integer.get('integer_layers', 0)} weight layers run in integer ({forms or 'none'}); "
                     f"{integer.get('float_layers', 0)} stay float.")
        acc = q.get("accuracy")
        if acc:
            lines.append(f"{acc['metric']} on the eval split: float {acc['float']:.4f}, every planned layer in integer {acc.get('all_integer', acc['quantized']):.4f}, "
                         f"final {acc['quantized']:.4f} (drop {acc['drop']:.4f}).")
        lat = q.get("latency")
        if lat and not integer.get("integer_layers"):
            lines.append(f"Float was clearly faster than integer for every layer on ONNX Runtime here ({lat['threads']} threads, batch 1), "
                         "so the deployed model is the float one.")
        elif lat and lat.get("whole_model_fallback"):
            lines.append("Block by block no loss stood out of the timing noise, but the whole integer model was clearly slower "
                         "than float here, so the timed layers went back to float.")
        elif lat:
            verdict = "faster" if lat["speedup"] >= 1 else "**slower**"
            lines.append(
                f"ONNX Runtime at batch 1, {lat['threads']} threads: float {lat['float_ms']:.3f} ms, quantized {lat['quantized_ms']:.3f} ms "
                f"({lat['speedup']:.2f}x, {verdict} than float). {len(lat.get('kept_float') or [])} layers stay float because float was clearly faster there."
            )
            if lat.get("placement_reverted"):
                lines.append("Some blocks were faster in float one at a time, but together they did not make the model clearly faster "
                             "than all-integer, so they stay integer.")
        md = q.get("max_drop")
        if md:
            state = "holds" if md["met"] else "**cannot be met**"
            lines.append(f"max_drop {md['allowed']:.4g}: {state} (final drop {md['final_drop']:.4g}) after {len(md['rounds'])} back-off rounds.")
            for r in md["rounds"]:
                lines.append(f"- {r['layer']}: {r['action']} -> drop {r['drop']:.4g}")
        sb = q.get("size_budget")
        if sb:
            state = "met" if sb["met"] else "**not met**"
            lines.append(f"size_budget {sb['budget_bytes'] / 1e6:.2f} MB: {state} (estimated {sb['estimated_bytes'] / 1e6:.2f} MB, {len(sb['lowered_to_4bit'])} layers lowered to 4-bit).")
        if q.get("qat"):
            t = q["qat"]
            lines.append(f"QAT: {t['epochs']} epochs ({t['loss']} loss), loss per epoch {t['loss_per_epoch']}, PTQ start {t.get('ptq_metric', DASH)}.")
        rows = q.get("layers") or []
        if rows:
            worst = set(worst_layers(rows))
            lines += ["", "Per layer: SQNR of each layer's output against float with every layer quantized "
                      "(where it falls, error enters; the biggest falls are in bold), and the metric drop with only that layer quantized.", ""]
            lines += layer_table(rows, worst)
        if q.get("skipped") and not rows:
            lines += ["", "Left float: " + "; ".join(f"{k} ({v})" for k, v in list(q["skipped"].items())[:20])
                      + (f"; and {len(q['skipped']) - 20} more" if len(q["skipped"]) > 20 else "")]
    return lines


def worst_layers(rows: list[dict[str, Any]], n: int = 3) -> list[str]:
    """Layers whose SQNR falls most below the layer before them: where the error enters."""
    jumps = []
    prev = None
    for r in rows:
        s = r.get("sqnr_db")
        if s is None or not math.isfinite(s):
            prev = s
            continue
        jumps.append((s - prev if prev is not None and math.isfinite(prev) else s - 60.0, r["layer"]))
        prev = s
    return [name for _, name in sorted(jumps)[:n]]


def render_sensitivity_png(steps: list[dict[str, Any]], path: Path) -> bool:
    """Per-layer sensitivity (bars) and SQNR (line) of the first quantized step; False when there is none."""
    rows = next((q.get("layers") for _, q in quant_steps(steps) if q.get("layers")), None)
    if not rows:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6, 0.25 * len(rows) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(rows)))
    sqnr = [r["sqnr_db"] if isinstance(r.get("sqnr_db"), (int, float)) and math.isfinite(r["sqnr_db"]) else float("nan") for r in rows]
    ax.plot(x, sqnr, marker="o", color="tab:blue", label="SQNR (dB)")
    ax.set_ylabel("output SQNR, all layers quantized (dB)")
    drops = [r.get("drop") for r in rows]
    if any(d is not None for d in drops):
        ax2 = ax.twinx()
        ax2.bar(x, [d or 0.0 for d in drops], color="tab:orange", alpha=0.5, label="metric drop alone")
        ax2.set_ylabel("metric drop, only this layer quantized")
    ax.set_xticks(x)
    ax.set_xticklabels([r["layer"] for r in rows], rotation=90, fontsize=6)
    ax.set_title("Quantization: where the error enters")
    fig.tight_layout()
    from edgekit import fsio

    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return True
