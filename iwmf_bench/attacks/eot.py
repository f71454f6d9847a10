"""APGD-EOT: APGD with the defense in the loop and Expectation over Transformation.

The gradient (and the objective used for step-size control and for keeping the best
iterate) is averaged over ``eot_iter`` draws of the defense's randomness per iteration
(Athalye et al. 2018), and it passes *through the purifier*: ``grad_mode`` ``"exact"``
(IWMF is linear for fixed windows, so autograd gives its exact gradient; also diffusion
defenses that support it) or ``"bpda"`` (forward purification, identity backward);
``None`` picks the defense's best. Note: the reference "APGD_EOT" of Wang et al. (TDSC
2024) never saw the purifier (crafted on the bare model); this one does. Run it on a
task with ``defense=None`` and it is plain APGD (the transfer setting).
"""

from __future__ import annotations

import torch

from .apgd import APGD


class APGDEOT(APGD):
    """APGD with the defense in the loop, gradients averaged over eot_iter draws of its randomness."""

    registered_name = "apgd-eot"

    def __init__(self, norm: str = "Linf", eps: float | None = None, steps: int = 40, eot_iter: int = 20,
                 grad_mode: str | None = None, goal: str = "impersonation"):
        super().__init__(norm=norm, eps=eps, steps=steps, eot_iter=eot_iter, grad_mode=grad_mode, goal=goal)

    def per_draw(self, task, x, generator, grad_mode, draws) -> tuple[torch.Tensor, torch.Tensor]:
        """Every draw's objective ``(draws, N)`` and gradient ``(draws, *x.shape)`` of one
        step (the same draws, in the same order, as :meth:`_loss_and_grad` takes): what an
        EOT that weights its draws (selective, majority) combines."""
        n = x.shape[0]
        objectives, grads = [], []
        for group in self.draw_groups(draws):
            xs = x.detach().repeat(group, 1, 1, 1).requires_grad_(True)
            with torch.enable_grad():
                obj = self.objective_draws(task, xs, generator, grad_mode, group)
                (grad,) = torch.autograd.grad(obj.sum(), xs, allow_unused=True)
            objectives.append(obj.detach().view(group, n))
            grads.append(torch.zeros_like(xs) if grad is None else grad.detach())
        return torch.cat(objectives), torch.cat(grads).view(draws, *x.shape)
