"""SWIFT-style self-speculative drafting: the model drafts for itself with some of its layers skipped.

After "SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference Acceleration" (Xia et
al., 2025). Training-free and without a second model: the draft pass is the target with a
set of intermediate layers run as identity, reading the committed cache of the layers it
keeps. Which layers to skip is found on the fly, for this input, while decoding: during the
first ``search_steps`` steps each step scores one candidate set (the current best with one
skipped layer swapped for a kept one; ties keep the incumbent) by how often the skipped model's
next-token choice on the last ``window`` committed tokens agrees with the text (which, past the
prompt, is the full model's own output), and keeps the better. Drafting stops early when the
draft's top probability falls below ``confidence``, since such tokens are rarely accepted.

SWIFT skips attention and MLP sublayers separately and searches with Bayesian optimisation;
here whole layers are skipped (never the first or the last) and the search is a random local
search, which fits the few layers of an edge model. Torch targets only: an exported graph
cannot skip its layers.
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import UserError
from edgekit.runtimes.decoding.verify import Draft, Drafter, draw, softmax


class SwiftDrafter(Drafter):
    name = "swift"

    def __init__(self, target, skip_ratio: float = 0.4, length: int = 8, confidence: float = 0.6, search_steps: int = 8, window: int = 64, seed: int = 0):
        if not hasattr(target, "draft_forward"):
            raise UserError(f"the swift drafter skips layers of a torch model; {type(target).__name__} cannot (use ngram, aded or head on exported models)")
        if not 0 < skip_ratio < 1:
            raise UserError(f"swift drafter: skip_ratio must lie in (0, 1), got {skip_ratio}")
        self.target = target
        self.candidates = list(range(1, target.layers - 1))  # the first and last layers always run
        self.n_skip = min(len(self.candidates), max(1, round(skip_ratio * target.layers)))
        if not self.candidates:
            raise UserError(f"swift drafter: a model of {target.layers} layers has no intermediate layer to skip; use another drafter")
        self.length, self.confidence, self.search_steps, self.window, self.seed = length, confidence, search_steps, window, seed

    def start(self, prompt, temperature, rng):
        super().start(prompt, temperature, rng)
        self.search_rng = np.random.default_rng(self.seed)  # its own stream: sampling draws stay the verifier's
        spaced = np.linspace(0, len(self.candidates) - 1, self.n_skip).round().astype(int)
        self.skip = frozenset(self.candidates[i] for i in spaced)
        self.best_score: float | None = None
        self.searches_left = self.search_steps

    def agreement(self, context: list[int], skip: frozenset[int]) -> float:
        """Share of the last ``window`` committed tokens the skipped model predicts from their prefix."""
        n = self.target.length  # committed tokens: the context without the pending one
        w = min(self.window, n - 1)
        if w < 1:
            return 0.0
        tokens = context[n - w : n]
        logits, _ = self.target.draft_forward(tokens, np.arange(n - w, n), skip, self.target.truncated_cache(n - w))
        # position i predicts token i + 1; the last one predicts the pending token, the full model's choice
        return float((logits.argmax(-1) == np.asarray(context[n - w + 1 : n + 1])).mean())

    def _search(self, context: list[int]) -> None:
        if self.best_score is None:
            self.best_score = self.agreement(context, self.skip)
        skipped, kept = sorted(self.skip), [c for c in self.candidates if c not in self.skip]
        if kept:
            out, into = self.search_rng.choice(skipped), self.search_rng.choice(kept)
            candidate = frozenset(self.skip - {int(out)} | {int(into)})
            score = self.agreement(context, candidate)
            if score > self.best_score:
                self.skip, self.best_score = candidate, score
        self.searches_left -= 1

    def propose(self, context: list[int], hidden: np.ndarray, max_depth: int) -> Draft:
        if self.searches_left > 0:
            self._search(context)
        tokens: list[int] = []
        probs: list[np.ndarray | None] = []
        past, token, position = None, context[-1], len(context) - 1
        for _ in range(min(self.length, max_depth)):
            logits, past = self.target.draft_forward([token], np.array([position]), self.skip, past)
            if self.temperature > 0:
                q = softmax(logits[-1], self.temperature)
                token = draw(q, self.rng)
                probs.append(q)
                top = float(q.max())
            else:
                token = int(logits[-1].argmax())
                probs.append(None)
                top = float(softmax(logits[-1], 1.0).max())
            tokens.append(token)
            position += 1
            if top < self.confidence:
                break
        return Draft.chain(tokens, probs if self.temperature > 0 else None)
