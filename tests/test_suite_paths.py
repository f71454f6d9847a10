"""Suites that run from anywhere: shipped suites found by name, relative data paths
resolved against the suite file's folder, and every data path checked before a run."""

import json
import shutil
from pathlib import Path

import pytest

from iwmf_bench.cli import main
from iwmf_bench.errors import BenchError
from iwmf_bench.suite import check_data, find_suite, load_suite, shipped_suites

ROOT = Path(__file__).resolve().parents[1]

SUITE = """\
name: rel
seed: 0
device: cpu
data: {{sources: {src}, targets: {tgt}, align: false, pairs: 2}}
models: {{dlib-resnet: {{}}}}
defenses: {{none: {{defense: none}}}}
threat_models: {{clean: {{attack: null}}}}
evaluation: {{draws: 2}}
"""


@pytest.fixture
def relative_suite(tmp_path, shared_imgs):
    """A suite in tmp/suites/ whose data folders are given relative to that folder."""
    folder = tmp_path / "suites"
    for kind in ("source", "target"):
        (folder / "faces" / kind).mkdir(parents=True)
        for path in sorted((shared_imgs / kind).iterdir())[:2]:
            shutil.copy(path, folder / "faces" / kind / path.name)
    path = folder / "rel.yaml"
    path.write_text(SUITE.format(src="faces/source", tgt="faces/target"))
    return path


def test_shipped_suites_are_found_by_name():
    shipped = shipped_suites()
    assert {"default", "smoke", "extended", "paper"} <= set(shipped)
    assert find_suite("smoke") == shipped["smoke"]
    with pytest.raises(BenchError, match="no shipped suite of that name .*smoke"):
        find_suite("no-such-suite")


def test_a_shipped_suite_gives_the_same_cells_by_name_and_by_path(monkeypatch, tmp_path):
    by_path = [c.key for c in load_suite(ROOT / "configs" / "smoke.yaml").cells()]
    monkeypatch.chdir(tmp_path)  # another folder: nothing relative to the checkout
    by_name = [c.key for c in load_suite(find_suite("smoke")).cells()]
    assert by_name == by_path and len(by_path) == len(set(by_path)) > 10


def test_relative_paths_resolve_against_the_suite_folder(relative_suite, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc = main(["run", "--all", "--config", str(relative_suite), "--results", "r", "--leaderboards", "lb",
               "--imgs", "im", "--no-progress"])
    assert rc == 0
    (record,) = [json.loads(p.read_text()) for p in (elsewhere / "r" / "rel").glob("*.json")]
    assert record["status"] == "ok" and record["metrics"]["pairs"] == 2
    # The record holds the suite's data as written, never this machine's folders.
    assert record["cell"]["data"]["sources"] == "faces/source" and "root" not in record["cell"]
    # The cell is the same from the suite's own folder.
    monkeypatch.chdir(relative_suite.parent)
    assert [c.key for c in load_suite(relative_suite.name).cells()] == [record["key"]]


def test_a_missing_folder_stops_the_run_before_any_cell(relative_suite, tmp_path, monkeypatch, capsys):
    relative_suite.write_text(SUITE.format(src="faces/source", tgt="faces/nowhere"))
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--all", "--config", str(relative_suite), "--results", "r", "--no-progress"])
    err = capsys.readouterr()
    assert rc == 2 and "cells:" not in err.out and not (tmp_path / "r").exists()
    (line,) = err.err.strip().splitlines()
    assert "data.targets 'faces/nowhere' does not exist" in line and "suite file's folder" in line


def test_a_missing_image_set_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path / "empty-cache"))
    suite = load_suite(find_suite("smoke"))
    with pytest.raises(BenchError) as info:
        check_data(suite)
    message = str(info.value)
    assert "\n" not in message and "iwmf-bench fetch paper-images" in message and "--from DIR" in message


def test_data_names_one_kind_of_source(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text(SUITE.format(src="a", tgt="b").replace("align: false", "images: paper-images, align: false"))
    with pytest.raises(BenchError, match="data names images and sources"):
        load_suite(path)
    path.write_text(SUITE.format(src="a", tgt="b").replace("sources: a, targets: b", "images: nope"))
    with pytest.raises(BenchError, match="'nope' is not a known image set .*paper-images"):
        load_suite(path)
