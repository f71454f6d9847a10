"""The adaptive attack and the evaluation of adversarial images on fresh randomness.

:class:`Adaptive` is APGD-EOT aimed at a purifier that must be present in the task:
gradients through the defense (``grad_mode`` ``"exact"`` by default, or ``"bpda"``),
averaged over ``eot_iter`` draws of its randomness. Unlike the paper's adaptive attack,
which passed no gradient through the purifier, this one differentiates through it.
After the attack, its 8-bit images are scored on *fresh* randomness (draws the attack
never saw) by :func:`evaluate`, attached as ``result.info["evaluation"]``.

:func:`evaluate` is what the CLI and the harness report:

* single-shot rate: the fraction of all ``N x n_draws`` submissions that succeed (each a
  fresh purification), i.e. the expected rate of one submission;
* worst-of-N rate: the fraction of samples that succeed in at least one of ``n_draws``
  purifications (the attacker may resubmit the same image).

For impersonation success is acceptance (this is the FAR under attack); for dodging,
rejection. A deterministic defense (or none) needs one draw; both rates then coincide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import metrics
from ..data import quantize
from ..defenses.base import Defense
from ..errors import BenchError
from .base import GOALS, AttackResult, AttackTask, is_random, make_generator
from .eot import APGDEOT

EVALUATE_BATCH = 64  # images per purification call at scoring (the draws depend on it: keep it)


@dataclass
class Evaluation:
    """Success of adversarial images over ``n_draws`` fresh purifications."""

    single_shot: metrics.Rate
    worst_of_n: metrics.Rate
    n_draws: int
    accepted: torch.Tensor  # (N, n_draws) bool: was submission (i, d) accepted?
    margin: torch.Tensor  # (N, n_draws) verification margin (> 0: accepted) of each submission
    embeddings: torch.Tensor | None = None  # (n_draws, N, D) of the purified submissions (CPU)
    scores: torch.Tensor | None = None  # (N, n_draws) verification score (the model's metric) of each submission

    def successes(self, goal: str) -> list[int]:
        """Per image, the draws on which the attack's goal was met (accepted; dodging: rejected)."""
        success = self.accepted if goal == "impersonation" else ~self.accepted
        return [int(k) for k in success.sum(dim=1).tolist()]

    def to_dict(self) -> dict[str, Any]:
        return {"single_shot": self.single_shot.to_dict(), "worst_of_n": self.worst_of_n.to_dict(),
                "n_draws": self.n_draws}


@torch.no_grad()
def evaluate(model, defense: Defense | None, adv: torch.Tensor, references: torch.Tensor, seed: int,
             n_draws: int = 10, goal: str = "impersonation", threshold: float | None = None,
             batch_size: int = EVALUATE_BATCH, stream: tuple = ("evaluate",)) -> Evaluation:
    """Score ``data.quantize(adv)`` (the 8-bit images an attacker submits) against
    ``references`` through ``defense`` (None: undefended) on fresh randomness.

    Draws come from the task seed's ``stream`` (``"evaluate"``, which no attack uses
    unless the threat model gives it the randomness: :mod:`.known`), in the order of
    :func:`scorer_draws`.
    """
    if goal not in GOALS:
        raise BenchError(f"evaluate: goal must be one of {GOALS}, got {goal!r}")
    if int(n_draws) != n_draws or n_draws < 1:
        raise BenchError(f"evaluate: n_draws must be a positive integer, got {n_draws}")
    if references.shape[0] != adv.shape[0]:
        raise BenchError(f"evaluate: {adv.shape[0]} images but {references.shape[0]} references")
    x = quantize(adv)
    references = references.to(x.device)
    thr = float(model.threshold if threshold is None else threshold)
    random = is_random(defense, x, seed)
    draws = int(n_draws) if random else 1
    accepted, margin, embeddings, scores = [], [], [], []
    for z in scorer_draws(defense, x, make_generator(seed, *stream), draws, batch_size):
        emb = torch.cat([model.embed(z[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
        s = metrics.scores(emb, references, model.metric)
        accepted.append(metrics.accepts(s, thr, model.metric).cpu())
        margin.append(metrics.margin(s, thr, model.metric).cpu())
        embeddings.append(emb.cpu())
        scores.append(s.cpu())
    accepted, margin = torch.stack(accepted, dim=1), torch.stack(margin, dim=1)
    success = accepted if goal == "impersonation" else ~accepted
    # The draws of one image are not independent trials: its interval counts images.
    return Evaluation(single_shot=metrics.Rate(int(success.sum()), int(success.numel()),
                                               clusters=int(success.shape[0]) if draws > 1 else None),
                      worst_of_n=metrics.Rate(int(success.any(dim=1).sum()), int(success.shape[0])),
                      n_draws=draws, accepted=accepted, margin=margin, embeddings=torch.stack(embeddings),
                      scores=torch.stack(scores, dim=1))


def scorer_draws(defense: Defense | None, x, generator: torch.Generator, draws: int,
                 batch_size: int = EVALUATE_BATCH, grad_mode: str = "none"):
    """The scorer's purifications of ``x``, one ``(N, ...)`` tensor per draw: draw by draw,
    each batch of ``batch_size`` images in turn, one generator carried along. The one place
    that order is written: the scorer (:func:`evaluate`) and an attacker that knows the
    randomness (:class:`~iwmf_bench.attacks.known.KnownDraws`) both purify through it, so
    they see the same draws by construction. ``x``: the images, or one copy of them per draw
    (an attacker's, each with its own gradient; the draws depend on the shapes only)."""
    copies = list(x) if isinstance(x, (list, tuple)) else [x] * draws
    if len(copies) != draws:
        raise BenchError(f"scorer_draws: {len(copies)} copies of the images for {draws} draws")
    for z in copies:
        if defense is None:
            yield z
        else:
            yield torch.cat([defense.purify(z[i:i + batch_size], generator, grad_mode)
                             for i in range(0, z.shape[0], batch_size)])


class Adaptive(APGDEOT):
    """Adaptive APGD-EOT through the purifier (exact or BPDA gradients), scored on fresh randomness."""

    registered_name = "adaptive"

    def __init__(self, norm: str = "Linf", eps: float | None = None, steps: int = 40, eot_iter: int = 20,
                 grad_mode: str = "exact", goal: str = "impersonation", n_draws: int = 10):
        if grad_mode not in ("exact", "bpda"):
            raise BenchError(f"adaptive: grad_mode must be 'exact' or 'bpda', got {grad_mode!r}")
        super().__init__(norm=norm, eps=eps, steps=steps, eot_iter=eot_iter, grad_mode=grad_mode, goal=goal)
        if int(n_draws) != n_draws or n_draws < 1:
            raise BenchError(f"adaptive: n_draws must be a positive integer, got {n_draws}")
        self.n_draws = int(n_draws)

    def config(self):
        return {**super().config(), "n_draws": self.n_draws}

    def run(self, task: AttackTask) -> AttackResult:
        if task.defense is None:
            raise BenchError("adaptive: the task has no defense to adapt to (use apgd for the undefended model)")
        result = super().run(task)
        result.info["evaluation"] = evaluate(task.model, task.defense, result.adversarial, task.references,
                                             task.seed, self.n_draws, self.goal, task.threshold)
        return result
