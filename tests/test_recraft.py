"""Threshold-dependent attacks crafted again at each defense's equal-utility threshold
(``operating_point: {recraft: true}``): which cells, at which threshold, and how the
leaderboard uses them, end to end through the CLI on the shared images."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from iwmf_bench.equal_utility import RECRAFT_SUFFIX, recraft_cells, section
from iwmf_bench.operating_points import as_float32, frr_at, rescored
from iwmf_bench.pipeline.outcome import metrics_of
from iwmf_bench.publish import committed_records
from iwmf_bench.suite import load_suite

EXE = str(Path(sys.executable).with_name("iwmf-bench"))

# Square stopping on success depends on the threshold; APGD's margin loss does not.
SUITE = """\
name: recraft
seed: 0
device: cpu
data: {{sources: "{src}", targets: "{tgt}", align: true, pairs: 6}}
models: {{dlib-resnet: {{}}}}
defenses:
  none: {{defense: none}}
  iwmf: {{defense: iwmf, lambda_0: 0.5}}
  median: {{defense: median, k: 5}}
threat_models:
  clean: {{attack: null}}
  apgd: {{attack: apgd, setting: transfer, norm: Linf, eps: 0.03, steps: 3}}
  square-stop: {{attack: square, setting: transfer, norm: Linf, eps: 0.03, queries: 40, stop_on_success: true}}
evaluation: {{draws: 3}}
operating_point: {{recraft: true, target_frr: 0.05}}  # below the undefended FRR: every threshold moves
"""


@pytest.fixture(scope="module")
def recraft_run(shared_imgs, tmp_path_factory):
    root = tmp_path_factory.mktemp("recraft")
    config = root / "recraft.yaml"
    config.write_text(SUITE.format(src=shared_imgs / "source", tgt=shared_imgs / "target"))
    boards = root / "boards"
    out = subprocess.run([EXE, "run", "--all", "--config", str(config), "--results", str(root / "results"),
                          "--leaderboards", str(boards), "--imgs", str(root / "imgs"), "--no-progress"],
                         capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return config, boards, committed_records(boards), out


def test_the_recrafted_cells_are_the_dependent_ones_whose_threshold_moved(recraft_run):
    config, boards, records, out = recraft_run
    eu = {row["defense"]: row for row in json.loads((boards / "dlib-resnet.json").read_text())["equal_utility"]["rows"]}
    own = {r["cell"]["defense"]: r for r in records if r["cell"]["threat"] == "square-stop"}
    model_threshold = metrics_of(own["none"]).threshold
    moved = {d for d, row in eu.items() if as_float32(row["threshold"]) != as_float32(model_threshold)}
    assert moved >= {"none", "iwmf"}
    again = {r["cell"]["defense"]: r for r in records if r["cell"]["threat"].endswith(RECRAFT_SUFFIX)}
    # exactly the threshold-dependent attack (Square stopping on success), for every defense whose threshold moved
    assert {r["cell"]["threat"] for r in again.values()} == {"square-stop" + RECRAFT_SUFFIX}
    assert set(again) == moved
    assert f"{len(moved)} cell(s) of threshold-dependent attacks" in out.stderr
    for d, r in again.items():
        m, original = metrics_of(r), metrics_of(own[d])
        assert r["status"] == "ok"
        assert as_float32(m.threshold) == as_float32(eu[d]["threshold"])  # crafted and scored at the defense's threshold
        assert r["cell"]["threat_options"] == own[d]["cell"]["threat_options"]
        assert r["cell"]["model_options"] == {"threshold": eu[d]["threshold"]}
        # the same genuine stage, decided at that threshold
        assert m.frr_genuine.k == frr_at(original, m.threshold).k
        assert m.attack.notes["threshold_dependent"]


def test_the_leaderboard_reads_the_recrafted_cell_at_equal_utility(recraft_run):
    config, boards, records, _ = recraft_run
    board = json.loads((boards / "dlib-resnet.json").read_text())
    eu = {row["defense"]: row for row in board["equal_utility"]["rows"]}
    again = {r["cell"]["defense"]: metrics_of(r) for r in records if r["cell"]["threat"].endswith(RECRAFT_SUFFIX)}
    for d, row in eu.items():
        far = row["far"]["square-stop"]
        assert far["bound"] is None  # crafted at this threshold (or it is the model's own)
        assert far["recrafted"] == (d in again)
        if d in again:
            assert (far["k"], far["n"]) == (again[d].success.k, again[d].success.n)
    # the re-crafted cells are no column of the main tables
    header = next(csv.reader((boards / "dlib-resnet.csv").open()))
    assert not any(RECRAFT_SUFFIX in h for h in header)
    assert all(RECRAFT_SUFFIX not in t for row in board["rows"] for t in row["far"])
    md = (boards / "dlib-resnet.md").read_text()
    assert "§" in md and "crafted again at this defense's threshold" in md
    # without the option, the same operating point reads the original cells, marked as bounds
    suite = load_suite(config)
    suite.operating_point = {"target_frr": 0.05}
    assert recraft_cells(suite, records) == []
    plain = [r for r in records if not r["cell"]["threat"].endswith(RECRAFT_SUFFIX)]
    rows = {row["defense"]: row for row in section(suite, plain, ["clean", "apgd", "square-stop"])[0]["raw"]["rows"]}
    for d in again:
        original = metrics_of(next(r for r in plain if r["cell"]["defense"] == d and r["cell"]["threat"] == "square-stop"))
        assert rows[d]["far"]["square-stop"]["bound"] == rescored(original, rows[d]["threshold"]).bound is not None
        assert rows[d]["far"]["square-stop"]["recrafted"] is False
        assert rows[d]["far"]["apgd"]["bound"] is None


def test_provenance_derives_the_recrafted_cells_from_the_committed_ones(recraft_run, tmp_path):
    config, boards, _, _ = recraft_run
    check = [EXE, "leaderboard", "check", "--provenance", "--leaderboards", str(boards)]
    ok = subprocess.run(check + ["--config", str(config)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    # the same suite without the option: the committed re-crafted cells are no longer cells of it
    plain = tmp_path / "recraft.yaml"
    plain.write_text(config.read_text().replace("recraft: true, ", ""))
    bad = subprocess.run(check + ["--config", str(plain)], capture_output=True, text=True)
    assert bad.returncode != 0
    assert f"dlib-resnet/iwmf/square-stop{RECRAFT_SUFFIX}: committed but no longer a cell of the suite" in bad.stderr


def test_operating_point_option_is_checked(tmp_path):
    from iwmf_bench.errors import BenchError
    from iwmf_bench.suite import check_operating_point

    assert check_operating_point(tmp_path, {"recraft": True, "target_frr": 0.05}) == {"recraft": True, "target_frr": 0.05}
    for bad in ({"recraft": "yes"}, {"target_frr": 1.5}, {"recraft": True, "other": 1}, [0.05]):
        with pytest.raises(BenchError, match="operating_point must be"):
            check_operating_point(tmp_path, bad)
