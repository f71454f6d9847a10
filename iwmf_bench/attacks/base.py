"""The attack contract, shared machinery, and the checks applied to every result.

An attack is a small object built from keyword arguments with explicit budgets
(torchattacks style, e.g. ``APGD(norm="Linf", eps=0.03, steps=40)``). It declares a
``registered_name``, a one-line docstring, :meth:`Attack.config`, and
:meth:`Attack.run` mapping an :class:`AttackTask` to an :class:`AttackResult`.

Threat model. ``task.defense`` is the system *as the attacker sees it*: an attack
queries (black-box) or differentiates (white-box) ``model.embed(defense.purify(x))``.
The paper's setting, where the adversarial images are crafted on the undefended model
and purified only at test time ("transfer"), is a task with ``defense=None`` followed
by :func:`iwmf_bench.scoring.evaluate` with the defense.

Objective. Attacks maximize the goal-signed verification margin
(:func:`iwmf_bench.metrics.margin`): ``margin`` for impersonation (source ``i`` must be
accepted as reference ``i``), ``-margin`` for dodging (genuine image ``i`` must be
rejected against its own identity's reference ``i``). The objective keeps improving past
the threshold, so a successful sample is pushed deeper into the accept region; a sample
counts as successful once its objective says accepted (impersonation) or rejected
(dodging).

Randomness. Every random number comes from a ``torch.Generator`` seeded from
``task.seed`` and a stream name (:func:`make_generator`); the global RNG is never used,
so a run is reproducible from its seed (checked: a change of the global RNG state during
an attack raises the ``global_rng_used`` flag).

Checks applied to every result (:meth:`Attack.run`): the raw output must lie in [0,1]
and within the budget (Linf: ``max|adv - src| <= eps + 1e-6``; L2: per-image
``||adv - src||_2 <= eps + 1e-6``), otherwise :class:`AttackBudgetError` is raised (a
bug, never clipped away). Then the output is rounded to the 8-bit grid *inside* the budget
around the sources, on the grid or not (an aligned probe is not: what a real attacker
submits is a PNG within its budget; :func:`~iwmf_bench.attacks.budget.quantize_within_budget`)
and checked again (the budget's arithmetic: :mod:`iwmf_bench.attacks.budget`). Sanity flags in the spirit of
AutoAttack's: ``zero_gradients`` (a white-box attack saw an identically zero gradient),
``randomness_without_eot`` (the defense in the loop is random, but the attack averages
over no more than one draw per step), ``global_rng_used``. Determinism for a seed is a
property of every attack here; :func:`check_deterministic` verifies it (tests run it on
each attack). :func:`blackbox_beats_whitebox` flags a score-based black-box attack doing
better than the white-box one on the same setting (the white-box attack is then broken
or the gradient obfuscated).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from .. import metrics
from ..defenses.base import Defense, check_images
from ..errors import BenchError
from .budget import TOLERANCE as TOLERANCE  # the stages' tolerance of a budget (they import this module only)
from .budget import check_budget, perturbation_norms, quantize_within_budget

NORMS = ("Linf", "L2")
GOALS = ("impersonation", "dodging")
DEFAULT_EPS = {"Linf": 0.03, "L2": 0.5}


class NonDeterministicAttack(RuntimeError):
    """Two runs of an attack with the same seed gave different images (a bug)."""


def derive_seed(seed: int, *stream: Any) -> int:
    """A 63-bit seed for the named random stream of a task seed (stable across runs)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(stream)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, *stream: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` for one stream of a task seed (never the global RNG)."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *stream))


@dataclass
class AttackTask:
    """What to attack.

    ``sources``: (N,3,H,W) images in [0,1]. ``references``: (N,D) embeddings, the
    target identity's for impersonation, the true identity's for dodging.
    ``defense``: the purifier in front of the model as the attacker sees it (None: the
    undefended model; see the module docstring). ``threshold``: overrides the model's.
    ``reference_images``: (N,3,H,W) images of the references' identities where the harness
    has them (impersonation: the targets), for attacks that start from an image the system
    accepts (decision-based ones); None otherwise.
    """

    model: torch.nn.Module
    sources: torch.Tensor
    references: torch.Tensor
    defense: Defense | None = None
    seed: int = 0
    threshold: float | None = None
    reference_images: torch.Tensor | None = None

    def validate(self) -> None:
        check_images(self.sources, "attack sources")
        for attr in ("metric", "threshold", "embed"):
            if not hasattr(self.model, attr):
                raise BenchError(f"attack task: model {type(self.model).__name__} lacks {attr!r} "
                                 "(expected an iwmf_bench FaceModel)")
        if self.model.metric not in metrics.METRICS:
            raise BenchError(f"attack task: model metric must be one of {metrics.METRICS}, got {self.model.metric!r}")
        if not isinstance(self.references, torch.Tensor) or self.references.dim() != 2 \
                or self.references.shape[0] != self.sources.shape[0]:
            shape = tuple(self.references.shape) if isinstance(self.references, torch.Tensor) else type(self.references)
            raise BenchError(f"attack task: references must be ({self.sources.shape[0]}, D) embeddings, "
                             f"one per source, got {shape}")
        if self.defense is not None and not isinstance(self.defense, Defense):
            raise BenchError(f"attack task: defense must be an iwmf_bench Defense or None, "
                             f"got {type(self.defense).__name__}")
        if int(self.seed) != self.seed:
            raise BenchError(f"attack task: seed must be an integer, got {self.seed!r}")

    @property
    def decision_threshold(self) -> float:
        return float(self.model.threshold if self.threshold is None else self.threshold)


@dataclass
class AttackResult:
    """Adversarial images (same shape as the sources) and how the attack went.

    ``success``: per sample, as judged during the attack (on the attack's own draws of
    the defense's randomness; final numbers come from ``scoring.evaluate``).
    ``queries``: per sample, forward passes of the attacked system (purify + model) used.
    ``flags``: sanity flags (True = suspicious), see the module docstring.
    ``info``: the attack's account; its JSON scalars become the cell's notes, and
    ``info["per_pair"]`` (names to lists of one plain JSON value per sample, e.g. the
    distance a decision-based attack reached) is kept in the cell's per-pair record.
    """

    adversarial: torch.Tensor
    success: torch.Tensor
    queries: torch.Tensor
    flags: dict[str, bool] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def success_rate(self) -> metrics.Rate:
        return metrics.Rate(int(self.success.sum()), int(self.success.numel()))

    def raised_flags(self) -> list[str]:
        return [name for name, value in self.flags.items() if value]


def is_random(defense: Defense | None, x: torch.Tensor, seed: int) -> bool:
    """Does the defense's output depend on randomness? No defense: no; one that declares
    itself ``stochastic``: yes; else purify ``x[:2]`` with two generators and compare. The one
    test every stage and attack applies (attacks' EOT, the scorer's draws, known randomness)."""
    if defense is None:
        return False
    if defense.stochastic:
        return True
    x = x[:2]
    with torch.no_grad():
        a = defense.purify(x, make_generator(seed, "sanity", 0))
        b = defense.purify(x, make_generator(seed, "sanity", 1))
    return not torch.equal(a, b)


def blackbox_beats_whitebox(black_box: metrics.Rate, white_box: metrics.Rate) -> bool:
    """AutoAttack's sanity check: a score-based black-box attack (Square) reaching a higher
    success rate than the white-box one (APGD) on the same setting means the white-box
    attack is broken or the defense obfuscates gradients. True = suspicious."""
    return black_box.value > white_box.value


def check_deterministic(attack: "Attack", task: AttackTask) -> AttackResult:
    """Run ``attack`` twice on ``task``; raise :class:`NonDeterministicAttack` unless the
    images, success and query counts are identical. Returns the first result."""
    first, second = attack.run(task), attack.run(task)
    if not (torch.equal(first.adversarial, second.adversarial) and torch.equal(first.success, second.success)
            and torch.equal(first.queries, second.queries)):
        diff = float((first.adversarial - second.adversarial).abs().max())
        raise NonDeterministicAttack(f"{attack.name}: two runs with seed {task.seed} differ (max |diff| {diff:.3g})")
    return first


def _installed(module: str) -> bool:
    """Whether ``import module`` can find it (a ``None`` in ``sys.modules`` blocks it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class Attack:
    """Base class of attacks (see the module docstring for the contract)."""

    registered_name: ClassVar[str] = ""
    #: Whether the attack differentiates through the system (white-box).
    uses_gradients: ClassVar[bool] = False
    #: Round outputs to the 8-bit grid inside the budget (what is submitted, and scored).
    quantize_output: ClassVar[bool] = True
    #: Show a progress bar over the iterations (``iwmf-bench attack`` turns it on).
    progress: bool = False
    #: Optional libraries the attack imports when it runs (an optional extra); without them
    #: its cells are skipped, which the harness predicts before running anything.
    libraries: ClassVar[tuple[str, ...]] = ()
    #: EOT attacks evaluate all draws of a step in one ``purify_draws`` call (what a GPU
    #: wants); False: one ``purify`` call per draw, the loop it replaced. Both give the same
    #: images bit for bit (tests/test_batched_eot.py); not part of :meth:`config`.
    batched_eot: bool = True
    #: At most this many draws per ``purify_draws`` call (None: all of a step's): bounds the
    #: memory of exact gradients through big purifiers without changing any result.
    draws_per_call: int | None = None

    def __init__(self, norm: str = "Linf", eps: float | None = None, goal: str = "impersonation",
                 eot_iter: int = 1):
        if norm not in NORMS:
            raise BenchError(f"{self.name}: norm must be one of {NORMS}, got {norm!r}")
        if goal not in GOALS:
            raise BenchError(f"{self.name}: goal must be one of {GOALS}, got {goal!r}")
        eps = DEFAULT_EPS[norm] if eps is None else float(eps)
        if not eps > 0:
            raise BenchError(f"{self.name}: eps must be > 0, got {eps}")
        if int(eot_iter) != eot_iter or eot_iter < 1:
            raise BenchError(f"{self.name}: eot_iter must be a positive integer, got {eot_iter}")
        self.norm, self.eps, self.goal, self.eot_iter = norm, eps, goal, int(eot_iter)

    @property
    def name(self) -> str:
        return self.registered_name or type(self).__name__.lower()

    def missing_libraries(self) -> list[str]:
        """Those of :attr:`libraries` that are not installed here (nothing is imported)."""
        return [m for m in self.libraries if not _installed(m)]

    def config(self) -> dict[str, Any]:
        """Parameters that identify this attack in results."""
        return {"attack": self.name, "norm": self.norm, "eps": self.eps, "goal": self.goal,
                "eot_iter": self.eot_iter}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "attack")
        return f"{type(self).__name__}({args})"

    def not_applicable(self, random_defense: bool) -> str | None:
        """Why this attack, as configured, means nothing against a system whose defense is
        random (``random_defense``) or deterministic, or None when it applies. The harness
        asks before crafting and marks the cell ``n/a`` with the reason (e.g. repeated
        queries against a deterministic system)."""
        return None

    def threshold_dependence(self) -> str | None:
        """Why the images this attack crafts depend on the acceptance threshold, or None when
        they do not. The objective is the margin ``score - threshold`` (or its negative):
        a shift of the threshold leaves its gradient and the order of its values unchanged,
        so an attack that only follows the gradient and keeps the best iterate crafts the
        same images at any threshold, and its cell can be re-scored at another one
        (:mod:`iwmf_bench.operating_points`). An attack that stops, weighs or searches on
        success (early stopping, selective EOT's unbroken draws, a bisection) or feeds the
        margin through a non-linear loss crafts other images at another threshold; its
        re-scored rate is then only what images crafted for the model's own threshold reach."""
        return None

    # -- the objective -----------------------------------------------------------------
    def objective(self, task: AttackTask, x: torch.Tensor, generator: torch.Generator | None = None,
                  grad_mode: str = "none") -> torch.Tensor:
        """Goal-signed margin per sample (higher is better for the attacker) of one
        forward pass through ``task.defense`` (if any) and the model."""
        z = x if task.defense is None else task.defense.purify(x, generator, grad_mode)
        return self.purified_objective(task, z)

    def purified_objective(self, task: AttackTask, z: torch.Tensor) -> torch.Tensor:
        """Goal-signed margin per sample of images ``z`` already through the defense
        (row ``i`` against reference ``i``)."""
        emb = task.model.embed(z)
        m = metrics.margin(metrics.scores(emb, task.references, task.model.metric),
                           task.decision_threshold, task.model.metric)
        return m if self.goal == "impersonation" else -m

    def objective_draws(self, task: AttackTask, xs: torch.Tensor, generator: torch.Generator | None,
                        grad_mode: str, draws: int) -> torch.Tensor:
        """The objective of ``draws`` draws of the defense's randomness at once: ``xs`` is
        ``draws`` copies of the N images stacked draw-major, the result ``(draws * N,)``.

        All draws go through one :meth:`Defense.purify_draws` call (the same randomness as
        ``draws`` consecutive :meth:`objective` calls); the model then sees each draw as
        its own batch of N, on a fresh buffer, as in those calls: a convolution may pick
        another algorithm, and round differently, for another batch size or alignment, and
        the values and gradients must stay those of the loop bit for bit (the committed
        leaderboards were computed with it).
        """
        z = xs if task.defense is None else task.defense.purify_draws(xs, generator, draws, grad_mode)
        n = z.shape[0] // draws
        return torch.cat([self.purified_objective(task, chunk.clone()) for chunk in z.split(n)])

    def draw_groups(self, draws: int) -> list[int]:
        """How many draws each :meth:`objective_draws` call of a step takes: all of them, or
        groups of at most :attr:`draws_per_call`, in draw order."""
        per_call = draws if self.draws_per_call is None else max(1, min(draws, int(self.draws_per_call)))
        return [min(per_call, draws - first) for first in range(0, draws, per_call)]

    def succeeded(self, objective: torch.Tensor) -> torch.Tensor:
        """Impersonation: accepted (margin >= 0); dodging: rejected (margin < 0)."""
        return objective >= 0 if self.goal == "impersonation" else objective > 0

    # -- running -------------------------------------------------------------------------
    def iterations(self, n: int, unit: str):
        """``range(n)``, with a progress bar when :attr:`progress` is set."""
        return tqdm(range(n), desc=self.name, unit=unit, leave=False, disable=not self.progress)

    def _run(self, task: AttackTask) -> AttackResult:
        raise NotImplementedError

    def run(self, task: AttackTask) -> AttackResult:
        """Attack ``task``; the returned images are checked (budget, range) and flagged."""
        task.validate()
        task = AttackTask(task.model, task.sources.detach(),
                          task.references.detach().to(task.sources.device), task.defense,
                          int(task.seed), task.threshold, task.reference_images)
        rng_before = torch.get_rng_state()
        flags: dict[str, bool] = {}
        if task.defense is not None:
            random_defense = is_random(task.defense, task.sources, task.seed)
            flags["randomness_without_eot"] = random_defense and self.eot_iter <= 1
        result = self._run(task)
        check_budget(result.adversarial, task.sources, self.norm, self.eps, self.name)
        adv = result.adversarial.detach()
        quantized = self.quantize_output
        if quantized:
            adv = quantize_within_budget(adv, task.sources, self.norm, self.eps)
            check_budget(adv, task.sources, self.norm, self.eps, f"{self.name} (8-bit output)")
        result.adversarial = adv
        result.flags = {"zero_gradients": False, **flags, **result.flags,
                        "global_rng_used": not torch.equal(rng_before, torch.get_rng_state())}
        result.info = {"config": self.config(), "quantized_8bit": quantized,
                       "perturbation": perturbation_norms(adv, task.sources, self.norm).cpu(), **result.info}
        return result
