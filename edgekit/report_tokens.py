"""The token-compression part of the report: the schedule, tokens and MACs per layer, and what it cost.

Reads the ``tokens`` metrics that tokens.transform and tokens.feather leave in a
step's manifest (measured by ``edgekit.compress.tokens.accounting``).
"""

from __future__ import annotations

from typing import Any


def render_tokens_section(steps: list[dict[str, Any]]) -> list[str]:
    from edgekit.compress.tokens.accounting import format_layers

    lines: list[str] = []
    for step in steps:
        m = (step.get("metrics") or {}).get("tokens")
        if not m or not m.get("layers"):
            continue
        lines += ["", f"## Token compression ({step.get('id', '?')})", ""]
        cut = m.get("block_macs_cut")
        summary = f"Method **{m.get('method', '?')}**"
        if isinstance(cut, (int, float)):
            summary += (f": the transformer blocks compute {cut:.1%} fewer MACs "
                        f"({m.get('dense_block_macs', 0) / 1e6:.1f} M → {m.get('block_macs', 0) / 1e6:.1f} M per sample); "
                        f"the whole model {m.get('total_macs_cut', 0):.1%} fewer")
        lines.append(summary + ". Counted on one batch-1 forward pass, token matrices and scoring included.")
        lines += [""] + format_layers(m)
    return lines
