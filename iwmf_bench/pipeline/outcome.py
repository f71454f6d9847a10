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

    @classmethod
    def from_dict(cls, d: dict) -> "PerPair":
        return cls(**d)


@dataclass
class AttackFacts:
    """The attack's own account of its run (absent for clean images)."""

    seconds_per_image: float
    queries_per_image: float
    success: Rate  # the attack's own success at the end (on the randomness it saw)
    flags: dict[str, bool]  # AutoAttack-style warnings: zero gradients, randomness without EOT...
    notes: dict[str, Any] = field(default_factory=dict)
    defense_report: dict[str, Any] = field(default_factory=dict)  # the defense right after the attack

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
        return out

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
        return cls(goal=goal, success=rate_from(d[rate], rate),
                   success_worst_of_n=rate_from(d[f"{rate}_worst_of_n"], f"{rate}_worst_of_n"), **rest)


def metrics_of(record: dict) -> CellMetrics:
    """The typed metrics of a finished cell's record."""
    if record.get("status") != "ok":
        raise ValueError(f"{record.get('name')}: status {record.get('status')!r} has no metrics")
    return CellMetrics.from_dict(record["metrics"])
