"""Random defenses: the three deployments (single-shot, worst-of-N, majority vote) of a
cell follow from its per-draw outcomes, and known randomness replays the scorer's draws."""

from __future__ import annotations

import json

import pytest
import torch

from iwmf_bench import metrics
from iwmf_bench.scoring import evaluate
from iwmf_bench.attacks.base import make_generator
from iwmf_bench.scoring import FRESH_STREAM, KnownDraws, known_view
from iwmf_bench.data import load_folder, quantize
from iwmf_bench.defenses.iwmf import IWMF, draw_centres
from iwmf_bench.defenses.median import Median
from iwmf_bench.errors import BenchError, NotApplicableError
from iwmf_bench.leaderboard import deployment_notes, tables
from iwmf_bench.pipeline.compute import prepare
from iwmf_bench.pipeline.outcome import CellMetrics, Votes, attack_success, deployment_accepts, metrics_of
from iwmf_bench.suite import load_suite, validate
from test_iwmf import reference_iwmf
from test_selective_eot import Linear


def test_deployment_rates_by_hand():
    v = Votes(10, [0, 5, 6, 10])
    assert (v.rate("single-shot").k, v.rate("single-shot").n) == (21, 40)
    assert v.rate("worst-of-n").k == 3 and v.rate("majority").k == 2  # 5 of 10 is no majority
    assert v.rate("majority", rejected=True).k == 2 and v.rate("single-shot", rejected=True).k == 19
    # dodging: successes are rejections; the vote is lost by the system on a tie (5 of 10 accepted)
    assert attack_success([0, 5, 6, 10], 10, "majority", "dodging").k == 3
    assert attack_success([0, 5, 6, 10], 10, "worst-of-n", "dodging").k == 3
    assert deployment_accepts("majority", 6, 11) == 1.0 and deployment_accepts("majority", 5, 11) == 0.0
    with pytest.raises(ValueError):
        deployment_accepts("majority", 11, 10)


def test_known_draws_are_the_scorers_windows():
    """Replaying the scorer's generator by hand (window centres, then the definition of
    IWMF window by window) gives what the attacker sees through KnownDraws, and the
    scorer's verdicts are those of the replayed purifications."""
    seed, draws, n, s = 7, 4, 3, 3
    x = quantize(torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(0)))
    iwmf = IWMF(lambda_0=0.5, s=s)
    seen = KnownDraws(iwmf, seed, draws, n).purify_draws(x.repeat(draws, 1, 1, 1), None, draws).view(draws, n, 3, 12, 12)
    gen = make_generator(seed, "evaluate")
    replay = torch.stack([reference_iwmf(x, draw_centres(n, 12, 12, int(0.5 * 144), s, gen), s) for _ in range(draws)])
    assert (seen - replay).abs().max() <= 1e-6
    assert not torch.allclose(replay[0], replay[1])  # the draws differ from each other
    model = Linear().eval()
    refs = model.embed(torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(1)))
    ev = evaluate(model, iwmf, x, refs, seed, n_draws=draws)
    margin = torch.stack([metrics.margin(metrics.scores(model.embed(replay[d]), refs, model.metric), model.threshold,
                                         model.metric) for d in range(draws)], dim=1)
    assert torch.allclose(ev.margin, margin, atol=1e-5)
    fresh = evaluate(model, iwmf, x, refs, seed, n_draws=draws, stream=FRESH_STREAM)
    assert not torch.allclose(fresh.margin, ev.margin)  # fresh draws are other windows
    # every copy has its own gradient path: draw d's output depends on copy d only, through
    # that draw's windows (the definition replayed, differentiated by autograd)
    xs = x.repeat(draws, 1, 1, 1).requires_grad_(True)
    w = torch.rand(draws, n, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    out = KnownDraws(IWMF(lambda_0=0.5, s=s), seed, draws, n).purify_draws(xs, None, draws, grad_mode="exact")
    (grad,) = torch.autograd.grad((out.view(draws, n, 3, 12, 12) * w).sum(), xs)
    gen = make_generator(seed, "evaluate")
    for d in range(draws):
        xd = x.clone().requires_grad_(True)
        yd = reference_iwmf(xd.double(), draw_centres(n, 12, 12, int(0.5 * 144), s, gen), s)
        (want,) = torch.autograd.grad((yd * w[d].double()).sum(), xd)
        assert torch.allclose(grad[d * n:(d + 1) * n], want.float(), atol=1e-5), d
        assert grad[d * n:(d + 1) * n].abs().sum() > 0
    # the view is all draws of all scored images at once, and only for random defenses
    with pytest.raises(BenchError, match="eot_iter: 4"):
        KnownDraws(iwmf, seed, draws, n).purify_draws(x.repeat(2, 1, 1, 1), None, 2)
    with pytest.raises(BenchError, match="set eot_iter: 4"):
        known_view(iwmf, seed, draws, x, eot_iter=5)
    with pytest.raises(NotApplicableError, match="deterministic"):
        known_view(Median(k=3), seed, draws, x, eot_iter=4)


SUITE = """name: deployments
seed: 0
device: cpu
data: {{sources: "{src}", targets: "{tgt}", pairs: 4}}
models: [dlib-resnet]
defenses: {{iwmf-0.25: {{defense: iwmf, lambda_0: 0.25}}, median-3: {{defense: median, k: 3}}}}
threat_models:
  transfer: {{attack: apgd, setting: transfer, norm: Linf, eps: 0.01, steps: 3}}
  unknown: {{attack: apgd, setting: adaptive, norm: Linf, eps: 0.01, steps: 2, eot_iter: 10, grad_mode: exact}}
  known: {{attack: apgd, {known}, norm: Linf, eps: 0.01, steps: 2, eot_iter: 10, grad_mode: exact}}
evaluation: {{draws: 10}}
"""
KNOWN = "setting: adaptive, randomness: known"


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_imgs):
    from iwmf_bench.runner import run_cells

    tmp = tmp_path_factory.mktemp("deployments")
    cfg = tmp / "deployments.yaml"
    cfg.write_text(SUITE.format(src=shared_imgs / "source", tgt=shared_imgs / "target", known=KNOWN))
    suite = load_suite(cfg)
    validate(suite)
    records = run_cells(suite.cells(), tmp / "results", progress=False)
    return suite, {r["name"]: r for r in records}, tmp / "results"


def scored_by_hand(cell, folder, stream=("evaluate",)):
    """Per pair, how many of the 10 scorer draws accept the saved adversarial image as
    its target: the defense and the model called directly, draw by draw."""
    p = prepare(cell)
    adv = load_folder(folder).images
    gen = make_generator(cell.seed, *stream)
    counts = torch.zeros(adv.shape[0], dtype=torch.long)
    for _ in range(10):
        emb = p.model.embed(p.defense.purify(adv, gen))
        counts += metrics.accepts(metrics.scores(emb, p.refs, p.model.metric), p.model.threshold, p.model.metric).long()
    return counts.tolist()


@pytest.mark.parametrize("threat", ["transfer", "unknown", "known"])
def test_majority_numbers_follow_from_the_per_draw_outcomes(run, threat):
    suite, records, results = run
    record = records[f"dlib-resnet/iwmf-0.25/{threat}"]
    assert record["status"] == "ok", record.get("reason")
    m = metrics_of(record)
    cell = next(c for c in suite.cells() if c.name == record["name"])
    counts = scored_by_hand(cell, results / suite.name / m.adversarial_images)
    assert m.per_pair.successes == counts
    n = len(counts)
    assert m.deployment("majority").success.k == sum(c > 5 for c in counts)
    assert m.deployment("worst-of-n").success.k == sum(c > 0 for c in counts) == m.success_worst_of_n.k
    assert m.deployment("single-shot").success.k == sum(counts) == m.success.k
    assert m.deployment("majority").success.n == n
    for name, votes in m.votes.items():  # genuine images, adversarial images vs true identity
        frr = "frr_genuine" if name == "genuine" else "frr_adv_true_identity"
        assert votes.draws == 10
        assert getattr(m.deployment("majority"), frr).k == sum(10 - a >= 5 for a in votes.accepted)
        assert getattr(m, frr).k == sum(10 - a for a in votes.accepted)
    again = CellMetrics.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.deployments == m.deployments and again.votes == m.votes and again.fresh_draws == m.fresh_draws
    if threat == "known":  # also scored on draws the attacker did not know
        fresh = scored_by_hand(cell, results / suite.name / m.adversarial_images, FRESH_STREAM)
        assert m.fresh_draws["successes"] == fresh
        assert m.fresh_draws["majority"].k == sum(c > 5 for c in fresh)
    else:
        assert m.fresh_draws is None


def test_known_randomness_views_and_sanity_rules(run):
    suite, records, _ = run
    assert records["dlib-resnet/median-3/known"]["status"] == "n/a"
    deterministic = metrics_of(records["dlib-resnet/median-3/unknown"])
    assert deterministic.deployments is None  # one draw: one deployment
    assert deterministic.votes["genuine"].draws == 1 and deterministic.votes["genuine"].scores  # scores kept
    t = tables(suite, list(records.values()))["dlib-resnet"]
    sections = {s["id"]: s for s in t["sections"]}
    assert [row[0] for row in sections["deployments"]["rows"]] == ["iwmf-0.25"]
    (row,) = sections["known_randomness"]["rows"]
    known, unknown = metrics_of(records["dlib-resnet/iwmf-0.25/known"]), metrics_of(records["dlib-resnet/iwmf-0.25/unknown"])
    assert row[:3] == ["iwmf-0.25", "known", "Linf 0.01"] and row[5] == "unknown, 30 gradients (known: 30)"
    assert row[-1] == f"{100 * (known.success.value - unknown.success.value):+.1f}"
    assert any("every deployment's rate was recomputed" in n and "matches the record" in n for n in t["notes"])
    # the worst case is over the threat models with the randomness secret
    worst = next(r for r in t["raw"] if r["defense"] == "iwmf-0.25")["worst_case"]["Linf 0.01"]
    assert worst["threats"] == ["transfer", "unknown"]
    # a record whose majority rate does not follow from its draws is named
    bad = json.loads(json.dumps(records["dlib-resnet/iwmf-0.25/unknown"]))
    d = bad["metrics"]["deployments"]["majority"]["far"]
    d["k"] = d["n"] - d["k"] if d["n"] != 2 * d["k"] else 0
    d["value"] = d["k"] / d["n"]
    notes = deployment_notes([bad])
    assert any("majority far do not follow from the per-pair draws" in n for n in notes), notes


@pytest.mark.parametrize("known,message", [("setting: adaptive, randomness: sometimes", "randomness must be one of"),
                                           ("setting: transfer, randomness: known", "needs setting: adaptive")])
def test_bad_randomness_fails_at_load(tmp_path, shared_imgs, known, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(SUITE.format(src=shared_imgs / "source", tgt=shared_imgs / "target", known=known))
    with pytest.raises(BenchError, match=message):
        validate(load_suite(cfg))
