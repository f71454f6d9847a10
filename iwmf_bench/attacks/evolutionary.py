"""The Evolutionary attack (Dong et al., "Efficient Decision-based Black-box Adversarial
Attacks on Face Recognition", CVPR 2019): decision-based, L2 (Linf: see below).

Written from the paper (our own code). A (1+1)-CMA-ES-like search over perturbations
drawn in a lower-dimensional space (``C x low_res x low_res``; the paper's 45x45x3 for
112x112 faces, so ``low_res`` defaults to ``round(45/112 * H)``) with a diagonal
covariance ``c`` and upsampled bilinearly to the image. Each iteration, per sample (all
samples in lockstep, one decision each):

1. draw ``z ~ N(0, diag(c))`` in the low-dimensional space and keep ``k = m / 20`` of its
   ``m`` coordinates, chosen at random with probabilities proportional to ``c`` (the
   stochastic coordinate selection), the others set to 0;
2. upsample ``z`` to the image and scale it to L2 norm ``sigma * D`` (``D`` the current L2
   distance to the source; the paper's ``sigma = 0.01 D``), add it to the point moved a
   fraction ``mu`` towards the source, ``x* + mu (x - x*)``, and rescale the candidate's
   offset from the source to that biased point's distance ``(1 - mu) D`` (as in the
   authors' code: every candidate is closer than the current point); clip to [0, 1];
3. if the oracle judges the candidate adversarial (and it is closer, in the attack's
   norm), it replaces ``x*``, and the evolution path ``p = (1 - c_c) p + sqrt(c_c (2 -
   c_c)) z`` and the covariance ``c = (1 - c_cov) c + c_cov p^2`` are updated (``c_c =
   0.01``, ``c_cov = 0.001``);
4. every ``window`` (30) trials, ``mu *= exp(P_success - 1/5)`` (the 1/5th success rule;
   ``mu`` kept in [1e-6, 0.5]).

The start (the caller's, e.g. the target's image, or uniform noise; see :mod:`.decision`)
is first moved towards the source by ``init_search`` bisection steps on the segment
between them (the authors' code does this for its noise starts; the paper starts at the
target image). ``norm="Linf"`` runs the same search and accepts a candidate only if it
also lowers the Linf distance (the search geometry stays L2); the final point is projected
onto the Linf ball like any decision attack's. The trajectory records ``(queries,
distance)`` at the start and at each improvement (a step function of the queries).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import BenchError
from .decision import DecisionAttack, DecisionSearch, binary_search
from .oracle import distances


class Evolutionary(DecisionAttack):
    """Evolutionary attack (Dong et al. 2019), decision-based CMA-ES in a low-dim space, L2."""

    registered_name = "evolutionary"

    def __init__(self, norm: str = "L2", eps: float | None = None, goal: str = "impersonation",
                 max_queries: int = 5000, repeats: int = 1, sequential: bool = False,
                 low_res: int | None = None, sigma: float = 0.01, mu: float = 0.01, c_c: float = 0.01,
                 c_cov: float = 0.001, window: int = 30, init_search: int = 10, init_trials: int = 100,
                 submit_8bit: bool = False, batch_size: int = 256):
        super().__init__(norm=norm, eps=eps, goal=goal, max_queries=max_queries, repeats=repeats,
                         sequential=sequential, init_trials=init_trials, submit_8bit=submit_8bit,
                         batch_size=batch_size)
        if low_res is not None and (int(low_res) != low_res or low_res < 1):
            raise BenchError(f"{self.name}: low_res must be None or a positive integer, got {low_res!r}")
        for key, value in (("sigma", sigma), ("mu", mu), ("c_c", c_c), ("c_cov", c_cov)):
            if not 0 < value < 1:
                raise BenchError(f"{self.name}: {key} must be in (0, 1), got {value!r}")
        if int(window) != window or window < 1 or int(init_search) != init_search or init_search < 0:
            raise BenchError(f"{self.name}: window must be >= 1 and init_search >= 0 (integers)")
        self.low_res = None if low_res is None else int(low_res)
        self.sigma, self.mu, self.c_c, self.c_cov = float(sigma), float(mu), float(c_c), float(c_cov)
        self.window, self.init_search = int(window), int(init_search)

    def config(self):
        return {**super().config(), "low_res": self.low_res, "sigma": self.sigma, "mu": self.mu,
                "c_c": self.c_c, "c_cov": self.c_cov, "window": self.window, "init_search": self.init_search}

    @torch.no_grad()
    def attack(self, oracle, sources, starts, generator) -> DecisionSearch:
        n, ch, h, w = sources.shape
        side = self.low_res or max(1, round(45 / 112 * h))
        m = ch * side * side
        k = max(1, m // 20)
        x = binary_search(oracle, sources, starts, "L2", 2.0 ** -self.init_search) if self.init_search \
            else starts.clone()
        dist = distances(x, sources, self.norm).cpu()
        path = torch.zeros(n, m, dtype=torch.float64)
        cov = torch.ones(n, m, dtype=torch.float64)
        mu = torch.full((n,), self.mu, dtype=torch.float64)
        trials = torch.zeros(n, dtype=torch.long)
        wins = torch.zeros(n, dtype=torch.long)
        queries = oracle.queries
        trajectory = [[(int(queries[i]), float(dist[i]))] for i in range(n)]
        everyone = torch.arange(n)
        iterations = 0
        while True:
            live = everyone[oracle.decisions_left() > 0]
            if live.numel() == 0:
                break
            iterations += 1
            b = live.numel()
            dev = live.to(sources.device)
            chosen = torch.multinomial(cov[live] / cov[live].sum(dim=1, keepdim=True), k, replacement=False,
                                       generator=generator)
            mask = torch.zeros(b, m, dtype=torch.float64).scatter_(1, chosen, 1.0)
            z = torch.randn((b, m), generator=generator, dtype=torch.float64) * mask * cov[live].sqrt()
            large = F.interpolate(z.view(b, ch, side, side), size=(h, w), mode="bilinear", align_corners=False)
            large = large / large.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x0, cur = sources[dev].double(), x[dev].double()
            to_source = x0 - cur
            d_l2 = to_source.flatten(1).norm(dim=1)
            biased = cur + mu[live].to(cur).view(-1, 1, 1, 1) * to_source
            cand = biased + (self.sigma * d_l2).view(-1, 1, 1, 1) * large.to(cur)
            offset = cand - x0
            radius = (biased - x0).flatten(1).norm(dim=1)
            cand = (x0 + offset * (radius / offset.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1))
            cand = cand.clamp(0, 1).to(sources.dtype)
            adversarial = oracle(cand, live)
            closer = distances(cand, sources[dev], self.norm).cpu() < dist[live]
            win = adversarial & closer
            rows = live[win]
            if rows.numel():
                x[rows.to(sources.device)] = cand[win.to(sources.device)]
                dist[rows] = distances(x[rows.to(sources.device)], sources[rows.to(sources.device)], self.norm).cpu()
                path[rows] = (1 - self.c_c) * path[rows] + math.sqrt(self.c_c * (2 - self.c_c)) * z[win]
                cov[rows] = (1 - self.c_cov) * cov[rows] + self.c_cov * path[rows] ** 2
                queries = oracle.queries
                for i in rows.tolist():
                    trajectory[i].append((int(queries[i]), float(dist[i])))
            trials[live] += 1
            wins[live] += adversarial.long()
            full = live[trials[live] >= self.window]
            if full.numel():
                rate = wins[full].double() / trials[full].double()
                mu[full] = (mu[full] * torch.exp(rate - 0.2)).clamp(1e-6, 0.5)
                trials[full], wins[full] = 0, 0
        queries = oracle.queries
        for i in range(n):
            if trajectory[i][-1][0] != int(queries[i]):
                trajectory[i].append((int(queries[i]), float(dist[i])))
        return DecisionSearch(adversarial=x, distance=dist, trajectory=trajectory,
                              info={"iterations": iterations, "low_res": side})
