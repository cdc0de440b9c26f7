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

PROFILE_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64)
PROFILE_REPEATS = 3
RECENT = 9  # passes per size the estimate is the median of


class PassCost:
    """Seconds of one verification pass as a function of the tokens fed (batch 1)."""

    def __init__(self):
        self.samples: dict[int, deque] = {}
        self.median: dict[int, float] = {}  # kept current by observe: curve() runs every pass

    def observe(self, n: int, seconds: float) -> None:
        recent = self.samples.setdefault(n, deque(maxlen=RECENT))
        recent.append(seconds)
        self.median[n] = statistics.median(recent)

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
        """Estimated seconds for 1..up_to tokens (index n - 1): medians at the measured sizes,
        linear in between and beyond, never falling as n grows."""
        sizes = sorted(self.median)
        secs = [self.median[n] for n in sizes]
        ns = np.arange(1, up_to + 1, dtype=np.float64)
        if len(sizes) == 1:
            est = np.full(up_to, secs[0])
        else:
            est = np.interp(ns, sizes, secs)
            if up_to > sizes[-1]:  # extrapolate with the slope of the last two sizes
                slope = (secs[-1] - secs[-2]) / (sizes[-1] - sizes[-2])
                tail = ns > sizes[-1]
                est[tail] = secs[-1] + slope * (ns[tail] - sizes[-1])
        return np.maximum.accumulate(est)


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
