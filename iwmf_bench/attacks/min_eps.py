"""Each pair's minimal budget: a per-sample bisection over eps with a warm-started APGD.

For every sample, :class:`MinEps` searches the smallest budget (``norm`` Linf or L2) at
which our APGD (:mod:`.apgd`, the same options: ``steps``, ``eot_iter``, ``grad_mode``,
``goal``) breaks it, within ``[0, eps]`` (``eps`` is the upper bound ``eps_max``). It is
the minimal-perturbation view of a threat model (Carlini et al. 2019 ask for accuracy as
a function of the budget; FMN, Pintor et al. 2021, reports each sample's smallest
successful budget): ``task.defense=None`` gives the transfer setting's budgets (crafted
on the bare model), a defense in the task the adaptive one's (gradients through it,
EOT over its randomness).

The search, batched over samples (each round is one APGD call in which every sample still
searching runs at its own eps):

1. budget 0: the sources themselves (a pair the model already confuses needs no budget);
2. budget ``eps_max``: APGD from its random start; a sample not broken here gets
   ``min_eps = inf`` (its failure at ``eps_max`` is recorded);
3. up to ``search_steps`` more rounds: the next budget is ``hi / 2`` while no failure above
   0 is recorded, then the geometric midpoint ``sqrt(lo * hi)`` of the bracket, where
   ``hi`` is the smallest budget with a recorded success and ``lo`` the largest recorded
   failure below it. APGD starts warm, from the best adversarial image found so far (at
   ``hi``) projected into the smaller ball. A sample stops once
   ``lo >= (1 - rel_tol) * hi`` (default: the recorded failure is within 0.9x of the
   reported budget). That takes about ``log2(eps_max / min_eps)`` halvings, then three
   geometric steps (bracket ratio 0.5 -> 0.71 -> 0.84 -> 0.92); a sample still searching
   after ``search_steps`` rounds keeps its bracket and ``converged`` says so.

Success is judged on what an attacker submits and the harness scores: the image rounded
to the 8-bit grid (:func:`iwmf_bench.data.quantize`), its goal-signed margin averaged over
``eot_iter`` draws of the defense's randomness (one draw when there is none or it is
deterministic). On 8-bit sources the image is first rounded inside its own budget
(:func:`.budget.quantize_within_budget`, as :meth:`.base.Attack.run` rounds every output),
so budget and success refer to the same image; on off-grid sources (aligned crops) the
budget is measured on the float image, as for every attack, and budgets well below
``0.5/255`` (Linf) drown in the rounding. A success at budget ``e`` is recorded at the
image's actual perturbation size ``p <= e`` (it succeeded inside the ``p``-ball too), so
``hi`` drops to ``p``; for Linf on 8-bit sources this puts the reported budget on the
grid ``k/255`` (budgets between two grid levels admit the same images).

Result: ``adversarial`` is each sample's image at its minimal budget (the source for
unbroken samples and for ``min_eps = 0``), ``success`` whether the sample broke at all
(``min_eps <= eps_max``), ``queries`` every forward pass of the attacked system (APGD's
and the judging ones). ``info``:

* ``min_eps``: per sample, the smallest budget with a recorded success (the returned
  image's perturbation), ``inf`` if none up to ``eps_max``;
* ``failed_eps``: per sample, the largest budget below ``min_eps`` at which the search
  recorded a failure (``eps_max`` for unbroken samples, 0 if none);
* ``converged``: per sample, ``failed_eps >= (1 - rel_tol) * min_eps`` was reached within
  ``search_steps`` (unbroken samples and ``min_eps = 0`` count as converged);
* ``search``: per sample, the list of ``(eps, success)`` budgets tried, in order (budget
  0 first, then ``eps_max``);
* ``grad_mode``, ``eight_bit`` (whether the sources were on the 8-bit grid).

The search assumes success is monotone in eps, which a stochastic attack only
approximately is; a success below a recorded failure simply moves ``hi`` down (the
smallest success wins) and ``lo`` becomes the largest failure below it.
:func:`budget_curve` turns the minimal budgets into the success rate at any budget (the
security curve) and :func:`iwmf_bench.metrics.median_interval` gives their median with a distribution-free
interval. Every random number comes from generators of ``task.seed`` (deterministic).
"""

from __future__ import annotations

import math

import torch

from .. import metrics
from ..data import quantize
from ..errors import BenchError
from .apgd import APGD
from .base import Attack, AttackResult, AttackTask, is_random, make_generator
from .budget import TOLERANCE, on_8bit_grid, perturbation_norms, quantize_within_budget


class MinEps(Attack):
    """Each sample's smallest budget at which APGD breaks it (bisection over eps, warm starts)."""

    registered_name = "min-eps"

    def threshold_dependence(self) -> str | None:
        return 'its bisection over the budget keeps the smallest budget accepted at the threshold'
    uses_gradients = True

    def __init__(self, norm: str = "Linf", eps: float | None = None, steps: int = 40, eot_iter: int = 1,
                 grad_mode: str | None = None, goal: str = "impersonation", search_steps: int = 8,
                 rel_tol: float = 0.1):
        super().__init__(norm=norm, eps=eps, goal=goal, eot_iter=eot_iter)
        if int(search_steps) != search_steps or search_steps < 0:
            raise BenchError(f"{self.name}: search_steps must be a non-negative integer, got {search_steps}")
        if not 0 < float(rel_tol) < 1:
            raise BenchError(f"{self.name}: rel_tol must lie in (0, 1), got {rel_tol}")
        self.inner = APGD(norm=norm, eps=self.eps, steps=steps, eot_iter=eot_iter, grad_mode=grad_mode, goal=goal)
        self.steps, self.grad_mode = self.inner.steps, self.inner.grad_mode
        self.search_steps, self.rel_tol = int(search_steps), float(rel_tol)

    def config(self):
        return {**super().config(), "steps": self.steps, "grad_mode": self.grad_mode,
                "search_steps": self.search_steps, "rel_tol": self.rel_tol}

    def _subtask(self, task: AttackTask, idx: torch.Tensor) -> AttackTask:
        return AttackTask(task.model, task.sources[idx], task.references[idx], task.defense, task.seed,
                          task.threshold)

    @torch.no_grad()
    def _judge(self, task: AttackTask, images: torch.Tensor, generator: torch.Generator,
               draws: int) -> torch.Tensor:
        """Success of submitting ``images`` (row i for sample i of ``task``): the goal-signed
        margin of their 8-bit rounding (what the harness scores) averaged over ``draws``
        draws of the defense's randomness."""
        n = images.shape[0]
        obj = self.objective_draws(task, quantize(images).repeat(draws, 1, 1, 1), generator, "none", draws)
        return self.succeeded(obj.view(draws, n).mean(dim=0)).cpu()

    def _candidates(self, adv: torch.Tensor, src: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The images returned for a budget: rounded to the grid inside each image's own
        budget (as :meth:`Attack.run` rounds outputs), what the harness scores. A budget
        smaller than the source's own rounding to 8 bits (an off-grid aligned probe: up to
        half a level) holds no image; there the least submittable budget is used, and the
        search records the success at the image's actual size."""
        floor = perturbation_norms(quantize(src).double(), src.double(), self.norm).cpu()
        return torch.cat([quantize_within_budget(adv[i:i + 1], src[i:i + 1], self.norm,
                                                 max(float(eps[i]), float(floor[i]) * (1 + 1e-9)))
                          for i in range(adv.shape[0])])

    def _run(self, task: AttackTask) -> AttackResult:
        x = task.sources
        n = x.shape[0]
        inner = self.inner
        inner.batched_eot, inner.draws_per_call = self.batched_eot, self.draws_per_call
        grad_mode = inner.resolve_grad_mode(task)
        random = is_random(task.defense, x, task.seed)
        draws = self.eot_iter if random else 1
        eight_bit = on_8bit_grid(x)
        target = 1 - self.rel_tol

        adv = x.clone()
        queries = torch.zeros(n, dtype=torch.long)
        search: list[list[tuple[float, bool]]] = [[] for _ in range(n)]
        hi = [math.inf] * n  # smallest budget with a recorded success
        zero_grad = False

        def lower(i: int) -> float:
            """The largest recorded failure below sample i's smallest success (-1: none)."""
            return max((e for e, ok in search[i] if not ok and e < hi[i]), default=-1.0)

        # Budget 0: the sources as they are.
        ok = self._judge(task, x, make_generator(task.seed, self.name, "judge", 0), draws)
        queries += draws
        for i in range(n):
            search[i].append((0.0, bool(ok[i])))
            if ok[i]:
                hi[i] = 0.0

        for rnd in self.iterations(self.search_steps + 1, "budget"):
            if rnd == 0:  # eps_max, from APGD's random start
                active = [i for i in range(n) if hi[i] > 0]
                budgets = [self.eps] * len(active)
            else:
                active = [i for i in range(n) if 0 < hi[i] < math.inf and lower(i) < target * hi[i]]
                budgets = [hi[i] / 2 if lower(i) <= 0 else math.sqrt(lower(i) * hi[i]) for i in active]
            if not active:
                break
            idx = torch.tensor(active, dtype=torch.long)
            sub = self._subtask(task, idx.to(x.device))
            eps = torch.tensor(budgets, dtype=torch.float64)
            found = inner.descend(
                sub, eps, None if rnd == 0 else adv[idx.to(x.device)],
                make_generator(task.seed, self.name, "defense", rnd),
                make_generator(task.seed, self.name, "init", rnd), grad_mode, draws)
            zero_grad |= bool(found.zero_gradient.any())
            submitted = self._candidates(found.adversarial, sub.sources, eps)
            ok = self._judge(sub, submitted, make_generator(task.seed, self.name, "judge", rnd + 1), draws)
            sizes = perturbation_norms(submitted.double(), sub.sources.double(), self.norm).cpu()
            queries[idx] += found.queries + draws
            for j, i in enumerate(active):
                search[i].append((budgets[j], bool(ok[j])))
                if ok[j] and float(sizes[j]) < hi[i]:
                    # It succeeded inside the ball of its actual size: a success at that budget
                    # (or, above it when the budget held no 8-bit image, at that size).
                    size = float(sizes[j])
                    hi[i] = min(size, budgets[j]) if size <= budgets[j] + TOLERANCE else size
                    adv[i] = submitted[j]

        min_eps = hi
        failed_eps = [self.eps if math.isinf(h) else max(lower(i), 0.0) for i, h in enumerate(hi)]
        converged = [math.isinf(h) or h == 0 or failed_eps[i] >= target * h for i, h in enumerate(hi)]
        return AttackResult(
            adversarial=adv,
            success=torch.tensor([not math.isinf(h) for h in hi]),
            queries=queries,
            flags={"zero_gradients": zero_grad},
            info={"min_eps": min_eps, "failed_eps": failed_eps, "converged": converged, "search": search,
                  "grad_mode": grad_mode, "eight_bit": eight_bit},
        )


def budget_curve(min_eps, budgets) -> list[metrics.Rate]:
    """The success rate at each budget ``e`` implied by per-sample minimal budgets: the
    fraction of samples with ``min_eps <= e`` (the empirical security curve)."""
    values = [float(v) for v in min_eps]
    return [metrics.Rate(sum(v <= float(e) for v in values), len(values)) for e in budgets]
