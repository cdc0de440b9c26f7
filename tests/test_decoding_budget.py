"""The draft budget (runtimes/decoding/budget.py): feed the best-scored draft nodes worth their
measured pass cost. Trimming must keep greedy output exact, cut drafts where passes are costly,
keep them whole where passes are cheap, leave sampled output to the seed alone, and roll the
cache back after profiling. Costs here are injected, so no assertion depends on this machine's timings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekit.errors import UserError
from edgekit.models.encdec import DecoderLM, LMConfig
from edgekit.runtimes.decoding import budget, generate
from edgekit.runtimes.decoding.budget import Calibration, PassCost, best_size
from edgekit.runtimes.decoding.drafters import make_drafter
from edgekit.runtimes.decoding.drafters.aded import AdedDrafter
from edgekit.runtimes.decoding.target import TorchTarget
from edgekit.runtimes.decoding.verify import Draft
from tests.test_decoding import VOCAB, fit_lm, motif_stream

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW = 32


def cost_of(seconds_per_size: dict[int, float]) -> PassCost:
    cost = PassCost()
    for n, s in seconds_per_size.items():
        cost.observe(n, s)
    return cost


FLAT = {1: 1.0, 64: 1.0}  # any pass costs the same: feed everything worth anything
STEEP = {1: 1.0, 2: 2.0, 64: 64.0}  # a pass costs its token count: drafting can only lose


@pytest.fixture(scope="module")
def lm():
    data = motif_stream()
    torch.manual_seed(0)
    model = fit_lm(DecoderLM(LMConfig(vocab=VOCAB, dim=32, heads=4, kv_heads=2, ffn=64, layers=3)), data)
    prompts = [data[100:112].tolist(), data[2000:2006].tolist(), data[2500:2540].tolist()]
    return model, data, prompts


def run_with_cost(model, data, prompts, costs: dict[int, float] | None, **options):
    """Greedy aded+corpus generations on a fresh target whose pass costs are ``costs`` (None: profiled)."""
    target = TorchTarget(model)
    if costs is not None:
        budget._costs[target] = cost_of(costs)
        budget._costs[target].observe = lambda n, s: None  # keep the injected curve fixed
    drafter = make_drafter("aded", target, corpus=data, **options)
    plain = [generate(target, None, p, NEW).tokens for p in prompts]
    runs = [generate(target, drafter, p, NEW) for p in prompts]
    return plain, runs, target


def test_ranked_prefixes_are_subtrees_even_when_scores_rise_along_a_path():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 20))
        parents = [int(rng.integers(-1, i)) if i else -1 for i in range(n)]
        draft = Draft(list(range(n)), parents, scores=rng.random(n).tolist())
        order, scores = draft.ranked()
        assert sorted(order) == list(range(n)) and scores == sorted(scores, reverse=True)
        for k in range(n + 1):
            kept = set(order[:k])
            assert all(parents[i] < 0 or parents[i] in kept for i in kept)
            sub = draft.subset(order[:k])
            assert len(sub) == k and all(-1 <= p < i for i, p in enumerate(sub.parents))


def test_subset_remaps_parents_and_carries_probs_and_scores():
    q = [np.full(3, 1 / 3)] * 4
    draft = Draft([7, 8, 9, 10], [-1, 0, -1, 2], probs=q, scores=[0.9, 0.5, 0.8, 0.1])
    sub = draft.subset([2, 3, 0])
    assert sub.tokens == [7, 9, 10] and sub.parents == [-1, -1, 1]
    assert sub.scores == [0.9, 0.8, 0.1] and len(sub.probs) == 3
    with pytest.raises(ValueError, match="parent"):
        draft.subset([1])  # node 1 without its parent 0


def test_pass_cost_curve_fits_base_jump_and_per_token_cost():
    true = {n: 2.0 + 1.0 * (n > 1) + 0.5 * (n - 1) for n in (1, 2, 3, 5, 8, 16)}
    np.testing.assert_allclose(cost_of(true).curve(20), [2.0 + (n > 1) + 0.5 * (n - 1) for n in range(1, 21)])
    noisy = cost_of({1: 2.0, 2: 3.6, 3: 3.0, 4: 4.4, 5: 4.1, 8: 6.0})  # no size may look cheaper than a smaller one
    assert np.all(np.diff(noisy.curve(12)) >= 0)
    falling = cost_of({1: 3.0, 4: 2.0, 8: 1.0})  # a fitted fall is read as no per-token cost, not a negative one
    assert np.all(np.diff(falling.curve(10)) >= 0) and np.all(falling.curve(10) > 0)
    single = cost_of({1: 2.5})
    np.testing.assert_allclose(single.curve(4), 2.5)
    preempted = PassCost()
    for s in (1.0, 1.0, 50.0, 1.0, 1.0):  # one preempted pass does not move the median
        preempted.observe(3, s)
    assert preempted.median[3] == 1.0


def test_best_size_weighs_expected_tokens_against_pass_time():
    accept = np.array([0.9, 0.8, 0.5, 0.2, 0.05])
    assert best_size(accept, cost_of(FLAT)) == 5
    assert best_size(accept, cost_of(STEEP)) == 0
    # a pass of n tokens costs 1 + 0.1 (n - 1): (1 + 0.9 + 0.8 + 0.5) / 1.3 beats one node less or more
    linear = cost_of({1: 1.0, 2: 1.1, 64: 7.3})
    assert best_size(accept, linear) == 3
    assert best_size(accept * 0.1, linear) == 0  # nodes rarely accepted are not worth a wider pass
    assert best_size(np.array([]), linear) == 0


def test_calibration_learns_what_a_score_means_per_band():
    cal = Calibration()
    np.testing.assert_allclose(cal.estimate([0.9, 0.3, 0.01]), [0.9, 0.3, 0.01])  # no evidence: the scores
    for _ in range(40):  # nodes scored 0.9 are accepted 1 time in 4; nodes scored 0.3 every time
        cal.update([0.9, 0.9, 0.9, 0.9, 0.3], [True, False, False, False, True])
    high, mid, low = cal.estimate([0.9, 0.3, 0.01])
    assert abs(high - 0.25) < 0.03 and mid > 0.95
    assert low == pytest.approx(0.01)  # a band never fed keeps its prior


def test_calibration_explores_before_it_trims():
    cal = Calibration()
    for _ in range(Calibration.EXPLORE):
        assert cal.exploring()
        cal.update([0.5], [False])
    assert not cal.exploring()


@pytest.mark.parametrize("costs,trimmed", [(STEEP, True), (FLAT, False)], ids=["steep", "flat"])
def test_trimmed_greedy_output_equals_plain_greedy(lm, costs, trimmed):
    model, data, prompts = lm
    plain, runs, _ = run_with_cost(model, data, prompts, costs)
    _, whole, _ = run_with_cost(model, data, prompts, costs, budget=False)
    assert [r.tokens for r in runs] == plain == [w.tokens for w in whole]
    fed, fed_whole = sum(sum(r.drafted) for r in runs), sum(sum(w.drafted) for w in whole)
    assert fed_whole > 0
    if trimmed:  # every pass costs its token count: after the exploring passes nothing is worth feeding
        assert 0 < fed < fed_whole
        assert all(sum(d > 0 for d in r.drafted) <= Calibration.EXPLORE for r in runs)
    else:
        assert fed == fed_whole and sum(sum(r.accepted) for r in runs) > 0


def test_profiling_leaves_the_cache_as_it_was(lm):
    model, data, prompts = lm
    target = TorchTarget(model)
    target.forward(prompts[0])
    before = target.cache_arrays()
    cost = PassCost()
    cost.profile(target, room=8)
    assert sorted(cost.median) == [1, 2, 3, 4, 5, 6, 7, 8]  # the profile sizes that fit in room=8
    after = target.cache_arrays()
    assert target.length == len(prompts[0])
    for (k1, v1), (k2, v2) in zip(before, after):
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(v1, v2)


def test_a_profiled_target_still_decodes_exactly(lm):
    model, data, prompts = lm
    plain, runs, target = run_with_cost(model, data, prompts, None)
    assert [r.tokens for r in runs] == plain
    assert target in budget._costs and budget._costs[target].median


def test_sampling_feeds_whole_drafts_so_a_seed_reproduces_its_output(lm):
    model, data, prompts = lm
    outs = []
    for costs in (STEEP, FLAT):
        target = TorchTarget(model)
        budget._costs[target] = cost_of(costs)
        drafter = make_drafter("aded", target, corpus=data)
        outs.append([generate(target, drafter, p, NEW, temperature=0.8, seed=s).tokens for p in prompts for s in range(3)])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("order", [2, 3, 4])
def test_aded_memo_gives_the_drafts_a_fresh_table_would(lm, order):
    _, data, prompts = lm
    context = data[:300].tolist()
    memo, fresh = AdedDrafter(corpus=data[:2000], order=order), AdedDrafter(corpus=data[:2000], order=order)
    memo.start(context[:20], 0.0, np.random.default_rng(0))
    for end in range(21, 300, 7):
        fresh.start(context[: end - 1], 0.0, np.random.default_rng(0))  # counts everything anew, empty memo
        got = memo.propose(context[:end], None, 8)
        want = fresh.propose(context[:end], None, 8)
        assert (got.tokens, got.parents, got.scores) == (want.tokens, want.parents, want.scores)


def test_aded_order_backs_off_to_shorter_contexts():
    drafter = AdedDrafter(corpus=np.array([1, 2, 3, 1, 2, 3, 9, 2, 4]), order=4, width=1)
    drafter.start([5], 0.0, np.random.default_rng(0))
    assert drafter.next_tokens((1, 2)) == [(3, 1.0)]  # (1, 2) -> 3 twice
    assert drafter.next_tokens((7, 9, 2)) == [(4, 1.0)]  # (7, 9, 2) unseen, (9, 2) -> 4
    assert drafter.next_tokens((7, 8, 2))[0][0] == 3  # only (2,): 3 twice, 4 once
    assert drafter.next_tokens((7, 8, 6)) == []
    with pytest.raises(Exception, match="order must be >= 2"):
        AdedDrafter(order=1)


@pytest.mark.parametrize("scores", [[0.5, 1.5], [0.5, float("nan")], [0.5]], ids=["above one", "nan", "one short"])
def test_bad_draft_scores_are_refused(scores):
    with pytest.raises(UserError, match="score"):
        Draft([3, 4], [-1, 0], scores=scores).check(vocab=10)
