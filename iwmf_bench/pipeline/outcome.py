"""The metrics of a cell as one typed record.

The stages fill it (:mod:`.craft` the attack's facts, :mod:`.score` the rates and the
per-pair evidence, :mod:`.compute` where the images were saved); the leaderboard, the
figures and the checks read it back with :meth:`CellMetrics.from_dict`. Its JSON form
(:meth:`CellMetrics.to_dict`) is what a cell file stores under ``metrics``: the rates
keep their names (``far``, ``far_worst_of_n``, or ``dodging_success*`` for dodging), so
a reader of the JSON needs no code of ours.

What plugins report is copied, not interpreted: an attack's JSON-scalar ``info`` entries
(its notes: library and RNG use, EOT cut to one draw, projections...) and a defense's
:meth:`~iwmf_bench.defenses.base.Defense.report` (speed paths, memory policy).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..metrics import Rate

GOALS = ("impersonation", "dodging")
DEPLOYMENTS = ("single-shot", "worst-of-n", "majority")


def deployment_accepts(deployment: str, accepted: int, draws: int) -> float:
    """Whether a submission with ``accepted`` of ``draws`` purifications accepted is
    accepted by the system (single-shot: the chance that one purification accepts it;
    worst-of-N: the submitter retries up to N times, accepted once any draw is; majority:
    purify N times, accept when more than half of the draws are accepted)."""
    if not 0 <= accepted <= draws:
        raise ValueError(f"{accepted} accepted draws out of {draws}")
    if deployment == "single-shot":
        return accepted / draws
    if deployment == "worst-of-n":
        return float(accepted > 0)
    if deployment == "majority":
        return float(2 * accepted > draws)
    raise ValueError(f"deployment must be one of {DEPLOYMENTS}, got {deployment!r}")


@dataclass
class Votes:
    """Per trial (an image scored against one reference), how many of ``draws`` purifications
    the system accepted: what every deployment's rate is computed from."""

    draws: int
    accepted: list[int]
    # Per trial, the verification score of each draw (the model's metric): any threshold's
    # decisions (:mod:`iwmf_bench.operating_points`). None in records made before scores were kept.
    scores: list[list[float]] | None = None

    def rate(self, deployment: str, rejected: bool = False) -> Rate:
        """The deployment's acceptance rate over the trials (``rejected``: the rejection
        rate, an FRR); single-shot counts every draw, its interval the trials."""
        d, n = self.draws, len(self.accepted)
        if deployment == "single-shot":
            k = sum(self.accepted)
            return Rate(d * n - k if rejected else k, d * n, clusters=n if d > 1 else None)
        k = int(sum(deployment_accepts(deployment, a, d) for a in self.accepted))
        return Rate(n - k if rejected else k, n)


def rate_from(d: dict, name: str = "rate") -> Rate:
    """A :class:`Rate` from its JSON, which must agree with itself (``value`` is k/n)."""
    rate = Rate(int(d["k"]), int(d["n"]), d.get("clusters"))
    value = d.get("value", rate.value)
    if not (abs(value - rate.value) <= 1e-12 or (math.isnan(value) and math.isnan(rate.value))):
        raise ValueError(f"{name}: value {value} is not k/n = {rate.k}/{rate.n}")
    return rate


def notes_of(info: dict) -> dict[str, Any]:
    """An attack's facts for the record: the JSON scalars of its ``info`` (tensors and
    nested results stay out)."""
    return {k: v for k, v in info.items() if isinstance(v, (str, bool, int, float))}


@dataclass
class PerPair:
    """What each pair's rates are computed from, pair by pair (the cell's pair order)."""

    draws: int  # purifications per pair at scoring (1 for a deterministic defense)
    successes: list[int]  # accepted draws (dodging: rejected) out of ``draws``
    linf: list[float] | None  # the submitted 8-bit image minus the aligned probe (None: crafted on photos)
    l2: list[float] | None
    queries: list[int] | None  # the attack's queries or gradient steps (None: no attack, or a re-score)
    min_eps: list[float | None] | None  # min-eps: the smallest breaking budget (None: not broken)
    probe_identity: list[str]
    reference_identity: list[str]
    probe: list[str] | None  # the probe's file name, where the pair source has one
    # Per pair, the verification score of each scored draw against the reference (the
    # model's metric, float32 values): ``successes`` at any other threshold.
    scores: list[list[float]] | None = None
    # The attack's own per-pair facts (``AttackResult.info["per_pair"]``: e.g. a
    # decision-based attack's distance reached before projection and its trajectory of
    # (queries, distance)), one JSON value per pair under each name.
    attack: dict[str, list] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "PerPair":
        return cls(**d)


@dataclass
class DeploymentRates:
    """One deployment's rates (see :func:`deployment_accepts`): the attack's success, the FRR
    of purified genuine images, the FRR of purified adversarial images against their true
    identity."""

    success: Rate
    frr_genuine: Rate
    frr_adv_true_identity: Rate

    def to_dict(self, rate_name: str) -> dict:
        return {rate_name: self.success.to_dict(), "frr_genuine": self.frr_genuine.to_dict(),
                "frr_adv_true_identity": self.frr_adv_true_identity.to_dict()}

    @classmethod
    def from_dict(cls, d: dict, rate_name: str) -> "DeploymentRates":
        return cls(rate_from(d[rate_name], rate_name), rate_from(d["frr_genuine"], "frr_genuine"),
                   rate_from(d["frr_adv_true_identity"], "frr_adv_true_identity"))


def attack_success(successes: list[int], draws: int, deployment: str, goal: str) -> Rate:
    """The attack's rate under a deployment from its per-pair successful draws (accepted;
    dodging: rejected). Worst-of-N is the attacker's: a pair counts once any draw succeeds,
    for dodging too (one rejection gets a dodger through)."""
    if deployment == "single-shot":
        return Votes(draws, successes).rate("single-shot")
    if deployment == "worst-of-n" or goal == "impersonation":
        return Votes(draws, successes).rate(deployment)
    return Votes(draws, [draws - k for k in successes]).rate("majority", rejected=True)


@dataclass
class AttackFacts:
    """The attack's own account of its run (absent for clean images)."""

    seconds_per_image: float
    queries_per_image: float
    success: Rate  # the attack's own success at the end (on the randomness it saw)
    flags: dict[str, bool]  # AutoAttack-style warnings: zero gradients, randomness without EOT...
    notes: dict[str, Any] = field(default_factory=dict)
    defense_report: dict[str, Any] = field(default_factory=dict)  # the defense right after the attack
    seconds: float | None = None  # the whole attack, all pairs (wall clock)
    seconds_per_query: float | None = None  # ``seconds`` over all queries (None: no queries counted)

    def to_dict(self) -> dict:
        return {**asdict(self), "success": self.success.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "AttackFacts":
        return cls(**{**d, "success": rate_from(d["success"])})


@dataclass
class CellMetrics:
    goal: str
    success: Rate  # single shot: FAR (impersonation) or rejected probes (dodging), over pairs x draws
    success_worst_of_n: Rate  # pairs with at least one successful draw
    draws: int
    pairs: int
    frr_genuine: Rate
    frr_adv_true_identity: Rate
    seconds_per_image: float  # purification
    threshold: float
    metric: str
    per_pair: PerPair
    attack: AttackFacts | None = None
    defense_report: dict[str, Any] = field(default_factory=dict)
    min_eps: dict | None = None  # min-eps: the per-pair budgets summarized (median, interval)
    threshold_source: dict | None = None
    clean: dict | None = None  # dataset sources: clean verification (ROC) of the defense
    dropped_pairs_no_face: int | None = None
    adversarial_images: str | None = None  # under results/<suite>/, where the run saved them
    # A random defense (more than one draw): per-trial votes of the genuine images and of the
    # adversarial images against their true identity, and every deployment's rates from them.
    votes: dict[str, Votes] | None = None  # "genuine", "adversarial_true_identity"
    deployments: dict[str, DeploymentRates] | None = None  # by DEPLOYMENTS name
    # Known randomness (``randomness: known``): the same images scored on fresh draws, i.e.
    # what the attack keeps when its knowledge of the draws turns out wrong.
    fresh_draws: dict[str, Any] | None = None  # {"successes": [...], "draws": N, deployment: Rate}

    def __post_init__(self):
        if self.goal not in GOALS:
            raise ValueError(f"goal must be one of {GOALS}, got {self.goal!r}")

    @property
    def rate_name(self) -> str:
        return "far" if self.goal == "impersonation" else "dodging_success"

    def to_dict(self) -> dict[str, Any]:
        out = {self.rate_name: self.success.to_dict(), f"{self.rate_name}_worst_of_n": self.success_worst_of_n.to_dict()}
        for name, value in asdict(self).items():
            if name in ("success", "success_worst_of_n"):
                continue
            if value is None and name not in ("threshold",):
                continue
            out[name] = value
        for name in ("frr_genuine", "frr_adv_true_identity"):
            out[name] = getattr(self, name).to_dict()
        if self.attack is not None:
            out["attack"] = self.attack.to_dict()
        if self.deployments is not None:
            out["deployments"] = {k: v.to_dict(self.rate_name) for k, v in self.deployments.items()}
        if self.fresh_draws is not None:
            out["fresh_draws"] = {k: v.to_dict() if isinstance(v, Rate) else v for k, v in self.fresh_draws.items()}
        return out

    def deployment(self, name: str) -> DeploymentRates:
        """A deployment's rates; a deterministic defense (one draw) has one for all three."""
        if self.deployments is not None:
            return self.deployments[name]
        return DeploymentRates(self.success, self.frr_genuine, self.frr_adv_true_identity)

    @classmethod
    def from_dict(cls, d: dict) -> "CellMetrics":
        goal = d.get("goal", "impersonation")
        rate = "far" if goal == "impersonation" else "dodging_success"
        known = {f for f in cls.__dataclass_fields__}
        rest = {k: v for k, v in d.items() if k in known and k not in ("goal",)}
        rest.update(frr_genuine=rate_from(d["frr_genuine"], "frr_genuine"),
                    frr_adv_true_identity=rate_from(d["frr_adv_true_identity"], "frr_adv_true_identity"),
                    per_pair=PerPair.from_dict(d["per_pair"]),
                    attack=AttackFacts.from_dict(d["attack"]) if d.get("attack") else None)
        if d.get("votes"):
            rest["votes"] = {k: Votes(**v) for k, v in d["votes"].items()}
        if d.get("deployments"):
            rest["deployments"] = {k: DeploymentRates.from_dict(v, rate) for k, v in d["deployments"].items()}
        if d.get("fresh_draws"):
            rest["fresh_draws"] = {k: rate_from(v, k) if k in DEPLOYMENTS else v for k, v in d["fresh_draws"].items()}
        return cls(goal=goal, success=rate_from(d[rate], rate),
                   success_worst_of_n=rate_from(d[f"{rate}_worst_of_n"], f"{rate}_worst_of_n"), **rest)


def metrics_of(record: dict) -> CellMetrics:
    """The typed metrics of a finished cell's record."""
    if record.get("status") != "ok":
        raise ValueError(f"{record.get('name')}: status {record.get('status')!r} has no metrics")
    return CellMetrics.from_dict(record["metrics"])
