"""The adaptive attack: APGD-EOT through the purifier, scored on fresh randomness.

:class:`Adaptive` is APGD-EOT aimed at a purifier that must be present in the task:
gradients through the defense (``grad_mode`` ``"exact"`` by default, or ``"bpda"``),
averaged over ``eot_iter`` draws of its randomness. Unlike the paper's adaptive attack,
which passed no gradient through the purifier, this one differentiates through it.
After the attack, its 8-bit images are scored on *fresh* randomness (draws the attack
never saw) by :func:`iwmf_bench.scoring.evaluate`, attached as ``result.info["evaluation"]``.
"""

from __future__ import annotations

from ..errors import BenchError
from ..scoring import evaluate
from .base import AttackResult, AttackTask
from .eot import APGDEOT


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
