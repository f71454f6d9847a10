"""Any torchattacks attack class as a threat model, on face verification.

``{attack: torchattacks, name: MIFGSM, eps: 0.03, steps: 10, decay: 1.0}`` builds
``torchattacks.MIFGSM(classifier, eps=0.03, steps=10, decay=1.0)`` on
:class:`.classifier.VerificationClassifier` (two logits ``(-m/2, m/2)``, m the goal-signed margin,
label 0, untargeted mode) and runs it on the task's sources. Needs the optional extra
``iwmf-bench[suites]``; without it a cell is skipped naming the install command.

* The norm follows the class (Linf for the FGSM/PGD family, L2 for PGDL2, CW,
  DeepFool; ``norm=`` for APGD and Square). ``eps`` is our budget and is passed to the
  class when it takes one. Minimum-norm attacks without a budget (CW, DeepFool) are
  projected onto the budget ball afterwards; ``info["projected"]`` counts the images
  whose library output had to be projected.
* Classes that cannot work here fail at suite validation (:meth:`validate_options`):
  targeted-only or many-class attacks (APGDT, FAB, torchattacks' AutoAttack), L0/L1
  attacks (our budgets are Linf/L2), wrappers that need other objects (MultiAttack, LGV),
  non-attacks (VANILA, GN), and ``loss='dlr'`` (needs >= 3 classes).
* torchattacks draws from torch's global RNG (random starts, input diversity, VMI's
  neighbourhood samples): seeded from the task seed and restored afterwards
  (:mod:`.classifier_run`); classes with a ``seed`` argument get one from the task seed.
* With a defense in the task, gradients pass through it (``grad_mode``, as for
  ``apgd``); a stochastic defense gives a fresh draw per forward pass, so EOTPGD's
  ``eot_iter`` averages over its randomness.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..errors import BenchError
from .apgd import APGD, project
from .base import Attack, AttackResult, AttackTask, derive_seed, make_generator
from .budget import TOLERANCE, perturbation_norms
from .classifier import VerificationClassifier
from .classifier_run import RNG_NOTE, QueryCounter, import_library, seeded_global_rng

LINF = ("FGSM", "BIM", "RFGSM", "PGD", "EOTPGD", "FFGSM", "TPGD", "MIFGSM", "UPGD", "DIFGSM", "TIFGSM", "Jitter",
        "NIFGSM", "PGDRS", "SINIFGSM", "VMIFGSM", "VNIFGSM", "SPSA", "PIFGSM", "PIFGSMPP")
L2 = ("PGDL2", "PGDRSL2", "CW", "DeepFool")
EITHER = ("APGD", "Square")  # take norm=
UNSUPPORTED = {
    "APGDT": "targets other classes with the targeted DLR loss (>= 4 classes); use autoattack with apgd-ce",
    "FAB": "multi-class boundary search (n_classes targets); not usable on two-class verification",
    "AutoAttack": "torchattacks' AutoAttack runs APGD-T/FAB-T on 10 classes; use the 'autoattack' threat model",
    "MultiAttack": "wraps other attack objects, which suite options cannot express",
    "LGV": "needs a training data loader",
    "JSMA": "L0 attack (our budgets are Linf or L2)",
    "OnePixel": "L0 attack (our budgets are Linf or L2)",
    "Pixle": "L0 attack (our budgets are Linf or L2)",
    "SparseFool": "L0 attack (our budgets are Linf or L2)",
    "EADL1": "L1 attack (our budgets are Linf or L2)",
    "EADEN": "elastic-net (L1) attack (our budgets are Linf or L2)",
    "VANILA": "not an attack (returns its input)",
    "GN": "Gaussian noise without a budget, not an attack",
}
NO_BUDGET = ("CW", "DeepFool")  # minimum-norm: projected onto the budget afterwards
OURS = ("name", "norm", "eps", "goal", "grad_mode")


def _norm_of(name: str, norm: str | None) -> str:
    fixed = "Linf" if name in LINF else "L2" if name in L2 else None
    if fixed is not None and norm not in (None, fixed):
        raise BenchError(f"torchattacks: {name} is an {fixed} attack, not {norm}")
    return fixed or norm or "Linf"


class TorchAttacks(Attack):
    """Any torchattacks attack class (name=..., its keyword arguments) on the verification margin."""

    registered_name = "torchattacks"

    def threshold_dependence(self) -> str | None:
        return "the library's loss (cross-entropy of the margin) is non-linear in the margin, so its step sizes depend on the threshold"
    uses_gradients = True
    libraries = ("torchattacks",)

    def __init__(self, name: str = "PGD", norm: str | None = None, eps: float | None = None,
                 goal: str = "impersonation", grad_mode: str | None = None, **options: Any):
        self.validate_options(name=name, norm=norm, **options)
        self.attack_name, self.options = name, dict(options)
        eot = options.get("eot_iter", 1) if isinstance(options.get("eot_iter", 1), int) else 1
        super().__init__(norm=_norm_of(name, norm), eps=eps, goal=goal, eot_iter=max(int(eot), 1))
        if grad_mode not in (None, "bpda", "exact"):
            raise BenchError(f"torchattacks: grad_mode must be 'exact', 'bpda' or None, got {grad_mode!r}")
        self.grad_mode = grad_mode

    @classmethod
    def validate_options(cls, name: str = "PGD", norm: str | None = None, **options: Any) -> None:
        """Suite validation: the class exists, can work on this task, and takes these options.
        Without torchattacks installed only the name is checked (the cell will be skipped)."""
        if name in UNSUPPORTED:
            raise BenchError(f"torchattacks: {name} cannot run on face verification: {UNSUPPORTED[name]}")
        if str(options.get("loss", "")).lower().startswith("dlr"):
            raise BenchError(f"torchattacks: {name} with loss='dlr' needs >= 3 classes; use loss='ce'")
        if "targeted" in options:
            raise BenchError("torchattacks: no targeted mode (with two classes, targeting class 1 is the "
                             "untargeted attack)")
        known = LINF + L2 + EITHER
        if name not in known:
            raise BenchError(f"torchattacks: unknown or unsupported class {name!r} (supported: {', '.join(known)})")
        _norm_of(name, norm)
        try:
            import torchattacks
        except ImportError:
            return
        params = inspect.signature(getattr(torchattacks, name).__init__).parameters
        unknown = sorted(set(options) - set(params) - {"model"} - set(OURS))
        if unknown:
            takes = [p for p in params if p not in ("self", "model")]
            raise BenchError(f"torchattacks: {name} does not take {', '.join(unknown)} (takes: {', '.join(takes)})")

    def config(self):
        return {**super().config(), "name": self.attack_name, "grad_mode": self.grad_mode, **self.options}

    def _run(self, task: AttackTask) -> AttackResult:
        ta = import_library(self.libraries[0], self.name)
        x = task.sources
        n = x.shape[0]
        grad_mode = "none" if task.defense is None else APGD.resolve_grad_mode(self, task)  # same rule as apgd
        classifier = VerificationClassifier(task.model, task.references, x, task.defense, grad_mode, self.goal,
                                            task.threshold, make_generator(task.seed, self.name, "defense"),
                                            self.norm).eval()
        cls = getattr(ta, self.attack_name)
        params = inspect.signature(cls.__init__).parameters
        kwargs = dict(self.options)
        if "eps" in params:
            kwargs["eps"] = self.eps
        if "norm" in params:
            kwargs["norm"] = self.norm
        if "seed" in params and "seed" not in kwargs:
            kwargs["seed"] = derive_seed(task.seed, self.name, "seed") % (2 ** 31)
        counter = QueryCounter(n, f"{self.name}:{self.attack_name}", self.progress)
        classifier.on_rows = counter
        try:
            with seeded_global_rng(task.seed, self.name, self.attack_name, device=x.device):
                attack = cls(classifier, **kwargs)
                attack.set_device(x.device)
                adv = attack(x, classifier.labels()).detach().to(x.dtype)
        finally:
            counter.close()
        classifier.on_rows = None
        outside = perturbation_norms(adv.double(), x.double(), self.norm) > self.eps + TOLERANCE
        if bool(outside.any()):
            if self.attack_name not in NO_BUDGET:
                raise BenchError(f"torchattacks: {self.attack_name} left the budget on {int(outside.sum())} "
                                 f"images (eps {self.eps}): does it take eps?")
            adv = project(adv, x, self.norm, self.eps)
        with torch.no_grad():
            objective = classifier.margin(adv)
        info = {"rng": RNG_NOTE, "library": f"torchattacks {ta.__version__}", "objective": objective.cpu(),
                "grad_mode": grad_mode, "projected": int(outside.sum())}
        return AttackResult(adversarial=adv, success=self.succeeded(objective).cpu(),
                            queries=counter.per_image.clone(), info=info)
