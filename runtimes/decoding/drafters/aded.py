"""ADED-style drafting: an adaptive n-gram (by default tri-gram) model of the output, searched into a draft tree.

After "Adaptive Draft-Verification for Efficient Large Language Model Decoding" (Liu et al.,
2024). An n-gram table stands in for the model's next-token distribution: the last
``order - 1`` tokens are looked up, backing off to shorter contexts where the table has no
counts (ADED's tri-gram is ``order=3``: two tokens, then one). It may be seeded with a corpus
(the model's training text, or text the model generated) and it adapts while decoding: every
token the model commits is counted in a table of its own, which outweighs the corpus for a
context once the output has continued that context a few times (``trust``), so the drafts
follow what this model writes for this prompt.

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

Context = tuple[int, ...]


def corpus_counts(tokens: np.ndarray, order: int = 3) -> dict[Context, dict[int, float]]:
    """{context: {next token: count}} of a 1-D token array, for every context of 1 to ``order - 1`` tokens."""
    t = np.asarray(tokens, dtype=np.int64).reshape(-1)
    table: dict[Context, dict[int, float]] = {}
    for n in range(2, order + 1):  # n-grams: a context of n - 1 tokens and the token after it
        if len(t) < n:
            break
        grams, counts = np.unique(np.lib.stride_tricks.sliding_window_view(t, n), axis=0, return_counts=True)
        for gram, count in zip(grams.tolist(), counts.tolist()):
            table.setdefault(tuple(gram[:-1]), {})[gram[-1]] = float(count)
    return table


class AdedDrafter(Drafter):
    name = "aded"

    def __init__(self, corpus: np.ndarray | None = None, size: int = 24, depth: int = 8, width: int = 3, trust: float = 3.0,
                 order: int = 3, budget: bool = True):
        if size < 1 or depth < 1 or width < 1:
            raise UserError(f"aded drafter: size, depth and width must be >= 1, got {size}, {depth}, {width}")
        if trust <= 0:
            raise UserError(f"aded drafter: trust must be > 0, got {trust}")
        if order < 2:
            raise UserError(f"aded drafter: order must be >= 2 (a bi-gram table at least), got {order}")
        self.size, self.depth, self.width, self.trust, self.order, self.budget = size, depth, width, trust, order, budget
        self.corpus = corpus_counts(corpus, order) if corpus is not None else {}

    def start(self, prompt, temperature, rng):
        super().start(prompt, temperature, rng)
        self.own: dict[Context, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.counted = 0
        # next_tokens by context, dropped when a count it read changes: readers[c] lists the
        # memoised contexts whose answer depends on the output's counts after c
        self.memo: dict[Context, list[tuple[int, float]]] = {}
        self.readers: dict[Context, set[Context]] = defaultdict(set)
        self._count(prompt)

    def _count(self, context: list[int]) -> None:
        """Count the n-grams ending at tokens not counted yet (the table adapts to the output)."""
        for j in range(max(self.counted, 1), len(context)):
            for n in range(1, min(self.order - 1, j) + 1):
                key = tuple(context[j - n : j])
                self.own[key][context[j]] += 1.0
                for reader in self.readers.pop(key, ()):
                    self.memo.pop(reader, None)
        self.counted = max(self.counted, len(context))

    def _next_tokens(self, context: Context) -> list[tuple[int, float]]:
        if context not in self.memo:
            self.memo[context] = self.next_tokens(context)
        return self.memo[context]

    def next_tokens(self, context: Context) -> list[tuple[int, float]]:
        """The ``width`` likeliest tokens after ``context`` (its last ``order - 1`` tokens) with their
        conditional probabilities, from the longest suffix of it that has counts.

        The output's own counts and the corpus's are mixed as distributions, the output's with
        weight n / (n + trust) after n occurrences of the context in it: a context the model has
        already continued here soon follows the model rather than the corpus."""
        for n in range(len(context), 0, -1):
            key = context[-n:]
            self.readers[key].add(context)  # a first count here (or a new one) changes the answer
            own, prior = self.own.get(key, {}), self.corpus.get(key, {})
            n_own, n_prior = sum(own.values()), sum(prior.values())
            if n_own + n_prior == 0:
                continue
            w = 1.0 if n_prior == 0 else n_own / (n_own + self.trust)
            mixed = {c: (1.0 - w) * k / n_prior for c, k in prior.items()} if n_prior else {}
            for c, k in own.items():
                mixed[c] = mixed.get(c, 0.0) + w * k / n_own
            return heapq.nlargest(self.width, mixed.items(), key=lambda kv: kv[1])
        return []

    def propose(self, context: list[int], hidden: np.ndarray, max_depth: int) -> Draft:
        self._count(context[:-1])  # the pending token is not committed yet
        depth_cap = min(self.depth, max_depth)
        if depth_cap < 1 or len(context) < 2:
            return Draft()
        keep = self.order - 1
        draft = Draft(scores=[])  # a node's score: its path probability under the table
        # heap of (-path probability, tie-break, node index (-1: the pending token), the context it ends, depth)
        heap = [(-1.0, 0, -1, tuple(context[-keep:]), 0)]
        order = 1
        while heap and len(draft) < self.size:
            neg_p, _, node, ctx, d = heapq.heappop(heap)
            if d >= depth_cap:
                continue
            for c, q in self._next_tokens(ctx):
                if len(draft) >= self.size:
                    break
                draft.tokens.append(c)
                draft.parents.append(node)
                draft.scores.append(-neg_p * q)
                heapq.heappush(heap, (neg_p * q, order, len(draft) - 1, (*ctx, c)[-keep:], d + 1))
                order += 1
        return draft

    def observe(self, context, draft, accepted):
        self._count(context[:-1])
