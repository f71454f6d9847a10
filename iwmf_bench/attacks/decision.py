"""Decision-based (hard-label) black-box attacks: the attacker sees only accept/reject.

The threat model of a deployed face authenticator: the attacker submits an image and
learns whether it was accepted as the claimed identity; no scores, no gradients, no
model. :class:`DecisionOracle` is that system: built from an :class:`AttackTask`, it
purifies each submission with the task's defense (fresh randomness from a generator of
its own), embeds it, compares it with its row's reference at ``task.decision_threshold``
and answers one boolean per image. :class:`DecisionAttack` builds the oracle and hands
the algorithm (:meth:`DecisionAttack.attack`) only the oracle, the sources, start points
and a generator: the algorithm cannot reach the model.

The oracle, its decisions and its query counting: :mod:`iwmf_bench.attacks.oracle`.

Start points. A decision-based attack walks along the boundary from an adversarial
point. :meth:`DecisionAttack._run`: (1) one decision on each source (an already
adversarial source is returned as is, distance 0); (2) the caller's start points, if
given (``attack.run(task, starts=images)``, or a :class:`DecisionTask`, e.g. the target's
images for impersonation), each checked with one decision; (3) for the samples still
without one, up to ``init_trials`` images of uniform noise, one decision each, until one
is adversarial (HopSkipJump's initialization; for impersonation of a real face model noise
is rarely accepted, so pass the targets' images). A sample with no adversarial start is
left unattacked (its source returned, distance ``inf``, no success). The algorithms then
blend the start towards the source by a binary search on the segment between them.

Result. The algorithm returns its best adversarial point per sample (the smallest
distance to the source in the attack's ``norm`` among points the oracle judged
adversarial). Within ``eps`` it is submitted; beyond, it is projected onto the eps-ball
around the source (the attack at a fixed budget; a projected point is not adversarial as
far as the search knows, so ``success`` is ``distance <= eps``). ``info``: ``distance``
(per sample, before projection; 0: the source itself was adversarial, inf: no start),
``projected``, ``start`` (``source``/``given``/``noise``/``none`` per sample),
``trajectory`` (per sample, a list of ``(queries, distance)`` after each iteration of
the algorithm: the query-budget curve), ``repeats``, ``sequential``, ``max_queries``,
``submit_8bit``, ``decisions`` (per sample). ``AttackResult.queries`` counts submissions.

Randomness: the search (``make_generator(seed, name, "search")``) and the defense's draws
inside the oracle (``make_generator(seed, name, "oracle")``) are separate streams, so a
run is deterministic for its seed.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from ..defenses.base import check_images
from ..errors import BenchError
from .base import Attack, AttackResult, AttackTask, make_generator
from .budget import fit_l2_ball
from .oracle import DecisionOracle, distances


def blend(sources: torch.Tensor, adv: torch.Tensor, alpha: torch.Tensor, norm: str) -> torch.Tensor:
    """Points between ``sources`` and ``adv``: L2 the convex combination with weight
    ``alpha`` on ``adv``; Linf ``adv`` clipped to the Linf ball of radius ``alpha``."""
    a = alpha.to(adv).view(-1, *([1] * (adv.dim() - 1)))
    if norm == "L2":
        return ((1 - a) * sources + a * adv).clamp(0, 1)
    return torch.minimum(torch.maximum(adv, sources - a), sources + a)


def binary_search(oracle, sources: torch.Tensor, adv: torch.Tensor, norm: str,
                  tol: float | torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Walk each adversarial ``adv[j]`` towards ``sources[j]`` along :func:`blend` by
    bisection, down to a bracket of width ``tol`` (L2: of the blend weight in [0, 1]; Linf:
    of the radius, from the current distance down), keeping the adversarial end. A sample
    stops early when its budget runs out. ``rows``: the oracle rows of the samples (default
    ``0..n-1``). Returns the adversarial points (the inputs where nothing was learnt)."""
    n = adv.shape[0]
    rows = torch.arange(n) if rows is None else rows
    if norm == "L2":
        high = torch.ones(n, dtype=torch.float64)
    else:
        high = distances(adv, sources, norm).cpu()
    start = high.clone()
    low = torch.zeros(n, dtype=torch.float64)
    tol = torch.as_tensor(tol, dtype=torch.float64).cpu().expand(n)
    while True:
        open_ = ((high - low) > tol) & (oracle.decisions_left(rows) > 0)
        idx = open_.nonzero().flatten()
        if idx.numel() == 0:
            break
        mid = (high[idx] + low[idx]) / 2
        d = idx.to(adv.device)
        adversarial = oracle(blend(sources[d], adv[d], mid, norm), rows[idx])
        high[idx] = torch.where(adversarial, mid, high[idx])
        low[idx] = torch.where(adversarial, low[idx], mid)
    unmoved = (high >= start).view(-1, *([1] * (adv.dim() - 1))).to(adv.device)
    return torch.where(unmoved, adv, blend(sources, adv, high, norm))


@dataclass
class DecisionSearch:
    """What an algorithm found: per sample its best adversarial image (as judged by the
    oracle), its distance to the source in the attack's norm, and the trajectory of
    ``(queries, distance)`` after each iteration."""

    adversarial: torch.Tensor
    distance: torch.Tensor
    trajectory: list[list[tuple[int, float]]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecisionTask(AttackTask):
    """An :class:`AttackTask` with start points for a decision-based attack (e.g. the
    target's images for impersonation): ``starts`` (N,3,H,W) in [0,1], or None."""

    starts: torch.Tensor | None = None


class DecisionAttack(Attack):
    """Base of decision-based attacks: builds the oracle, finds start points, and runs
    :meth:`attack` with the oracle only (see the module docstring)."""

    #: Subclasses fill in their own parameters with :meth:`config`.
    def __init__(self, norm: str = "L2", eps: float | None = None, goal: str = "impersonation",
                 max_queries: int = 5000, repeats: int = 1, sequential: bool = False,
                 init_trials: int = 100, submit_8bit: bool = False, batch_size: int = 256):
        if int(repeats) != repeats or repeats < 1 or repeats % 2 == 0:
            raise BenchError(f"{self.registered_name}: repeats must be an odd integer >= 1, got {repeats!r}")
        super().__init__(norm=norm, eps=eps, goal=goal, eot_iter=int(repeats))
        if int(max_queries) != max_queries or max_queries < 1:
            raise BenchError(f"{self.name}: max_queries must be a positive integer, got {max_queries!r}")
        if int(init_trials) != init_trials or init_trials < 0:
            raise BenchError(f"{self.name}: init_trials must be an integer >= 0, got {init_trials!r}")
        self.max_queries, self.repeats, self.sequential = int(max_queries), int(repeats), bool(sequential)
        self.init_trials, self.submit_8bit = int(init_trials), bool(submit_8bit)
        self.batch_size = int(batch_size)
        self._starts: torch.Tensor | None = None

    def config(self) -> dict[str, Any]:
        cfg = {k: v for k, v in super().config().items() if k != "eot_iter"}
        return {**cfg, "max_queries": self.max_queries, "repeats": self.repeats, "sequential": self.sequential,
                "init_trials": self.init_trials, "submit_8bit": self.submit_8bit}

    def threshold_dependence(self) -> str | None:
        return ("a decision-based attack searches the decision boundary at the threshold "
                "(accept/reject answers: binary searches, step-size searches, accepted candidates)")

    def not_applicable(self, random_defense: bool) -> str | None:
        if self.repeats > 1 and not random_defense:
            return (f"{self.name} with repeats {self.repeats} against a deterministic system, which answers a "
                    "query the same way every time: repeats would only spend queries (the column without "
                    "repeats is this attack)")
        return None

    def run(self, task: AttackTask, starts: torch.Tensor | None = None) -> AttackResult:
        """:meth:`Attack.run`, with optional start points (adversarial images, one per
        source; also read from a :class:`DecisionTask`'s ``starts``)."""
        if starts is None:
            starts = getattr(task, "starts", None)
        if starts is None:  # the harness's images of the references (impersonation: the targets)
            starts = task.reference_images
        self._starts = starts
        try:
            return super().run(task)
        finally:
            self._starts = None

    def oracle(self, task: AttackTask) -> DecisionOracle:
        """The decision oracle of ``task`` with this attack's repeats, budget and options."""
        return DecisionOracle(task, goal=self.goal, repeats=self.repeats, sequential=self.sequential,
                              max_queries=self.max_queries, batch_size=self.batch_size,
                              submit_8bit=self.submit_8bit, stream=(self.name, "oracle"))

    @abstractmethod
    def attack(self, oracle, sources: torch.Tensor, starts: torch.Tensor,
               generator: torch.Generator) -> DecisionSearch:
        """The algorithm: from adversarial ``starts``, adversarial points close to ``sources``,
        seeing the system only through ``oracle`` (call it, read ``queries``, ask
        ``decisions_left()``)."""

    def _find_starts(self, oracle: DecisionOracle, x: torch.Tensor, rows: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform noise images, one decision each, until adversarial: (images, found)."""
        found = torch.zeros(rows.shape, dtype=torch.bool)
        starts = x[rows.to(x.device)].clone()
        for _ in range(self.init_trials):
            todo = (~found & (oracle.decisions_left(rows) > 0)).nonzero().flatten()
            if todo.numel() == 0:
                break
            noise = torch.rand((todo.numel(), *x.shape[1:]), generator=generator).to(x)
            ok = oracle(noise, rows[todo])
            hit = todo[ok]
            starts[hit.to(x.device)] = noise[ok.to(x.device)]
            found[hit] = True
        return starts, found

    def _run(self, task: AttackTask) -> AttackResult:
        x = task.sources
        n = x.shape[0]
        oracle = self.oracle(task)
        gen = make_generator(task.seed, self.name, "search")
        kind = ["none"] * n
        distance = torch.full((n,), math.inf, dtype=torch.float64)
        adv = x.clone()
        starts = x.clone()
        has_start = torch.zeros(n, dtype=torch.bool)
        # (1) sources that are adversarial already
        everyone = torch.arange(n)
        ask = everyone[oracle.decisions_left() > 0]
        already = torch.zeros(n, dtype=torch.bool)
        already[ask] = oracle(x[ask.to(x.device)], ask)
        for i in already.nonzero().flatten().tolist():
            kind[i], distance[i] = "source", 0.0
        # (2) the caller's start points
        given = self._starts
        if given is not None:
            check_images(given, f"{self.name} start points", channels=x.shape[1])
            if given.shape != x.shape:
                raise BenchError(f"{self.name}: start points have shape {tuple(given.shape)}, "
                                 f"sources {tuple(x.shape)}")
            given = given.detach().to(x)
            ask = everyone[~already & (oracle.decisions_left() > 0)]
            ok = oracle(given[ask.to(x.device)], ask)
            for i in ask[ok].tolist():
                starts[i], has_start[i], kind[i] = given[i], True, "given"
        # (3) uniform noise
        todo = everyone[~already & ~has_start]
        if todo.numel() and self.init_trials:
            noise, found = self._find_starts(oracle, x, todo, gen)
            for j, i in enumerate(todo.tolist()):
                if found[j]:
                    starts[i], has_start[i], kind[i] = noise[j], True, "noise"
        trajectory: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        rows = has_start.nonzero().flatten()
        search_info: dict[str, Any] = {}
        if rows.numel():
            d = rows.to(x.device)
            found = self.attack(oracle.view(rows), x[d], starts[d], gen)
            adv[d] = found.adversarial.to(x)
            distance[rows] = distances(found.adversarial, x[d], self.norm).cpu()
            for j, i in enumerate(rows.tolist()):
                trajectory[i] = [(int(q), float(v)) for q, v in found.trajectory[j]]
            search_info = found.info
        projected = distance > self.eps
        projected &= torch.isfinite(distance)
        if projected.any():
            p = projected.nonzero().flatten().to(x.device)
            delta = adv[p] - x[p]
            if self.norm == "L2":
                scale = (self.eps / distance[projected]).to(x).view(-1, 1, 1, 1)
                adv[p] = fit_l2_ball((x[p] + delta * scale).clamp(0, 1), x[p], self.eps)
            else:
                adv[p] = x[p] + delta.clamp(-self.eps, self.eps)
        success = distance <= self.eps
        info = {"distance": distance, "projected": projected, "start": kind, "trajectory": trajectory,
                "repeats": self.repeats, "sequential": self.sequential, "max_queries": self.max_queries,
                "submit_8bit": self.submit_8bit, "decisions": oracle.decisions.clone(),
                "oracle": "decision-only (accept/reject)", **search_info,
                # For the record, per pair: the distance reached (None: no adversarial
                # start), where the walk started and its curve of (queries, distance).
                "per_pair": {"distance": [v if math.isfinite(v) else None for v in distance.tolist()],
                             "start": list(kind), "decisions": [int(k) for k in oracle.decisions.tolist()],
                             "trajectory": [[[q, round(v, 6)] for q, v in t] for t in trajectory]}}
        return AttackResult(adversarial=adv, success=success, queries=oracle.queries.clone(), info=info)
