"""Paired comparisons of defenses on the same pairs, and intervals that respect identities.

Two defenses of one suite are scored on the same pairs, so whether A beats B is a
paired question: per pair, which of the two let the attack through more often. The
exact **sign test** answers it: the pairs where A's per-pair success fraction is lower
than B's, against those where it is higher (ties carry no information), under the null
that either is equally likely (a two-sided binomial test with p = 1/2). With one draw per
pair (a deterministic defense) the outcomes are 0/1 and this is McNemar's exact test.

A suite's pairs are rarely independent: the paper's 20 pairs come from 2 source and 2
target identities. Where the data has enough identities (:data:`MIN_IDENTITIES` source
identities), :func:`identity_interval` resamples identities rather than pairs (a
percentile cluster bootstrap); with fewer, the leaderboard says that its intervals and
tests treat pairs as independent.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

ALPHA = 0.05
MIN_IDENTITIES = 10  # source identities needed for a bootstrap over identities
BOOTSTRAP = 2000


def sign_test(a: list[float], b: list[float]) -> tuple[int, int, float]:
    """(pairs where ``a`` < ``b``, pairs where ``a`` > ``b``, exact two-sided p)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples of different sizes: {len(a)} and {len(b)}")
    lower = sum(x < y for x, y in zip(a, b))
    higher = sum(x > y for x, y in zip(a, b))
    n, k = lower + higher, min(lower, higher)
    if n == 0:
        return 0, 0, 1.0
    # P(X <= k) for X ~ Binomial(n, 1/2), doubled (the distribution is symmetric), at most 1.
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return lower, higher, min(1.0, 2 * tail)


@dataclass(frozen=True)
class Comparison:
    better: str  # the defense with the lower success rate
    worse: str
    wins: int  # pairs where ``better`` let the attack through less often
    losses: int
    p: float

    @property
    def significant(self) -> bool:
        return self.p < ALPHA

    def to_dict(self) -> dict:
        return {"better": self.better, "worse": self.worse, "wins": self.wins, "losses": self.losses, "p": self.p}


def compare(per_pair: dict[str, list[float]]) -> list[Comparison]:
    """Every pair of defenses (each its per-pair success fractions), the better first."""
    names = list(per_pair)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            lower, higher, p = sign_test(per_pair[a], per_pair[b])
            if sum(per_pair[a]) <= sum(per_pair[b]):
                out.append(Comparison(a, b, lower, higher, p))
            else:
                out.append(Comparison(b, a, higher, lower, p))
    return out


def ranking(per_pair: dict[str, list[float]]) -> str:
    """The defenses from the lowest success rate up, ``<`` between neighbours whose paired
    sign test has p < 0.05 and ``~`` (not told apart) otherwise: ``a ~ b < c``."""
    order = sorted(per_pair, key=lambda d: sum(per_pair[d]) / max(1, len(per_pair[d])))
    if not order:
        return ""
    text = order[0]
    for prev, name in zip(order, order[1:]):
        _, _, p = sign_test(per_pair[prev], per_pair[name])
        text += f" {'<' if p < ALPHA else '~'} {name}"
    return text


def identity_interval(values: list[float], identities: list[str], seed: int = 0,
                      resamples: int = BOOTSTRAP) -> tuple[float, float] | None:
    """95% percentile interval of the mean of ``values`` (one per pair), resampling
    identities with replacement (each drawn identity brings all its pairs); None when
    there are fewer than :data:`MIN_IDENTITIES` identities."""
    groups: dict[str, list[float]] = {}
    for v, ident in zip(values, identities):
        groups.setdefault(ident, []).append(v)
    if len(groups) < MIN_IDENTITIES:
        return None
    clusters = list(groups.values())
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        drawn = [clusters[rng.randrange(len(clusters))] for _ in clusters]
        total, count = sum(sum(c) for c in drawn), sum(len(c) for c in drawn)
        means.append(total / count)
    means.sort()
    return means[int(0.025 * (resamples - 1))], means[int(math.ceil(0.975 * (resamples - 1)))]
