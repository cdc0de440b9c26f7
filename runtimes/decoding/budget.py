"""How much of a draft to feed: the size that maximises expected tokens per second on this target.

A verification pass over n tokens costs more the larger n is, and how much more depends on the
runtime and the machine: a torch model this small is dispatch-bound (a 25-token pass cost 1.5x
a 1-token one here) while ONNX Runtime's lower overhead leaves the matmuls in charge (2-2.5x).
So a draft tree sized for one runtime loses on the other. A drafter that scores its nodes
(``Draft.scores``: higher for nodes the model is likelier to accept, e.g. the path probability)
lets the loop feed only the best k nodes, with k chosen from

    expected tokens(k) / pass seconds(k + 1),  expected tokens(k) = 1 + sum of the k best nodes' acceptance estimates

(an accepted path yields one token per node on it, so the expected accepted length is the sum of
the nodes' acceptance probabilities). Pass seconds come from :class:`PassCost`, profiled on the
target once and refined by every pass; acceptance estimates from :class:`Calibration`, which
maps scores to how often nodes so scored were accepted earlier in this generation.
The choice changes only speed: whatever is fed, the verification keeps the output exact. It
applies to greedy decoding; sampled decoding feeds whole drafts, because which tokens a seed
draws depends on the draft, and a seed must reproduce its output whatever the timings were.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections import deque

import numpy as np

PROFILE_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32)
PROFILE_REPEATS = 3
RECENT = 9  # passes per size the estimate is the median of
REFIT = 8  # passes between fits of the cost curve (a fit every pass would cost more than it tells)


class PassCost:
    """Seconds of one verification pass as a function of the tokens fed (batch 1)."""

    def __init__(self):
        self.samples: dict[int, deque] = {}
        self.median: dict[int, float] = {}
        self.coef: np.ndarray | None = None  # the fitted curve, refitted every REFIT passes
        self.unfitted = 0

    def observe(self, n: int, seconds: float) -> None:
        recent = self.samples.setdefault(n, deque(maxlen=RECENT))
        recent.append(seconds)
        self.median[n] = statistics.median(recent)
        self.unfitted += 1

    def profile(self, target, room: int) -> None:
        """Time passes of the profile sizes (at most ``room`` tokens) after the target's cache, then
        roll the cache back; the caller has just run the prefill."""
        base = target.length
        # varied tokens: a sparse (mixture-of-experts) model's cost follows the experts they pick
        tokens = np.random.default_rng(0).integers(0, target.vocab, size=max(PROFILE_SIZES)).tolist()
        for n in (s for s in PROFILE_SIZES if s <= room):
            for _ in range(PROFILE_REPEATS):
                started = time.perf_counter()
                target.forward(tokens[:n])
                self.observe(n, time.perf_counter() - started)
                target.keep(base, [])

    def curve(self, up_to: int) -> np.ndarray:
        """Estimated seconds for 1..up_to tokens (index n - 1) from the model

            seconds(n) = base + jump * (n > 1) + per_token * (n - 1),  each term >= 0,

        fitted by least squares to the medians of every measured size, weighted by their samples.
        The jump is the step from a one-token pass to a batched one (a matrix-vector product
        becoming a matrix product, a sparse kernel switching to its chunk path). One curve
        through all sizes rides out the noise of any single size, which read point by point
        would make a size look cheaper or dearer than its neighbours."""
        if self.coef is None or self.unfitted >= REFIT:
            self.coef, self.unfitted = self._fit(), 0
        ns = np.arange(1, up_to + 1, dtype=np.float64)
        return np.maximum(self.coef[0] + self.coef[1] * (ns > 1) + self.coef[2] * (ns - 1), 1e-9)

    def _fit(self) -> np.ndarray:
        sizes = np.array(sorted(self.median), dtype=np.float64)
        secs = np.array([self.median[int(n)] for n in sizes])
        weight = np.sqrt([len(self.samples[int(n)]) for n in sizes])
        columns = np.stack([np.ones_like(sizes), (sizes > 1).astype(np.float64), sizes - 1], axis=1)
        active = [0, 1, 2]
        while True:  # non-negative least squares by dropping a term whose fit comes out negative
            coef = np.zeros(3)
            coef[active] = np.linalg.lstsq(columns[:, active] * weight[:, None], secs * weight, rcond=None)[0]
            negative = [i for i in active[1:] if coef[i] < 0]
            if not negative:
                break
            active.remove(negative[0])
        return coef


class Calibration:
    """P(a fed node ends up on the accepted path | its score), learnt per score band over the passes
    so far. Bands halve (scores in (1/2, 1], (1/4, 1/2], ...; the last band takes the rest), so a
    drafter's scores need only rank its nodes, not be probabilities. Each band starts from the
    drafter's own scores as PRIOR pseudo-observations. A drafter's scores can be far off either
    way (a corpus table's probability for the model's greedy choice is often a fraction of how
    often the model takes it), and a band trimmed away would never be corrected, so the first
    EXPLORE passes of a generation feed whole drafts."""

    BANDS = 10
    PRIOR = 2.0
    EXPLORE = 4

    def __init__(self):
        self.hits = np.zeros(self.BANDS)
        self.fed = np.zeros(self.BANDS)
        self.passes = 0

    def exploring(self) -> bool:
        return self.passes < self.EXPLORE

    def _bands(self, scores) -> np.ndarray:
        s = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1.0)
        return np.minimum((-np.log2(s)).astype(np.int64), self.BANDS - 1)

    def estimate(self, scores) -> np.ndarray:
        band = self._bands(scores)
        return (self.hits[band] + self.PRIOR * np.asarray(scores, dtype=np.float64)) / (self.fed[band] + self.PRIOR)

    def update(self, scores, on_path) -> None:
        self.passes += 1
        band = self._bands(scores)
        np.add.at(self.fed, band, 1.0)
        np.add.at(self.hits, band, np.asarray(on_path, dtype=np.float64))


_costs: "weakref.WeakKeyDictionary[object, PassCost]" = weakref.WeakKeyDictionary()


def pass_cost(target, room: int) -> PassCost:
    """The target's pass-cost model, profiled on first use (the profile lives as long as the target)."""
    cost = _costs.get(target)
    if cost is None:
        cost = PassCost()
        cost.profile(target, room)
        _costs[target] = cost
    return cost


def best_size(accept: np.ndarray, cost: PassCost) -> int:
    """How many nodes to feed, given each node's estimated acceptance probability in feed order."""
    gains = np.concatenate([[1.0], 1.0 + np.cumsum(np.clip(accept, 0.0, 1.0))])
    seconds = cost.curve(len(accept) + 1)  # k nodes + the pending token
    return int(np.argmax(gains / seconds))
