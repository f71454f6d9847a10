"""Acceptance of the `min-eps` attack (issue 20, item 4): each pair's minimal budget.

On dlib-resnet with the first ``PAIRS`` shared pairs, aligned as the harness aligns them
(:func:`folder_pairs`), source ``i`` impersonating target ``i``. Small budgets to stay
within a few CPU minutes: ``STEPS`` APGD iterations per search round, ``SEARCH_STEPS``
rounds after the one at ``eps_max`` (the search stops early once every pair has its
bracket: the closest pair here, already near the threshold, needs about ten).
"""

import math

import pytest
import torch

from iwmf_bench import load_model, registry
from iwmf_bench.scoring import evaluate
from iwmf_bench.attacks.apgd import APGD, project
from iwmf_bench.attacks.base import AttackTask
from iwmf_bench.attacks.budget import perturbation_norms
from iwmf_bench.attacks.base import make_generator
from iwmf_bench.attacks.min_eps import MinEps, budget_curve
from iwmf_bench.metrics import median_interval
from iwmf_bench.defenses.gaussian_noise import GaussianNoise
from iwmf_bench.errors import BenchError
from iwmf_bench.pipeline.folder_pairs import folder_pairs

PAIRS = 4
STEPS = 10
SEARCH_STEPS = 10
EPS_MAX = 0.03
SEED = 0


@pytest.fixture(scope="module")
def pairs(shared_imgs):
    aligned = folder_pairs(str((shared_imgs / "source").resolve()), str((shared_imgs / "target").resolve()),
                           True, PAIRS, "dlib-resnet", 150)
    model = load_model("dlib-resnet").eval()
    with torch.no_grad():
        refs = model.embed(aligned.targets)
    return model, aligned.sources, refs


@pytest.fixture(scope="module")
def searched(pairs):
    model, src, refs = pairs
    attack = MinEps(norm="Linf", eps=EPS_MAX, steps=STEPS, search_steps=SEARCH_STEPS)
    result = attack.run(AttackTask(model, src, refs, seed=SEED))
    print(f"\nmin_eps {result.info['min_eps']}\nfailed_eps {result.info['failed_eps']}\n"
          f"queries {result.queries.tolist()}")
    return result


def test_registered_with_its_options():
    attack = registry.create("attacks", "min-eps", norm="L2", eps=2.0, steps=5, search_steps=4, rel_tol=0.05)
    assert isinstance(attack, MinEps) and attack.name == "min-eps"
    assert attack.config() == {"attack": "min-eps", "norm": "L2", "eps": 2.0, "goal": "impersonation",
                               "eot_iter": 1, "steps": 5, "grad_mode": None, "search_steps": 4, "rel_tol": 0.05}
    for bad in ({"search_steps": -1}, {"search_steps": 1.5}, {"rel_tol": 0}, {"rel_tol": 1.0}, {"steps": 0},
                {"grad_mode": "magic"}):
        with pytest.raises(BenchError):
            MinEps(**bad)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_per_sample_projection(norm):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 8, 8, generator=gen)
    far = torch.rand(3, 3, 8, 8, generator=gen)
    eps = torch.tensor([0.01, 0.1, 0.5], dtype=torch.float64) * (1 if norm == "Linf" else 10)
    out = project(far, x, norm, eps)
    assert (perturbation_norms(out.double(), x.double(), norm) <= eps + 1e-6).all()
    assert out.min() >= 0 and out.max() <= 1
    for i in range(3):  # one budget per image: what apgd.project does with that budget
        assert torch.equal(out[i:i + 1], project(far[i:i + 1], x[i:i + 1], norm, float(eps[i])))


def test_apgd_descends_at_one_budget_per_image(pairs):
    """The search's inner attack, APGD's descent, with a budget per image: each image stays
    in its own ball, the larger budget gets the higher objective, and at equal budgets it
    is ``APGD.run`` (its images, objectives and queries)."""
    model, src, refs = pairs
    task = AttackTask(model, src[:2], refs[:2], seed=SEED)
    apgd = APGD(eps=EPS_MAX, steps=3)

    def descend(budgets):
        eps = torch.tensor(budgets, dtype=torch.float64)
        return apgd.descend(task, eps, None, make_generator(SEED, apgd.name, "defense"),
                            make_generator(SEED, apgd.name, "init"), "none", 1), eps

    mixed, eps = descend([0.002, EPS_MAX])
    assert (perturbation_norms(mixed.adversarial.double(), src[:2].double(), "Linf") <= eps + 1e-6).all()
    small, _ = descend([0.002, 0.002])
    large, _ = descend([EPS_MAX, EPS_MAX])
    assert mixed.objective[1] > small.objective[1] and large.objective[0] > mixed.objective[0]
    run = apgd.run(task)
    assert torch.equal(run.info["objective"], large.objective.cpu())
    assert run.queries.tolist() == [large.queries] * 2


def test_reported_budget_succeeds_and_0_9x_failed(pairs, searched):
    """For every pair: the image at its minimal budget lies within it and succeeds as the
    harness scores it; the search recorded a failure in [0.9x, 1x) of that budget."""
    model, src, refs = pairs
    info = searched.info
    sizes = perturbation_norms(searched.adversarial.double(), src.double(), "Linf")
    for i in range(PAIRS):
        min_eps, failed = info["min_eps"][i], info["failed_eps"][i]
        assert math.isfinite(min_eps), f"pair {i} unbroken at Linf {EPS_MAX}"
        assert info["converged"][i]
        assert float(sizes[i]) <= min_eps + 1e-6
        assert evaluate(model, None, searched.adversarial[i:i + 1], refs[i:i + 1], SEED).single_shot.k == 1
        assert 0.9 * min_eps <= failed < min_eps or min_eps == failed == 0
        assert (failed, False) in info["search"][i] or min_eps == 0
        assert any(ok and e >= min_eps for e, ok in info["search"][i])
        assert info["search"][i][0][0] == 0.0 and info["search"][i][1] == (EPS_MAX, True)


def test_undefended_linf_breaks_every_pair(searched):
    assert searched.success.all()
    assert all(0 <= e <= EPS_MAX for e in searched.info["min_eps"])
    assert not searched.raised_flags()
    assert (searched.queries > 0).all()


def test_budget_curve_agrees_with_apgd_at_half_budget(pairs, searched):
    """The fraction of pairs with min_eps <= e is the FAR of a plain APGD run at e, within
    the Wilson intervals (e = eps_max / 2)."""
    model, src, refs = pairs
    e = EPS_MAX / 2
    (curve,) = budget_curve(searched.info["min_eps"], [e])
    plain = APGD(norm="Linf", eps=e, steps=STEPS).run(AttackTask(model, src, refs, seed=SEED))
    far = evaluate(model, None, plain.adversarial, refs, SEED).single_shot
    print(f"\nmin_eps <= {e}: {curve}; APGD at {e}: {far}")
    (lo_a, hi_a), (lo_b, hi_b) = curve.interval, far.interval
    assert lo_a <= hi_b and lo_b <= hi_a
    assert curve.value <= budget_curve(searched.info["min_eps"], [EPS_MAX])[0].value


def test_deterministic_through_a_random_defense(pairs):
    """Same seed, same everything, with a stochastic defense in the loop (EOT, judged on
    the defense's draws)."""
    model, src, refs = pairs
    task = AttackTask(model, src[:2], refs[:2], defense=GaussianNoise(sigma=0.02), seed=SEED)
    attack = MinEps(norm="L2", eps=2.0, steps=2, eot_iter=2, search_steps=1, grad_mode="exact")
    first, second = attack.run(task), attack.run(task)
    assert torch.equal(first.adversarial, second.adversarial) and torch.equal(first.success, second.success)
    assert torch.equal(first.queries, second.queries)
    for key in ("min_eps", "failed_eps", "search", "converged"):
        assert first.info[key] == second.info[key]
    sizes = perturbation_norms(first.adversarial.double(), src[:2].double(), "L2")
    for i in range(2):
        min_eps = first.info["min_eps"][i]
        assert float(sizes[i]) <= (min_eps if math.isfinite(min_eps) else 0) + 1e-6
        assert len(first.info["search"][i]) <= 2 + 1
    assert first.flags["randomness_without_eot"] is False and first.flags["global_rng_used"] is False


def test_median_interval_and_curve():
    assert median_interval([0.01, 0.02, 0.03, math.inf])[0] == 0.025
    assert median_interval([0.01, math.inf, math.inf]) == (math.inf, 0.0, math.inf)  # n = 3: no 95% interval
    values = [i / 100 for i in range(1, 21)]
    median, lo, hi = median_interval(values)
    assert median == pytest.approx(0.105) and (lo, hi) == (0.06, 0.15)  # ranks 6 and 15 of 20
    rates = budget_curve([0.0, 0.01, 0.02, math.inf], [0.0, 0.01, 0.015, 1.0])
    assert [(r.k, r.n) for r in rates] == [(1, 4), (2, 4), (2, 4), (3, 4)]
