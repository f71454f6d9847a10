"""The decision oracle: a deployed face authenticator as a decision-based attacker sees it.

:class:`DecisionOracle` is built from an :class:`~iwmf_bench.attacks.base.AttackTask`: it
purifies each submission with the task's defense (fresh randomness from a generator of its
own), embeds it, compares it with its row's reference at ``task.decision_threshold`` and
answers one boolean per image; nothing else of the system is reachable through it.

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
"""

from __future__ import annotations

import torch

from .. import metrics
from ..data import quantize
from ..defenses.base import check_images
from ..errors import BenchError
from .base import AttackTask, make_generator


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
