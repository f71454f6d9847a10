"""Selective EOT: APGD through a random defense, its gradient concentrated on the draws
that are not broken yet.

Plain EOT averages the gradient over the draws of the defense's randomness. Once some
draws already accept the adversarial face, their gradients (which push a margin that is
already won) compete with those of the draws still rejecting it: the "gradient dilemma"
DiffHammer (Wang et al., NeurIPS 2024) describes, answered there by an EM-style weighting
of the draws. Written here for face verification's margin objective (our own code, from
the idea): at every step, per image, each of the ``eot_iter`` draws ``d`` gets the weight

    w_d = 1[draw d not broken] / #(draws not broken)   (uniform when every draw is broken)

("broken": the attack's goal reached on that draw: accepted for impersonation, rejected
for dodging), and the step follows ``sum_d w_d grad_d``. The objective that drives APGD's
step-size schedule and picks the best iterate stays the mean over the draws, so the only
change from :class:`~iwmf_bench.attacks.eot.APGDEOT` is where the gradient points; at an
equal number of steps and draws both cost the same gradient evaluations. Over a
deterministic defense (one draw per step) it is APGD.
"""

from __future__ import annotations

import torch

from .eot import APGDEOT


def selective_weights(objectives: torch.Tensor, broken: torch.Tensor) -> torch.Tensor:
    """(draws, N) weights from per-draw objectives and whether each draw is broken: uniform
    over the unbroken draws of an image, uniform over all when none is left."""
    open_ = (~broken).to(objectives.dtype)
    count = open_.sum(dim=0, keepdim=True)
    uniform = torch.full_like(objectives, 1.0 / objectives.shape[0])
    return torch.where(count > 0, open_ / count.clamp_min(1), uniform)


class SelectiveEOT(APGDEOT):
    """APGD-EOT whose gradient weights only the draws not yet broken (DiffHammer's selective idea)."""

    registered_name = "selective-eot"

    def threshold_dependence(self) -> str | None:
        return 'its gradient follows only the draws not yet accepted at the threshold'

    def _loss_and_grad(self, task, x, generator, grad_mode, draws):
        if task.defense is None or draws == 1:
            return super()._loss_and_grad(task, x, generator, grad_mode, draws)
        n = x.shape[0]
        obj, grad = self.per_draw(task, x, generator, grad_mode, draws)
        weights = selective_weights(obj, self.succeeded(obj))
        total_grad = (weights.view(draws, n, 1, 1, 1).to(grad.dtype) * grad).sum(dim=0)
        return obj.mean(dim=0), total_grad, draws
