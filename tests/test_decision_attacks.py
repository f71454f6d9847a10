"""Decision-based attacks (HopSkipJump, Evolutionary) and their accept/reject oracle.

The toy system has a decision boundary known in closed form: the "embedding" is the
flattened 3x8x8 image (W = I), the metric euclidean, so an image is accepted as reference
``c`` iff ``||x - c|| <= t``: a ball. The smallest L2 distance from a source ``x0`` to the
accept region is ``||x0 - c|| - t`` (reached on the segment to ``c``, inside the [0,1] box),
and the boundary's normal at ``x`` points along ``x - c``. Fast (seconds).
"""

import math

import pytest
import torch

from iwmf_bench.attacks.base import AttackTask, check_deterministic
from iwmf_bench.attacks.decision import DecisionAttack, DecisionTask, binary_search
from iwmf_bench.attacks.oracle import DecisionOracle, QueryBudgetExceeded
from iwmf_bench.attacks.evolutionary import Evolutionary
from iwmf_bench.attacks.hopskipjump import HopSkipJump, estimate_direction
from iwmf_bench.defenses.gaussian_noise import GaussianNoise
from iwmf_bench.models.base import FaceModel

RADIUS = 4.3


class Ball(FaceModel):
    """Accepts ``x`` as reference ``c`` iff ``||x - c|| <= threshold``; counts the images it embeds."""

    input_size = 8
    metric = "euclidean"
    threshold = RADIUS

    def __init__(self, threshold=RADIUS):
        super().__init__()
        self.threshold = threshold
        self.embedded = 0

    def forward(self, x):
        self.embedded += x.shape[0]
        return x.flatten(1)


def toy(n=3, seed=0):
    """Sources (binary-ish images far from grey), ball centres near grey, the model."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.5 + 0.1 * (torch.rand(n, 3, 8, 8, generator=g) - 0.5)
    sources = torch.where(torch.rand(n, 3, 8, 8, generator=g) > 0.5, 242 / 255, 13 / 255)  # on the 8-bit grid
    return Ball(), sources, centres


def true_distance(sources, centres, threshold=RADIUS):
    return ((sources - centres).flatten(1).norm(dim=1) - threshold).clamp_min(0).double()


def toy_task(n=3, seed=0, **kw):
    model, src, centres = toy(n, seed)
    return AttackTask(model, src, centres.flatten(1), **kw), centres


def non_increasing(trajectory):
    return all(b[1] <= a[1] + 1e-12 and b[0] >= a[0] for a, b in zip(trajectory, trajectory[1:]))


class DecisionsOnly:
    """An oracle that can only be called and asked for its query counters: any other
    attribute access raises (what the algorithm code may see of the system)."""

    _allowed = ("queries", "decisions_left")

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)

    def __call__(self, x, rows=None):
        return object.__getattribute__(self, "_inner")(x, rows)

    def __getattribute__(self, name):
        if name in DecisionsOnly._allowed:
            return getattr(object.__getattribute__(self, "_inner"), name)
        raise AssertionError(f"the algorithm touched oracle.{name}")


# -- HopSkipJump on the ball ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hsj_l2():
    task, centres = toy_task()
    attack = HopSkipJump(norm="L2", eps=3.0, max_queries=3000)
    return attack, task, centres, attack.run(task)


def test_hopskipjump_l2_reaches_the_minimal_distance(hsj_l2):
    attack, task, centres, result = hsj_l2
    truth = true_distance(task.sources, centres)
    reached = result.info["distance"]
    print(f"\nHSJ L2 3000 queries: reached {reached.tolist()} true {truth.tolist()}")
    assert (reached >= truth * (1 - 1e-6)).all()  # no point closer than the truth was accepted
    assert (reached <= 1.10 * truth).all()
    for tr in result.info["trajectory"]:
        assert len(tr) >= 5 and non_increasing(tr)
        assert tr[-1][1] < 0.85 * tr[0][1]
    assert torch.equal(result.queries, torch.full((3,), 3000))
    assert result.success.all() and not result.info["projected"].any()
    assert result.info["start"] == ["noise"] * 3
    assert not result.raised_flags()
    assert attack.threshold_dependence() and "boundary" in attack.threshold_dependence()
    assert result.info["config"]["max_queries"] == 3000 and result.info["repeats"] == 1


def true_linf_distance(sources, centres, threshold=RADIUS):
    """The smallest Linf radius ``a`` whose box around the source meets the ball: moving
    every pixel ``a`` towards the centre, ``sum max(|x0 - c| - a, 0)^2 = t^2`` (bisection)."""
    gap = (sources - centres).abs().flatten(1).double()
    lo, hi = torch.zeros(gap.shape[0], dtype=torch.float64), torch.ones(gap.shape[0], dtype=torch.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        inside = ((gap - mid.view(-1, 1)).clamp_min(0) ** 2).sum(dim=1).sqrt() <= threshold
        hi, lo = torch.where(inside, mid, hi), torch.where(inside, lo, mid)
    return hi


def test_hopskipjump_linf_approaches_the_minimal_distance():
    task, centres = toy_task(n=2)
    result = HopSkipJump(norm="Linf", eps=0.5, max_queries=4000).run(task)
    truth = true_linf_distance(task.sources, centres)
    print(f"\nHSJ Linf 4000 queries: reached {result.info['distance'].tolist()} true {truth.tolist()}")
    for i, tr in enumerate(result.info["trajectory"]):
        assert non_increasing(tr) and tr[-1][1] < 0.95 * tr[0][1]
        assert float(truth[i]) * (1 - 1e-6) <= tr[-1][1] <= 1.10 * float(truth[i])
    assert torch.equal(result.queries, torch.full((2,), 4000))


def test_direction_estimate_points_into_the_accept_region():
    task, centres = toy_task(n=1)
    x0, c = task.sources[0], centres[0]
    outward = (x0 - c) / (x0 - c).norm()
    oracle = DecisionOracle(task)
    gen = torch.Generator().manual_seed(5)
    for norm, radius in (("L2", RADIUS), ("L2", RADIUS - 1e-4), ("Linf", RADIUS)):
        boundary = c + radius * outward  # the closest accepted point (on or just inside the ball)
        g = estimate_direction(oracle, boundary, 0.05, 200, norm, gen)
        cosine = float((g.flatten() @ -outward.flatten()) / g.norm())
        print(f"\n{norm} r={radius}: cosine with the true normal {cosine:.3f}")
        assert abs(float(g.norm()) - 1) < 1e-5
        assert cosine > 0.3
    assert int(oracle.queries[0]) == 600


def test_algorithm_sees_only_decisions():
    """The algorithm runs on an oracle that raises on anything but a call and the counters,
    and the model embeds exactly the images the oracle counted (nothing else touched it)."""
    task, centres = toy_task(n=2)
    for attack in (HopSkipJump(norm="L2", eps=3.0, max_queries=400), Evolutionary(eps=3.0, max_queries=300,
                                                                               low_res=4)):
        oracle = DecisionOracle(task, max_queries=attack.max_queries)
        starts = centres.clone()  # the centres are accepted (the targets' own images)
        found = attack.attack(DecisionsOnly(oracle), task.sources, starts, torch.Generator().manual_seed(0))
        dist = (found.adversarial - centres).flatten(1).norm(dim=1)
        assert (dist <= RADIUS + 1e-5).all()  # what it returns is really accepted
        assert (found.distance < (task.sources - starts).flatten(1).norm(dim=1).double()).all()
        assert (oracle.queries <= attack.max_queries).all() and int(oracle.queries.min()) > 0

        model = Ball()
        counted = AttackTask(model, task.sources, task.references, seed=1)
        result = attack.run(counted, starts=starts)
        assert model.embedded == int(result.queries.sum())
        assert result.info["start"] == ["given"] * 2


# -- queries and repeats ----------------------------------------------------------------------


def test_query_counts_are_exact_with_repeats():
    task, _ = toy_task(n=2)
    one = HopSkipJump(eps=3.0, max_queries=700).run(task)
    three = HopSkipJump(eps=3.0, max_queries=2100, repeats=3).run(task)
    assert torch.equal(three.queries, 3 * one.queries)
    assert torch.equal(three.info["decisions"], one.info["decisions"])
    assert torch.equal(one.queries, one.info["decisions"])
    assert torch.equal(three.adversarial, one.adversarial)
    assert three.info["repeats"] == 3 and three.info["config"]["repeats"] == 3
    # sequential majority: without randomness the first two answers agree, so 2 per decision
    # (a fixed number of iterations: the budget plans for the worst case of 3 per decision)
    runs = [HopSkipJump(eps=3.0, max_queries=10 ** 6, steps=4, repeats=r, sequential=seq).run(task)
            for r, seq in ((1, False), (3, True))]
    assert torch.equal(runs[1].queries, 2 * runs[1].info["decisions"])
    assert torch.equal(runs[1].info["decisions"], runs[0].queries)
    assert torch.equal(runs[1].adversarial, runs[0].adversarial)


@pytest.mark.parametrize("attack", [
    HopSkipJump(eps=3.0, max_queries=137), HopSkipJump(eps=3.0, max_queries=100, repeats=3),
    HopSkipJump(norm="Linf", eps=0.2, max_queries=91, repeats=5, sequential=True),
    Evolutionary(eps=3.0, max_queries=137, low_res=4), Evolutionary(eps=3.0, max_queries=100, repeats=3, low_res=4),
])
def test_query_cap_is_never_exceeded(attack):
    task, _ = toy_task(n=2, seed=3)
    result = attack.run(task)
    cap = attack.max_queries
    assert (result.queries <= cap).all()
    # the budget is spent up to the last whole decision
    assert (result.queries > cap - attack.repeats).all()
    assert all(q <= cap for tr in result.info["trajectory"] for q, _ in tr)


def test_oracle_refuses_over_budget():
    task, centres = toy_task(n=2)
    oracle = DecisionOracle(task, repeats=3, max_queries=10)
    assert oracle(centres).tolist() == [True, True] and oracle.queries.tolist() == [3, 3]
    oracle(torch.cat([centres[:1], task.sources[:1]]), torch.tensor([0, 0]))
    assert oracle.queries.tolist() == [9, 3] and oracle.decisions_left().tolist() == [0, 2]
    with pytest.raises(QueryBudgetExceeded):
        oracle(centres)
    assert oracle.queries.tolist() == [9, 3]  # nothing submitted
    assert oracle(task.sources[1:], torch.tensor([1])).tolist() == [False]


def test_seed_determines_the_run():
    task, _ = toy_task(n=2)
    for attack in (HopSkipJump(eps=3.0, max_queries=300), Evolutionary(eps=3.0, max_queries=200, low_res=4)):
        first = check_deterministic(attack, task)
        other = attack.run(AttackTask(task.model, task.sources, task.references, seed=1))
        assert not torch.equal(first.adversarial, other.adversarial)
        assert not first.flags["global_rng_used"]


# -- evolutionary ---------------------------------------------------------------------------


def test_evolutionary_reduces_the_distance():
    task, centres = toy_task()
    attack = Evolutionary(eps=3.0, max_queries=1500, low_res=4)
    result = attack.run(task)
    truth = true_distance(task.sources, centres)
    for i, tr in enumerate(result.info["trajectory"]):
        assert non_increasing(tr)
        assert tr[-1][1] < 0.95 * tr[0][1]
        assert tr[-1][1] >= float(truth[i]) * (1 - 1e-6)
    assert (result.queries <= 1500).all()
    assert result.info["low_res"] == 4 and attack.threshold_dependence()


# -- starts, projection, budgets ----------------------------------------------------------------


def test_start_points_and_projection():
    model, src, centres = toy(n=4)
    src[0] = centres[0]  # already accepted: nothing to do
    starts = centres.clone()
    starts[2] = src[2]  # not accepted: falls back to noise
    task = DecisionTask(model, src, centres.flatten(1), starts=starts)
    result = HopSkipJump(eps=0.5, max_queries=300).run(task)
    assert result.info["start"] == ["source", "given", "noise", "given"]
    assert float(result.info["distance"][0]) == 0.0 and result.success[0]
    # eps 0.5 is far below the reachable ~2: the best points are projected, not successes
    assert result.info["projected"][1:].all() and not result.success[1:].any()
    l2 = (result.adversarial - src).flatten(1).norm(dim=1)
    assert (l2 <= 0.5 + 1e-6).all() and (l2[1:] > 0.45).all()
    # no start at all: the source comes back, unattacked
    lost = HopSkipJump(eps=0.5, max_queries=300, init_trials=0).run(
        AttackTask(model, src[1:2], centres[1:2].flatten(1)))
    assert lost.info["start"] == ["none"] and math.isinf(float(lost.info["distance"][0]))
    assert not lost.success[0] and torch.equal(lost.adversarial, src[1:2]) and lost.queries.tolist() == [1]


def test_submit_8bit_judges_what_is_submitted():
    """With 8-bit submissions the oracle judges the rounded image, which is what the run
    returns: the output is really accepted (a float boundary point may round outside)."""
    task, centres = toy_task(n=3)
    result = HopSkipJump(eps=3.0, max_queries=400, submit_8bit=True).run(task)
    assert result.success.all() and result.info["submit_8bit"]
    assert ((result.adversarial - centres).flatten(1).norm(dim=1) <= RADIUS).all()


def test_binary_search_lands_on_the_boundary():
    task, centres = toy_task(n=2)
    oracle = DecisionOracle(task)
    out = binary_search(oracle, task.sources, centres, "L2", 1e-6)
    r = (out - centres).flatten(1).norm(dim=1)
    assert (r <= RADIUS + 1e-5).all() and (r > RADIUS - 1e-4).all()


# -- a random defense: majority votes ---------------------------------------------------------


def test_repeats_make_noisy_decisions_reliable():
    """Gaussian-noise "purification" makes decisions near the boundary random; the majority
    of 5 submissions agrees with the system's more likely answer more often than one does."""
    n_points = 40
    model, src, centres = toy(n=1)
    c = centres[0]
    direction = (src[0] - c) / (src[0] - c).norm()
    radii = torch.linspace(4.15, 4.33, n_points)
    points = c.unsqueeze(0) + radii.view(-1, 1, 1, 1) * direction
    task = AttackTask(model, points, c.flatten().repeat(n_points, 1), defense=GaussianNoise(0.05), seed=0)
    estimate = DecisionOracle(task, stream=("estimate",))
    p_accept = torch.stack([estimate(points) for _ in range(200)]).double().mean(dim=0)
    likely = p_accept > 0.5
    assert 0.1 < float(p_accept.mean()) < 0.9  # the points straddle the noisy boundary

    def wrong(repeats):
        oracle = DecisionOracle(task, repeats=repeats, stream=("check", repeats))
        answers = torch.stack([oracle(points) for _ in range(25)])
        assert torch.equal(oracle.queries, torch.full((n_points,), 25 * repeats))
        return float((answers != likely).double().mean())

    err1, err5 = wrong(1), wrong(5)
    print(f"\nwrong decisions near the boundary: 1 submission {err1:.3f}, majority of 5 {err5:.3f}")
    assert err5 < 0.75 * err1

    noisy = AttackTask(model, src, centres.flatten(1), defense=GaussianNoise(0.05), seed=0)
    single = HopSkipJump(eps=3.0, max_queries=300).run(noisy)
    voted = HopSkipJump(eps=3.0, max_queries=900, repeats=3).run(noisy)
    assert single.flags["randomness_without_eot"] and not voted.flags["randomness_without_eot"]
    assert voted.info["repeats"] == 3 and voted.info["config"]["repeats"] == 3
    assert int(voted.queries[0]) % 3 == 0 and int(voted.queries[0]) <= 900


def test_options_are_checked():
    from iwmf_bench.errors import BenchError

    for bad in (dict(repeats=2), dict(repeats=0), dict(max_queries=0), dict(init_evals=0)):
        with pytest.raises(BenchError):
            HopSkipJump(**bad)
    with pytest.raises(BenchError):
        Evolutionary(sigma=0)
    assert issubclass(HopSkipJump, DecisionAttack) and HopSkipJump.registered_name == "hopskipjump"
    assert Evolutionary.registered_name == "evolutionary"
    assert "eot_iter" not in HopSkipJump().config()


# -- end to end on dlib-resnet --------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_end_to_end(shared_imgs, tmp_path):
    """Both attacks run on dlib-resnet with two shared pairs, the targets' images as start
    points (no assertion on the numbers: only that the pipeline works end to end)."""
    from conftest import align_shared_pairs
    from iwmf_bench import registry
    from iwmf_bench.data import load_folder

    aligned = align_shared_pairs(shared_imgs, tmp_path, "dlib-resnet", 2)
    model = registry.create("models", "dlib-resnet").eval()
    src, tgt = load_folder(aligned["source"]).images, load_folder(aligned["target"]).images
    with torch.no_grad():
        refs = model.embed(tgt)
    task = AttackTask(model, src, refs, seed=0)
    for attack in (HopSkipJump(norm="L2", eps=2.0, max_queries=150, init_evals=20, gamma=1000.0),
                   Evolutionary(norm="L2", eps=2.0, max_queries=60)):
        result = attack.run(task, starts=tgt)
        print(f"\n{attack.name}: distance {result.info['distance'].tolist()} queries {result.queries.tolist()} "
              f"starts {result.info['start']}")
        assert (result.queries <= attack.max_queries).all()
        assert result.info["start"] == ["given", "given"]
        assert all(non_increasing(tr) for tr in result.info["trajectory"])
        assert (result.info["distance"] < (src - tgt).flatten(1).norm(dim=1).double()).all()


def test_repeats_do_not_apply_to_a_deterministic_system():
    """The harness marks a column with repeated queries n/a where the system answers the
    same way every time (it would only spend queries); without repeats it always applies."""
    assert "deterministic" in HopSkipJump(repeats=3).not_applicable(random_defense=False)
    assert HopSkipJump(repeats=3).not_applicable(random_defense=True) is None
    assert HopSkipJump().not_applicable(random_defense=False) is None


# -- in a suite: the records of a decision-based column ------------------------------------

DECISION_SUITE = """\
name: decision
seed: 0
device: cpu
data: {{sources: "{src}", targets: "{tgt}", align: true, pairs: 3}}
models: {{dlib-resnet: {{}}}}
defenses:
  none: {{defense: none}}
  iwmf: {{defense: iwmf, lambda_0: 0.25}}
threat_models:
  hsj: {{attack: hopskipjump, setting: adaptive, norm: L2, eps: 2.0, max_queries: 60}}
  hsj-majority: {{attack: hopskipjump, setting: adaptive, norm: L2, eps: 2.0, max_queries: 60, repeats: 3,
                  sequential: true}}
evaluation: {{draws: 2}}
"""


def test_a_decision_column_records_each_pairs_walk_and_its_cost(shared_imgs, tmp_path):
    """A suite's decision-based cells keep, per pair, the queries, the distance reached
    before projection and the walk's (queries, distance) curve, and the attack's seconds
    per query; the majority column is n/a against a deterministic system; the leaderboard
    notes give each defense's median distance."""
    from iwmf_bench.leaderboard.notes import decision_notes
    from iwmf_bench.pipeline.outcome import metrics_of
    from iwmf_bench.runner import run_cells
    from iwmf_bench.suite import load_suite

    config = tmp_path / "decision.yaml"
    config.write_text(DECISION_SUITE.format(src=shared_imgs / "source", tgt=shared_imgs / "target"))
    records = {r["name"]: r for r in run_cells(load_suite(config).cells(), tmp_path / "results", progress=False)}
    na = records["dlib-resnet/none/hsj-majority"]
    assert na["status"] == "n/a" and "deterministic system" in na["reason"]
    for name in ("dlib-resnet/none/hsj", "dlib-resnet/iwmf/hsj", "dlib-resnet/iwmf/hsj-majority"):
        assert records[name]["status"] == "ok", records[name].get("reason")
        m = metrics_of(records[name])
        facts, queries = m.per_pair.attack, m.per_pair.queries
        assert set(facts) == {"distance", "start", "decisions", "trajectory"}
        assert len(facts["distance"]) == len(queries) == 3 and max(queries) <= 60
        for start, reached, walk, q in zip(facts["start"], facts["distance"], facts["trajectory"], queries):
            if start == "source":  # the source itself accepted (by the model, or by luck on a draw)
                assert reached == 0 and walk == [], name
                continue
            assert start == "given", name  # else the target's image, accepted as itself
            assert walk and all(b[1] <= a[1] + 1e-9 and b[0] >= a[0] for a, b in zip(walk, walk[1:])), name
            assert walk[-1][0] <= q and walk[-1][1] == pytest.approx(reached, abs=1e-5), name
        assert max(m.per_pair.l2) <= 2.0  # scored within the budget (projected when beyond it)
        assert m.attack.seconds_per_query == pytest.approx(m.attack.seconds / sum(queries))
    repeats = metrics_of(records["dlib-resnet/iwmf/hsj-majority"]).per_pair
    assert all(2 * k <= q <= 3 * k for q, k in zip(repeats.queries, repeats.attack["decisions"]))  # 2-3 per decision
    notes = decision_notes(list(records.values()))
    assert len(notes) == 2 and notes[0].startswith("hsj (decision-based") and "iwmf " in notes[0]
    assert "majority of 3" in notes[1] and "none" not in notes[1]


QUERY_SUITE = """\
name: queries
seed: 0
device: cpu
data: {{sources: "{src}", targets: "{tgt}", align: true, pairs: 3}}
models: {{dlib-resnet: {{}}}}
defenses:
  none: {{defense: none}}
  iwmf: {{defense: iwmf, lambda_0: 0.25}}
threat_models:
  hsj-30: {{attack: hopskipjump, setting: adaptive, norm: L2, eps: 2.0, max_queries: 30}}
  hsj-90: {{attack: hopskipjump, setting: adaptive, norm: L2, eps: 2.0, max_queries: 90}}
  hsj-linf: {{attack: hopskipjump, setting: adaptive, norm: Linf, eps: 0.03, max_queries: 30}}
evaluation: {{draws: 2}}
"""


def test_query_budget_curves_plot_each_defenses_far_against_queries(shared_imgs, tmp_path):
    """Threat models that differ only in max_queries form a query curve: one figure per
    model with each defense's FAR at each budget, read from the cells (a lone budget makes
    no curve)."""
    from iwmf_bench.figures import query_curves, query_points
    from iwmf_bench.pipeline.outcome import metrics_of
    from iwmf_bench.runner import run_cells
    from iwmf_bench.suite import load_suite

    config = tmp_path / "queries.yaml"
    config.write_text(QUERY_SUITE.format(src=shared_imgs / "source", tgt=shared_imgs / "target"))
    suite = load_suite(config)
    assert suite.query_sweeps() == {"hopskipjump-L2-2.0": [(30, "hsj-30"), (90, "hsj-90")]}
    records = run_cells(suite.cells(), tmp_path / "results", progress=False)
    assert all(r["status"] == "ok" for r in records)
    far = {(r["cell"]["defense"], r["cell"]["threat"]): metrics_of(r).success for r in records}
    points = query_points(suite, records)
    assert list(points) == [("dlib-resnet", "hopskipjump-L2-2.0")]
    assert points[("dlib-resnet", "hopskipjump-L2-2.0")] == {
        d: [(30, far[(d, "hsj-30")]), (90, far[(d, "hsj-90")])] for d in ("none", "iwmf")}
    paths = query_curves(suite, records, tmp_path / "imgs")
    assert [p.name for p in paths["dlib-resnet"]] == ["queries_queries_dlib-resnet_hopskipjump-L2-2.0.png"]
    assert paths["dlib-resnet"][0].stat().st_size > 5000
