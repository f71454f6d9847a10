"""Operating points from stored scores: any threshold read from a cell equals the cell
computed at that threshold; the equal-utility threshold; rankings that compare like with
like; strength sweeps and the deployer's recommendation; every scored image in its budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_folder_suite
import torch

from iwmf_bench.equal_utility import APART_MARK
from iwmf_bench.errors import BenchError
from iwmf_bench.leaderboard import tables
from iwmf_bench.operating_points import (as_float32, equal_utility_threshold, frr_at, rescored, target_frr)
from iwmf_bench.pipeline.cell import Cell
from iwmf_bench.pipeline.compute import run_cell
from iwmf_bench.pipeline.outcome import CellMetrics, Votes, metrics_of
from iwmf_bench.recommend import recommend
from iwmf_bench.suite import find_suite, load_suite

REPO = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("iwmf-bench"))

SUITE = """\
name: points
seed: 0
device: cpu
data: {{sources: "{src}", targets: "{tgt}", align: true, pairs: 6}}
models: {{dlib-resnet: {{}}}}
defenses:
  none: {{defense: none}}
  iwmf: {{defense: iwmf, lambda_0: [0.1, 0.5]}}
  median: {{defense: median, k: 3}}
threat_models:
  clean: {{attack: null}}
  apgd: {{attack: apgd, setting: transfer, norm: Linf, eps: 0.02, steps: 4}}
  adaptive: {{attack: apgd, setting: adaptive, norm: Linf, eps: 0.02, steps: 3, eot_iter: 2, grad_mode: exact}}
evaluation: {{draws: 4}}
"""


@pytest.fixture(scope="module")
def points_run(shared_imgs, tmp_path_factory):
    return run_folder_suite(SUITE, shared_imgs, tmp_path_factory.mktemp("points"), "points")


# -- any threshold from the stored scores equals a fresh computation at it -------------


@pytest.mark.parametrize("threat", ["apgd-linf-transfer", "square-linf-transfer"])
def test_far_at_another_threshold_equals_the_cell_computed_there(threat, tmp_path):
    """A smoke cell of a random defense (IWMF), re-read at another threshold from its scores,
    against the same cell computed from scratch with that threshold fixed in the suite:
    single-shot and majority FAR, per-pair successes and the genuine FRR, exactly."""
    suite = load_suite(find_suite("smoke"))
    cell = next(c for c in suite.cells(defenses=["iwmf-0.25"], attacks=[threat]))
    m = metrics_of(run_cell(cell, tmp_path / "a"))
    assert m.attack.notes.get("threshold_dependent") is None  # these attacks craft the same images at any threshold
    # a threshold inside the stored scores, so the decisions really change
    scores = sorted(s for row in m.per_pair.scores for s in row)
    threshold = as_float32(scores[len(scores) // 2])
    again = rescored(m, threshold)
    assert again.single_shot.k != m.success.k or again.success["majority"].k != m.deployment("majority").success.k
    fresh_cell = Cell(**{**cell.transport(), "model_options": {**cell.model_options, "threshold": threshold}})
    fresh = metrics_of(run_cell(fresh_cell, tmp_path / "b"))
    assert fresh.threshold == pytest.approx(threshold)
    assert again.per_pair.successes == fresh.per_pair.successes
    assert (again.single_shot.k, again.single_shot.n) == (fresh.success.k, fresh.success.n)
    for deployment in ("worst-of-n", "majority"):
        assert again.success[deployment].k == fresh.deployment(deployment).success.k
    assert frr_at(m, threshold).k == fresh.frr_genuine.k
    assert again.bound is None


def test_a_threshold_dependent_attack_is_marked_as_a_bound(points_run):
    _, _, _, records = points_run
    m = metrics_of(next(r for r in records if r["cell"]["threat"] == "apgd" and r["cell"]["defense"] == "none"))
    m.attack.notes["threshold_dependent"] = "it stops on success"  # as a stopping attack records it
    assert rescored(m, m.threshold).bound is None  # at its own threshold the rate is exact
    assert "stops on success" in rescored(m, m.threshold + 0.05).bound


# -- equal utility ------------------------------------------------------------------------


def closest_frr_by_brute_force(scores: list[list[float]], metric: str, target: float) -> float:
    """The reference: every threshold that gives a distinct FRR (each score, and beyond all)."""
    flat = torch.tensor(scores, dtype=torch.float32).flatten()
    candidates = flat.tolist() + [float(flat.min()) - 1, float(flat.max()) + 1]
    frrs = []
    for t in candidates:
        rejected = (flat < t) if metric == "cosine" else (flat > t)
        frrs.append(float(rejected.double().mean()))
    return min(abs(f - target) for f in frrs)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("target", [0.0, 0.05, 0.123, 0.5, 0.97])
def test_equal_utility_threshold_is_the_closest_achievable(metric, target):
    g = torch.Generator().manual_seed(7)
    scores = (torch.rand(30, 4, generator=g) * 0.8 + 0.2)
    scores[3, :] = scores[5, 0]  # ties
    votes = Votes(4, [0] * 30, scores.tolist())
    t = equal_utility_threshold(votes, metric, target)
    flat = torch.tensor(votes.scores, dtype=torch.float32).flatten()
    rejected = (flat < t) if metric == "cosine" else (flat > t)
    got = float(rejected.double().mean())
    assert abs(got - target) == pytest.approx(closest_frr_by_brute_force(votes.scores, metric, target), abs=1e-12)
    # and the FRR the leaderboard reports there is that one
    m = CellMetrics.__new__(CellMetrics)
    m.votes, m.metric = {"genuine": votes}, metric
    assert frr_at(m, t).value == pytest.approx(got)


def test_equal_utility_on_a_cells_genuine_scores(points_run):
    _, suite, _, records = points_run
    undefended = metrics_of(next(r for r in records if r["cell"]["defense"] == "none"))
    target, how = target_frr(undefended)
    for defense in ("iwmf-0.1", "iwmf-0.5", "median"):
        m = metrics_of(next(r for r in records if r["cell"]["defense"] == defense))
        votes = m.votes["genuine"]
        t = equal_utility_threshold(votes, m.metric, target)
        assert abs(frr_at(m, t).value - target) == pytest.approx(
            closest_frr_by_brute_force(votes.scores, m.metric, target), abs=1e-12)
    # the undefended row keeps the model's own threshold: it already meets its own FRR
    assert equal_utility_threshold(undefended.votes["genuine"], undefended.metric, target,
                                   keep=undefended.threshold) == as_float32(undefended.threshold)


def test_target_frr_has_a_floor_of_one_comparison(points_run):
    _, _, _, records = points_run
    m = metrics_of(next(r for r in records if r["cell"]["defense"] == "none"))
    votes = m.votes["genuine"]
    m.frr_genuine = type(m.frr_genuine)(0, m.frr_genuine.n)  # as on data where nobody is rejected
    target, how = target_frr(m)
    assert target == pytest.approx(1 / len(votes.accepted)) and "one genuine comparison" in how
    assert target_frr(m, 0.05) == (0.05, "the suite's target FRR 5.0%")


# -- rankings that compare like with like ----------------------------------------------


def test_a_row_missing_a_threat_model_is_not_ranked_among_complete_rows(points_run):
    _, suite, _, records = points_run
    table = tables(suite, records)["dlib-resnet"]
    best = table["rows"][0][0]
    # take the best row's adaptive cell away: it met fewer threat models than the others
    fewer = [r for r in records if not (r["cell"]["defense"] == best and r["cell"]["threat"] == "adaptive")]
    table = tables(suite, fewer)["dlib-resnet"]
    order = [row[0] for row in table["rows"]]
    assert order[-1] == best, order
    raw = next(x for x in table["raw"] if x["defense"] == best)["worst_case"]["Linf 0.02"]
    assert raw["comparable"] is False and raw["missing_threats"] == ["adaptive"]
    assert table["rows"][-1][2].endswith(APART_MARK)
    assert any(n.startswith("worst case Linf 0.02" + APART_MARK) and best in n for n in table["notes"])
    assert best not in table["paired"]["worst case Linf 0.02"]["ranking"]
    eu = next(s for s in table["sections"] if s["id"] == "equal_utility")
    assert [row[0] for row in eu["rows"]][-1] == best
    complete = [x["worst_case"]["Linf 0.02"]["value"] for x in eu["raw"]["rows"] if x["defense"] != best]
    assert complete == sorted(complete)


def test_a_transfer_only_model_says_so_in_its_header(points_run):
    _, suite, _, records = points_run
    transfer = [r for r in records if r["cell"]["threat"] != "adaptive"]
    assert "transfer threat models only" in tables(suite, transfer)["dlib-resnet"]["scope"]
    assert tables(suite, records)["dlib-resnet"]["scope"] is None


# -- strength sweeps and the deployer's recommendation ----------------------------------


def test_a_list_valued_option_is_a_strength_sweep(points_run, tmp_path):
    _, suite, _, _ = points_run
    assert list(suite.defenses) == ["none", "iwmf-0.1", "iwmf-0.5", "median"]
    assert suite.families == {"iwmf": {"parameter": "lambda_0", "rows": {"iwmf-0.1": 0.1, "iwmf-0.5": 0.5}}}
    assert suite.defenses["iwmf-0.5"] == {"defense": "iwmf", "lambda_0": 0.5}
    assert suite.family_of("iwmf-0.1") == ("iwmf", "lambda_0", 0.1) and suite.family_of("median") is None
    base = Path(points_run[0]).read_text()
    for bad, message in (("lambda_0: [0.1, 0.5], s: [3, 4]}", "sweeps lambda_0, s"),
                         ("lambda_0: []}", "non-empty list of distinct values")):
        (tmp_path / "bad.yaml").write_text(base.replace("lambda_0: [0.1, 0.5]}", bad))
        with pytest.raises(BenchError, match=message):
            load_suite(tmp_path / "bad.yaml")


def test_recommend_picks_the_lowest_worst_case_under_the_constraint(points_run):
    config, suite, results, records = points_run
    rec = recommend(suite, records, "dlib-resnet", "iwmf", allowance=0.02, budget="Linf 0.02")
    undefended = metrics_of(next(r for r in records if r["cell"]["defense"] == "none")).frr_genuine.value
    assert rec.target == pytest.approx(undefended + 0.02)
    for s in rec.settings:
        assert s.point.frr_genuine.value <= rec.target + 1e-12  # every setting within the constraint
    values = {s.defense: s.worst["Linf 0.02"]["value"] for s in rec.settings}
    assert rec.best.worst["Linf 0.02"]["value"] == min(values.values())
    out = subprocess.run([EXE, "recommend", "--config", str(config), "--model", "dlib-resnet", "--family", "iwmf",
                          "--results", str(results), "--leaderboards", str(results.parent / "none"),
                          "--budget", "Linf 0.02", "--no-progress"], capture_output=True, text=True, check=True)
    assert f"recommended: {rec.best.defense}" in out.stdout and "caveat: 6 pairs" in out.stdout
    bad = subprocess.run([EXE, "recommend", "--config", str(config), "--model", "dlib-resnet", "--family", "median"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a strength-swept family" in bad.stderr


# -- every scored image within its budget -----------------------------------------------


def test_every_committed_cell_lies_within_its_budget():
    checked = 0
    for path in sorted((REPO / "leaderboards").glob("*/cells/*.json")):
        record = json.loads(path.read_text())
        t = record["cell"]["threat_options"]
        if record["status"] != "ok" or not t.get("attack") or t.get("eps") is None:
            continue
        per = record["metrics"]["per_pair"]
        sizes = per["linf"] if t.get("norm", "Linf") == "Linf" else per["l2"]
        if sizes is None:  # crafted on a surrogate's photos: no aligned probe to measure against
            continue
        assert max(sizes) <= float(t["eps"]) + 1e-6, f"{path.name}: {max(sizes)} > {t['eps']}"
        checked += 1
    assert checked > 100


def test_every_committed_cell_keeps_its_scores():
    for path in sorted((REPO / "leaderboards").glob("*/cells/*.json")):
        record = json.loads(path.read_text())
        if record["status"] != "ok":
            continue
        m = metrics_of(record)
        assert m.per_pair.scores is not None and len(m.per_pair.scores) == m.pairs, path.name
        assert all(len(row) == m.per_pair.draws for row in m.per_pair.scores)
        # the stored decisions follow from the stored scores at the cell's threshold
        assert rescored(m, m.threshold).per_pair.successes == m.per_pair.successes, path.name
        g = m.votes["genuine"]
        assert frr_at(m, m.threshold).k == m.frr_genuine.k and len(g.scores) == len(g.accepted), path.name
        assert not any(math.isnan(s) for row in m.per_pair.scores for s in row)
