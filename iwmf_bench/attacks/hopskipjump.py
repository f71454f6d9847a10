"""HopSkipJumpAttack (Chen, Jordan and Wainwright, IEEE S&P 2020), targeted, L2 and Linf.

Written from the paper (our own code). A decision-based attack: it sees only the
accept/reject answers of :class:`~.decision.DecisionOracle` (see :mod:`.decision` for the
oracle, start points, budgets and the result). From an adversarial start, each sample
iterates, in lockstep with the others (``t = 1, 2, ...``):

1. *boundary*: a binary search on the segment (L2: the convex blend; Linf: the clip
   to a shrinking Linf ball) between the source and the current point, down to a bracket
   of ``theta`` (L2: of the blend weight, ``theta = gamma / d^{3/2}``; Linf: of the radius,
   ``min(theta * dist, theta)`` with ``theta = gamma / d^2``; ``d`` the number of pixel
   values), keeping the adversarial end: the iterate ``x_t`` at distance ``dist_t``;
2. *gradient direction* at ``x_t`` (:func:`estimate_direction`): ``B_t = min(init_evals *
   sqrt(t), max_evals)`` random unit directions ``u_b`` (Gaussian for L2, uniform in
   [-1, 1] for Linf, normalized), the points ``clip(x_t + delta_t u_b)``, their decisions
   ``phi_b = +-1``; the estimate is the mean of ``(phi_b - mean(phi)) u_b`` (the paper's
   baseline subtraction; when all decisions agree, ``+-mean(u_b)``), with ``u_b`` taken as
   the clipped displacement over ``delta_t``. ``delta_1 = 0.1``, then ``delta_t =
   sqrt(d) theta dist_{t-1}`` (L2) or ``d theta dist_{t-1}`` (Linf);
3. *geometric step*: along the direction ``v`` (L2: the unit estimate; Linf: its sign),
   step ``xi = dist_t / sqrt(t)``, halved until ``clip(x_t + xi v)`` is adversarial (at most
   ``step_halvings`` halvings; none: no move this iteration); then step 1 again.

Each sample runs until its ``max_queries`` budget cannot pay for another decision (the
gradient batch is cut to what is left), or after ``steps`` iterations when given. The
returned image is the sample's best boundary point (the smallest distance to the source
among the iterates, which the trajectory follows: it never increases).

``repeats`` > 1 (majority votes over the defense's randomness) makes each decision, hence
each binary-search step and each gradient sample, cost ``repeats`` queries.
"""

from __future__ import annotations

import math

import torch

from ..errors import BenchError
from .decision import DecisionAttack, DecisionSearch, binary_search
from .oracle import distances


def theta_of(d: int, norm: str, gamma: float = 1.0) -> float:
    """The paper's binary-search tolerance for ``d`` pixel values."""
    return gamma / (d ** 1.5) if norm == "L2" else gamma / (d ** 2)


@torch.no_grad()
def estimate_direction(oracle, x: torch.Tensor, delta: float, num_evals: int, norm: str,
                       generator: torch.Generator, row: int = 0, chunk: int = 256) -> torch.Tensor:
    """HopSkipJump's Monte-Carlo estimate of the direction of the boundary's normal,
    pointing into the adversarial side, at the boundary point ``x`` (C,H,W) of oracle row
    ``row``: ``num_evals`` decisions on ``clip(x + delta * u)``, ``u`` random unit vectors.
    Returns a unit vector of the shape of ``x`` (zeros if the estimate vanishes).
    The directions are drawn in chunks of ``chunk`` (memory bounded at any ``num_evals``)."""
    if num_evals < 1:
        raise BenchError(f"estimate_direction: num_evals must be >= 1, got {num_evals}")
    shape = x.shape
    sum_fu = torch.zeros(shape, dtype=torch.float64, device=x.device)
    sum_u = torch.zeros(shape, dtype=torch.float64, device=x.device)
    sum_f = 0.0
    done = 0
    while done < num_evals:
        b = min(chunk, num_evals - done)
        if norm == "L2":
            u = torch.randn((b, *shape), generator=generator)
        else:
            u = torch.rand((b, *shape), generator=generator) * 2 - 1
        u = (u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * len(shape)))).to(x)
        points = (x.unsqueeze(0) + delta * u).clamp(0, 1)
        u = (points - x.unsqueeze(0)).double() / delta
        f = oracle(points, torch.full((b,), int(row), dtype=torch.long)).to(x.device).double() * 2 - 1
        sum_fu += (f.view(-1, *([1] * len(shape))) * u).sum(dim=0)
        sum_u += u.sum(dim=0)
        sum_f += float(f.sum())
        done += b
    mean_f = sum_f / num_evals
    if mean_f == 1.0:
        grad = sum_u / num_evals
    elif mean_f == -1.0:
        grad = -sum_u / num_evals
    else:  # baseline subtraction: mean((f - mean f) u)
        grad = (sum_fu - mean_f * sum_u) / num_evals
    norm_g = float(grad.norm())
    if not norm_g > 0:
        return torch.zeros_like(x)
    return (grad / norm_g).to(x)


class HopSkipJump(DecisionAttack):
    """HopSkipJumpAttack (Chen et al. 2020), decision-based (accept/reject only), L2/Linf."""

    registered_name = "hopskipjump"

    def __init__(self, norm: str = "L2", eps: float | None = None, goal: str = "impersonation",
                 max_queries: int = 5000, repeats: int = 1, sequential: bool = False,
                 steps: int | None = None, init_evals: int = 100, max_evals: int = 10000,
                 gamma: float = 1.0, step_halvings: int = 25, init_trials: int = 100,
                 submit_8bit: bool = False, batch_size: int = 256):
        super().__init__(norm=norm, eps=eps, goal=goal, max_queries=max_queries, repeats=repeats,
                         sequential=sequential, init_trials=init_trials, submit_8bit=submit_8bit,
                         batch_size=batch_size)
        if steps is not None and (int(steps) != steps or steps < 0):
            raise BenchError(f"{self.name}: steps must be None or an integer >= 0, got {steps!r}")
        if int(init_evals) != init_evals or init_evals < 1 or int(max_evals) != max_evals or max_evals < init_evals:
            raise BenchError(f"{self.name}: need integers 1 <= init_evals <= max_evals, got {init_evals}, {max_evals}")
        if not gamma > 0:
            raise BenchError(f"{self.name}: gamma must be > 0, got {gamma}")
        if int(step_halvings) != step_halvings or step_halvings < 0:
            raise BenchError(f"{self.name}: step_halvings must be an integer >= 0, got {step_halvings!r}")
        self.steps = None if steps is None else int(steps)
        self.init_evals, self.max_evals = int(init_evals), int(max_evals)
        self.gamma, self.step_halvings = float(gamma), int(step_halvings)

    def config(self):
        return {**super().config(), "steps": self.steps, "init_evals": self.init_evals,
                "max_evals": self.max_evals, "gamma": self.gamma, "step_halvings": self.step_halvings}

    def _step(self, oracle, x: torch.Tensor, update: torch.Tensor, xi: torch.Tensor, rows: torch.Tensor):
        """Geometric step-size search for samples ``rows``: the first of
        ``clip(x + xi / 2^k * update)`` judged adversarial (k = 0..step_halvings); returns the
        new points (``x`` where none was found or the budget ran out) and which moved."""
        n = rows.numel()
        moved = torch.zeros(n, dtype=torch.bool)
        out = x.clone()
        xi = xi.clone()
        for _ in range(self.step_halvings + 1):
            todo = (~moved & (oracle.decisions_left(rows) > 0)).nonzero().flatten()
            if todo.numel() == 0:
                break
            d = todo.to(x.device)
            cand = (x[d] + xi[todo].to(x).view(-1, 1, 1, 1) * update[d]).clamp(0, 1)
            ok = oracle(cand, rows[todo])
            out[d[ok.to(x.device)]] = cand[ok.to(x.device)]
            moved[todo[ok]] = True
            xi[todo[~ok]] /= 2
        return out, moved

    @torch.no_grad()
    def attack(self, oracle, sources, starts, generator) -> DecisionSearch:
        n = sources.shape[0]
        d = sources[0].numel()
        theta = theta_of(d, self.norm, self.gamma)
        everyone = torch.arange(n)

        def tolerance(points, x0):  # the paper's: theta (L2, of the blend weight), min(theta * dist, theta) (Linf)
            if self.norm == "L2":
                return torch.full((points.shape[0],), theta, dtype=torch.float64)
            return torch.clamp(distances(points, x0, self.norm).cpu() * theta, max=theta)

        x = binary_search(oracle, sources, starts, self.norm, tolerance(starts, sources))
        dist = distances(x, sources, self.norm).cpu()
        best, best_dist = x.clone(), dist.clone()
        queries = oracle.queries
        trajectory = [[(int(queries[i]), float(dist[i]))] for i in range(n)]
        t = 0
        while self.steps is None or t < self.steps:
            live = everyone[oracle.decisions_left() > 0]
            if live.numel() == 0:
                break
            t += 1
            delta = torch.full((n,), 0.1, dtype=torch.float64) if t == 1 else \
                (math.sqrt(d) * theta * dist if self.norm == "L2" else d * theta * dist)
            evals = min(int(self.init_evals * math.sqrt(t)), self.max_evals)
            update = torch.zeros_like(x)
            for i in live.tolist():
                b = min(evals, int(oracle.decisions_left(torch.tensor([i]))[0]))
                g = estimate_direction(oracle, x[i], float(delta[i]), b, self.norm, generator, row=i,
                                       chunk=self.batch_size)
                update[i] = g if self.norm == "L2" else g.sign()
            xi = dist / math.sqrt(t)
            stepped, moved = self._step(oracle, x[live.to(x.device)], update[live.to(x.device)], xi[live], live)
            rows = live[moved]
            if rows.numel():
                r = rows.to(x.device)
                pts = stepped[moved.to(x.device)]
                x[r] = binary_search(oracle, sources[r], pts, self.norm, tolerance(pts, sources[r]), rows=rows)
                dist[rows] = distances(x[r], sources[r], self.norm).cpu()
                better = rows[dist[rows] < best_dist[rows]]
                best[better.to(x.device)] = x[better.to(x.device)]
                best_dist[better] = dist[better]
            queries = oracle.queries
            for i in live.tolist():
                trajectory[i].append((int(queries[i]), float(best_dist[i])))
        return DecisionSearch(adversarial=best, distance=best_dist, trajectory=trajectory,
                              info={"iterations": t})
