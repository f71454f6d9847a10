"""Operating points: every cell read again at another acceptance threshold, from its scores.

A cell keeps, per pair and per draw, the verification score of the purified probe against
its reference, and per genuine comparison and per draw the score of the purified genuine
image (:class:`~iwmf_bench.pipeline.outcome.PerPair` ``scores``, the genuine
:class:`~iwmf_bench.pipeline.outcome.Votes` ``scores``). So any threshold's decisions
follow from the record, as a ROC follows from scores, without computing anything:

* :func:`rescored` -- a cell's per-pair successes and rates at a threshold;
* :func:`equal_utility_threshold` -- the threshold at which a defense rejects purified
  genuine images as often as a target FRR (the undefended model's at its own threshold,
  or a suite's ``operating_point: {target_frr: ...}``): what a deployer who adds a defense
  and re-tunes the threshold, so that genuine users still get in, would set.

Scores are float32 values and torch compares them with a threshold in float32, so a
threshold here is always a float32 value and a re-scored decision is the computed one bit
for bit (tests/test_operating_points.py checks it against a fresh computation).

Attacks whose crafting depends on the threshold (:meth:`~iwmf_bench.attacks.base.Attack.
threshold_dependence`, recorded as the attack note ``threshold_dependent``) would craft
other images at another threshold: their re-scored rate is what images crafted for the
model's threshold reach there, not what the attack crafts at that operating point (on the
default suite, crafting such cells again at the equal-utility threshold moved their rates by
-2 to +2.5 points: :func:`iwmf_bench.equal_utility.recraft_cells`), and it is marked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import metrics
from .metrics import Rate
from .pipeline.outcome import DEPLOYMENTS, CellMetrics, PerPair, Votes, attack_success


class NoScores(ValueError):
    """A record made before cells kept their scores: it can only be read at its own threshold."""


def as_float32(threshold: float) -> float:
    """The float32 value torch compares float32 scores with (a Python float is rounded to it)."""
    return float(torch.tensor(float(threshold), dtype=torch.float32))


def decisions(scores: list[list[float]], threshold: float, metric: str) -> torch.Tensor:
    """``(trials, draws)`` acceptances of stored scores at ``threshold``."""
    s = torch.tensor(scores, dtype=torch.float32).reshape(len(scores), -1)
    return metrics.accepts(s, threshold, metric)


def genuine_votes(m: CellMetrics) -> Votes:
    """The cell's genuine votes with their scores (raises :class:`NoScores` without them)."""
    votes = (m.votes or {}).get("genuine")
    if votes is None or votes.scores is None:
        raise NoScores("the record keeps no genuine scores (computed before cells kept them); recompute it")
    return votes


def votes_at(votes: Votes, threshold: float, metric: str) -> Votes:
    """``votes`` decided again at ``threshold`` from their scores."""
    if votes.scores is None:
        raise NoScores("these votes keep no scores; recompute the cell")
    accepted = decisions(votes.scores, threshold, metric).long().sum(dim=1) if votes.scores else torch.zeros(0)
    return Votes(votes.draws, [int(k) for k in accepted.tolist()], votes.scores)


def frr_at(m: CellMetrics, threshold: float) -> Rate:
    """The genuine FRR (single-shot: every draw counted) of the cell's defense at ``threshold``."""
    return votes_at(genuine_votes(m), threshold, m.metric).rate("single-shot", rejected=True)


@dataclass
class Rescored:
    """A cell's attack at another threshold: per-pair successes and each deployment's rate."""

    threshold: float
    per_pair: PerPair
    success: dict[str, Rate]  # by deployment
    bound: str | None  # why the rate is not the attack's at this threshold (None: exact)

    @property
    def single_shot(self) -> Rate:
        return self.success["single-shot"]


def rescored(m: CellMetrics, threshold: float) -> Rescored:
    """The cell's per-pair successes and rates at ``threshold`` from its stored scores."""
    p = m.per_pair
    if p.scores is None:
        raise NoScores("the record keeps no per-pair scores (computed before cells kept them); recompute it")
    accepted = decisions(p.scores, threshold, m.metric)
    success = accepted if m.goal == "impersonation" else ~accepted
    successes = [int(k) for k in success.sum(dim=1).tolist()]
    rates = {d: attack_success(successes, p.draws, d, m.goal) for d in DEPLOYMENTS}
    notes = m.attack.notes if m.attack else {}
    dependence = notes.get("threshold_dependent")
    bound = (f"crafted for the model's threshold: {dependence}; an attacker who knows this operating point "
             "would craft other images") if dependence and as_float32(threshold) != as_float32(m.threshold) else None
    return Rescored(as_float32(threshold), dataclasses.replace(p, successes=successes), rates, bound)


def target_frr(undefended: CellMetrics | None, suite_target: float | None = None) -> tuple[float, str]:
    """The FRR a defense is held to, and how it was set: the suite's ``target_frr``, else the
    undefended model's genuine FRR at its own threshold, floored at one genuine comparison
    (an undefended FRR of 0 would push the threshold to accept everyone)."""
    if suite_target is not None:
        return float(suite_target), f"the suite's target FRR {100 * float(suite_target):.1f}%"
    if undefended is None:
        raise ValueError("equal utility needs the undefended model's genuine FRR ('none' among the defenses) "
                         "or a target (operating_point: {target_frr: 0.05} in the suite)")
    frr = undefended.frr_genuine
    comparisons = len(genuine_votes(undefended).accepted)
    floor = 1 / comparisons if comparisons else 0.0
    if frr.value >= floor:
        return frr.value, f"the undefended model's genuine FRR at its threshold ({frr.k}/{frr.n})"
    return floor, (f"one genuine comparison in {comparisons} (the undefended FRR is {frr.k}/{frr.n}; "
                   "a target of 0 would accept everyone)")


def equal_utility_threshold(genuine: Votes, metric: str, target: float, keep: float | None = None,
                            at_most: bool = False) -> float:
    """The threshold at which the genuine FRR (every draw of every comparison counted) is the
    closest achievable to ``target``; of two equally close, the lower FRR. ``keep`` (the
    model's own threshold) is returned when it already reaches that FRR; otherwise the
    threshold sits halfway between the two genuine scores around the cut (rounded to
    float32; at the stricter score itself where the halfway value rounds onto one of them).
    ``at_most``: the highest FRR not above ``target`` instead (a utility constraint)."""
    if genuine.scores is None:
        raise NoScores("genuine votes without scores")
    s = torch.tensor(genuine.scores, dtype=torch.float32).flatten()
    n = s.numel()
    if n == 0:
        raise ValueError("no genuine comparisons to set a threshold on")
    u = s.double() if metric == "cosine" else -s.double()  # accept u >= t_u
    u, _ = torch.sort(u)
    # Rejecting exactly the k lowest needs t_u in (u[k-1], u[k]]: possible where they differ.
    cuts = [k for k in range(n + 1) if k in (0, n) or u[k - 1] < u[k]]
    if at_most:
        best = max(k for k in cuts if k / n <= target + 1e-12)  # k = 0 always qualifies
    else:
        best = min(cuts, key=lambda k: (abs(k / n - target), k))
    if keep is not None and int((~metrics.accepts(s, keep, metric)).sum()) == best:
        return as_float32(keep)
    if best == 0:
        t_u = float(u[0]) - 1.0
    elif best == n:
        t_u = float(u[-1]) + 1.0
    else:
        t_u = as_float32((float(u[best - 1]) + float(u[best])) / 2)
        if not float(u[best - 1]) < t_u <= float(u[best]):
            t_u = float(u[best])  # a float32 score: rejects exactly the k below it
    t = as_float32(t_u if metric == "cosine" else -t_u)
    return t


@dataclass
class OperatingPoint:
    """One (model, defense) at a threshold: the threshold, its genuine FRR and clean
    impostor FAR, and how it was chosen."""

    threshold: float
    frr_genuine: Rate
    clean_far: Rate | None
    how: str

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "frr_genuine": self.frr_genuine.to_dict(),
                "clean_far": self.clean_far.to_dict() if self.clean_far else None, "how": self.how}


def equal_utility(defended: CellMetrics, clean: CellMetrics | None, target: float, how: str,
                  at_most: bool = False) -> OperatingPoint:
    """A defense's equal-utility operating point (``defended``: any of its cells, all share
    the genuine stage; ``clean``: its clean cell, for the impostor FAR at the threshold);
    ``at_most``: at the highest genuine FRR not above ``target`` (:func:`equal_utility_threshold`)."""
    t = equal_utility_threshold(genuine_votes(defended), defended.metric, target, keep=defended.threshold,
                                at_most=at_most)
    return OperatingPoint(t, frr_at(defended, t), rescored(clean, t).single_shot if clean else None, how)
