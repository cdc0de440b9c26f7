"""The speculative-decoding part of the report: each drafter against plain greedy decoding
on the final language model (``bench.decoding``): speed-up, tokens per verification pass,
and whether the output stayed identical to plain greedy."""

from __future__ import annotations

from typing import Any


def render_decoding_section(steps: list[dict[str, Any]]) -> list[str]:
    from edgekit.report import _num, _table

    lines: list[str] = []
    for step in steps:
        d = (step.get("metrics") or {}).get("decoding")
        if not d:
            continue
        lines += ["", f"## Speculative decoding ({step.get('id', '?')})", ""]
        lines += _table(
            ["Drafter", "Tokens/s", "Speed-up", "Tokens per pass", "Draft share of time", "Output = plain greedy"],
            [[r["drafter"], _num(r.get("tokens_per_s"), ".1f"), _num(r.get("speedup"), ".2f", "x"), _num(r.get("tokens_per_pass"), ".2f"),
              _num(100 * r.get("draft_share", 0.0), ".0f", " %"),
              "yes" if r.get("exact") else f"NO ({r.get('prompts_differing')} of {d.get('prompts')} prompts differ)"] for r in d["rows"]],
            right={1, 2, 3, 4},
        )
        lines += ["", f"Torch, batch 1, {d.get('threads')} thread(s); {d.get('prompts')} prompts of {d.get('prompt_tokens')} tokens, "
                  f"{d.get('max_new_tokens')} new tokens each, greedy; speed-ups are medians over {d.get('rounds')} rounds of per-round ratios. "
                  "A verification pass of plain decoding yields one token; a drafter's yields the accepted draft tokens plus one."]
    return lines
