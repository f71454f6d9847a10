"""Verification on clean pairs: thresholds at a target FAR, TAR@FAR, ROC, AUC, EER.

Inputs are the scores of genuine and impostor pairs in the model's metric: cosine
similarity (accept when score >= t) or euclidean distance (accept when score <= t).
Internally every score is turned "higher = more alike" (a distance is negated), so one
code path serves both; thresholds come back in the model's own metric.
"""

from __future__ import annotations

import math

import torch

from .errors import BenchError
from .metrics import METRICS, Rate, accepts

STANDARD_FARS = (1e-2, 1e-3)


def _oriented(scores: torch.Tensor, metric: str) -> torch.Tensor:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    s = torch.as_tensor(scores).flatten().double()
    return s if metric == "cosine" else -s


def _back(t: float, metric: str) -> float:
    return t if metric == "cosine" else -t


def check_far(far: float, n_impostor: int) -> int:
    """How many impostor pairs a threshold at ``far`` accepts; BenchError when ``far`` is
    outside (0, 1) or below 1/(impostor pairs) (too few pairs to resolve it)."""
    if not 0 < far < 1:
        raise BenchError(f"FAR must be in (0, 1), got {far:g}")
    k = math.floor(far * n_impostor + 1e-9)
    if k < 1:
        raise BenchError(f"FAR {far:g} is below 1/{n_impostor} (the dataset has {n_impostor} impostor pairs): "
                         f"too few pairs to calibrate it; use FAR >= {1 / max(n_impostor, 1):.2g} or more pairs")
    return k


def _threshold_oriented(desc: torch.Tensor, k: int) -> float:
    """Oriented threshold accepting the top ``k`` of ``desc`` (sorted descending), or
    fewer when ties make exactly ``k`` impossible (never more)."""
    while k > 0 and k < desc.numel() and desc[k - 1] <= desc[k]:
        k -= 1  # a tie straddles the cut: accept fewer, never more
    if k == 0:
        return math.nextafter(float(desc[0]), math.inf)
    if k >= desc.numel():
        return float(desc[-1])
    return float((desc[k - 1] + desc[k]) / 2)


def threshold_at_far(impostor: torch.Tensor, far: float, metric: str) -> float:
    """The threshold (model's metric) accepting floor(far * n) of the impostor pairs."""
    s = _oriented(impostor, metric)
    k = check_far(far, s.numel())
    return _back(_threshold_oriented(torch.sort(s, descending=True).values, k), metric)


def bootstrap_threshold(impostor: torch.Tensor, far: float, metric: str, generator: torch.Generator,
                        resamples: int = 1000, chunk: int = 100) -> tuple[float, float]:
    """95% percentile-bootstrap interval of :func:`threshold_at_far` (impostor pairs
    resampled with replacement; ``generator`` fixes the draws)."""
    s = _oriented(impostor, metric)
    n = s.numel()
    k = check_far(far, n)
    values = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        idx = torch.randint(n, (b, n), generator=generator)
        top = torch.topk(s[idx], min(k + 1, n), dim=1).values
        values.append((top[:, k - 1] + top[:, min(k, n - 1)]) / 2)
    v = torch.cat(values)
    lo, hi = (_back(float(torch.quantile(v, q)), metric) for q in (0.025, 0.975))
    return (min(lo, hi), max(lo, hi))


def rates_at(genuine: torch.Tensor, impostor: torch.Tensor, threshold: float, metric: str) -> dict[str, Rate]:
    """TAR (genuine accepted) and FAR (impostor accepted) at ``threshold``."""
    g = accepts(torch.as_tensor(genuine).double(), threshold, metric)
    i = accepts(torch.as_tensor(impostor).double(), threshold, metric)
    return {"tar": Rate(int(g.sum()), int(g.numel())), "far": Rate(int(i.sum()), int(i.numel()))}


def tar_at_far(genuine: torch.Tensor, impostor: torch.Tensor, far: float, metric: str) -> dict:
    """TAR at the threshold calibrated to ``far`` on these impostors, or why not."""
    n = torch.as_tensor(impostor).numel()
    if far * n < 1 - 1e-9:
        return {"far_target": far, "supported": False,
                "note": f"needs >= {math.ceil(1 / far)} impostor pairs, have {n}"}
    t = threshold_at_far(impostor, far, metric)
    r = rates_at(genuine, impostor, t, metric)
    return {"far_target": far, "supported": True, "threshold": t, "tar": r["tar"].to_dict(),
            "far": r["far"].to_dict()}


def roc_curve(genuine: torch.Tensor, impostor: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FAR, TAR, thresholds) at every distinct score, from the strictest threshold down;
    FAR/TAR start above (0, 0) and end at (1, 1). Thresholds in the model's metric."""
    g, i = _oriented(genuine, metric), _oriented(impostor, metric)
    cuts = torch.unique(torch.cat([g, i])).flip(0)  # descending: strictest first
    gs, is_ = torch.sort(g).values, torch.sort(i).values
    tar = (g.numel() - torch.searchsorted(gs, cuts, right=False)).double() / max(g.numel(), 1)
    far = (i.numel() - torch.searchsorted(is_, cuts, right=False)).double() / max(i.numel(), 1)
    return far, tar, cuts if metric == "cosine" else -cuts


def auc(genuine: torch.Tensor, impostor: torch.Tensor, metric: str) -> float:
    """ROC AUC = P(genuine more alike than impostor) + P(tie)/2, in O((G + I) log I)."""
    g, i = _oriented(genuine, metric), torch.sort(_oriented(impostor, metric)).values
    below = torch.searchsorted(i, g, right=False).double()
    ties = torch.searchsorted(i, g, right=True).double() - below
    return float((below + 0.5 * ties).sum() / (g.numel() * i.numel()))


def eer(genuine: torch.Tensor, impostor: torch.Tensor, metric: str) -> tuple[float, float]:
    """Equal error rate and its threshold: over every distinct score as threshold, the
    one where |FAR - FRR| is smallest; the EER is their mean there."""
    far, tar, cuts = roc_curve(genuine, impostor, metric)
    frr = 1 - tar
    j = int(torch.argmin((far - frr).abs()))
    return float((far[j] + frr[j]) / 2), float(cuts[j])


def clean_summary(genuine: torch.Tensor, impostor: torch.Tensor, metric: str,
                  fars: tuple[float, ...] = STANDARD_FARS) -> dict:
    """TAR@FAR for each of ``fars`` (or why it is unsupported), AUC and EER."""
    e, t = eer(genuine, impostor, metric)
    return {"tar_at_far": {f"{f:g}": tar_at_far(genuine, impostor, f, metric) for f in fars},
            "auc": auc(genuine, impostor, metric), "eer": e, "eer_threshold": t,
            "genuine_pairs": int(torch.as_tensor(genuine).numel()),
            "impostor_pairs": int(torch.as_tensor(impostor).numel())}
