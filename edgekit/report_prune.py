"""The pruning part of the report: the budget, each pruning round, and the shape left.

Reads the ``prune`` metrics that prune.vib leaves in a step's manifest.
"""

from __future__ import annotations

from typing import Any


def render_prune_section(steps: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for step in steps:
        m = (step.get("metrics") or {}).get("prune")
        if not m:
            continue
        lines += ["", f"## Pruning ({step.get('id', '?')})", ""]
        method = "VTrans VIB masks" if m.get("method") == "vib" else f"{m.get('method')} importance (baseline)"
        lines.append(
            f"{method}, mode {m.get('mode')}: encoder {m.get('budget')} {m.get('achieved', 0):.1%} of the original "
            f"(target {m.get('target', 0):.1%}); encoder parameters {m.get('encoder_params_before', 0):,} -> "
            f"{m.get('encoder_params_after', 0):,}; FLOPs per {m.get('seq')}-token sequence {m.get('flops_before', 0):,} -> "
            f"{m.get('flops_after', 0):,}; {m.get('samples')} training samples, {m.get('steps')} steps, {m.get('seconds')} s."
        )
        rounds = m.get("rounds") or []
        if rounds:
            lines += ["", "| Round | Steps | Goal | Expected (soft masks) | Hard mask | λ1 | λ2 | Distillation loss |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for r in rounds:
                lines.append(
                    f"| {r.get('round')} | {r.get('steps')} | {_pct(r.get('target'))} | {_pct(r.get('expected'))} | "
                    f"{_pct(r.get('hard'))} | {_num(r.get('lambda1'))} | {_num(r.get('lambda2'))} | {_num(r.get('distill'))} |"
                )
            lines += ["", "After the last round the hard mask is snapped to the budget: the least informative units go "
                      "(or the most informative pruned ones return) until the size meets it exactly or just under."]
        shape = m.get("structure") or {}
        layers = shape.get("layers") or []
        if layers:
            lines += ["", "| Layer | Heads kept | FFN neurons kept |", "| ---: | ---: | ---: |"]
            lines += [f"| {i} | {L['heads']} | {L['ffn']} |" for i, L in enumerate(layers)]
            lines.append(f"\nHidden width: {shape.get('hidden')}" + (" (pruned)" if m.get("prune_hidden") else " (not pruned)") + ".")
    return lines


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) else "–"


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "–"
