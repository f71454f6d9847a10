"""AutoAttack (Croce & Hein, ICML 2020) from its reference code, on face verification.

Runs the ``pyautoattack`` package (Croce & Hein's code, packaged; optional extra
``iwmf-bench[suites]``) on :class:`.classifier.VerificationClassifier`: two logits
``(-m/2, m/2)`` from the goal-signed margin ``m``, label 0, untargeted. ``version="custom"`` with the attacks
that are well defined on two classes:

* ``apgd-ce``: APGD on cross-entropy, ``softplus(margin)`` here (monotone in the margin);
* ``square``: Square Attack on the margin loss, exactly our objective.

Excluded: ``apgd-dlr`` (the DLR loss divides by ``z_pi1 - z_pi3`` and needs a third
logit), ``apgd-t`` and ``fab-t`` (they attack the top-9 classes other than the label
with a targeted DLR loss or boundary search: with two classes the only target is class
1, i.e. the untargeted attack again, and targeted DLR needs >= 4 classes). ``fab``
(untargeted minimum-norm search) is not offered: unchecked on this task.

The ``rand`` flavour (AutoAttack's version for randomized defenses: EOT over 20 draws)
is ``eot_iter > 1``: each APGD step averages the gradient over that many forward passes,
each a fresh draw of the defense's randomness (the adapter's generator advances); the
adapter purifies a step's draws in one ``purify_draws`` call, with the loop's randomness
and the loop's gradients bit for bit (see :mod:`.classifier`).
AutoAttack's own ``rand`` version also runs APGD-DLR, undefined here. Over a
deterministic defense extra draws are identical, so ``eot_iter`` is cut to 1 and the
result says so (``info["eot_note"]``).

Budgets: ``steps`` APGD iterations (AutoAttack's default 100), ``queries`` Square
queries per image (5000), ``restarts`` APGD restarts, Square's ``p_init`` 0.8
(AutoAttack's value; our ``square`` uses the paper's 0.05). As in AutoAttack, each
attack runs only on the samples not yet fooled, and a sample it does not fool comes
back unperturbed. ``queries`` in the result counts every forward pass per image,
AutoAttack's own passes included (8 for its checks and clean accuracy, one clean
prediction per attack, one final prediction per attack).

Seeds: AutoAttack seeds torch's global RNG; see :mod:`.classifier_run` (reproducible
for a seed, global state restored).
"""

from __future__ import annotations

import logging

import torch

from ..errors import BenchError
from .apgd import APGD
from .base import Attack, AttackResult, AttackTask, derive_seed, is_random, make_generator
from .classifier import VerificationClassifier
from .classifier_run import RNG_NOTE, QueryCounter, import_library, seeded_global_rng

TWO_CLASS_ATTACKS = ("apgd-ce", "square")
EXCLUDED = {"apgd-dlr": "DLR needs >= 3 classes", "apgd-t": "targeted DLR needs >= 4 classes",
            "fab-t": "needs target classes other than the label; two classes have none",
            "fab": "not checked on two-class verification"}


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class AutoAttack(Attack):
    """AutoAttack's reference APGD-CE and Square (pyautoattack) on the verification margin."""

    registered_name = "autoattack"

    def threshold_dependence(self) -> str | None:
        return "the library's loss is a non-linear function of the margin and it stops on success at the threshold"
    uses_gradients = True
    libraries = ("pyautoattack",)

    def __init__(self, norm: str = "Linf", eps: float | None = None, attacks: tuple | list = TWO_CLASS_ATTACKS,
                 steps: int = 100, queries: int = 5000, restarts: int = 1, p_init: float = 0.8,
                 eot_iter: int = 1, grad_mode: str | None = None, goal: str = "impersonation"):
        super().__init__(norm=norm, eps=eps, goal=goal, eot_iter=eot_iter)
        self.validate_options(attacks=attacks)
        for what, value in (("steps", steps), ("queries", queries), ("restarts", restarts)):
            if int(value) != value or value < 1:
                raise BenchError(f"autoattack: {what} must be a positive integer, got {value}")
        if not 0 < p_init <= 1:
            raise BenchError(f"autoattack: p_init must be in (0, 1], got {p_init}")
        if grad_mode not in (None, "bpda", "exact"):
            raise BenchError(f"autoattack: grad_mode must be 'exact', 'bpda' or None, got {grad_mode!r}")
        self.attacks = [str(a) for a in attacks]
        self.steps, self.queries, self.restarts, self.p_init = int(steps), int(queries), int(restarts), float(p_init)
        self.grad_mode = grad_mode

    @classmethod
    def validate_options(cls, attacks=TWO_CLASS_ATTACKS, **_) -> None:
        """Suite validation: only attacks that are well defined on two classes."""
        if isinstance(attacks, str) or not list(attacks):
            raise BenchError(f"autoattack: attacks must be a non-empty list from {', '.join(TWO_CLASS_ATTACKS)}, "
                             f"got {attacks!r}")
        for a in attacks:
            if a not in TWO_CLASS_ATTACKS:
                why = EXCLUDED.get(a, "unknown AutoAttack attack")
                raise BenchError(f"autoattack: attack {a!r} cannot run on two-class verification ({why}); "
                                 f"use {', '.join(TWO_CLASS_ATTACKS)}")

    def config(self):
        return {**super().config(), "attacks": list(self.attacks), "steps": self.steps, "queries": self.queries,
                "restarts": self.restarts, "p_init": self.p_init, "grad_mode": self.grad_mode}

    def _run(self, task: AttackTask) -> AttackResult:
        aa = import_library(self.libraries[0], self.name)
        x = task.sources
        n = x.shape[0]
        needs_grad = task.defense is not None and "apgd-ce" in self.attacks
        grad_mode = APGD.resolve_grad_mode(self, task) if needs_grad else "none"  # same rule as apgd
        random = is_random(task.defense, x, task.seed)
        eot = self.eot_iter if random else 1
        classifier = VerificationClassifier(task.model, task.references, x, task.defense, grad_mode, self.goal,
                                            task.threshold, make_generator(task.seed, self.name, "defense"),
                                            self.norm)
        # The rand flavour's EOT loop purifies its draws in one call (same results; see .classifier).
        classifier.eot_draws, classifier.batched_eot = eot, self.batched_eot
        counter = QueryCounter(n, self.name, self.progress)
        classifier.on_rows = counter
        seed = derive_seed(task.seed, self.name, "library") % (2 ** 31)
        runner = aa.AutoAttack(classifier, attacks=self.attacks, version="custom", norm=self.norm, eps=self.eps,
                               seed=seed, device=x.device)
        runner.apgd.n_iter, runner.apgd.n_restarts, runner.apgd.eot_iter = self.steps, self.restarts, eot
        runner.apgd.n_iter_orig = self.steps
        # APGD's checkpoint constants are computed in its constructor from n_iter.
        runner.apgd.n_iter_2 = max(int(0.22 * self.steps), 1)
        runner.apgd.n_iter_min = max(int(0.06 * self.steps), 1)
        runner.apgd.size_decr = max(int(0.03 * self.steps), 1)
        runner.square.n_queries, runner.square.p_init = self.queries, self.p_init
        capture = _Capture()
        runner.logger.addHandler(capture)
        try:
            with seeded_global_rng(task.seed, self.name, "global", device=x.device):
                adv, predicted = runner.run_standard_evaluation(x, classifier.labels(), batch_size=n)
        finally:
            runner.logger.removeHandler(capture)
            counter.close()
        classifier.on_rows = None
        with torch.no_grad():
            objective = classifier.margin(adv.to(x.dtype))
        info = {"rng": RNG_NOTE, "library": f"pyautoattack {aa.__version__}", "objective": objective.cpu(),
                "library_warnings": capture.messages, "grad_mode": grad_mode, "eot_iter_used": eot}
        if self.eot_iter > 1 and not random:
            info["eot_note"] = (f"defense is deterministic: EOT over {self.eot_iter} draws would repeat one "
                                "query, so 1 draw per step was used")
        return AttackResult(adversarial=adv.to(x.dtype).detach(), success=(predicted == 1).cpu(),
                            queries=counter.per_image.clone(), info=info)
