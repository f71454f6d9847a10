"""Attacks on a tiny random CNN face model: budgets, determinism, sanity flags, projections,
Square's query accounting, evaluation on fresh randomness. Fast (seconds)."""

import math

import pytest
import torch

from iwmf_bench import metrics, registry
from iwmf_bench.attacks.adaptive import Adaptive
from iwmf_bench.scoring import evaluate
from iwmf_bench.attacks.apgd import APGD, checkpoints, project
from iwmf_bench.attacks.base import (Attack, AttackResult, AttackTask, NonDeterministicAttack,
                                     blackbox_beats_whitebox, check_deterministic)
from iwmf_bench.attacks.budget import AttackBudgetError, check_budget, quantize_within_budget
from iwmf_bench.attacks.eot import APGDEOT
from iwmf_bench.attacks.square import Square, meta_pseudo_gaussian, p_selection
from iwmf_bench.data import quantize
from iwmf_bench.defenses.base import Defense, NoDefense
from iwmf_bench.defenses.iwmf import IWMF
from iwmf_bench.errors import BenchError
from iwmf_bench.models.base import FaceModel


class TinyFace(FaceModel):
    """A random CNN embedding (cosine); the threshold is set per test."""

    input_size = 24
    metric = "cosine"
    threshold = 0.5

    def __init__(self, threshold=0.5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, 2), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, 2), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(8 * 5 * 5, 16))
        for p in self.net.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
        self.threshold = threshold
        self.eval()

    def forward(self, x):
        return self.net(x - 0.5)


class ConstantFace(TinyFace):
    """Ignores its input: every gradient is zero."""

    def forward(self, x):
        return self.net(torch.zeros_like(x)) + 0 * x.sum()


class NoisyButClaimsDeterministic(Defense):
    """Random (from the generator) while declaring stochastic=False."""

    registered_name = "noisy"
    stochastic = False

    def _purify(self, x, generator):
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        return (x + 0.01 * noise).clamp(0, 1)


def images(n, size=28, seed=0, grid=True):
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return quantize(x) if grid else x


@pytest.fixture(scope="module")
def setup():
    """Four pairs; threshold between the clean and the reachable scores."""
    model = TinyFace()
    src, tgt = images(4, seed=1), images(4, seed=2)
    with torch.no_grad():
        refs = model.embed(tgt)
        clean = metrics.scores(model.embed(src), refs, "cosine")
    model.threshold = float(clean.max()) + 0.05
    return model, src, refs


def task(setup, **kw):
    model, src, refs = setup
    return AttackTask(model=model, sources=src, references=refs, **kw)


# -- budget checks -----------------------------------------------------------------------


class Broken(Attack):
    """Deliberately broken: returns whatever ``make`` builds."""

    registered_name = "broken"

    def __init__(self, make, **kw):
        super().__init__(**kw)
        self.make = make

    def _run(self, task):
        n = task.sources.shape[0]
        return AttackResult(self.make(task.sources), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.long))


@pytest.mark.parametrize("norm, make", [
    ("Linf", lambda x: (x + 0.05).clamp(0, 1)),                       # 0.05 > eps 0.03
    ("Linf", lambda x: torch.where(x > 0.99, x + 0.01, x)),           # leaves [0,1] within budget
    ("L2", lambda x: (x + 0.01 * torch.sign(0.5 - x)).clamp(0, 1)),   # L2 ~0.29 > eps 0.1
    ("Linf", lambda x: x[:-1]),                                       # wrong shape
    ("Linf", lambda x: x * float("nan")),
])
def test_budget_violations_are_caught_not_clipped(setup, norm, make):
    src = setup[1].clone()
    src[0, 0, 0, 0] = 1.0
    t = AttackTask(setup[0], src, setup[2])
    with pytest.raises(AttackBudgetError):
        Broken(make, norm=norm, eps=0.03 if norm == "Linf" else 0.1).run(t)


def test_budget_check_accepts_boundary_and_rounding(setup):
    src = setup[1]
    check_budget((src + 0.03).clamp(0, 1), src, "Linf", 0.03)
    delta = torch.randn(src.shape, generator=torch.Generator().manual_seed(0))
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 0.5
    adv = project(src + delta, src, "L2", 0.5)
    check_budget(adv, src, "L2", 0.5)
    r = Broken(lambda x: (x + 0.03).clamp(0, 1), eps=0.03).run(task(setup))
    assert r.info["quantized_8bit"] and torch.equal(quantize(r.adversarial), r.adversarial)
    assert float((r.adversarial - src).abs().max()) <= 7 / 255 + 1e-7  # floor(0.03 * 255) levels


# -- projections -------------------------------------------------------------------------


def test_linf_projection():
    x = images(3, grid=False)
    y = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    p = project(y, x, "Linf", 0.03)
    assert float((p - x).abs().max()) <= 0.03 + 1e-7 and p.min() >= 0 and p.max() <= 1
    inside = (y - x).abs() <= 0.03
    assert torch.equal(p[inside & (y >= 0) & (y <= 1)], y[inside & (y >= 0) & (y <= 1)])
    assert torch.allclose(project(p, x, "Linf", 0.03), p)


def test_l2_projection():
    x = torch.full((3, 3, 8, 8), 0.5)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) * 0.01
    d[0] *= 5  # image 0 outside the ball (norm ~0.4), still inside the box
    p = project(x + d, x, "L2", 0.2)
    norms = (p - x).flatten(1).norm(dim=1)
    assert torch.all(norms <= 0.2 + 1e-6)
    assert math.isclose(float(norms[0]), 0.2, rel_tol=1e-5)  # outside: lands on the sphere
    small = (d[1:]).flatten(1).norm(dim=1)
    assert torch.all(small < 0.2)
    assert torch.allclose(p[1:], x[1:] + d[1:])  # inside: unchanged
    assert torch.allclose(project(p, x, "L2", 0.2), p)
    # face-sized images: float32 rounding (a float32 norm over 67,500 pixels) must not
    # leave the result a hair outside the ball (this failed before the float64 refit)
    big = 0.45 + 0.1 * images(4, size=150, grid=False)
    d = torch.randn(big.shape, generator=torch.Generator().manual_seed(5)) * 0.01
    d[:, :, :75] *= 100
    for eps in (0.5, 2.0):
        check_budget(project(big + d, big, "L2", eps), big, "L2", eps)


def test_quantize_within_budget_stays_in_budget():
    x = images(4)
    for norm, eps in (("Linf", 0.03), ("L2", 0.3)):
        d = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        adv = project(x + d, x, norm, eps)
        q = quantize_within_budget(adv, x, norm, eps)
        assert torch.equal(quantize(q), q)
        check_budget(q, x, norm, eps)


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(40) == [9, 17, 23, 28, 32, 35, 38]


# -- attacks work ------------------------------------------------------------------------


@pytest.mark.parametrize("norm, eps", [("Linf", 0.03), ("L2", 0.5)])
def test_apgd_impersonates_and_keeps_best(setup, norm, eps):
    r = APGD(norm=norm, eps=eps, steps=15).run(task(setup))
    assert r.success.all(), r.info["objective"]
    assert r.info["objective"].min() > 0
    assert r.info["objective_trace"][-1] >= r.info["objective_trace"][0]
    ev = evaluate(setup[0], None, r.adversarial, setup[2], seed=0)
    assert ev.single_shot.k == 4 and ev.n_draws == 1
    assert torch.equal(r.queries, torch.full((4,), 16))
    assert not r.raised_flags()


def test_apgd_dodging_lowers_the_margin():
    model = TinyFace()
    src = images(3, seed=4)
    with torch.no_grad():
        refs = model.embed(src)  # genuine: accepted against itself
    model.threshold = 0.9
    r = APGD(eps=0.03, steps=10, goal="dodging").run(AttackTask(model, src, refs))
    with torch.no_grad():
        after = metrics.scores(model.embed(r.adversarial), refs, "cosine")
    assert r.success.all() and torch.all(after < 0.9)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_square_query_accounting(setup, norm):
    model, src, refs = setup
    impossible = TinyFace(threshold=1.5)  # cosine never reaches 1.5: every query is spent
    r = Square(norm=norm, queries=30).run(AttackTask(impossible, src, refs))
    assert torch.equal(r.queries, torch.full((4,), 30)) and not r.success.any()
    check_budget(r.adversarial, src, norm, r.info["config"]["eps"])
    trivial = TinyFace(threshold=-1.5)  # accepted at the initial point: one query when stopping on success
    r = Square(norm=norm, queries=30, stop_on_success=True).run(AttackTask(trivial, src, refs))
    assert torch.equal(r.queries, torch.ones(4, dtype=torch.long)) and r.success.all()
    r = Square(norm=norm, queries=31, eot_iter=2).run(AttackTask(impossible, src, refs, defense=IWMF(0.1)))
    assert torch.equal(r.queries, torch.full((4,), 30))  # 15 loss estimates of 2 draws each


def test_square_improves_objective(setup):
    model, src, refs = setup
    hard = TinyFace(threshold=1.5)
    r = Square(queries=100).run(AttackTask(hard, src, refs))
    with torch.no_grad():
        before = metrics.scores(hard.embed(src), refs, "cosine")
        after = metrics.scores(hard.embed(r.adversarial), refs, "cosine")
    assert torch.all(after > before)


def test_square_schedule_and_l2_block():
    assert p_selection(0.05, 0, 5000) == 0.05 and p_selection(0.05, 4999, 5000) == 0.05 / 512
    assert p_selection(0.8, 100, 1000) == 0.8 / 16  # iteration 1000 of 10,000 after rescaling
    assert p_selection(0.8, 101, 1000) == 0.8 / 32
    b = meta_pseudo_gaussian(7)
    assert math.isclose(float(b.norm()), 1.0, rel_tol=1e-9) and b[:3].sum() > 0 > b[3:].sum()


# -- determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: APGD(norm="Linf", steps=5), lambda: APGD(norm="L2", steps=5),
    lambda: Square(norm="Linf", queries=20), lambda: Square(norm="L2", queries=20),
])
def test_same_seed_same_images(setup, make):
    for defense in (None, IWMF(0.2)):
        attack = make()
        if defense is not None and isinstance(attack, APGD):
            attack = APGDEOT(steps=3, eot_iter=2)
        r = check_deterministic(attack, task(setup, defense=defense, seed=3))
        assert not r.flags["global_rng_used"]
    other = make().run(task(setup, seed=4)).adversarial
    assert not torch.equal(other, make().run(task(setup, seed=3)).adversarial)


def test_adaptive_is_deterministic_and_evaluates_on_fresh_draws(setup):
    r = check_deterministic(Adaptive(steps=3, eot_iter=2, grad_mode="bpda", n_draws=4),
                            task(setup, defense=IWMF(0.2), seed=1))
    ev = r.info["evaluation"]
    assert ev.n_draws == 4 and ev.accepted.shape == (4, 4) and ev.margin.shape == (4, 4)
    assert ev.worst_of_n.value >= ev.single_shot.value
    assert torch.equal(ev.accepted, ev.margin >= 0)
    with pytest.raises(BenchError):
        Adaptive().run(task(setup))  # nothing to adapt to


def test_global_rng_untouched(setup):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    Square(queries=10).run(task(setup, defense=IWMF(0.2)))
    APGDEOT(steps=2, eot_iter=2).run(task(setup, defense=IWMF(0.2)))
    assert torch.equal(state, torch.get_rng_state())


class NondeterministicAttack(APGD):
    def _run(self, task):
        r = super()._run(task)
        r.adversarial = project(r.adversarial + 1e-3 * torch.randn(r.adversarial.shape), task.sources,
                                self.norm, self.eps)
        return r


def test_nondeterminism_is_detected(setup):
    with pytest.raises(NonDeterministicAttack):
        check_deterministic(NondeterministicAttack(steps=1), task(setup))


# -- sanity flags --------------------------------------------------------------------------


def test_random_defense_without_eot_is_flagged(setup):
    assert APGD(steps=2).run(task(setup, defense=IWMF(0.2))).flags["randomness_without_eot"]
    assert not APGD(steps=2, eot_iter=2).run(task(setup, defense=IWMF(0.2))).flags["randomness_without_eot"]
    assert not APGD(steps=2).run(task(setup, defense=NoDefense())).flags["randomness_without_eot"]
    # declared deterministic but random: detected by purifying twice with different generators
    noisy = NoisyButClaimsDeterministic()
    assert APGD(steps=2).run(task(setup, defense=noisy)).flags["randomness_without_eot"]
    assert Square(queries=3).run(task(setup, defense=noisy)).flags["randomness_without_eot"]


def test_zero_gradients_are_flagged(setup):
    _, src, refs = setup
    r = APGD(steps=2).run(AttackTask(ConstantFace(), src, refs))
    assert r.flags["zero_gradients"] and r.info["zero_gradient_samples"] == 4
    assert not APGD(steps=2).run(task(setup)).flags["zero_gradients"]


def test_blackbox_beats_whitebox_helper():
    assert blackbox_beats_whitebox(metrics.Rate(5, 10), metrics.Rate(4, 10))
    assert not blackbox_beats_whitebox(metrics.Rate(4, 10), metrics.Rate(4, 10))


# -- contract ----------------------------------------------------------------------------


def test_registry_builds_attacks_with_budgets():
    for name, cls in (("apgd", APGD), ("square", Square), ("apgd-eot", APGDEOT), ("adaptive", Adaptive)):
        entry = registry.get("attacks", name)
        assert entry.factory is cls and entry.description and "\n" not in entry.description
    a = registry.create("attacks", "apgd", norm="Linf", eps=0.03, steps=40, eot_iter=1, grad_mode=None,
                        goal="impersonation")
    assert a.config() == {"attack": "apgd", "norm": "Linf", "eps": 0.03, "goal": "impersonation", "eot_iter": 1,
                          "steps": 40, "grad_mode": None}
    assert registry.create("attacks", "apgd", norm="L2").eps == 0.5
    assert registry.create("attacks", "square", norm="Linf", eps=0.03, queries=5000).queries == 5000
    assert registry.create("attacks", "apgd-eot").eot_iter == 20
    for bad in ({"norm": "L1"}, {"eps": -1}, {"steps": 0}, {"goal": "x"}, {"grad_mode": "none"}):
        with pytest.raises(BenchError):
            APGD(**bad)


def test_task_validation(setup):
    model, src, refs = setup
    with pytest.raises(BenchError):
        APGD(steps=1).run(AttackTask(model, src, refs[:2]))
    with pytest.raises(BenchError):
        APGD(steps=1).run(AttackTask(model, src * 2, refs))


def test_grad_mode_resolution(setup):
    class Bpda(NoDefense):
        grad_modes = ("none", "bpda")

    class Opaque(NoDefense):
        grad_modes = ("none",)

    assert APGD(steps=1).run(task(setup, defense=IWMF(0.1), seed=0)).info["grad_mode"] == "exact"
    assert APGD(steps=1).run(task(setup, defense=Bpda())).info["grad_mode"] == "bpda"
    with pytest.raises(BenchError):
        APGD(steps=1, grad_mode="exact").run(task(setup, defense=Bpda()))
    with pytest.raises(BenchError):
        APGD(steps=1).run(task(setup, defense=Opaque()))


def test_eot_over_a_deterministic_defense_costs_one_draw_per_step(setup):
    from iwmf_bench.defenses.median import Median

    single = APGD(steps=4, eot_iter=1).run(task(setup, defense=Median(3)))
    eot = APGD(steps=4, eot_iter=5).run(task(setup, defense=Median(3)))
    assert eot.queries.tolist() == [5] * len(eot.queries)  # steps + 1, not (steps + 1) * 5
    assert "deterministic" in eot.info["eot_note"] and "eot_note" not in single.info
    assert torch.allclose(eot.adversarial, single.adversarial, atol=1e-6)
    # A random defense keeps every draw.
    random = APGD(steps=4, eot_iter=5).run(task(setup, defense=IWMF(0.2)))
    assert random.queries.tolist() == [25] * len(random.queries) and "eot_note" not in random.info
