"""Decision-based (hard-label) black-box attacks: the attacker sees only accept/reject.

The threat model of a deployed face authenticator: the attacker submits an image and
learns whether it was accepted as the claimed identity; no scores, no gradients, no
model. :class:`DecisionOracle` is that system: built from an :class:`AttackTask`, it
purifies each submission with the task's defense (fresh randomness from a generator of
its own), embeds it, compares it with its row's reference at ``task.decision_threshold``
and answers one boolean per image. :class:`DecisionAttack` builds the oracle and hands
the algorithm (:meth:`DecisionAttack.attack`) only the oracle, the sources, start points
and a generator: the algorithm cannot reach the model.

Decisions. ``oracle(x, rows)`` says, for each image ``x[j]``, whether it is
*adversarial* for sample ``rows[j]`` (default: row ``j``): accepted as reference
``rows[j]`` for impersonation, rejected by it for dodging. Each decision is the majority of
``repeats`` (odd) independent submissions; with ``sequential=True`` the submissions of a
decision stop once one answer holds the majority (``repeats // 2 + 1`` votes): the same
majority rule, fewer submissions on clear-cut points. ``submit_8bit=True`` rounds every
submission to the 8-bit grid first (what a real attacker uploads is a PNG).

Queries. A query is one image submitted once: ``oracle.queries`` counts them per sample,
exactly, repeats included. ``max_queries`` per sample is a hard cap: a call that could
exceed it (counting the worst case of ``repeats`` submissions per decision) raises
:class:`QueryBudgetExceeded` before submitting anything, so algorithms plan their calls
with ``oracle.decisions_left()``.

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

Over the 400-line cap: the oracle and the attack base share this module; the oracle moves to
its own module together with the next recompute of the decision-based cells.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import metrics
from ..data import quantize
from ..defenses.base import check_images
from ..errors import BenchError
from .base import Attack, AttackResult, AttackTask, fit_l2_ball, make_generator


class QueryBudgetExceeded(BenchError):
    """A decision was asked for a sample whose query budget cannot pay for it (a bug of the
    algorithm: it must plan with ``decisions_left``)."""


def distances(x: torch.Tensor, sources: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image distance ``||x - sources||`` in ``norm`` (float64)."""
    delta = (x.double() - sources.double()).flatten(1)
    return delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(dim=1)


class DecisionOracle:
    """The attacked system as a hard-label oracle: ``oracle(x, rows) -> (M,) bool``.

    ``task``: the model, references, defense, threshold and seed. ``goal``: what counts as
    adversarial (accepted for impersonation, rejected for dodging). ``repeats``: odd number
    of submissions per decision (majority vote); ``sequential``: stop submitting once the
    majority is reached. ``max_queries``: per-sample cap on submissions (None: no cap).
    ``batch_size``: images per model call. ``submit_8bit``: round submissions to 8 bits.
    """

    def __init__(self, task: AttackTask, goal: str = "impersonation", repeats: int = 1,
                 sequential: bool = False, max_queries: int | None = None, batch_size: int = 256,
                 submit_8bit: bool = False, stream: tuple = ("decision-oracle",)):
        if int(repeats) != repeats or repeats < 1 or repeats % 2 == 0:
            raise BenchError(f"decision oracle: repeats must be an odd integer >= 1, got {repeats!r}")
        if max_queries is not None and (int(max_queries) != max_queries or max_queries < 0):
            raise BenchError(f"decision oracle: max_queries must be an integer >= 0, got {max_queries!r}")
        self._model = task.model
        self._references = task.references
        self._defense = task.defense
        self._threshold = task.decision_threshold
        self._impersonation = goal == "impersonation"
        self._generator = make_generator(task.seed, *stream)
        self._batch_size = max(1, int(batch_size))
        self._submit_8bit = bool(submit_8bit)
        self.repeats, self.sequential = int(repeats), bool(sequential)
        self.max_queries = None if max_queries is None else int(max_queries)
        n = task.sources.shape[0]
        self.queries = torch.zeros(n, dtype=torch.long)
        self.decisions = torch.zeros(n, dtype=torch.long)

    def __len__(self) -> int:
        return self.queries.shape[0]

    def _rows(self, rows, m: int) -> torch.Tensor:
        if rows is None:
            if m != len(self):
                raise BenchError(f"decision oracle: {m} images without rows, for {len(self)} samples")
            return torch.arange(m)
        rows = torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
        if rows.numel() != m:
            raise BenchError(f"decision oracle: {m} images but {rows.numel()} rows")
        return rows

    def decisions_left(self, rows=None) -> torch.Tensor:
        """Per sample (all, or ``rows``): how many more decisions the budget surely pays for."""
        rows = torch.arange(len(self)) if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
        if self.max_queries is None:
            return torch.full(rows.shape, 2 ** 62, dtype=torch.long)
        return (self.max_queries - self.queries[rows]).clamp_min(0) // self.repeats

    @torch.no_grad()
    def _submit(self, x: torch.Tensor, rows: torch.Tensor, draws: int) -> torch.Tensor:
        """``draws`` independent submissions of each image: (draws, M) adversarial votes."""
        out = []
        per_call = max(1, self._batch_size // draws)
        for start in range(0, x.shape[0], per_call):
            chunk, idx = x[start:start + per_call], rows[start:start + per_call]
            stacked = chunk.repeat(draws, 1, 1, 1) if draws > 1 else chunk
            if self._defense is not None:
                stacked = self._defense.purify_draws(stacked, self._generator, draws)
            emb = self._model.embed(stacked)
            refs = self._references[idx.to(self._references.device)].repeat(draws, 1)
            acc = metrics.accepts(metrics.scores(emb, refs, self._model.metric), self._threshold,
                                  self._model.metric).cpu()
            out.append((acc if self._impersonation else ~acc).view(draws, -1))
        return torch.cat(out, dim=1) if out else torch.zeros(draws, 0, dtype=torch.bool)

    def __call__(self, x: torch.Tensor, rows=None) -> torch.Tensor:
        """Is each image adversarial for its row's reference? One decision per image."""
        rows = self._rows(rows, x.shape[0])
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool)
        if self.max_queries is not None:
            need = torch.bincount(rows, minlength=len(self)) * self.repeats
            over = (self.queries + need > self.max_queries).nonzero().flatten()
            if over.numel():
                i = int(over[0])
                raise QueryBudgetExceeded(
                    f"decision oracle: sample {i} would need {int(need[i])} more queries after "
                    f"{int(self.queries[i])}, over its budget of {self.max_queries}")
        check_images(x, "decision query")
        x = x.detach()
        if self._submit_8bit:
            x = quantize(x)
        if not self.sequential or self.repeats == 1:
            votes = self._submit(x, rows, self.repeats).sum(dim=0)
            self.queries.index_add_(0, rows, torch.full(rows.shape, self.repeats, dtype=torch.long))
        else:  # one submission per round to the undecided images, until a majority
            need_votes = self.repeats // 2 + 1
            votes = torch.zeros(rows.shape, dtype=torch.long)
            against = torch.zeros(rows.shape, dtype=torch.long)
            open_ = torch.ones(rows.shape, dtype=torch.bool)
            for _ in range(self.repeats):
                idx = open_.nonzero().flatten()
                if idx.numel() == 0:
                    break
                v = self._submit(x[idx.to(x.device)], rows[idx], 1)[0].long()
                votes[idx] += v
                against[idx] += 1 - v
                self.queries.index_add_(0, rows[idx], torch.ones(idx.shape, dtype=torch.long))
                open_ = (votes < need_votes) & (against < need_votes)
        self.decisions.index_add_(0, rows, torch.ones(rows.shape, dtype=torch.long))
        return votes > self.repeats // 2

    def view(self, rows) -> "OracleView":
        """The oracle seen through a subset of samples (local row ``j`` is sample ``rows[j]``)."""
        return OracleView(self, rows)


class OracleView:
    """A subset of a :class:`DecisionOracle`'s samples, indexed locally (what algorithms get)."""

    def __init__(self, oracle: DecisionOracle, rows):
        self._oracle = oracle
        self._rows = torch.as_tensor(rows, dtype=torch.long).flatten().cpu()

    def __len__(self) -> int:
        return self._rows.shape[0]

    def _global(self, rows, m: int) -> torch.Tensor:
        if rows is None:
            if m != len(self):
                raise BenchError(f"decision oracle: {m} images without rows, for {len(self)} samples")
            return self._rows
        return self._rows[torch.as_tensor(rows, dtype=torch.long).flatten().cpu()]

    def __call__(self, x: torch.Tensor, rows=None) -> torch.Tensor:
        return self._oracle(x, self._global(rows, x.shape[0]))

    @property
    def queries(self) -> torch.Tensor:
        return self._oracle.queries[self._rows]

    def decisions_left(self, rows=None) -> torch.Tensor:
        local = self._rows if rows is None else self._rows[torch.as_tensor(rows, dtype=torch.long).cpu()]
        return self._oracle.decisions_left(local)


# -- shared pieces of the algorithms ------------------------------------------------------


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
                "oracle": "decision-only (accept/reject)", **search_info}
        return AttackResult(adversarial=adv, success=success, queries=oracle.queries.clone(), info=info)
