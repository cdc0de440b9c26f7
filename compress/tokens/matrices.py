"""Token compression as an explicit token matrix: ``X' = T X``.

Every method here builds, per sample, a non-negative matrix ``T`` of shape
(N', N) over the N tokens entering a layer, and :func:`apply` turns it into
the compressed tokens with size weighting (sizes ``s`` count how many original
patches a token stands for)::

    x'_i = sum_j T_ij s_j x_j / sum_j T_ij s_j        s'_i = sum_j T_ij s_j

Token 0 (CLS) is always kept as row 0, alone. The methods differ only in T:

- ``prune_matrix``: top-k by importance; rows are one-hot (a kept token copies
  itself, the rest are dropped: their columns are zero).
- ``tome_matrix``: ToMe's bipartite soft matching (Bolya et al. 2023). Patch
  tokens alternate between sets A (even) and B (odd); each A token finds its
  most similar B token (cosine of the metric), and the r A tokens with the
  highest such similarity merge into their match. Rows: the unmerged A tokens
  (one-hot) and every B token (one on itself, one on each A token merged into
  it). Each column holds exactly one 1: exclusive groups.
- ``transform_matrix``: Token Transforming's many-to-many T (Zeng et al. 2025,
  arXiv 2506.05709). The paper's exact construction was not reachable, so this
  is our own, built the way the paper frames it (anchors by importance, every
  token spread over its most similar anchors):

  1. anchors: the k patch tokens with the highest keep score; they become the
     rows, in their original order. The score is either the CLS attention
     (``anchors: attention``, EViT-style importance) or :func:`matching_scores`
     (``anchors: matching``): the anchors are then exactly the tokens ToMe's
     bipartite matching keeps, i.e. the removed tokens are the most redundant
     ones. The pass defaults to ``matching``, which scored higher on a
     validation split of shapes_cls (see bench/tokens_vit.py);
  2. every non-anchor token j spreads its mass over its ``top_m`` most similar
     anchors a with weights ``softmax_a(cos(m_j, m_a) / temperature)``; an
     anchor keeps its own mass whole (its column is one-hot on its row);
  3. so every column sums to 1: no token is dropped, total size is conserved
     (sum s' = sum s), and with k = all tokens T is the identity.

  With ``top_m = 1`` this is a hard nearest-anchor merge (ToMe-like with
  matching anchors, except a removed token may join an A anchor too); with
  the non-anchor columns zeroed it is pruning — the framework the paper
  describes, with pruning and merging as special cases. ``top_m > 1`` makes
  it many-to-many: a removed token is shared by its nearest anchors in
  proportion to ``softmax(cos / temperature)``.

Everything is batched and exportable to ONNX: TopK, Sort, comparisons with an
``arange`` (one-hot by equality), softmax, matmul. No scatter, no Python loops
over data-dependent values; the token counts are Python ints fixed when the
model is traced.
"""

from __future__ import annotations

import torch


def one_hot(index: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
    """``index`` (..., k) -> (..., k, n) one-hot rows, built by equality with an arange (exports as Equal)."""
    return (index.unsqueeze(-1) == torch.arange(n, device=index.device)).to(dtype)


def _cls_row(batch: int, n: int, ref: torch.Tensor) -> torch.Tensor:
    """(batch, 1, n): the row that keeps token 0 (CLS) as it is."""
    return one_hot(torch.zeros(batch, 1, dtype=torch.long, device=ref.device), n, ref.dtype)


def _normalise(metric: torch.Tensor) -> torch.Tensor:
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores`` (batch, n), in ascending index order (so k = n is the identity)."""
    idx = torch.topk(scores, k, dim=-1).indices
    return torch.sort(idx, dim=-1).values


def prune_matrix(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """One-hot T keeping CLS and the ``keep`` patch tokens of highest ``importance`` (batch, N-1): (batch, keep+1, N)."""
    b, n = importance.shape
    idx = top_indices(importance, keep) + 1
    return torch.cat([_cls_row(b, n + 1, importance), one_hot(idx, n + 1, importance.dtype)], dim=1)


def tome_matrix(metric: torch.Tensor, r: int) -> torch.Tensor:
    """ToMe bipartite soft matching over the patch tokens of ``metric`` (batch, N, c): T (batch, N-r, N).

    Rows: CLS, the unmerged A tokens (ascending), then the B tokens (ascending).
    """
    b, n_all, _ = metric.shape
    n = n_all - 1
    na, nb = (n + 1) // 2, n // 2
    if not 0 <= r <= na or nb == 0:
        raise ValueError(f"ToMe merges at most {na} of {n} tokens, not {r}")
    m = _normalise(metric[:, 1:])
    a, bset = m[:, 0::2], m[:, 1::2]
    scores = a @ bset.transpose(1, 2)  # (b, na, nb)
    best, match = scores.max(dim=-1)  # each A token's most similar B token
    order = torch.topk(best, na, dim=-1).indices  # A tokens by similarity, best first
    merged = one_hot(order[:, :r], na, metric.dtype).sum(1)  # (b, na): 1 where the A token merges
    unmerged = torch.sort(order[:, r:], dim=-1).values
    cols_a = 1 + 2 * torch.arange(na, device=metric.device)  # column of A token i
    cols_b = 2 + 2 * torch.arange(nb, device=metric.device)  # column of B token j
    rows_a = one_hot(cols_a[unmerged], n_all, metric.dtype)  # (b, na - r, N)
    # B row j: itself, plus every merged A token whose match is j
    into = (match.unsqueeze(1) == torch.arange(nb, device=metric.device)[None, :, None]).to(metric.dtype)  # (b, nb, na)
    into = into * merged.unsqueeze(1)
    place_a = (cols_a[:, None] == torch.arange(n_all, device=metric.device)).to(metric.dtype)  # (na, N), constant
    rows_b = one_hot(cols_b, n_all, metric.dtype).expand(b, -1, -1) + _spread(into, place_a)
    return torch.cat([_cls_row(b, n_all, metric), rows_a, rows_b], dim=1)


def matching_scores(metric: torch.Tensor) -> torch.Tensor:
    """Keep scores (batch, N-1) that make ToMe's survivors the top tokens: every B token scores 2,
    an A token scores minus its best cosine similarity to a B token (the most redundant A tokens go first).

    Used as ``importance`` in :func:`transform_matrix`, the anchors are exactly the
    tokens ToMe keeps, and with ``top_m=1`` each removed token goes to its nearest anchor.
    """
    m = _normalise(metric[:, 1:])
    best = (m[:, 0::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1).values  # (b, na)
    n = m.shape[1]
    is_b = (torch.arange(n, device=metric.device) % 2).to(metric.dtype)  # 1 at B positions
    a_at = (torch.arange(n, device=metric.device)[:, None] == 2 * torch.arange(best.shape[1], device=metric.device)).to(metric.dtype)
    return 2 * is_b - (best.unsqueeze(1) * a_at).sum(-1)


def _spread(w: torch.Tensor, place: torch.Tensor) -> torch.Tensor:
    """(b, r, k) weights on k tokens -> (b, r, N) columns, with ``place`` (k, N) a constant 0/1 map.

    Written as a broadcast sum over k (elementwise ops) rather than a matmul so it
    does not count as compute in FLOP counters; k and N are small.
    """
    return (w.unsqueeze(-1) * place).sum(dim=-2)


def transform_matrix(metric: torch.Tensor, importance: torch.Tensor, keep: int, top_m: int = 4, temperature: float = 0.1) -> torch.Tensor:
    """Token Transforming's many-to-many T (batch, keep+1, N); see the module docstring.

    ``metric`` (batch, N, c) is the similarity feature (keys), ``importance``
    (batch, N-1) the patch tokens' CLS attention.
    """
    b, n_all, _ = metric.shape
    n = n_all - 1
    anchors = top_indices(importance, keep)  # (b, k) patch positions
    m = _normalise(metric[:, 1:])
    pick = one_hot(anchors, n, metric.dtype)  # (b, k, n)
    anchor_feat = torch.gather(m, 1, anchors.unsqueeze(-1).expand(-1, -1, m.shape[-1]))  # (b, k, c)
    # every token vs every anchor; an anchor's similarity to itself gets a bonus of 1000 softmax
    # logits over any other, so its weight on itself is exactly 1 and on the rest exactly 0
    # (exp(-1000) is below even float64's smallest number): anchors stay whole with no extra branch
    sim = m @ anchor_feat.transpose(1, 2) + (1000.0 * temperature) * pick.transpose(1, 2)  # (b, n, k)
    top = torch.topk(sim, min(top_m, keep), dim=-1)
    w = torch.softmax(top.values / temperature, dim=-1)  # (b, n, m)
    cols = (w.unsqueeze(-1) * one_hot(top.indices, keep, metric.dtype)).sum(-2)  # (b, n, k): column j of T's patch part
    patch_rows = torch.cat([torch.zeros(b, keep, 1, dtype=metric.dtype, device=metric.device), cols.transpose(1, 2)], dim=2)
    return torch.cat([_cls_row(b, n_all, metric), patch_rows], dim=1)


def apply(t: torch.Tensor, x: torch.Tensor, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x', sizes')``: size-weighted averages of the tokens each row of ``t`` gathers, and their summed sizes."""
    if sizes is None:
        sizes = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    weights = t * sizes.unsqueeze(1)  # (b, N', N)
    new_sizes = weights.sum(-1)
    # normalise T first: a one-hot row then copies its token bit for bit (s / s == 1)
    return (weights / new_sizes.unsqueeze(-1)) @ x, new_sizes
