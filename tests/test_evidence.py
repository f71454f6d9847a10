"""Per-pair evidence: what every cell's rates are computed from, the worst case over
threat models taken as the union over pairs, and re-scoring saved adversarial images
bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_folder_suite

from iwmf_bench.commands.rescore import reproduced
from iwmf_bench.leaderboard import tables, worst_case
from iwmf_bench.pipeline.compute import images_dir, rescore_cell

EXE = str(Path(sys.executable).with_name("iwmf-bench"))
SUITE = """\
name: evidence
seed: 0
device: cpu
data: {{sources: "{src}", targets: "{tgt}", align: true, pairs: 6}}
models: {{dlib-resnet: {{}}}}
defenses:
  none: {{defense: none}}
  iwmf: {{defense: iwmf, lambda_0: 0.25}}
  median: {{defense: median, k: 3}}
threat_models:
  clean: {{attack: null}}
  apgd: {{attack: apgd, setting: transfer, norm: Linf, eps: 0.02, steps: 4}}
  square: {{attack: square, setting: transfer, norm: Linf, eps: 0.02, queries: 30, p_init: 0.8, stop_on_success: false}}
  adaptive: {{attack: apgd, setting: adaptive, norm: Linf, eps: 0.02, steps: 3, eot_iter: 2, grad_mode: exact}}
evaluation: {{draws: 4}}
"""


@pytest.fixture(scope="module")
def evidence_run(shared_imgs, tmp_path_factory):
    return run_folder_suite(SUITE, shared_imgs, tmp_path_factory.mktemp("evidence"), "evidence")


def test_per_pair_records_are_what_the_rates_count(evidence_run):
    _, _, _, records = evidence_run
    for r in records:
        m, per = r["metrics"], r["metrics"]["per_pair"]
        n = m["pairs"]
        assert len(per["successes"]) == len(per["linf"]) == len(per["probe_identity"]) == n == 6
        assert per["draws"] == m["draws"] == (4 if r["cell"]["defense"] == "iwmf" else 1)
        assert m["far"]["k"] == sum(per["successes"]) and m["far"]["n"] == n * per["draws"]
        assert m["far_worst_of_n"]["k"] == sum(k > 0 for k in per["successes"])
        eps = r["cell"]["threat_options"].get("eps")
        # an attacked face lies within its budget around the aligned probe; a clean one is the
        # probe rounded to 8 bits (at most half a level from it)
        assert max(per["linf"]) <= (0.5 / 255 if eps is None else eps) + 1e-6
        assert all(l2 >= linf for l2, linf in zip(per["l2"], per["linf"]))
        assert per["probe_identity"] == ["25"] * 3 + ["26"] * 3 and per["reference_identity"] == ["0"] * 3 + ["1"] * 3
        attack = r["cell"]["threat_options"].get("attack")
        assert (per["queries"] is None) == (attack is None)
        if attack == "square":
            assert per["queries"] == [30] * 6


def test_worst_case_is_the_union_over_threat_models_per_pair(evidence_run):
    _, suite, _, records = evidence_run
    table = tables(suite, records)["dlib-resnet"]
    assert table["headers"][2] == "worst case Linf 0.02 %"
    values = {}
    for defense in ("none", "iwmf", "median"):
        cells = [r for r in records if r["cell"]["defense"] == defense and r["cell"]["threat"] != "clean"]
        per = [c["metrics"]["per_pair"] for c in cells]
        # the reference: per pair, the largest accepted fraction of any threat model
        single = [max(p["successes"][i] / p["draws"] for p in per) for i in range(6)]
        broken = sum(any(p["successes"][i] for p in per) for i in range(6))
        got = worst_case([r for r in records if r["cell"]["defense"] == defense])["Linf 0.02"]
        assert got["value"] == pytest.approx(sum(single) / 6, abs=1e-12)
        assert got["worst_of_n"]["k"] == broken and got["threats"] == ["adaptive", "apgd", "square"]
        assert got["value"] >= max(c["metrics"]["far"]["value"] for c in cells) - 1e-12
        raw = next(x for x in table["raw"] if x["defense"] == defense)
        assert raw["worst_case"]["Linf 0.02"]["value"] == got["value"]
        values[defense] = got["value"]
    # rows sorted by the worst case, lowest first
    order = [row[0] for row in table["rows"]]
    assert [values[d] for d in order] == sorted(values.values())


def test_rescoring_saved_images_reproduces_the_cell_bit_for_bit(evidence_run):
    _, suite, results, records = evidence_run
    by = {r["name"]: r for r in records}
    for cell in suite.cells():
        if cell.name not in ("dlib-resnet/iwmf/adaptive", "dlib-resnet/median/square"):
            continue
        record = by[cell.name]
        folder = images_dir(cell, results)
        assert record["metrics"]["adversarial_images"] == str(folder.relative_to(results / suite.name))
        metrics = json.loads(json.dumps(rescore_cell(cell, folder).to_dict()))
        assert reproduced(record, metrics) == []
        assert metrics["far"] == record["metrics"]["far"] and metrics["per_pair"]["successes"] == \
            record["metrics"]["per_pair"]["successes"]


def test_rescore_command_reproduces_and_refuses_foreign_images_of_the_wrong_shape(evidence_run, tmp_path):
    config, _, results, _ = evidence_run
    ok = subprocess.run([EXE, "rescore", "dlib-resnet/iwmf/apgd", "--config", str(config), "--results", str(results)],
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "reproduced bit for bit" in ok.stdout
    from PIL import Image

    (tmp_path / "00000_25.png").write_bytes(b"")
    Image.new("RGB", (64, 64)).save(tmp_path / "00000_25.png")
    bad = subprocess.run([EXE, "rescore", "dlib-resnet/iwmf/apgd", "--config", str(config), "--images", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert "but dlib-resnet/iwmf/apgd scores 6 pairs of (3, 150, 150)" in bad.stderr


def test_sign_test_is_the_exact_binomial_test_and_mcnemar_on_binary_outcomes():
    from scipy.stats import binomtest

    from iwmf_bench.paired import sign_test

    a = [0.0, 0.1, 0.5, 0.2, 0.0, 1.0, 0.3, 0.0, 0.0, 0.4, 0.2, 0.0]
    b = [0.3, 0.1, 0.9, 0.6, 0.2, 0.8, 0.7, 0.5, 0.0, 0.9, 0.6, 0.1]
    lower, higher, p = sign_test(a, b)
    assert (lower, higher) == (9, 1)  # two ties left out
    assert p == pytest.approx(binomtest(1, 10, 0.5).pvalue, rel=1e-12)
    # 0/1 outcomes: McNemar's exact test on the discordant pairs (6 vs 0: p = 2/64)
    x, y = [0, 0, 0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]
    assert sign_test(x, y) == (6, 1, pytest.approx(binomtest(1, 7, 0.5).pvalue, rel=1e-12))
    assert sign_test([0.5] * 4, [0.5] * 4) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="different sizes"):
        sign_test([0.0], [0.0, 1.0])


def test_ranking_marks_told_apart_neighbours_only():
    from iwmf_bench.paired import compare, ranking

    strong = [0.0] * 10
    weak = [1.0] * 10  # broken on every pair: 10 vs 0, p = 2/1024
    close = [0.0] * 9 + [1.0]  # one pair apart from strong: p = 1
    assert ranking({"weak": weak, "strong": strong, "close": close}) == "strong ~ close < weak"
    tests = {(c.better, c.worse): c for c in compare({"weak": weak, "strong": strong})}
    assert tests[("strong", "weak")].wins == 10 and tests[("strong", "weak")].p == pytest.approx(2 / 1024)


def test_identity_bootstrap_needs_enough_identities_and_widens_for_clustered_pairs():
    from iwmf_bench.paired import MIN_IDENTITIES, identity_interval
    from iwmf_bench.metrics import wilson_interval

    assert identity_interval([1.0, 0.0] * 10, ["a", "b"] * 10) is None  # 2 identities: not enough
    # 12 identities of 5 pairs each, all pairs of an identity alike: 60 pairs that are worth 12
    values = [float(i % 2) for i in range(12) for _ in range(5)]
    identities = [str(i) for i in range(12) for _ in range(5)]
    lo, hi = identity_interval(values, identities, seed=0)
    assert MIN_IDENTITIES <= 12 and lo < 0.5 < hi
    wlo, whi = wilson_interval(30, 60)
    assert hi - lo > whi - wlo  # wider than treating the 60 pairs as independent
    assert identity_interval(values, identities, seed=0) == (lo, hi)  # seeded


@pytest.mark.parametrize("suite", ["smoke", "default", "tradeoff"])
def test_committed_worst_case_is_the_union_of_the_committed_per_pair_records(suite):
    """Every committed cell carries per-pair records, and each committed table's worst case
    equals the union recomputed here from them: per pair the largest accepted fraction over
    the impersonation threat models within that budget (same norm, eps at most the budget),
    with the defense's randomness secret (known-randomness cells are another threat model)."""
    root = Path(__file__).resolve().parents[1] / "leaderboards" / suite
    cells = [json.loads(p.read_text()) for p in sorted((root / "cells").glob("*.json"))]
    cells = [c for c in cells if c["status"] == "ok"]  # skipped and n/a cells carry their reason only
    # cells re-crafted at a defense's equal-utility threshold count in that section only
    cells = [c for c in cells if not c["cell"]["threat"].endswith("@equal-utility")]
    assert cells and all("per_pair" in c["metrics"] for c in cells)
    checked = 0
    for table in sorted(root.glob("*.json")):
        data = json.loads(table.read_text())
        for row in data["rows"]:
            for budget, worst in row["worst_case"].items():
                norm, eps = budget.split()
                mine = [c for c in cells if c["cell"]["model"] == data["model"] and c["cell"]["defense"] == row["defense"]
                        and c["cell"]["threat_options"].get("attack")
                        and c["cell"]["threat_options"].get("goal", "impersonation") == "impersonation"
                        and c["cell"]["threat_options"].get("randomness", "unknown") == "unknown"
                        and c["cell"]["threat_options"].get("norm", "Linf") == norm
                        and c["cell"]["threat_options"].get("eps") is not None
                        and c["cell"]["threat_options"]["eps"] <= float(eps) + 1e-12]  # within the budget
                assert sorted(c["cell"]["threat"] for c in mine) == worst["threats"]
                per = [c["metrics"]["per_pair"] for c in mine]
                n = len(per[0]["successes"])
                single = [max(p["successes"][i] / p["draws"] for p in per) for i in range(n)]
                assert worst["value"] == pytest.approx(sum(single) / n, abs=1e-12)
                assert worst["worst_of_n"]["k"] == sum(any(p["successes"][i] for p in per) for i in range(n))
                checked += 1
    assert checked >= (4 if suite == "smoke" else 40)
