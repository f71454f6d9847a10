"""Majority EOT: APGD aimed at a majority-vote deployment of a random defense.

A system that purifies each submission ``vote`` times and accepts it when more than half
of the purified images are accepted (DiffBreak's majority vote, Kassis et al.) is beaten
when at least ``k`` draws go the attacker's way: ``k = vote // 2 + 1`` accepted draws for
impersonation, ``k = ceil(vote / 2)`` rejected ones for dodging (a tie rejects). So the
attacker's objective for one vote is its *k-th best draw*: the vote succeeds exactly when
that draw's goal-signed margin does. Written from that definition (our own code):

* each step draws ``eot_iter`` purifications, taken as ``eot_iter / vote`` votes of
  ``vote`` consecutive draws (EOT over votes);
* the objective of a vote is the k-th largest goal-signed margin of its draws (what APGD's
  step-size schedule and best iterate follow: > 0 means the vote is won);
* its gradient, a smooth stand-in for that order statistic's: the mean of the gradients of
  the vote's ``k`` best draws that are not yet won (the draws that must flip; the others
  are left alone, as selective EOT leaves broken draws), or of all ``k`` when they all
  are (pushing the won majority deeper, which is what survives fresh draws).

At an equal number of steps and draws it costs what APGD-EOT costs. With ``randomness:
known`` and ``eot_iter == vote ==`` the scorer's draws it attacks the exact vote the
system will take.
"""

from __future__ import annotations

import torch

from ..errors import BenchError
from .eot import APGDEOT


def needed(vote: int, goal: str) -> int:
    """Draws of a ``vote`` that must go the attacker's way for the vote to."""
    return vote // 2 + 1 if goal == "impersonation" else (vote + 1) // 2


def majority_weights(objectives: torch.Tensor, broken: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For one vote's ``(vote, N)`` objectives and whether each draw is already won: the
    vote's objective (its k-th largest, ``(N,)``) and the ``(vote, N)`` gradient weights
    (uniform over the unbroken draws among the ``k`` best, or over all ``k`` best)."""
    order = torch.sort(objectives, dim=0, descending=True, stable=True).indices
    top = torch.zeros_like(broken).scatter_(0, order[:k], True)
    open_ = top & ~broken
    weights = torch.where(open_.any(dim=0, keepdim=True), open_, top).to(objectives.dtype)
    kth = objectives.gather(0, order[k - 1:k]).squeeze(0)
    return kth, weights / weights.sum(dim=0, keepdim=True)


class MajorityEOT(APGDEOT):
    """APGD-EOT on a majority vote over `vote` purifications: the k-th best draw of each vote."""

    registered_name = "majority-eot"

    def threshold_dependence(self) -> str | None:
        return 'it weighs the draws by their rank around the threshold (the k-th best draw of the vote)'

    def __init__(self, norm: str = "Linf", eps: float | None = None, steps: int = 40, eot_iter: int = 10,
                 vote: int = 10, grad_mode: str | None = None, goal: str = "impersonation"):
        super().__init__(norm=norm, eps=eps, steps=steps, eot_iter=eot_iter, grad_mode=grad_mode, goal=goal)
        if int(vote) != vote or vote < 1 or self.eot_iter % int(vote):
            raise BenchError(f"{self.name}: vote must be a positive integer dividing eot_iter ({self.eot_iter}), "
                             f"got {vote}")
        self.vote = int(vote)

    def config(self):
        return {**super().config(), "vote": self.vote}

    def _loss_and_grad(self, task, x, generator, grad_mode, draws):
        if task.defense is None or draws == 1:
            return super()._loss_and_grad(task, x, generator, grad_mode, draws)
        n = x.shape[0]
        obj, grad = self.per_draw(task, x, generator, grad_mode, draws)
        obj, grad = obj.view(draws // self.vote, self.vote, n), grad.view(draws // self.vote, self.vote, *x.shape)
        k = needed(self.vote, self.goal)
        loss = torch.zeros(n, dtype=x.dtype, device=x.device)
        total_grad = torch.zeros_like(x)
        for v in range(obj.shape[0]):
            kth, weights = majority_weights(obj[v], self.succeeded(obj[v]), k)
            loss += kth
            total_grad += (weights.view(self.vote, n, 1, 1, 1).to(grad.dtype) * grad[v]).sum(dim=0)
        return loss / obj.shape[0], total_grad / obj.shape[0], draws
