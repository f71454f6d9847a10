"""Verification scores and error rates with 95% Wilson intervals.

Scores follow the model's metric: ``"cosine"`` similarity (accept when score >=
threshold) or ``"euclidean"`` distance (accept when score <= threshold). ``margin``
turns either into one convention, positive exactly when a pair is accepted, which is
what attacks optimize.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

METRICS = ("cosine", "euclidean")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def scores(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Index-matched scores between rows of ``a`` and ``b`` (same shape (N, D))."""
    _check_metric(metric)
    if metric == "cosine":
        return F.cosine_similarity(a, b, dim=-1)
    return (a - b).norm(dim=-1)


def pair_scores(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """All-pairs scores, shape (len(a), len(b))."""
    _check_metric(metric)
    if metric == "cosine":
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    return torch.cdist(a, b)


def margin(score: torch.Tensor, threshold: float, metric: str) -> torch.Tensor:
    """Signed distance to the decision threshold, > 0 exactly when accepted."""
    _check_metric(metric)
    return score - threshold if metric == "cosine" else threshold - score


def accepts(score: torch.Tensor, threshold: float, metric: str) -> torch.Tensor:
    """Boolean: is each pair accepted as the same person?"""
    _check_metric(metric)
    return score >= threshold if metric == "cosine" else score <= threshold


def score_values(score: torch.Tensor) -> list:
    """Scores as JSON numbers: each float32 score by its shortest decimal form, which reads
    back (``torch.tensor(values, dtype=torch.float32)``) to the same float32, so a stored
    score decides at any threshold exactly as the computed one did. Nested lists follow the
    tensor's shape."""
    return _shortest(score.detach().cpu().float().numpy())


def _shortest(arr):
    if arr.ndim == 0:
        return float(str(arr))
    return [_shortest(row) for row in arr] if arr.ndim > 1 else [float(str(v)) for v in arr]


def wilson_interval(k: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n ((0, 1) when n == 0)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Rate:
    """A proportion with its count and 95% Wilson interval.

    ``clusters``: the trials come in that many groups that are not independent (e.g. 10
    purifications of each of 20 adversarial images). The interval is then the Wilson
    interval of the same proportion over ``clusters`` trials: the mean of per-cluster
    rates varies at most as much as that many Bernoulli trials, so this is conservative,
    where treating every draw as independent would understate the uncertainty.
    """

    k: int
    n: int
    clusters: int | None = None

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        if self.clusters and self.n:
            return wilson_interval(self.value * self.clusters, self.clusters)
        return wilson_interval(self.k, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {**asdict(self), "value": self.value, "ci95": [lo, hi]}

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{100 * self.value:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({self.k}/{self.n})"


def far_frr(score_matrix: torch.Tensor, labels_a: Sequence[int], labels_b: Sequence[int],
            threshold: float, metric: str, exclude_self: bool = False,
            exclude_diagonal: bool = False) -> dict[str, Rate]:
    """FAR over all different-label pairs and FRR over all same-label pairs.

    ``exclude_self``: the two sets are the same images; skip the diagonal and count each
    unordered pair once. ``exclude_diagonal``: row i and column i are versions of one
    image (e.g. purified vs clean); skip the diagonal, keep both (i, j) and (j, i).
    """
    la = torch.as_tensor(list(labels_a)).view(-1, 1)
    lb = torch.as_tensor(list(labels_b)).view(1, -1)
    if score_matrix.shape != (la.shape[0], lb.shape[1]):
        raise ValueError(f"score matrix {tuple(score_matrix.shape)} does not match "
                         f"{la.shape[0]} x {lb.shape[1]} labels")
    same = la == lb
    valid = torch.ones_like(same)
    if exclude_self:
        valid = torch.triu(valid, diagonal=1)
    elif exclude_diagonal:
        valid &= ~torch.eye(*valid.shape, dtype=torch.bool)
    acc = accepts(score_matrix, threshold, metric)
    genuine, impostor = same & valid, ~same & valid
    return {
        "far": Rate(int((acc & impostor).sum()), int(impostor.sum())),
        "frr": Rate(int((~acc & genuine).sum()), int(genuine.sum())),
    }


def impersonation_far(adv_emb: torch.Tensor, target_emb: torch.Tensor, threshold: float,
                      metric: str) -> Rate:
    """Index-matched impersonation success: adversarial i accepted as target i."""
    ok = accepts(scores(adv_emb, target_emb, metric), threshold, metric)
    return Rate(int(ok.sum()), int(ok.numel()))


def matched_frr(emb: torch.Tensor, reference_emb: torch.Tensor, threshold: float, metric: str) -> Rate:
    """Index-matched rejection rate: image i rejected against its own reference i."""
    ok = accepts(scores(emb, reference_emb, metric), threshold, metric)
    return Rate(int((~ok).sum()), int(ok.numel()))


def roc_auc(genuine: torch.Tensor, impostor: torch.Tensor, metric: str) -> float:
    """Probability that a genuine pair scores better than an impostor pair (ties: 1/2)."""
    _check_metric(metric)
    g, i = genuine.flatten().double(), impostor.flatten().double()
    if metric == "euclidean":
        g, i = -g, -i
    diff = g.view(-1, 1) - i.view(1, -1)
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def median_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Median of ``values`` (``inf`` counts as the largest: e.g. the minimal budget of an
    unbroken sample) and a distribution-free ``level`` interval for it from order
    statistics (binomial(n, 1/2) ranks); bounds are 0 / ``inf`` where ``n`` is too small to
    reach the level."""
    values = sorted(float(v) for v in values)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    median = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    # Largest k with P(Bin(n, 1/2) < k) <= (1 - level) / 2: [x_(k), x_(n+1-k)] (1-based) covers the median.
    alpha, cdf, k = (1 - level) / 2, 0.0, 0
    while k < n and cdf + math.comb(n, k) / 2 ** n <= alpha:
        cdf += math.comb(n, k) / 2 ** n
        k += 1
    if k == 0:
        return median, 0.0, math.inf
    return median, values[k - 1], values[n - k]
