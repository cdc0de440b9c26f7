"""Speculative decoding (edgekit.runtimes.decoding): lossless greedy drafting, tree attention,
KV-cache rollback, the sampling acceptance rule, eos and bad input.

The greedy tests run on a DecoderLM and a TinyLM trained for a few seconds on a repetitive
synthetic token stream (motifs with noise), so greedy output repeats patterns and every drafter
gets some drafts accepted and some rejected; the tests assert both, so none passes vacuously.
"""

from __future__ import annotations

import gc
import math
import weakref
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests.conftest import scrambled_weights
from edgekit.errors import UserError
from edgekit.models.encdec import DecoderLM, LMConfig
from edgekit.models.tiny_lm import TinyLM
from edgekit.runtimes.decoding import generate
from edgekit.runtimes.decoding.drafters import make_drafter
from edgekit.runtimes.decoding.drafters.head import HeadWeights, train_head
from edgekit.runtimes.decoding.target import Target, TorchTarget
from edgekit.runtimes.decoding.verify import Draft, Drafter, accept_sample, walk

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 40
MAX_SEQ = 64  # the TinyLM's
NEW = 24  # greedy tokens per prompt


# -- models ------------------------------------------------------------------------


def motif_stream(n: int = 3000, seed: int = 0) -> np.ndarray:
    """Six motifs of 4-8 tokens in random order, 10% of the tokens replaced by noise."""
    rng = np.random.default_rng(seed)
    motifs = [rng.integers(3, VOCAB, size=int(rng.integers(4, 9))).tolist() for _ in range(6)]
    out: list[int] = []
    while len(out) < n:
        for t in motifs[int(rng.integers(len(motifs)))]:
            out.append(int(rng.integers(3, VOCAB)) if rng.random() < 0.1 else t)
    return np.array(out[:n], dtype=np.int64)


def fit_lm(model, data: np.ndarray, steps: int = 60, seq: int = 32, batch: int = 8, lr: float = 1e-2):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        x = torch.from_numpy(np.stack([data[s : s + seq + 1] for s in starts]))
        logits = model.step(x[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@dataclass
class Trained:
    model: object
    target: TorchTarget
    head: HeadWeights
    prompts: list[list[int]]
    plain: list[list[int]]  # plain greedy output per prompt


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    return motif_stream()


def _trained(model, data) -> Trained:
    fit_lm(model, data)
    target = TorchTarget(model)
    head = train_head(model, data, steps=30, seq=32, batch=8, lr=1e-2)
    prompts = [data[100:112].tolist(), data[2000:2006].tolist(), [5, 6, 7]]
    plain = [generate(target, None, p, NEW).tokens for p in prompts]
    return Trained(model, target, head, prompts, plain)


@pytest.fixture(scope="module")
def trained(one_torch_thread, stream) -> dict[str, Trained]:
    torch.manual_seed(0)
    decoder = DecoderLM(LMConfig(vocab=VOCAB, dim=32, heads=4, kv_heads=2, ffn=64, layers=4))
    torch.manual_seed(0)
    tiny = TinyLM(dim=32, layers=4, heads=4, ffn=64, max_seq=MAX_SEQ, vocab=VOCAB)
    return {"decoder": _trained(decoder, stream), "tiny": _trained(tiny, stream)}


def fresh_cache(target: TorchTarget, text: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The cache of a plain prefill of ``text`` (resets ``target``)."""
    target.reset()
    target.forward(text)
    return target.cache_arrays()


def assert_caches_close(got, want, atol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for (k1, v1), (k2, v2) in zip(got, want):
        assert k1.shape == k2.shape and v1.shape == v2.shape
        np.testing.assert_allclose(k1, k2, atol=atol, rtol=1e-4)
        np.testing.assert_allclose(v1, v2, atol=atol, rtol=1e-4)


# -- 1. every drafter is lossless under greedy decoding --------------------------------

DRAFTERS = [
    ("ngram", {}),
    ("aded", {}),
    ("aded", {"corpus": "stream", "width": 2}),
    ("swift", {}),
    ("swift", {"skip_ratio": 0.25, "search_steps": 4, "confidence": 0.0}),
    ("head", {"weights": "head"}),
]


@pytest.mark.parametrize("kind", ["decoder", "tiny"])
@pytest.mark.parametrize("name,options", DRAFTERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DRAFTERS)])
def test_greedy_drafting_equals_plain_greedy(trained, stream, kind, name, options):
    t = trained[kind]
    opts = {k: (stream if v == "stream" else t.head if v == "head" else v) for k, v in options.items()}
    drafter = make_drafter(name, t.target, **opts)  # one drafter for all prompts: no state may leak between runs
    accepted = drafted = 0
    for prompt, plain in zip(t.prompts, t.plain):
        g = generate(t.target, drafter, prompt, NEW)
        assert g.tokens == plain
        assert g.steps == len(g.accepted) == len(g.drafted)
        assert all(0 <= a <= d for a, d in zip(g.accepted, g.drafted))
        assert 1 + g.steps + sum(g.accepted) == len(g.tokens)  # the prefill's token + one per pass + the accepted ones
        # the cache holds exactly the accepted text: prompt + output without the pending last token
        assert t.target.length == len(prompt) + len(g.tokens) - 1
        accepted += sum(g.accepted)
        drafted += sum(g.drafted)
    assert accepted > 0, "no draft token was ever accepted: the test would pass vacuously"
    assert drafted > accepted, "no draft token was ever rejected: the rollback path went untested"


def test_plain_greedy_equals_the_models_own_generate(trained):
    t = trained["tiny"]
    for prompt, plain in zip(t.prompts, t.plain):
        ref = t.model.generate(torch.tensor([prompt]), NEW)[0, len(prompt) :].tolist()
        assert plain == ref


def test_max_new_tokens_edges(trained):
    t = trained["tiny"]
    prompt, plain = t.prompts[0], t.plain[0]
    drafter = make_drafter("ngram", t.target)
    g = generate(t.target, drafter, prompt, 0)
    assert g.tokens == [] and g.steps == 0
    g = generate(t.target, drafter, prompt, 1)
    assert g.tokens == plain[:1] and g.steps == 0
    for n in (2, 3, 7):
        assert generate(t.target, drafter, prompt, n).tokens == plain[:n]
    with pytest.raises(UserError):
        generate(t.target, drafter, prompt, -1)


@pytest.mark.parametrize("name", ["aded", "swift"])  # a tree's positions, a self-draft's own passes
def test_drafting_up_to_the_tinylm_context_limit(trained, name):
    # prompt + max_new_tokens - 1 == max_seq is allowed (the last token is never fed): no draft may overflow it
    t = trained["tiny"]
    prompt = t.prompts[0]
    n = MAX_SEQ - len(prompt) + 1
    plain = generate(t.target, None, prompt, n).tokens
    assert len(plain) == n
    drafter = make_drafter(name, t.target)
    g = generate(t.target, drafter, prompt, n)
    assert g.tokens == plain
    assert sum(g.accepted) > 0
    with pytest.raises(UserError, match="at most"):
        generate(t.target, drafter, prompt, n + 1)


# -- 2. tree attention ----------------------------------------------------------------

# a draft tree over the pending token: two roots, branching below both (siblings distinct)
TREE_TOKENS = [7, 11, 7, 30, 12, 7, 9, 21]
TREE_PARENTS = [-1, -1, 0, 0, 1, 2, 2, 4]


def ancestors(parents: list[int], node: int) -> list[int]:
    """Fed indices (0 = the pending token) from the root to ``node`` (a fed index)."""
    path = [node]
    while path[-1] > 0:
        path.append(parents[path[-1] - 1] + 1)
    return path[::-1]


@pytest.mark.parametrize("kind", ["decoder", "tiny"])
def test_tree_draft_logits_equal_each_paths_chain(trained, kind):
    t = trained[kind]
    target, prompt = t.target, t.prompts[1]
    draft = Draft(TREE_TOKENS, TREE_PARENTS)
    draft.check(target.vocab)
    assert not draft.is_chain()
    target.reset()
    pending = int(target.forward(prompt)[0][-1].argmax())
    tokens, positions, mask = draft.feed(pending, target.length)
    assert mask is not None and list(positions) == [len(prompt) + d for d in [0, *draft.depths()]]
    logits, hidden = target.forward(tokens, positions, mask)
    assert logits.shape == (len(tokens), VOCAB)
    for node in range(len(tokens)):
        path = ancestors(TREE_PARENTS, node)
        target.reset()
        target.forward(prompt)
        chain_logits, chain_hidden = target.forward([tokens[i] for i in path])
        np.testing.assert_allclose(logits[node], chain_logits[-1], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(hidden[node], chain_hidden[-1], atol=1e-4, rtol=1e-4)


def test_draft_feed_mask_and_limited():
    draft = Draft(TREE_TOKENS, TREE_PARENTS, probs=[None] * len(TREE_TOKENS))
    tokens, positions, mask = draft.feed(3, 10)
    assert tokens == [3, *TREE_TOKENS]
    # every fed token sees exactly its ancestors and itself
    for node in range(len(tokens)):
        assert set(np.flatnonzero(mask[node])) == set(ancestors(TREE_PARENTS, node))
        assert positions[node] == 10 + len(ancestors(TREE_PARENTS, node)) - 1
    assert Draft.chain([4, 5, 6]).feed(3, 10) == ([3, 4, 5, 6], None, None)
    # limited: the nodes up to a depth, parents renumbered, distributions carried along
    small = draft.limited(2)
    assert small.depths() == [d for d in draft.depths() if d <= 2]
    assert small.tokens == [tok for tok, d in zip(TREE_TOKENS, draft.depths()) if d <= 2]
    small.check(VOCAB)
    assert len(small.probs) == len(small)
    assert draft.limited(0).tokens == [] and draft.limited(10) is draft


# -- 3. the cache rolls back to the accepted text --------------------------------------


class Scripted(Drafter):
    """Proposes one planned draft per step, built from the plain greedy continuation ``ref``
    (``ref[0]`` is the prefill's token, so the pending token of a step is ``ref[len(output) - 1]``),
    then none; after every pass it records the target's state (right after the rollback)."""

    name = "scripted"

    def __init__(self, target: TorchTarget, plans, ref: list[int], prompt_len: int):
        self.target, self.plans, self.ref, self.prompt_len = target, list(plans), ref, prompt_len
        self.states: list[tuple[list[int], int, int, list]] = []  # (context, accepted, cache length, cache)

    def propose(self, context, hidden, max_depth):
        if not self.plans:
            return Draft()
        done = len(context) - self.prompt_len  # output so far, the pending token included
        return self.plans.pop(0)(self.ref[done:])  # what the model will say after the pending token

    def observe(self, context, draft, accepted):
        if len(draft):
            self.states.append((list(context), accepted, self.target.length, self.target.cache_arrays()))


def wrong(token: int) -> int:
    return (token + 1) % VOCAB


def chain_two_then_wrong(r):  # accepts 2
    return Draft.chain([r[0], r[1], wrong(r[2]), r[3]])


def chain_all_wrong(r):  # accepts 0
    return Draft.chain([wrong(r[0]), r[1]])


def tree_second_branch(r):  # accepts 2 along a branch that is not a prefix of the block
    return Draft(
        [wrong(r[0]), r[0], r[1], wrong(r[1]), r[1], wrong(r[2])],
        [-1, -1, 0, 1, 1, 4],
    )


def tree_all_wrong(r):  # two wrong roots, accepts 0
    return Draft([wrong(r[0]), wrong(wrong(r[0])), r[1]], [-1, -1, 0])


def check_states(target: TorchTarget, states, accepted: list[int]) -> None:
    assert [a for _, a, _, _ in states] == accepted
    for context, _, length, cache in states:
        text = context[:-1]  # all but the pending token
        assert length == len(text)
        assert_caches_close(cache, fresh_cache(target, text))


@pytest.mark.parametrize("kind", ["decoder", "tiny"])
@pytest.mark.parametrize(
    "plan,accepted",
    [(chain_two_then_wrong, 2), (chain_all_wrong, 0), (tree_second_branch, 2), (tree_all_wrong, 0)],
)
def test_cache_after_a_rejection_equals_a_plain_prefill(trained, kind, plan, accepted):
    t = trained[kind]
    target, prompt, ref = t.target, t.prompts[0], t.plain[0]
    drafter = Scripted(target, [plan], ref, len(prompt))
    g = generate(target, drafter, prompt, 8)
    assert g.tokens == ref[:8]
    assert g.accepted[0] == accepted and g.drafted[0] > accepted
    # at the end of the run, after plain passes
    text = prompt + g.tokens[:-1]
    assert target.length == len(text)
    assert_caches_close(target.cache_arrays(), fresh_cache(target, text))
    # and right after the speculative pass
    check_states(target, drafter.states, [accepted])


@pytest.mark.parametrize("kind", ["decoder", "tiny"])
def test_cache_stays_exact_over_many_mixed_steps(trained, kind):
    t = trained[kind]
    target, prompt, ref = t.target, t.prompts[2], t.plain[2]
    plans = [tree_second_branch, chain_all_wrong, chain_two_then_wrong, tree_all_wrong, tree_second_branch, chain_two_then_wrong]
    drafter = Scripted(target, plans, ref, len(prompt))
    g = generate(target, drafter, prompt, 20)
    assert g.tokens == ref[:20]
    assert g.accepted[:6] == [2, 0, 2, 0, 2, 2]
    check_states(target, drafter.states, [2, 0, 2, 0, 2, 2])


@pytest.mark.parametrize("kind", ["decoder", "tiny"])
def test_cache_after_aded_trees_equals_a_plain_prefill(trained, kind):
    t = trained[kind]
    accepted = drafted = 0
    for prompt in t.prompts:
        g = generate(t.target, make_drafter("aded", t.target), prompt, NEW)
        accepted, drafted = accepted + sum(g.accepted), drafted + sum(g.drafted)
        text = prompt + g.tokens[:-1]
        assert t.target.length == len(text)
        assert_caches_close(t.target.cache_arrays(), fresh_cache(t.target, text))
    assert drafted > accepted > 0


def test_keep_by_hand_then_continue(trained):
    # the Target contract step by step: feed a tree, walk it greedily, keep the branch, decode on
    t = trained["decoder"]
    target, prompt, ref = t.target, t.prompts[0], t.plain[0]
    target.reset()
    pending = int(target.forward(prompt)[0][-1].argmax())
    assert pending == ref[0]
    draft = tree_second_branch(ref[1:])
    base = target.length
    logits, _ = target.forward(*draft.feed(pending, base))
    path, nxt = walk(logits, draft, 0.0, np.random.default_rng(0))
    assert path == [0, 2, 5] and nxt == ref[3]
    target.keep(base, path)
    assert target.length == len(prompt) + 3
    logits, _ = target.forward([nxt])
    assert int(logits[-1].argmax()) == ref[4]
    with pytest.raises(UserError):
        target.keep(base, [0, 99])


# -- 4. sampling keeps the model's distribution ----------------------------------------


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square p-value of ``counts`` against ``probs``; cells expected below 5 are pooled,
    and a cell of probability 0 must be empty."""
    counts, probs = np.asarray(counts, dtype=np.float64).ravel(), np.asarray(probs, dtype=np.float64).ravel()
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was emitted"
    n = counts.sum()
    expected = probs / probs.sum() * n
    small = (expected < 5) & (probs > 0)
    obs = np.append(counts[expected >= 5], counts[small].sum())
    exp = np.append(expected[expected >= 5], expected[small].sum())
    if exp[-1] < 5:  # pool the pooled cell into the smallest big one
        obs[np.argmin(exp[:-1])] += obs[-1]
        exp[np.argmin(exp[:-1])] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return chi2_sf(stat, len(obs) - 1)


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square with an integer ``dof`` (closed forms; scipy.stats takes seconds to import)."""
    h = x / 2
    if dof % 2 == 0:  # exp(-h) * sum_{i < dof/2} h^i / i!
        term = total = 1.0
        for i in range(1, dof // 2):
            term *= h / i
            total += term
        return math.exp(-h) * total
    total = math.erfc(math.sqrt(h))  # + exp(-h) * sum_{i < (dof-1)/2} h^(i+1/2) / gamma(i + 3/2)
    term = math.sqrt(h) * math.exp(-h) / math.gamma(1.5)
    for i in range(1, (dof - 1) // 2 + 1):
        total += term
        term *= h / (i + 0.5)
    return total


def test_chi2_sf_known_values():
    # critical values at 5% and 0.1% from the tables
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=1e-4)
    assert chi2_sf(5.991, 2) == pytest.approx(0.05, abs=1e-4)
    assert chi2_sf(16.266, 3) == pytest.approx(0.001, abs=1e-6)
    assert chi2_sf(18.467, 4) == pytest.approx(0.001, abs=1e-6)
    assert chi2_sf(36.415, 24) == pytest.approx(0.05, abs=1e-4)
    assert chi2_sf(0.0, 7) == pytest.approx(1.0)


P = np.array([0.1, 0.4, 0.0, 0.3, 0.2])
Q = np.array([0.05, 0.1, 0.35, 0.1, 0.4])  # mass where p has none, too little where p has much


CASES = ["one deterministic likely child", "one deterministic impossible child", "three deterministic children", "sampled child", "sampled child, q == p"]


@pytest.mark.parametrize("case", CASES)
def test_accept_sample_emits_tokens_distributed_as_p(case):
    rng = np.random.default_rng(CASES.index(case))
    trials = 20000
    q = Q if case == "sampled child" else P
    drafted = rng.choice(len(q), size=trials, p=q)  # a sampled child is drawn from q
    tokens = np.empty(trials, dtype=np.int64)
    hits = 0
    for n in range(trials):
        if case == "one deterministic likely child":
            children = [(1, None)]
        elif case == "one deterministic impossible child":
            children = [(2, None)]
        elif case == "three deterministic children":
            children = [(3, None), (0, None), (4, None)]
        else:
            children = [(int(drafted[n]), q)]
        p = P.copy() if n < 50 else P
        index, token = accept_sample(p, children, rng)
        if n < 50:
            np.testing.assert_array_equal(p, P)  # the caller's distribution is left alone
        if index is None:
            assert token not in [c for c, _ in children]  # a rejected child is struck from p
        else:
            assert token == children[index][0]
            hits += 1
        tokens[n] = token
    counts = np.bincount(tokens, minlength=len(P))
    assert chi_square_pvalue(counts, P) > 1e-3, counts / trials
    # how often a draft is accepted: p(x) for a deterministic child, sum(min(p, q)) for a sampled one
    rate = {
        "one deterministic likely child": P[1],
        "one deterministic impossible child": 0.0,
        "three deterministic children": P[3] + P[0] + P[4],
        "sampled child": np.minimum(P, Q).sum(),
        "sampled child, q == p": 1.0,
    }[case]
    assert abs(hits / trials - rate) < 4 * math.sqrt(max(rate * (1 - rate), 1e-9) / trials) + 1e-9


class MemoTarget(Target):
    """A TorchTarget whose passes are memoised by the text they follow: the statistical tests sample the
    same few contexts thousands of times. Every pass is the wrapped model's own; the cache is the text."""

    def __init__(self, inner: TorchTarget):
        self.inner, self.vocab, self.layers, self.max_len = inner, inner.vocab, inner.layers, inner.max_len
        self.memo: dict = {}
        self.reset()

    def reset(self):
        self.text: list[int] = []
        self.length = 0

    def _prefilled(self, text) -> None:
        self.inner.reset()
        if text:
            self.inner.forward(list(text))

    def forward(self, tokens, positions=None, tree_mask=None):
        tokens = [int(x) for x in tokens]
        mask = None if tree_mask is None else np.asarray(tree_mask, dtype=bool)
        key = ("forward", tuple(self.text), tuple(tokens), None if mask is None else mask.tobytes())
        if key not in self.memo:
            self._prefilled(self.text)
            self.memo[key] = self.inner.forward(tokens, positions, mask)
        self.text += tokens
        self.length = len(self.text)
        return self.memo[key]

    def keep(self, start, indices):
        block = self.text[start:]
        self.text = self.text[:start] + [block[i] for i in indices]
        self.length = len(self.text)

    def truncated_cache(self, n):
        return (tuple(self.text[:n]), ())

    def draft_forward(self, tokens, positions, skip, past):
        base, chunks = (tuple(self.text), ()) if past is None else past
        chunks = (*chunks, (tuple(int(x) for x in tokens), tuple(int(x) for x in positions), frozenset(skip)))
        key = ("draft", base, chunks)
        if key not in self.memo:
            self._prefilled(base)
            cache = None
            for toks, pos, sk in chunks:
                logits, cache = self.inner.draft_forward(list(toks), np.array(pos), sk, cache)
            self.memo[key] = logits
        return self.memo[key], (base, chunks)

    def embedding(self):
        return self.inner.embedding()

    def head(self):
        return self.inner.head()


SMALL_VOCAB = 5
SAMPLE_PROMPT = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0]  # every token recurs: the n-gram drafter always drafts
SAMPLED = 3  # the joint distribution of the first three tokens is checked; a fourth lets step one draft two deep


@pytest.fixture(scope="module")
def small_lm(one_torch_thread):
    torch.manual_seed(0)
    model = scrambled_weights(DecoderLM(LMConfig(vocab=SMALL_VOCAB, dim=16, heads=2, kv_heads=1, ffn=32, layers=3)), seed=3)
    target = TorchTarget(model)
    rng = np.random.default_rng(0)
    dim = 16
    head = HeadWeights(
        (rng.normal(size=(3 * dim, 32)) * 0.3).astype(np.float32), np.zeros(32, np.float32),
        (rng.normal(size=(32, dim)) * 0.3).astype(np.float32), rng.normal(size=(3, 32)).astype(np.float32), SMALL_VOCAB,
    )
    return target, MemoTarget(target), head


def exact_joint(target: TorchTarget, prompt: list[int], temperature: float) -> np.ndarray:
    """p(x1, x2, x3) after ``prompt`` at ``temperature``, from the model's logits, shape (V, V, V)."""
    v = SMALL_VOCAB
    seqs = torch.tensor([prompt + [a, b] for a in range(v) for b in range(v)])
    with torch.inference_mode():
        logits = target.model(seqs).double() / temperature
    probs = logits[:, len(prompt) - 1 :].softmax(-1).numpy()  # (v*v, 3, v)
    p1 = probs[0, 0]
    p2 = probs[::v, 1]  # (a, x2): the row of sequence (a, 0)
    p3 = probs[:, 2].reshape(v, v, v)
    return p1[:, None, None] * p2[:, :, None] * p3


SAMPLING = [
    ("plain", None, {}, 1.0),
    ("ngram chains", "ngram", {}, 1.0),
    ("aded trees", "aded", {"width": 3}, 1.0),
    ("swift sampled chains", "swift", {"confidence": 0.0}, 1.0),
    ("head sampled chains at temperature 0.6", "head", {"confidence": 0.0}, 0.6),
]
RUNS = 2000


@pytest.mark.parametrize("label,name,options,temperature", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_sampled_generation_keeps_the_models_joint_distribution(small_lm, label, name, options, temperature):
    target, memo, head = small_lm
    opts = {**options, **({"weights": head} if name == "head" else {})}
    make = (lambda t: None) if name is None else (lambda t: make_drafter(name, t, **opts))
    # the memoised target is faithful: on the same seeds, the same tokens as the real one
    drafter_real, drafter_memo = make(target), make(memo)
    for seed in range(8):
        real = generate(target, drafter_real, SAMPLE_PROMPT, SAMPLED + 1, temperature=temperature, seed=seed)
        assert generate(memo, drafter_memo, SAMPLE_PROMPT, SAMPLED + 1, temperature=temperature, seed=seed).tokens == real.tokens
    exact = exact_joint(target, SAMPLE_PROMPT, temperature)
    assert exact.max() < 0.5  # not near-deterministic: a wrong rule shows
    counts = np.zeros_like(exact)
    accepted = drafted = 0
    for seed in range(RUNS):
        g = generate(memo, drafter_memo, SAMPLE_PROMPT, SAMPLED + 1, temperature=temperature, seed=seed)
        counts[tuple(g.tokens[:SAMPLED])] += 1
        accepted += sum(g.accepted)
        drafted += sum(g.drafted)
    if name is not None:  # drafts were both accepted and rejected
        assert drafted > accepted > 0.05 * RUNS
    assert chi_square_pvalue(counts, exact) > 1e-3
    # the first two tokens, and the first one, on their own too (fewer, fuller cells: sharper)
    assert chi_square_pvalue(counts.sum(axis=2), exact.sum(axis=2)) > 1e-3
    assert chi_square_pvalue(counts.sum(axis=(1, 2)), exact.sum(axis=(1, 2))) > 1e-3


# -- 5. bad input -----------------------------------------------------------------------


def test_unknown_drafter_and_option(trained):
    target = trained["tiny"].target
    with pytest.raises(UserError, match="unknown drafter"):
        make_drafter("medusa", target)
    with pytest.raises(UserError, match="no setting"):
        make_drafter("ngram", target, depth=3)
    with pytest.raises(UserError):
        make_drafter("ngram", target, min_ngram=3, max_ngram=2)
    with pytest.raises(UserError):
        make_drafter("aded", target, size=0)
    with pytest.raises(UserError):
        make_drafter("swift", target, skip_ratio=1.5)
    with pytest.raises(UserError, match="weights"):
        make_drafter("head", target)


def test_bad_prompts_and_lengths(trained):
    t = trained["tiny"]
    with pytest.raises(UserError, match="prompt"):
        generate(t.target, None, [], 5)
    with pytest.raises(UserError, match="prompt"):
        generate(t.target, make_drafter("ngram", t.target), [], 5)
    with pytest.raises(UserError, match="at most"):
        generate(t.target, make_drafter("aded", t.target), list(range(3, 33)) * 2, 10)
    with pytest.raises(UserError, match="token ids"):
        generate(t.target, None, [1, VOCAB], 3)


def test_bad_feeds_and_drafts(trained):
    target = trained["decoder"].target
    target.reset()
    with pytest.raises(UserError):
        target.forward([])
    with pytest.raises(UserError):
        target.forward([1, 2, 3], tree_mask=np.ones((2, 2), dtype=bool))
    with pytest.raises(UserError):
        target.forward([1, 2, 3], positions=[0, 1])
    with pytest.raises(UserError, match="sibling"):
        Draft([4, 5, 4], [-1, -1, -1]).check(VOCAB)
    with pytest.raises(UserError, match="sibling"):
        Draft([4, 5, 6, 6], [-1, 0, 0, 0]).check(VOCAB)
    Draft([4, 4, 4], [-1, 0, 1]).check(VOCAB)  # equal tokens down a chain are fine
    with pytest.raises(UserError, match="parent"):
        Draft([4, 5], [1, -1]).check(VOCAB)
    with pytest.raises(UserError, match="vocabulary"):
        Draft.chain([4, VOCAB]).check(VOCAB)
    with pytest.raises(UserError):
        Draft([4, 5], [-1]).check(VOCAB)
    with pytest.raises(UserError):
        TorchTarget(torch.nn.Linear(2, 2))


def test_a_drafter_proposing_repeated_siblings_is_refused(trained):
    t = trained["decoder"]

    class Twins(Drafter):
        def propose(self, context, hidden, max_depth):
            return Draft([3, 3], [-1, -1])

    with pytest.raises(UserError, match="sibling"):
        generate(t.target, Twins(), t.prompts[0], 5)


def test_swift_needs_an_intermediate_layer():
    torch.manual_seed(0)
    two = TorchTarget(DecoderLM(LMConfig(vocab=VOCAB, dim=16, heads=2, kv_heads=2, ffn=32, layers=2)))
    with pytest.raises(UserError, match="layer"):
        make_drafter("swift", two)
    three = TorchTarget(TinyLM(dim=16, layers=3, heads=2, ffn=32, max_seq=32, vocab=VOCAB))
    make_drafter("swift", three)

    class Exported(Target):  # no draft_forward: not a torch model
        vocab = VOCAB

    with pytest.raises(UserError, match="torch"):
        make_drafter("swift", Exported())
    with pytest.raises(UserError, match="embedding"):
        make_drafter("head", Exported(), weights=HeadWeights(np.zeros((48, 4)), np.zeros(4), np.zeros((4, 16)), np.zeros((2, 4)), VOCAB))


def test_head_weights_of_another_model_are_refused(trained, tmp_path):
    t = trained["decoder"]
    w = t.head
    narrow = HeadWeights(w.w1[:48], w.b1, w.w2[:, :16], w.depth_bias, w.vocab)
    with pytest.raises(UserError, match="width"):
        make_drafter("head", t.target, weights=narrow)
    other_vocab = HeadWeights(w.w1, w.b1, w.w2, w.depth_bias, w.vocab + 1)
    with pytest.raises(UserError, match="vocabulary"):
        make_drafter("head", t.target, weights=other_vocab)
    narrow.save(tmp_path / "narrow.npz")
    with pytest.raises(UserError, match="width"):
        make_drafter("head", t.target, weights=tmp_path / "narrow.npz")


def test_head_weights_save_load_round_trip(trained, tmp_path):
    t = trained["decoder"]
    path = tmp_path / "head.npz"
    t.head.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["head.npz"]  # no temp file left behind
    back = HeadWeights.load(path)
    for name in ("w1", "b1", "w2", "depth_bias"):
        np.testing.assert_array_equal(getattr(back, name), getattr(t.head, name))
    assert (back.vocab, back.dim, back.depth) == (t.head.vocab, t.head.dim, t.head.depth)
    # a drafter from the file drafts as one from the weights in memory
    prompt = t.prompts[0]
    a = generate(t.target, make_drafter("head", t.target, weights=str(path)), prompt, NEW)
    b = generate(t.target, make_drafter("head", t.target, weights=t.head), prompt, NEW)
    assert a.tokens == b.tokens == t.plain[0] and a.accepted == b.accepted


def test_loading_a_missing_or_foreign_file_as_head_weights(tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        HeadWeights.load(tmp_path / "missing.npz")
    text = tmp_path / "notes.npz"
    text.write_text("not an npz archive\n")
    with pytest.raises(UserError):
        HeadWeights.load(text)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(UserError):
        HeadWeights.load(other)
    newer = tmp_path / "newer.npz"
    np.savez(newer, format=np.int64(99), vocab=np.int64(5), w1=np.zeros((6, 4)), b1=np.zeros(4), w2=np.zeros((4, 2)), depth_bias=np.zeros((1, 4)))
    with pytest.raises(UserError, match="format"):
        HeadWeights.load(newer)


@pytest.mark.parametrize("kind", ["empty", "truncated npz", "npy array"])
def test_loading_damaged_head_weights_gives_a_user_error(tmp_path, kind):
    path = tmp_path / "head.npz"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated npz":
        HeadWeights(np.zeros((6, 4), np.float32), np.zeros(4, np.float32), np.zeros((4, 2), np.float32), np.zeros((1, 4), np.float32), 5).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    with pytest.raises(UserError):
        HeadWeights.load(path)


def test_train_head_refuses_too_little_text(trained):
    with pytest.raises(UserError, match="tokens of text"):
        train_head(trained["tiny"].model, np.arange(20) % VOCAB, steps=1, seq=32)


# -- 6. eos --------------------------------------------------------------------------------


def eos_case(t: Trained, first: int) -> tuple[list[int], list[int], int]:
    """A prompt, its plain output and the index k >= ``first`` of a token first produced there."""
    for prompt, plain in zip(t.prompts, t.plain):
        for k in range(first, NEW):
            if plain[k] not in plain[:k]:
                return prompt, plain, k
    raise AssertionError("the plain outputs repeat from the start: no eos to pick")


@pytest.mark.parametrize("kind", ["decoder", "tiny"])
def test_eos_stops_plain_and_drafted_output_alike(trained, kind):
    t = trained[kind]
    prompt, plain, k = eos_case(t, 6)
    eos = plain[k]
    assert generate(t.target, None, prompt, NEW, eos=eos).tokens == plain[: k + 1]
    for name in ("ngram", "aded", "swift", "head"):
        drafter = make_drafter(name, t.target, **({"weights": t.head} if name == "head" else {}))
        g = generate(t.target, drafter, prompt, NEW, eos=eos)
        assert g.tokens == plain[: k + 1], name
    # eos as the very first token: nothing is verified after the prefill
    g = generate(t.target, make_drafter("ngram", t.target), prompt, NEW, eos=plain[0])
    assert g.tokens == plain[:1] and g.steps == 0


@pytest.mark.parametrize("kind", ["decoder", "tiny"])
def test_no_verification_pass_runs_after_eos(trained, kind):
    # eos arrives inside an accepted draft: the loop must stop after that pass, not decode on to max_new_tokens
    t = trained[kind]
    prompt, plain, k = next(
        (p, out, k) for p, out in zip(t.prompts, t.plain) for k in range(2, 8) if out[k] not in out[:k] and out[k + 2] != out[k]
    )
    # the pass accepts plain[1..k+1] (eos = plain[k] inside it) and adds plain[k+2], which is not eos
    drafter = Scripted(t.target, [lambda r: Draft.chain(r[: k + 1])], plain, len(prompt))
    g = generate(t.target, drafter, prompt, NEW, eos=plain[k])
    assert g.tokens == plain[: k + 1]
    assert g.accepted[0] == k + 1
    assert g.steps == 1, f"{g.steps} passes for {k + 1} tokens: passes ran after eos"


# -- targets -----------------------------------------------------------------------------------


def test_a_dropped_target_is_freed(trained):
    # a TorchTarget hooks the model's final norm; dropping the target must not leave it (and the hidden
    # states it collects on every later forward of the model) alive
    model = trained["tiny"].model
    hooks = len(model.norm._forward_hooks)
    target = TorchTarget(model)
    ref = weakref.ref(target)
    del target
    gc.collect()
    assert ref() is None
    assert len(model.norm._forward_hooks) == hooks
