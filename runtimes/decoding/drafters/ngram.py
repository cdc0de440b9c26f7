"""Prompt lookup: draft what followed the last earlier occurrence of the context's final n-gram.

Training-free and model-free (Saxena 2023, "prompt lookup decoding"; the n-gram retrieval in
LLMA and REST): where the output repeats or quotes the prompt (code, structured text,
summaries, edits) the continuation of the matching n-gram is often exactly what the model
will write. Longest n first; the index is built incrementally, so a step costs O(new tokens).
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import UserError
from edgekit.runtimes.decoding.verify import Draft, Drafter


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, length: int = 8, budget: bool = True):
        if not 1 <= min_ngram <= max_ngram:
            raise UserError(f"ngram drafter: need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        if length < 1:
            raise UserError(f"ngram drafter: length must be >= 1, got {length}")
        self.max_ngram, self.min_ngram, self.length, self.budget = max_ngram, min_ngram, length, budget

    def start(self, prompt, temperature, rng):
        super().start(prompt, temperature, rng)
        self.last_end: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token, latest occurrence
        self.indexed = 0

    def _index(self, context: list[int]) -> None:
        # n-grams ending before the final token: those have a continuation to propose
        for j in range(self.indexed, len(context) - 1):
            for n in range(self.min_ngram, min(self.max_ngram, j + 1) + 1):
                self.last_end[tuple(context[j - n + 1 : j + 1])] = j
        self.indexed = max(self.indexed, len(context) - 1)

    def propose(self, context: list[int], hidden: np.ndarray, max_depth: int) -> Draft:
        self._index(context)
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            j = self.last_end.get(tuple(context[-n:]))
            if j is not None:
                tokens = context[j + 1 : j + 1 + min(self.length, max_depth)]
                # scores only rank the chain's depths (one in two per step a priori); the loop learns
                # how often each depth is accepted and feeds the depths worth their cost
                return Draft.chain(tokens, scores=[0.5 ** (i + 1) for i in range(len(tokens))])
        return Draft()
