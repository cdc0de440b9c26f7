"""The verification loop: feed the pending token and a draft in one pass, keep what the model agrees with.

Each step feeds ``[pending] + draft`` (a chain, or a tree flattened with a mask so every
draft token sees only its ancestors, at position = the cache length + its depth). From the
logits at each fed position the loop walks down the draft:

- greedy: follow the child whose token is the model's argmax; the first position without
  such a child gives the next token. The output is token for token what plain greedy gives.
- sampling: at each position try the children in order with the speculative acceptance rule
  (Leviathan et al. 2023; Chen et al. 2023): a child drawn from the drafter's distribution q
  is accepted with probability min(1, p(x) / q(x)), otherwise p becomes norm(max(p - q, 0)); a
  child the drafter chose deterministically (q one-hot) is accepted with probability p(x),
  otherwise x is struck from p and p renormalised. When no child is accepted, the next token is
  drawn from what is left of p. Every emitted token is thereby distributed exactly as
  softmax(logits / temperature). Siblings are distinct tokens; a sampled (non one-hot) child
  must be its parent's only child.

The cache then keeps the fed tokens on the accepted path (the pending token first), so it
equals the cache of a plain run over the same text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edgekit.errors import UserError
from edgekit.runtimes.decoding.budget import PROFILE_SIZES, Calibration, best_size, pass_cost
from edgekit.runtimes.decoding.target import Target


@dataclass
class Draft:
    """Proposed tokens as a tree over the pending token: ``parents[i]`` is node i's parent (-1: the
    pending token; parents precede children); ``probs[i]``, if given, is the distribution node i's
    token was drawn from (a chain only), None for a token the drafter chose deterministically;
    ``scores[i]``, if given, in [0, 1], ranks node i by how likely the model accepts it (e.g. its path
    probability; never above its parent's), which lets the loop feed only the nodes worth their
    cost (``budget.py`` learns what a score means in accepted tokens)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[np.ndarray | None] | None = None
    scores: list[float] | None = None

    @classmethod
    def chain(cls, tokens: Sequence[int], probs: list[np.ndarray | None] | None = None, scores: Sequence[float] | None = None) -> "Draft":
        return cls([int(t) for t in tokens], list(range(-1, len(tokens) - 1)), probs, None if scores is None else [float(x) for x in scores])

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))

    def limited(self, max_depth: int) -> "Draft":
        """The nodes at depth <= max_depth (a subtree: parents precede children)."""
        depth = self.depths()
        if max(depth, default=0) <= max_depth:
            return self
        return self.subset([i for i, d in enumerate(depth) if d <= max_depth])

    def subset(self, nodes: Sequence[int]) -> "Draft":
        """The given nodes (each with its parent among them), in the draft's order."""
        keep = sorted(set(nodes))
        new_index = {old: new for new, old in enumerate(keep)}
        if any(self.parents[i] >= 0 and self.parents[i] not in new_index for i in keep):
            raise ValueError("a draft subset must keep every kept node's parent")
        return Draft(
            [self.tokens[i] for i in keep],
            [-1 if self.parents[i] < 0 else new_index[self.parents[i]] for i in keep],
            None if self.probs is None else [self.probs[i] for i in keep],
            None if self.scores is None else [self.scores[i] for i in keep],
        )

    def ranked(self) -> tuple[list[int], list[float]]:
        """Node indices best score first, and the scores in that order. A child's score is capped at
        its parent's and ties go to the earlier node, so every prefix of the order is a subtree."""
        capped: list[float] = []
        for s, p in zip(self.scores or [], self.parents):
            capped.append(min(float(s), capped[p]) if p >= 0 else float(s))
        order = sorted(range(len(capped)), key=lambda i: (-capped[i], i))
        return order, [capped[i] for i in order]

    def check(self, vocab: int) -> None:
        if len(self.parents) != len(self.tokens) or any(x is not None and len(x) != len(self.tokens) for x in (self.probs, self.scores)):
            raise UserError("a draft needs one parent (and, if any, one distribution and one score) per token")
        if self.scores is not None and not all(0.0 <= s <= 1.0 for s in self.scores):  # NaN fails too
            raise UserError("draft scores must lie in [0, 1] (e.g. path probabilities)")
        seen: set[tuple[int, int]] = set()
        for i, (tok, par) in enumerate(zip(self.tokens, self.parents)):
            if not -1 <= par < i:
                raise UserError(f"draft node {i} has parent {par}; parents must come before their children")
            if not 0 <= tok < vocab:
                raise UserError(f"draft token {tok} is outside the vocabulary of {vocab}")
            if (par, tok) in seen:
                raise UserError(f"draft node {i} repeats its sibling's token {tok}; merge equal siblings")
            seen.add((par, tok))

    def feed(self, pending: int, length: int) -> tuple[list[int], np.ndarray | None, np.ndarray | None]:
        """Tokens, positions and tree mask of ``[pending] + self`` after a cache of ``length`` tokens
        (None, None for a chain: plain causal order)."""
        tokens = [int(pending), *self.tokens]
        if self.is_chain():
            return tokens, None, None
        n = len(tokens)
        mask = np.zeros((n, n), dtype=bool)
        mask[:, 0] = True
        for i, par in enumerate(self.parents, start=1):
            mask[i] = mask[par + 1]
            mask[i, i] = True
        positions = length + np.array([0, *self.depths()], dtype=np.int64)
        return tokens, positions, mask


class Drafter:
    """Where drafts come from. ``start`` sees the prompt, ``propose`` drafts after ``context`` (prompt +
    output, the pending token last) given the model's final hidden state at the last verified position,
    and ``observe`` learns which of its tokens were accepted. A drafter whose drafts carry scores is
    trimmed to the draft size worth its cost on the target unless its ``budget`` is off."""

    name = "none"
    budget = True

    def start(self, prompt: list[int], temperature: float, rng: np.random.Generator) -> None:
        self.temperature, self.rng = temperature, rng

    def propose(self, context: list[int], hidden: np.ndarray, max_depth: int) -> Draft:
        raise NotImplementedError

    def observe(self, context: list[int], draft: Draft, accepted: int) -> None:
        """``context`` now ends with the step's output; ``accepted`` of the draft's tokens were kept."""


@dataclass
class Generation:
    tokens: list[int]
    steps: int  # verification passes after the prefill
    accepted: list[int]  # draft tokens accepted per pass
    drafted: list[int]  # draft tokens fed per pass
    seconds: float
    draft_seconds: float

    @property
    def mean_accepted(self) -> float:
        """Tokens each verification pass produced: accepted draft tokens + the model's own one."""
        return (sum(self.accepted) + self.steps) / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from the distribution ``p`` (inverse CDF; never an index with probability 0)."""
    cdf = np.cumsum(p)
    u = (1.0 - rng.random()) * cdf[-1]
    return int(min(np.searchsorted(cdf, u), len(p) - 1))


def accept_sample(p: np.ndarray, children: list[tuple[int, np.ndarray | None]], rng: np.random.Generator) -> tuple[int | None, int]:
    """Try ``children`` (token, q or None) against the model's distribution ``p``; returns (index of the
    accepted child or None, the token emitted at this position)."""
    p = p.astype(np.float64, copy=True)
    for i, (tok, q) in enumerate(children):
        if q is None:
            if rng.random() < p[tok]:
                return i, tok
            p[tok] = 0.0
        else:
            if rng.random() * q[tok] < p[tok]:  # u < p/q without dividing by a tiny q
                return i, tok
            p = np.maximum(p - q, 0.0)
        total = p.sum()
        if total <= 0.0:  # only by rounding (p == q); nothing is left to reject into
            return i, tok
        p /= total
    return None, draw(p, rng)


def walk(logits: np.ndarray, draft: Draft, temperature: float, rng: np.random.Generator) -> tuple[list[int], int]:
    """The accepted path as fed indices (0, the pending token, first) and the next token after it."""
    children: list[list[int]] = [[] for _ in range(len(draft) + 1)]
    for i, par in enumerate(draft.parents, start=1):
        children[par + 1].append(i)
    path, node = [0], 0
    while True:
        kids = children[node]
        if temperature <= 0:
            best = int(logits[node].argmax())
            nxt = next((k for k in kids if draft.tokens[k - 1] == best), None)
            if nxt is None:
                return path, best
            path.append(nxt)
            node = nxt
            continue
        p = softmax(logits[node], temperature)
        cands = [(draft.tokens[k - 1], None if draft.probs is None else draft.probs[k - 1]) for k in kids]
        chosen, token = accept_sample(p, cands, rng) if kids else (None, draw(p, rng))
        if chosen is None:
            return path, token
        path.append(kids[chosen])
        node = kids[chosen]


def generate(
    target: Target,
    drafter: Drafter | None,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos: int | None = None,
) -> Generation:
    """Up to ``max_new_tokens`` tokens after ``prompt`` (stopping after ``eos``); ``drafter`` None is
    plain decoding, one token per pass, the reference every drafter must match."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise UserError("generation needs a prompt of at least one token")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = getattr(target, "max_len", None)
    if limit and len(prompt) + max_new_tokens - 1 > limit:
        raise UserError(f"the model handles at most {limit} tokens; a prompt of {len(prompt)} plus {max_new_tokens} new tokens needs more; shorten one")
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    target.reset()
    if max_new_tokens == 0:
        return Generation([], 0, [], [], 0.0, 0.0)
    logits, hidden = target.forward(prompt)
    pending = int(logits[-1].argmax()) if temperature <= 0 else draw(softmax(logits[-1], temperature), rng)
    out, last_hidden = [pending], hidden[-1]
    accepted: list[int] = []
    drafted: list[int] = []
    draft_seconds = 0.0
    cost, calibration = None, Calibration()
    if drafter is not None:
        drafter.start(prompt, temperature, rng)
    while len(out) < max_new_tokens and not (eos is not None and eos in out):  # eos may come inside an accepted draft
        draft = Draft()
        if drafter is not None:
            t = time.perf_counter()
            # a pass yields the accepted draft tokens plus one, so deeper drafts could only overshoot
            draft = drafter.propose(prompt + out, last_hidden, max_new_tokens - len(out) - 1).limited(max_new_tokens - len(out) - 1)
            draft.check(target.vocab)
            # greedy only: the trim follows measured times, and a sampled output must depend on its seed alone
            if draft.scores is not None and drafter.budget and temperature <= 0 and len(draft) and not calibration.exploring():
                if cost is None:  # the target's first budgeted draft profiles its passes (once per target)
                    cost = pass_cost(target, room=(limit - target.length) if limit else PROFILE_SIZES[-1])
                order, scores = draft.ranked()
                draft = draft.subset(order[: best_size(calibration.estimate(scores), cost)])
            draft_seconds += time.perf_counter() - t
        base = target.length
        tokens, positions, mask = draft.feed(pending, base)
        t = time.perf_counter()
        logits, hidden = target.forward(tokens, positions, mask)
        if cost is not None:
            cost.observe(len(tokens), time.perf_counter() - t)
        path, pending = walk(logits, draft, temperature, rng)
        target.keep(base, path)
        out += [tokens[i] for i in path[1:]] + [pending]
        last_hidden = hidden[path[-1]]
        accepted.append(len(path) - 1)
        drafted.append(len(draft))
        if draft.scores is not None and len(draft):
            on_path = [False] * len(draft)
            for fed in path[1:]:
                on_path[fed - 1] = True
            calibration.update(draft.scores, on_path)
        if drafter is not None:
            t = time.perf_counter()
            drafter.observe(prompt + out, draft, len(path) - 1)
            draft_seconds += time.perf_counter() - t
    if eos is not None and eos in out:
        out = out[: out.index(eos) + 1]
    return Generation(out[:max_new_tokens], len(accepted), accepted, drafted, time.perf_counter() - started, draft_seconds)
