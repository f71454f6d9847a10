"""Auto-PGD (Croce & Hein, ICML 2020), Linf and L2, on the verification margin.

Written from the paper (Algorithm 1), with the reference implementation's random start:

* step size ``eta = 2 eps``; first step a plain projected step; then
  ``z = P(x_k + eta * g)``, ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))``
  with momentum ``a = 0.75``; ``g`` is the sign of the gradient (Linf) or the
  gradient normalized per image (L2); ``P`` projects onto the eps-ball and [0,1];
* checkpoints ``w_j = ceil(p_j N)``, ``p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``; at a checkpoint the step size is
  halved and the iterate restarted from the best point when (1) fewer than
  ``rho = 0.75`` of the steps since the last checkpoint increased the objective, or (2)
  neither the step size nor the best objective changed since the last checkpoint;
* the best iterate (highest objective) is returned.

The objective is the goal-signed margin of :mod:`.base` (averaged over ``eot_iter``
draws of the defense's randomness when a defense is in the loop, gradients likewise
averaged: EOT). With ``task.defense=None`` this is the paper's "APGD" (crafted on the
undefended model). With a defense in the task the gradient passes *through the
purifier* (``grad_mode``: ``"exact"`` or ``"bpda"``; ``None`` picks ``"exact"`` when the
defense supports it, else ``"bpda"``): the paper's reference APGD_EOT never saw the
purifier; this one does.

Default budgets: 40 iterations; Linf eps = 0.03 (about 7.65/255; 8-bit outputs keep
7/255); L2 eps = 0.5, the usual benchmark value, but note it is a per-pixel RMS of only
about 0.0019 on 150x150 RGB faces (CIFAR-10's L2 = 0.5 spread over 22x more pixels) and
is weak there: measured on dlib-resnet with the 20 aligned shared pairs, 40 steps, FAR
5% at L2 0.5, 70% at 1.0, 100% at 2.0 (Linf 0.03: 100%). Pass ``eps`` explicitly for
a meaningful L2 threat on face-sized images (about 2.0 matches CIFAR's per-pixel RMS).
Queries per image: ``(steps + 1) * eot_iter`` forward and backward passes, or ``steps + 1``
when the defense in the loop is deterministic (EOT would repeat one gradient; the result
says so in ``info["eot_note"]``). The draws of a step go through the defense in one
``purify_draws`` call (one big batch: what a GPU wants), with the same randomness, and so
the same iterates bit for bit, as one call per draw (:attr:`Attack.batched_eot`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import BenchError
from .base import Attack, AttackResult, AttackTask, is_random, make_generator
from .budget import fit_l2_ball


@dataclass
class Descent:
    """What :meth:`APGD.descend` found: per image the best iterate and its objective, whether
    a gradient was identically zero, the final step size; the queries per image (the same
    for all) and the mean objective after each step."""

    adversarial: torch.Tensor
    objective: torch.Tensor
    queries: int
    zero_gradient: torch.Tensor
    trace: list[float]
    step_size: torch.Tensor


def checkpoints(steps: int) -> list[int]:
    """Iterations ``w_1 < w_2 < ...`` (< steps) where APGD may halve its step size."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = {math.ceil(round(q * steps, 9)) for q in p[1:]}  # round: 0.22 * 100 is 22.000000000000004
    return sorted(w for w in marks if 0 < w < steps)


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float | torch.Tensor) -> torch.Tensor:
    """Project onto the eps-ball around ``x`` (per image), then clip to [0,1]; ``eps`` is
    one budget for all images or one per image (a float64 tensor of shape ``(N,)``).

    For Linf this is the exact projection onto the intersection; for L2 (as in the
    reference implementation) clipping after the ball projection stays feasible, since
    clipping only shrinks each pixel's perturbation toward ``x`` in [0,1].
    """
    delta = x_adv - x
    per_image = isinstance(eps, torch.Tensor)
    if norm == "Linf":
        bound = eps.to(delta.dtype).view(-1, 1, 1, 1) if per_image else eps
        return (x + delta.clamp(-bound, bound)).clamp(0, 1)
    norms = delta.double().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    scale = (eps.view(-1, 1, 1, 1) if per_image else eps) / norms.clamp_min(1e-12)
    delta = delta * torch.clamp(scale, max=1.0).to(delta.dtype)
    # Float rounding can leave an image a hair outside its ball: pull it back.
    return fit_l2_ball((x + delta).clamp(0, 1), x, eps)


def step_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020), Linf/L2, white-box on the verification margin (EOT optional)."""

    registered_name = "apgd"
    uses_gradients = True
    momentum = 0.75
    rho = 0.75

    def __init__(self, norm: str = "Linf", eps: float | None = None, steps: int = 40, eot_iter: int = 1,
                 grad_mode: str | None = None, goal: str = "impersonation"):
        super().__init__(norm=norm, eps=eps, goal=goal, eot_iter=eot_iter)
        if int(steps) != steps or steps < 1:
            raise BenchError(f"{self.name}: steps must be a positive integer, got {steps}")
        if grad_mode not in (None, "bpda", "exact"):
            raise BenchError(f"{self.name}: grad_mode must be 'exact', 'bpda' or None (the defense's best), "
                             f"got {grad_mode!r}")
        self.steps, self.grad_mode = int(steps), grad_mode

    def config(self):
        return {**super().config(), "steps": self.steps, "grad_mode": self.grad_mode}

    def resolve_grad_mode(self, task: AttackTask) -> str:
        """How gradients pass through ``task.defense`` ("none" when there is none)."""
        defense = task.defense
        if defense is None:
            return "none"
        if self.grad_mode is not None:
            if self.grad_mode not in defense.grad_modes:
                raise BenchError(f"{self.name}: defense {defense.name!r} does not support grad_mode "
                                 f"{self.grad_mode!r} (supported: {', '.join(defense.grad_modes)})")
            return self.grad_mode
        for mode in ("exact", "bpda"):
            if mode in defense.grad_modes:
                return mode
        raise BenchError(f"{self.name}: defense {defense.name!r} passes no gradient; attack it with a "
                         "black-box attack (square) or craft on the undefended model (transfer)")

    def _loss_and_grad(self, task, x, generator, grad_mode, draws):
        """Objective averaged over ``draws`` draws, and its gradient (EOT).

        The draws of a step go through the defense together (:meth:`Attack.objective_draws`,
        at most :attr:`draws_per_call` per call), each draw's share of the loss and gradient
        then added up in draw order, as the loop of one call per draw
        (:attr:`batched_eot` False) adds them: the sums are the same bit for bit.
        """
        if not self.batched_eot or task.defense is None or draws == 1:
            return self._loss_and_grad_loop(task, x, generator, grad_mode, draws)
        n = x.shape[0]
        total_loss = torch.zeros(n, dtype=x.dtype, device=x.device)
        total_grad = torch.zeros_like(x)
        for group in self.draw_groups(draws):
            xs = x.detach().repeat(group, 1, 1, 1).requires_grad_(True)
            with torch.enable_grad():
                obj = self.objective_draws(task, xs, generator, grad_mode, group)
                (grad,) = torch.autograd.grad(obj.sum(), xs, allow_unused=True)
            for d in range(group):
                total_loss += obj[d * n:(d + 1) * n].detach()
                if grad is not None:
                    total_grad += grad[d * n:(d + 1) * n]
        return total_loss / draws, total_grad / draws, draws

    def _loss_and_grad_loop(self, task, x, generator, grad_mode, draws):
        """:meth:`_loss_and_grad` with one ``purify`` call per draw."""
        total_loss = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        total_grad = torch.zeros_like(x)
        for _ in range(draws):
            xr = x.detach().requires_grad_(True)
            with torch.enable_grad():
                obj = self.objective(task, xr, generator, grad_mode)
                (grad,) = torch.autograd.grad(obj.sum(), xr, allow_unused=True)
            total_loss += obj.detach()
            if grad is not None:
                total_grad += grad.detach()
        return total_loss / draws, total_grad / draws, draws

    def _run(self, task: AttackTask) -> AttackResult:
        x = task.sources
        n = x.shape[0]
        grad_mode = self.resolve_grad_mode(task)
        # EOT only where there is randomness: over a deterministic defense every draw gives
        # the same loss and gradient, so one draw per step (the same iterates up to rounding, eot_iter times cheaper).
        random = is_random(task.defense, x, task.seed)
        draws = self.eot_iter if random else 1
        eot_note = {} if draws == self.eot_iter else {
            "eot_note": f"defense is deterministic: EOT over {self.eot_iter} draws would repeat one gradient, "
                        "so one draw per step"}
        run = self.descend(task, torch.full((n,), float(self.eps), dtype=torch.float64), None,
                           make_generator(task.seed, self.name, "defense"),
                           make_generator(task.seed, self.name, "init"), grad_mode, draws)
        return AttackResult(
            adversarial=run.adversarial,
            success=self.succeeded(run.objective).cpu(),
            queries=torch.full((n,), run.queries, dtype=torch.long),
            flags={"zero_gradients": bool(run.zero_gradient.any())},
            info={"objective": run.objective.cpu(), "grad_mode": grad_mode,
                  "zero_gradient_samples": int(run.zero_gradient.sum()), "objective_trace": run.trace,
                  "final_step_size": run.step_size.flatten().cpu(), **eot_note},
        )

    def descend(self, task: AttackTask, eps: torch.Tensor, start: torch.Tensor | None,
                defense_gen: torch.Generator, init_gen: torch.Generator, grad_mode: str, draws: int) -> Descent:
        """APGD's iterations with budget ``eps[i]`` (float64, shape ``(N,)``) for image ``i``,
        from ``start`` projected into the balls, or (None) from the reference implementation's
        random start, a random point of each ball's surface drawn from ``init_gen``.
        ``draws`` draws of the defense's randomness (from ``defense_gen``) per step.
        :meth:`run` is this at one budget for all; :class:`.min_eps.MinEps` searches with
        one budget per image."""
        x = task.sources
        n, norm = x.shape[0], self.norm
        eps = eps.to(device=x.device, dtype=torch.float64)
        if start is None:
            t = (torch.rand(x.shape, generator=init_gen, dtype=torch.float64) * 2 - 1).to(x)
            size = t.flatten(1).abs().amax(dim=1) if norm == "Linf" else t.flatten(1).norm(dim=1)
            x_adv = (x + eps.to(x.dtype).view(-1, 1, 1, 1) * t / size.clamp_min(1e-12).view(-1, 1, 1, 1)).clamp(0, 1)
        else:
            x_adv = project(start.to(x), x, norm, eps)

        loss, grad, used = self._loss_and_grad(task, x_adv, defense_gen, grad_mode, draws)
        queries = used
        zero_grad = grad.flatten(1).abs().amax(dim=1) == 0
        x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
        step = (2.0 * eps).to(x.dtype).view(-1, 1, 1, 1).clone()
        marks = set(checkpoints(self.steps))
        last_mark = 0
        increases = torch.zeros(n, device=x.device)
        reduced_last = torch.zeros(n, dtype=torch.bool, device=x.device)
        best_last = loss_best.clone()
        x_prev = x_adv.clone()
        loss_prev = loss.clone()
        trace = [float(loss.mean())]

        for k in self.iterations(self.steps, "step"):
            with torch.no_grad():
                a = self.momentum if k > 0 else 1.0
                z = project(x_adv + step * step_direction(grad, norm), x, norm, eps)
                x_new = project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x, norm, eps)
                x_prev, x_adv = x_adv, x_new
            loss, grad, used = self._loss_and_grad(task, x_adv, defense_gen, grad_mode, draws)
            queries += used
            zero_grad |= grad.flatten(1).abs().amax(dim=1) == 0
            trace.append(float(loss.mean()))
            with torch.no_grad():
                increases += (loss > loss_prev).float()
                loss_prev = loss
                better = loss > loss_best
                x_best[better], loss_best[better], grad_best[better] = x_adv[better], loss[better], grad[better]
                if k + 1 in marks:
                    span = k + 1 - last_mark
                    cond1 = increases < self.rho * span
                    cond2 = ~reduced_last & (best_last >= loss_best)
                    reduce = cond1 | cond2
                    step[reduce] /= 2
                    x_adv[reduce], grad[reduce] = x_best[reduce], grad_best[reduce]
                    # Restarted samples: no momentum from before the restart.
                    x_prev[reduce] = x_best[reduce]
                    reduced_last, best_last = reduce, loss_best.clone()
                    increases.zero_()
                    last_mark = k + 1
        return Descent(x_best.detach(), loss_best.detach(), queries, zero_grad, trace, step)
