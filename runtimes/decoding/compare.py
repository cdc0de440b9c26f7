"""Drafters against plain decoding on the same target and prompts: speed, tokens per pass, exactness.

What ``bench.decoding`` in a recipe, ``edgekit generate --compare`` and bench/decoding.py report.
Each round decodes every prompt once per variant (variants in a rotating order, so a slow spell
of a shared machine does not land on one variant); speed-ups are ratios within a round, medians
over rounds. Greedy only: exactness means the drafter's tokens equal plain greedy's, prompt by prompt.
"""

from __future__ import annotations

import statistics
from typing import Callable, Sequence

from edgekit.errors import UserError
from edgekit.runtimes.decoding.target import Target
from edgekit.runtimes.decoding.verify import Drafter, generate

PLAIN = "plain"


def compare_drafters(
    target: Target,
    prompts: Sequence[Sequence[int]],
    drafters: dict[str, Callable[[], Drafter]],
    max_new_tokens: int,
    rounds: int = 3,
    eos: int | None = None,
) -> list[dict]:
    """One row per variant (``plain`` first): tokens/s, speed-up over plain, tokens per verification
    pass, draft share of the time, and whether every prompt's output equals plain greedy's."""
    if not prompts:
        raise UserError("comparing drafters needs at least one prompt")
    if rounds < 1:
        raise UserError(f"rounds must be >= 1, got {rounds}")
    names = [PLAIN, *drafters]
    seconds = {n: [] for n in names}  # per round: the seconds for all prompts
    passes = {n: [0, 0] for n in names}  # tokens, verification passes
    draft_s = {n: 0.0 for n in names}
    outputs: dict[str, list[list[int]]] = {}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            total, texts = 0.0, []
            for prompt in prompts:
                drafter = drafters[name]() if name != PLAIN else None
                g = generate(target, drafter, prompt, max_new_tokens, eos=eos)
                total += g.seconds
                texts.append(g.tokens)
                if r == 0:
                    passes[name][0] += len(g.tokens) - 1  # the prefill's token needs no pass
                    passes[name][1] += g.steps
                    draft_s[name] += g.draft_seconds
            seconds[name].append(total)
            outputs.setdefault(name, texts)
    n_tokens = sum(len(t) for t in outputs[PLAIN])
    rows = []
    for name in names:
        ratios = [p / s for p, s in zip(seconds[PLAIN], seconds[name])]
        differ = sum(a != b for a, b in zip(outputs[name], outputs[PLAIN]))
        rows.append({
            "drafter": name,
            "tokens_per_s": n_tokens / statistics.median(seconds[name]),
            "speedup": statistics.median(ratios),
            "tokens_per_pass": passes[name][0] / passes[name][1] if passes[name][1] else 0.0,
            "draft_share": draft_s[name] / seconds[name][0] if seconds[name][0] else 0.0,
            "exact": differ == 0,
            "prompts_differing": differ,
        })
    return rows
