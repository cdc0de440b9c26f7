"""Token matrices: each method's T against a plain reference of what the method does."""

import pytest
import torch

from edgekit.compress.tokens import matrices as M


def _data(b=3, n=17, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    metric = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    importance = torch.rand(b, n - 1, generator=g, dtype=torch.float64)
    sizes = torch.randint(1, 5, (b, n), generator=g).to(torch.float64)
    return x, metric, importance, sizes


def test_one_hot_T_reproduces_top_k_pruning_exactly():
    x, _, importance, sizes = _data()
    keep = 6
    t = M.prune_matrix(importance, keep)
    assert t.shape == (3, keep + 1, 17)
    assert set(t.unique().tolist()) == {0.0, 1.0} and (t.sum(-1) == 1).all()
    out, new_sizes = M.apply(t, x, sizes)
    for i in range(3):
        kept = [0] + sorted((torch.topk(importance[i], keep).indices + 1).tolist())
        assert torch.equal(out[i], x[i, kept])
        assert torch.equal(new_sizes[i], sizes[i, kept])


def _tome_reference(x, metric, sizes, r):
    """ToMe written out plainly for one sample: rows CLS, unmerged A (ascending), B (ascending)."""
    n = x.shape[0] - 1
    a_pos, b_pos = list(range(1, n + 1, 2)), list(range(2, n + 1, 2))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best, match = [], []
    for i in a_pos:
        sims = [float(unit[i] @ unit[j]) for j in b_pos]
        k = max(range(len(sims)), key=lambda q: sims[q])
        best.append(sims[k])
        match.append(k)
    ranked = sorted(range(len(a_pos)), key=lambda q: -best[q])
    merged = set(ranked[:r])
    rows, out_sizes = [x[0]], [sizes[0]]
    for q, i in enumerate(a_pos):
        if q not in merged:
            rows.append(x[i])
            out_sizes.append(sizes[i])
    for k, j in enumerate(b_pos):
        group = [j] + [a_pos[q] for q in merged if match[q] == k]
        total = sum(sizes[p] for p in group)
        rows.append(sum(sizes[p] * x[p] for p in group) / total)
        out_sizes.append(total)
    return torch.stack(rows), torch.stack(out_sizes)


@pytest.mark.parametrize("n,r", [(17, 5), (16, 8), (9, 1)])
def test_tome_T_reproduces_the_weighted_average_merge_exactly(n, r):
    x, metric, _, sizes = _data(n=n)
    t = M.tome_matrix(metric, r)
    assert t.shape == (3, n - r, n)
    assert (t.sum(1) == 1).all()  # exclusive: every column used exactly once
    out, new_sizes = M.apply(t, x, sizes)
    for i in range(3):
        ref, ref_sizes = _tome_reference(x[i], metric[i], sizes[i], r)
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(new_sizes[i], ref_sizes, atol=1e-6, rtol=0)


def test_transform_T_conserves_mass_and_keeps_anchors_whole():
    x, metric, importance, sizes = _data()
    keep, top_m = 5, 3
    t = M.transform_matrix(metric, importance, keep, top_m=top_m, temperature=0.2)
    assert t.shape == (3, keep + 1, 17)
    torch.testing.assert_close(t.sum(1), torch.ones(3, 17, dtype=t.dtype))  # every column sums to 1
    out, new_sizes = M.apply(t, x, sizes)
    torch.testing.assert_close(new_sizes.sum(-1), sizes.sum(-1))  # total size conserved
    assert torch.equal(out[:, 0], x[:, 0])  # CLS alone
    for i in range(3):
        anchors = sorted((torch.topk(importance[i], keep).indices + 1).tolist())
        cols = t[i][:, anchors]
        assert torch.equal(cols[1:], torch.eye(keep, dtype=t.dtype))  # an anchor keeps all of itself
        others = [j for j in range(1, 17) if j not in anchors]
        assert ((t[i][:, others] > 0).sum(0) <= top_m).all()  # sparse: at most top_m anchors per token
        assert ((t[i][:, others] > 0).sum(0) >= 1).all()


def test_transform_T_is_the_identity_when_nothing_is_removed():
    x, metric, importance, sizes = _data()
    t = M.transform_matrix(metric, importance, 16)
    assert torch.equal(t, torch.eye(17, dtype=t.dtype).expand(3, -1, -1))
    out, new_sizes = M.apply(t, x, sizes)
    torch.testing.assert_close(out, x)
    torch.testing.assert_close(new_sizes, sizes)


def test_transform_with_one_anchor_per_token_and_cold_softmax_is_a_hard_merge():
    _, metric, importance, _ = _data()
    t = M.transform_matrix(metric, importance, 4, top_m=1)
    assert set(t.unique().tolist()) == {0.0, 1.0}
    assert (t.sum(1) == 1).all()


def test_matching_anchors_are_the_tokens_tome_keeps():
    _, metric, _, _ = _data()
    r = 4
    tome = M.tome_matrix(metric, r)
    t = M.transform_matrix(metric, M.matching_scores(metric), 16 - r, top_m=2)
    torch.testing.assert_close(t.sum(1), torch.ones(3, 17, dtype=t.dtype))
    for i in range(3):
        kept_by_tome = {int(row.nonzero()[0]) for row in tome[i] if row.sum() == 1}  # rows with one token: unmerged
        kept_by_tome |= {int(c) for c in range(2, 17, 2)}  # every B token stays
        anchors = {int(row.argmax()) for row in t[i]}
        assert anchors == kept_by_tome | {0}
