"""ADED-style drafting: an adaptive tri-gram model of the output, searched into a draft tree.

After "Adaptive Draft-Verification for Efficient Large Language Model Decoding" (Liu et al.,
2024). A tri-gram table (with a bi-gram back-off) stands in for the model's next-token
distribution. It may be seeded with a corpus (the model's training text, or text the model
generated) and it adapts while decoding: every token the model commits is counted in a table
of its own, which outweighs the corpus for a context once the output has continued that
context a few times (``trust``), so the drafts follow what this model writes for this prompt.

The draft is a tree: starting from the pending token, the most probable unexpanded node (by
the product of the table's conditional probabilities along its path) is expanded with its
``width`` likeliest next tokens, until ``size`` nodes are drafted or no node reaches
``depth``. ADED searches with Monte Carlo tree search; this best-first expansion is its
deterministic core (it spends the node budget where the expected accepted length grows most)
without rollouts, which a budget of a few dozen nodes does not need. Every node carries its path
probability as its score, so the verification loop feeds only as many nodes as pay for their
cost on the target (``budget.py``).
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np

from edgekit.errors import UserError
from edgekit.runtimes.decoding.verify import Draft, Drafter


def corpus_counts(tokens: np.ndarray) -> tuple[dict, dict]:
    """Tri-gram and bi-gram counts of a 1-D token array: {(a, b): {c: n}}, {b: {c: n}}."""
    t = np.asarray(tokens, dtype=np.int64).reshape(-1)
    tri: dict = defaultdict(dict)
    bi: dict = defaultdict(dict)
    if len(t) >= 3:
        keys, counts = np.unique(np.stack([t[:-2], t[1:-1], t[2:]], axis=1), axis=0, return_counts=True)
        for (a, b, c), n in zip(keys.tolist(), counts.tolist()):
            tri[(a, b)][c] = float(n)
    if len(t) >= 2:
        keys, counts = np.unique(np.stack([t[:-1], t[1:]], axis=1), axis=0, return_counts=True)
        for (b, c), n in zip(keys.tolist(), counts.tolist()):
            bi[b][c] = float(n)
    return dict(tri), dict(bi)


class AdedDrafter(Drafter):
    name = "aded"

    def __init__(self, corpus: np.ndarray | None = None, size: int = 24, depth: int = 8, width: int = 3, trust: float = 3.0,
                 budget: bool = True):
        if size < 1 or depth < 1 or width < 1:
            raise UserError(f"aded drafter: size, depth and width must be >= 1, got {size}, {depth}, {width}")
        if trust <= 0:
            raise UserError(f"aded drafter: trust must be > 0, got {trust}")
        self.size, self.depth, self.width, self.trust, self.budget = size, depth, width, trust, budget
        self.corpus_tri, self.corpus_bi = corpus_counts(corpus) if corpus is not None else ({}, {})

    def start(self, prompt, temperature, rng):
        super().start(prompt, temperature, rng)
        self.tri: dict = defaultdict(lambda: defaultdict(float))
        self.bi: dict = defaultdict(lambda: defaultdict(float))
        self.counted = 0
        # next_tokens by context, dropped when a count it read changes; a context answered from the
        # bi-gram back-off is listed under its last token
        self.memo: dict[tuple[int, int], list[tuple[int, float]]] = {}
        self.backed_off: dict[int, set[tuple[int, int]]] = defaultdict(set)
        self._count(prompt)

    def _count(self, context: list[int]) -> None:
        """Count the n-grams ending at tokens not counted yet (the table adapts to the output)."""
        for j in range(max(self.counted, 1), len(context)):
            b, c = context[j - 1], context[j]
            self.bi[b][c] += 1.0
            for key in self.backed_off.pop(b, ()):
                self.memo.pop(key, None)
            if j >= 2:
                self.tri[(context[j - 2], b)][c] += 1.0
                self.memo.pop((context[j - 2], b), None)
        self.counted = max(self.counted, len(context))

    def _next_tokens(self, a: int, b: int) -> list[tuple[int, float]]:
        if (a, b) not in self.memo:
            self.memo[(a, b)] = self.next_tokens(a, b)
        return self.memo[(a, b)]

    def next_tokens(self, a: int, b: int) -> list[tuple[int, float]]:
        """The ``width`` likeliest tokens after (a, b) with their conditional probabilities.

        The output's own counts and the corpus's are mixed as distributions, the output's with
        weight n / (n + trust) after n occurrences of the context in it: a context the model has
        already continued here soon follows the model rather than the corpus."""
        for table, key, corpus in ((self.tri, (a, b), self.corpus_tri), (self.bi, b, self.corpus_bi)):
            own, prior = table.get(key, {}), corpus.get(key, {})
            n_own, n_prior = sum(own.values()), sum(prior.values())
            if n_own + n_prior == 0:
                continue
            w = 1.0 if n_prior == 0 else n_own / (n_own + self.trust)
            mixed = {c: (1.0 - w) * n / n_prior for c, n in prior.items()} if n_prior else {}
            for c, n in own.items():
                mixed[c] = mixed.get(c, 0.0) + w * n / n_own
            if table is self.bi:
                self.backed_off[b].add((a, b))
            return heapq.nlargest(self.width, mixed.items(), key=lambda kv: kv[1])
        self.backed_off[b].add((a, b))  # no counts yet: a first count of b's continuations changes that
        return []

    def propose(self, context: list[int], hidden: np.ndarray, max_depth: int) -> Draft:
        self._count(context[:-1])  # the pending token is not committed yet
        depth_cap = min(self.depth, max_depth)
        if depth_cap < 1 or len(context) < 2:
            return Draft()
        draft = Draft(scores=[])  # a node's score: its path probability under the table
        # heap of (-path probability, tie-break, node index (-1: the pending token), last two tokens, depth)
        heap = [(-1.0, 0, -1, (context[-2], context[-1]), 0)]
        order = 1
        while heap and len(draft) < self.size:
            neg_p, _, node, (a, b), d = heapq.heappop(heap)
            if d >= depth_cap:
                continue
            for c, q in self._next_tokens(a, b):
                if len(draft) >= self.size:
                    break
                draft.tokens.append(c)
                draft.parents.append(node)
                draft.scores.append(-neg_p * q)
                heapq.heappush(heap, (neg_p * q, order, len(draft) - 1, (b, c), d + 1))
                order += 1
        return draft

    def observe(self, context, draft, accepted):
        self._count(context[:-1])
