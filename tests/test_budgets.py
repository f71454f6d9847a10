"""Budgets as lists (one cell per eps, security curves) and the paper's protocol in
``configs/paper.yaml``, checked against the paper's code."""

from pathlib import Path

import pytest
import yaml

from iwmf_bench import registry
from iwmf_bench.errors import BenchError
from iwmf_bench.metrics import Rate
from iwmf_bench.suite import load_suite, validate

ROOT = Path(__file__).resolve().parents[1]


def test_paper_yaml_is_the_papers_protocol():
    """azrealwang/iwmfdiff attack.py: APGD n_iter=40 at Linf 0.03; APGD_EOT eot_iter=20;
    SquareAttack n_queries=20000 with the class's p_init 0.8 and thres=1 (never reached,
    so never a stop on success); IWMF lambda_0 0.25, s 3; IWMF-Diff sigma_y 0.15, 20 steps."""
    suite = load_suite(ROOT / "configs" / "paper.yaml")
    validate(suite)
    t = suite.threat_models
    square = t["square-linf-transfer"]
    assert (square["queries"], square["p_init"], square["stop_on_success"]) == (20000, 0.8, False)
    assert (square["norm"], square["eps"], square["setting"]) == ("Linf", 0.03, "transfer")
    built = registry.create("attacks", "square", **{k: v for k, v in square.items() if k not in ("attack", "setting")})
    assert built.config()["stop_on_success"] is False and built.p_init == 0.8 and built.queries == 20000
    apgd = t["apgd-linf-transfer"]
    assert (apgd["attack"], apgd["steps"], apgd["norm"], apgd["eps"]) == ("apgd", 40, "Linf", 0.03)
    for label in ("apgd-eot-bpda-adaptive", "apgd-eot-exact-adaptive"):
        assert (t[label]["eot_iter"], t[label]["steps"], t[label]["setting"]) == (20, 40, "adaptive")
    d = suite.defenses
    assert (d["iwmf"]["lambda_0"], d["iwmf"]["s"]) == (0.25, 3)
    assert (d["iwmfdiff"]["lambda_0"], d["iwmfdiff"]["sigma_y"], d["iwmfdiff"]["timesteps"]) == (0.25, 0.15, 20)


SWEEP = """\
name: sweep
seed: 0
device: cpu
data: {{sources: "{src}", targets: "{tgt}", pairs: {pairs}}}
models: [dlib-resnet]
defenses: {{none: {{defense: none}}}}
threat_models:
  apgd: {{attack: apgd, setting: transfer, norm: Linf, eps: {eps}, steps: {steps}{extra}}}
{more}"""


def sweep_suite(tmp_path, shared_imgs, eps, steps=40, pairs=20, extra="", more=""):
    cfg = tmp_path / f"sweep{abs(hash((str(eps), extra)))}.yaml"
    cfg.write_text(SWEEP.format(src=shared_imgs / "source", tgt=shared_imgs / "target", eps=eps, steps=steps,
                                pairs=pairs, extra=extra, more=more))
    suite = load_suite(cfg)
    validate(suite)
    return suite


def test_each_budget_is_its_own_cell_and_a_longer_list_reuses_them(tmp_path, shared_imgs):
    scalar = {c.threat: c.key for c in sweep_suite(tmp_path, shared_imgs, "0.03").cells()}
    short = {c.threat: c.key for c in sweep_suite(tmp_path, shared_imgs, "[0.008, 0.03]").cells()}
    longer = {c.threat: c.key for c in sweep_suite(tmp_path, shared_imgs, "[0.004, 0.008, 0.016, 0.03]").cells()}
    assert list(short) == ["apgd@0.008", "apgd"]  # the table's budget (the largest) keeps the label
    assert short["apgd"] == scalar["apgd"]  # so a number turned into a list keeps its cell
    assert all(longer[label] == key for label, key in short.items())
    cells = sweep_suite(tmp_path, shared_imgs, "[0.004, 0.03]", extra=", table_eps: 0.004").cells()
    assert [(c.threat, c.threat_options["eps"]) for c in cells] == [("apgd", 0.004), ("apgd@0.03", 0.03)]
    assert all("table_eps" not in c.threat_options for c in cells)


@pytest.mark.parametrize("eps,extra,message", [
    ("[]", "", "list of distinct positive numbers"),
    ("[0.01, 0.01]", "", "list of distinct positive numbers"),
    ("[0.01, -1]", "", "list of distinct positive numbers"),
    ("[0.01, 0.03]", ", table_eps: 0.02", "table_eps must be one of its eps list"),
    ("0.03", ", table_eps: 0.03", "table_eps must be one of its eps list"),
])
def test_bad_budget_lists_fail_at_load(tmp_path, shared_imgs, eps, extra, message):
    with pytest.raises(BenchError, match=message):
        sweep_suite(tmp_path, shared_imgs, eps, extra=extra)


@pytest.mark.slow
def test_far_grows_with_the_budget_on_the_undefended_model(tmp_path, shared_imgs):
    """The default suite's APGD transfer budgets on the 20 shared pairs (10 steps): FAR is
    non-decreasing in eps within the intervals, and the smallest budget is clearly below
    the largest (disjoint 95% intervals), so the curve says something."""
    from iwmf_bench.figures import security_curves
    from iwmf_bench.leaderboard import render
    from iwmf_bench.runner import run_cells

    default = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    budgets = default["threat_models"]["apgd-linf-transfer"]["eps"]
    assert isinstance(budgets, list) and len(budgets) >= 3
    more = f"  min-eps: {{attack: min-eps, setting: transfer, norm: Linf, eps: {max(budgets)}, steps: 10}}\n"
    suite = sweep_suite(tmp_path, shared_imgs, budgets, steps=10, more=more)
    records = run_cells(suite.cells(), tmp_path / "results", progress=False)
    assert all(r["status"] == "ok" for r in records), [r.get("reason") for r in records]
    minimal = next(r for r in records if r["cell"]["threat"] == "min-eps")
    records = [r for r in records if r is not minimal]
    far = {r["cell"]["threat_options"]["eps"]: r["metrics"]["far"] for r in records}
    rates = [far[e] for e in sorted(far)]
    for low, high in zip(rates, rates[1:]):
        assert high["ci95"][1] >= low["ci95"][0] and high["value"] >= low["value"] - 0.1, rates
    assert rates[0]["ci95"][1] < rates[-1]["ci95"][0], rates
    # Each pair's minimal budget: the fraction broken at <= eps agrees with APGD's FAR at eps.
    values = minimal["metrics"]["min_eps"]["values"]
    for e in budgets:
        k = sum(v is not None and v <= e + 1e-9 for v in values)
        lo, hi = Rate(k, len(values)).interval
        assert lo <= far[e]["ci95"][1] and far[e]["ci95"][0] <= hi, (e, k, far[e])
    records.append(minimal)
    curves = security_curves(suite, records, tmp_path / "imgs")
    assert [p.name for p in curves["dlib-resnet"]] == ["sweep_curve_dlib-resnet_apgd.png",
                                                       "sweep_mineps_dlib-resnet_min-eps.png"]
    render(suite, records, tmp_path / "boards", curves)
    md = (tmp_path / "boards" / "dlib-resnet.md").read_text()
    csv = (tmp_path / "boards" / "dlib-resnet.csv").read_text()
    table = "\n".join(line for line in md.splitlines() if line.startswith("|"))
    # the table shows one budget of the sweep (the notes may name the others: the worst
    # case of a budget takes every threat model within it)
    assert "FAR apgd %" in table and "apgd@" not in table
    assert all(f"FAR apgd@{e:g} %" in csv for e in budgets[:-1]) and "sweep_curve_dlib-resnet_apgd.png" in md
