"""The harness end to end on the shared images with the offline dlib model: cells,
shards, the crash-proof cache, skipped cells, leaderboards and their regression check,
third-party plugins, and the Ray executor."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iwmf_bench.errors import BenchError
from iwmf_bench.runner import run_cells
from iwmf_bench.leaderboard import check, render
from iwmf_bench.suite import load_suite, parse_shard, validate

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("iwmf-bench"))
TINY = """\
name: tiny
seed: 0
device: cpu
data: {{sources: "{src}", targets: "{tgt}", align: true, pairs: 4}}
models: {{dlib-resnet: {{}}}}
defenses:
  none: {{defense: none}}
  iwmf: {{defense: iwmf, lambda_0: 0.25}}
  diffpure: {{defense: diffpure}}
threat_models:
  clean: {{attack: null}}
  apgd: {{attack: apgd, setting: transfer, norm: Linf, eps: 0.03, steps: 3}}
evaluation: {{draws: 3}}
check: {{atol: 0.0}}
"""


def numbers(records):
    """Every metric of the finished cells except wall-clock timings (purification's, and
    the attack's in its facts)."""
    def untimed(m):
        out = {k: v for k, v in m.items() if k != "seconds_per_image"}
        if "attack" in out:
            out["attack"] = {k: v for k, v in out["attack"].items()
                             if k not in ("seconds_per_image", "seconds", "seconds_per_query")}
        return out
    return {r["name"]: untimed(r["metrics"]) for r in records if r["status"] == "ok"}


@pytest.fixture(scope="module")
def tiny_config(shared_imgs, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY.format(src=shared_imgs / "source", tgt=shared_imgs / "target"))
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_config, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    suite = load_suite(tiny_config)
    return suite, results, run_cells(suite.cells(), results, progress=False)


def test_cells_filters_and_shards(tiny_config):
    suite = load_suite(tiny_config)
    cells = suite.cells()
    assert [c.name for c in cells][:2] == ["dlib-resnet/none/clean", "dlib-resnet/none/apgd"]
    assert len(cells) == 6 and len({c.key for c in cells}) == 6
    shards = [suite.cells(shard=(i, 3)) for i in (1, 2, 3)]
    assert sorted(c.key for s in shards for c in s) == sorted(c.key for c in cells)
    assert suite.cells(shard=(2, 3)) == shards[1]  # deterministic
    assert [c.name for c in suite.cells(defenses=["iwmf"], attacks=["clean"])] == ["dlib-resnet/iwmf/clean"]
    with pytest.raises(BenchError, match="no defense named nope"):
        suite.cells(defenses=["nope"])
    with pytest.raises(BenchError, match="i/n"):
        parse_shard("2")


def test_run_skips_missing_weights_and_resumes_from_cache(tiny_run):
    suite, results, records = tiny_run
    status = {r["name"]: r["status"] for r in records}
    assert status == {"dlib-resnet/none/clean": "ok", "dlib-resnet/none/apgd": "ok",
                      "dlib-resnet/iwmf/clean": "ok", "dlib-resnet/iwmf/apgd": "ok",
                      "dlib-resnet/diffpure/clean": "skipped", "dlib-resnet/diffpure/apgd": "skipped"}
    skipped = next(r for r in records if r["status"] == "skipped")
    assert "iwmf-bench fetch celeba-hq-ddpm" in skipped["reason"]
    got = numbers(records)
    # Undefended: clean impostors rejected, 3 APGD steps already impersonate most pairs.
    assert got["dlib-resnet/none/clean"]["far"]["value"] == 0.0
    assert got["dlib-resnet/none/apgd"]["far"]["value"] >= 0.5
    assert got["dlib-resnet/iwmf/apgd"]["draws"] == 3 and got["dlib-resnet/none/apgd"]["draws"] == 1
    rec = next(r for r in records if r["status"] == "ok")
    assert {"torch", "numpy", "python", "device", "iwmf_bench"} <= set(rec["env"]) and rec["seed"] == 0
    # Re-running reuses every finished cell: same records, files untouched.
    files = sorted((results / "tiny").glob("*.json"))
    assert len(files) == 4
    stamps = [f.stat().st_mtime_ns for f in files]
    again = run_cells(suite.cells(), results, progress=False)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    started = lambda rs: [r.get("started") for r in rs if r["status"] == "ok"]  # noqa: E731 (skips are not cached)
    assert numbers(again) == got and started(again) == started(records)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_identical_numbers(tiny_config, tiny_run, tmp_path):
    _, _, reference = tiny_run
    cmd = [EXE, "run", "--all", "--config", str(tiny_config), "--results", str(tmp_path / "r"),
           "--leaderboards", str(tmp_path / "lb"), "--imgs", str(tmp_path / "imgs"), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cache = tmp_path / "r" / "tiny"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(cache.glob("*.json"))) < 2:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # mid-cell: the third cell is in flight
    proc.wait()
    finished = len(list(cache.glob("*.json")))
    assert 2 <= finished < 4 and not list(cache.glob(".*.tmp"))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 cells: 4 ok, 2 skipped, 0 errors" in done.stdout
    suite = load_suite(tiny_config)
    assert numbers(run_cells(suite.cells(), tmp_path / "r", progress=False)) == numbers(reference)
    assert (tmp_path / "lb" / "dlib-resnet.md").is_file() and (tmp_path / "imgs" / "tiny_far.png").is_file()


def test_leaderboard_tables_and_check(tiny_run, tmp_path):
    suite, _, records = tiny_run
    paths = render(suite, records, tmp_path / "lb")
    md = (tmp_path / "lb" / "dlib-resnet.md").read_text()
    assert "| none " in md and "| diffpure  | skipped" in md
    assert "- skipped (diffpure): weights for 'celeba-hq-ddpm' are not in the cache" in md
    csv_rows = (tmp_path / "lb" / "dlib-resnet.csv").read_text().splitlines()
    # the worst case over the threat models of each budget comes first (the ranking column)
    assert csv_rows[0].startswith("defense,FRR genuine %,worst case Linf 0.03 %,FAR clean %,FAR apgd %")
    # the 4 finished cells and the 2 skipped ones (their reason, no metrics)
    committed = [json.loads(p.read_text()) for p in (tmp_path / "lb" / "cells").glob("*.json")]
    assert sorted(c["status"] for c in committed) == ["ok"] * 4 + ["skipped"] * 2 and len(paths) == 3
    assert all("metrics" not in c and "celeba-hq-ddpm" in c["reason"] for c in committed if c["status"] == "skipped")
    assert check(records, tmp_path / "lb", atol=0.0) == []
    # Alter one committed number: the check names the cell and both values.
    cell = tmp_path / "lb" / "cells" / "dlib-resnet__iwmf__apgd.json"
    data = json.loads(cell.read_text())
    far = data["metrics"]["far"]
    old = far["value"]
    far["k"] -= far["n"] // 4  # 12 = 4 pairs x 3 draws: 3 accepted draws fewer
    far["value"] = far["k"] / far["n"]
    cell.write_text(json.dumps(data))
    problems = check(records, tmp_path / "lb", atol=0.13)
    assert len(problems) == 1 and problems[0].startswith("dlib-resnet/iwmf/apgd: far moved from")
    assert f"{old - 0.25:.4f}" in problems[0] and f"{old:.4f}" in problems[0]
    # A record whose rate disagrees with its own count is named as such, not compared.
    far["value"] = old
    cell.write_text(json.dumps(data))
    (problem,) = check(records, tmp_path / "lb", atol=0.13)
    assert problem.startswith("dlib-resnet/iwmf/apgd: committed record is inconsistent: far")


# The smoke leaderboard's regression check runs from an installed wheel: tests/test_newcomer.py.


def test_third_party_plugin_is_listed_run_and_broken_one_skipped(tiny_config, tmp_path):
    target, source = tmp_path / "site", tmp_path / "plugin-src"
    # Build from a copy, so the build leaves nothing in the repository.
    shutil.copytree(ROOT / "tests" / "plugins" / "iwmf_bench_example_plugin", source)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    listing = subprocess.run([EXE, "list"], capture_output=True, text=True, env=env, timeout=300)
    assert listing.returncode == 0
    assert "example-jpeg" in listing.stdout and "[plugin: iwmf-bench-example-plugin]" in listing.stdout
    assert "uniform-noise" in listing.stdout
    assert "attacks/broken-attack from iwmf-bench-example-plugin" in listing.stdout
    assert "ModuleNotFoundError" in listing.stdout
    cfg = tmp_path / "plugin.yaml"
    cfg.write_text(tiny_config.read_text()
                   .replace("diffpure: {defense: diffpure}", "example-jpeg: {defense: example-jpeg, quality: 50}")
                   .replace("apgd: {attack: apgd, setting: transfer, norm: Linf, eps: 0.03, steps: 3}",
                            "noise: {attack: uniform-noise, setting: transfer, eps: 0.03}"))
    run = subprocess.run([EXE, "run", "--all", "--config", str(cfg), "--results", str(tmp_path / "r"),
                          "--leaderboards", str(tmp_path / "lb"), "--imgs", str(tmp_path / "imgs"), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "6 cells: 6 ok, 0 skipped, 0 errors" in run.stdout
    assert "| example-jpeg " in (tmp_path / "lb" / "dlib-resnet.md").read_text()


@pytest.mark.slow
def test_ray_executor_gives_the_local_numbers(tiny_config, tiny_run, tmp_path):
    pytest.importorskip("ray")
    _, _, reference = tiny_run
    env = {**os.environ, "IWMF_BENCH_RAY_CPUS": "2"}
    r = subprocess.run([EXE, "run", "--all", "--config", str(tiny_config), "--results", str(tmp_path / "r"),
                        "--executor", "ray", "--leaderboards", str(tmp_path / "lb"), "--imgs", str(tmp_path / "i"),
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    suite = load_suite(tiny_config)
    got, want = (copy.deepcopy(numbers(records)) for records in
                 (run_cells(suite.cells(), tmp_path / "r", progress=False), reference))  # popped below
    # A worker runs one thread: its aligned probes differ from the 2-thread ones in the last
    # float bits, and so do the per-pair distances to them (not the crafted images or rates).
    for name in want:
        for size in ("linf", "l2"):
            assert got[name]["per_pair"].pop(size) == pytest.approx(want[name]["per_pair"].pop(size), rel=1e-5)
    assert got == want


def test_sanity_notes_flag_raised_flags_and_blackbox_beating_whitebox(tiny_run):
    from iwmf_bench.leaderboard import sanity_notes

    _, _, records = tiny_run
    ok = [json.loads(json.dumps(r)) for r in records if r["status"] == "ok"]
    assert sanity_notes(ok) == []  # the real tiny run raises nothing
    apgd = next(r for r in ok if r["name"] == "dlib-resnet/iwmf/apgd")
    square = json.loads(json.dumps(apgd))
    square["cell"]["threat"] = "square"
    square["cell"]["threat_options"] = {"attack": "square", "setting": "transfer", "norm": "Linf",
                                        "eps": apgd["cell"]["threat_options"]["eps"]}
    far = apgd["metrics"]["far"]
    square["metrics"]["far"] = {**far, "k": far["k"] + 1, "value": (far["k"] + 1) / far["n"]}
    square["metrics"]["attack"]["flags"] = {"zero_gradients": False, "randomness_without_eot": True}
    notes = sanity_notes(ok + [square])
    assert notes == ["sanity (iwmf/square): attack flagged randomness_without_eot",
                     f"sanity (iwmf): black-box square ({100 * (far['k'] + 1) / far['n']:.1f}%) beats "
                     f"white-box apgd ({100 * far['value']:.1f}%): check the white-box attack or gradient masking"]


def test_adaptive_below_transfer_is_flagged_in_table_and_notes(tiny_config, tiny_run):
    from iwmf_bench.leaderboard import sanity_notes, tables
    from iwmf_bench.metrics import Rate

    _, _, records = tiny_run
    ok = [json.loads(json.dumps(r)) for r in records if r["status"] == "ok"]
    transfer = next(r for r in ok if r["name"] == "dlib-resnet/none/apgd")
    far = transfer["metrics"]["far"]
    assert far["k"] == far["n"] == 4  # 3 steps impersonate all 4 pairs: interval [51, 100]%
    adaptive = json.loads(json.dumps(transfer))
    adaptive["name"], adaptive["cell"]["threat"] = "dlib-resnet/none/apgd-adaptive", "apgd-adaptive"
    adaptive["cell"]["threat_options"] = {**transfer["cell"]["threat_options"], "setting": "adaptive"}
    suite = load_suite(tiny_config)
    suite.threat_models["apgd-adaptive"] = adaptive["cell"]["threat_options"]
    # 0 of 4 adaptive successes: [0, 49]%, disjoint, flagged; 1 of 4: [5, 70]%, overlapping, not.
    for k, flagged in ((0, True), (1, False)):
        adaptive["metrics"]["far"] = Rate(k, 4).to_dict()
        notes = [x for x in sanity_notes(ok + [adaptive]) if "below transfer" in x]
        row = next(r for r in tables(suite, ok + [adaptive])["dlib-resnet"]["rows"] if r[0] == "none")
        assert ("(!)" in row[-2]) == flagged  # the fabricated cell is also marked stale: its config was edited
        assert notes == ([f"sanity (none): adaptive apgd-adaptive (0.0%) is below transfer apgd (100.0%) "
                          "beyond the 95% intervals: check its gradients through the defense (broken or "
                          "obfuscated) and its budget"]
                         if flagged else [])


def test_skipped_cells_are_predicted_before_running(tiny_config, tmp_path):
    from iwmf_bench.runner import predict_skips

    cfg = tmp_path / "t.yaml"
    cfg.write_text(tiny_config.read_text().replace("iwmf: {defense: iwmf, lambda_0: 0.25}",
                                                   "iwmf: {defense: iwmf, lambda_0: 0.25, requires: cuda}"))
    suite = load_suite(cfg)
    names = {c.name for c in suite.cells() if c.key in predict_skips(suite.cells())}
    # diffpure: checkpoint missing; iwmf: marked `requires: cuda` on a CPU suite.
    assert names == {"dlib-resnet/diffpure/clean", "dlib-resnet/diffpure/apgd",
                     "dlib-resnet/iwmf/clean", "dlib-resnet/iwmf/apgd"}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_suites_load_and_name_registered_plugins(path):
    from iwmf_bench import registry

    from iwmf_bench.suite import validate

    suite = load_suite(path)
    validate(suite)  # every option is one its factory accepts
    cells = suite.cells()
    # The cross product, less what an entry's `threats:` list leaves out; a threat model
    # with a list of budgets counts once per budget.
    allowed = lambda opts: set(opts.get("threats", suite.threat_models))  # noqa: E731
    budgets = {t: len(suite.budgets(t)) for t in suite.threat_models}
    assert len(cells) == sum(budgets[t] for m in suite.models.values() for d in suite.defenses.values()
                             for t in allowed(m) & allowed(d)) > 0
    assert set(suite.models) <= set(registry.available("models"))
    assert {d["defense"] for d in suite.defenses.values()} <= set(registry.available("defenses"))
    assert {t["attack"] for t in suite.threat_models.values()} - {None} <= set(registry.available("attacks"))
    assert len({c.key for c in cells}) == len(cells)


def test_option_typos_and_unknown_names_fail_before_running(tiny_config, tmp_path):
    from iwmf_bench.suite import validate

    validate(load_suite(tiny_config))
    bad = tmp_path / "typo.yaml"
    bad.write_text(tiny_config.read_text().replace("lambda_0: 0.25", "lamda_0: 0.25"))
    with pytest.raises(BenchError, match=r"defenses\.iwmf: unknown option\(s\) lamda_0 \(accepted: lambda_0, s, shared\)"):
        validate(load_suite(bad))
    bad.write_text(tiny_config.read_text().replace("attack: apgd,", "attack: apdg,"))
    with pytest.raises(BenchError, match="unknown attack 'apdg'"):
        validate(load_suite(bad))
    r = subprocess.run([EXE, "run", "--all", "--config", str(bad), "--results", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown attack 'apdg'" in r.stderr and not (tmp_path / "r").exists()


def test_requires_cuda_skips_on_cpu_and_is_checked(shared_imgs, tmp_path, monkeypatch):
    # The same tiny-UNet IWMF-Diff entry twice: marked `requires: cuda` it is skipped on
    # this CPU with the reason and the fix; unmarked it runs. Missing weights are named too.
    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path / "home"))
    config = tmp_path / "gpu.yaml"
    config.write_text(f"""\
name: gpu
device: cpu
data: {{sources: "{shared_imgs / 'source'}", targets: "{shared_imgs / 'target'}", align: false, pairs: 2}}
models: {{dlib-resnet: {{}}}}
defenses:
  diff-gpu: {{defense: iwmfdiff, config: tiny, pretrained: false, timesteps: 2, requires: cuda}}
  diff-cpu: {{defense: iwmfdiff, config: tiny, pretrained: false, timesteps: 2}}
  diffpure: {{defense: diffpure, requires: cuda}}
threat_models: {{clean: {{attack: null}}}}
evaluation: {{draws: 1}}
""")
    suite = load_suite(config)
    validate(suite)  # `requires` is the suite's key, not an option of the defense
    records = {r["name"]: r for r in run_cells(suite.cells(), tmp_path / "r", progress=False)}
    skipped, ran = records["dlib-resnet/diff-gpu/clean"], records["dlib-resnet/diff-cpu/clean"]
    assert ran["status"] == "ok", ran.get("reason")
    assert skipped["status"] == "skipped"
    assert "defense 'diff-gpu' needs a CUDA GPU" in skipped["reason"] and "delete that line" in skipped["reason"]
    assert "fetch" not in skipped["reason"]
    both = records["dlib-resnet/diffpure/clean"]
    assert both["status"] == "skipped" and "needs a CUDA GPU" in both["reason"]
    assert "iwmf-bench fetch celeba-hq-ddpm" in both["reason"]
    config.write_text(config.read_text().replace("requires: cuda", "requires: tpu"))
    with pytest.raises(BenchError, match=r"defenses.diff-gpu.requires must be one of cuda, got 'tpu'"):
        load_suite(config)


def test_adaptive_gradient_mode_a_defense_lacks_is_not_applicable(shared_imgs, tmp_path):
    from iwmf_bench.runner import predict_skips
    from iwmf_bench.leaderboard import tables

    cfg = tmp_path / "na.yaml"
    cfg.write_text(TINY.format(src=shared_imgs / "source", tgt=shared_imgs / "target")
                   .replace("  iwmf: {defense: iwmf, lambda_0: 0.25}\n  diffpure: {defense: diffpure}\n",
                            "  bits: {defense: bit-depth, bits: 4}\n")
                   .replace("apgd: {attack: apgd, setting: transfer, norm: Linf, eps: 0.03, steps: 3}",
                            "exact: {attack: apgd, setting: adaptive, norm: Linf, eps: 0.03, steps: 2, grad_mode: exact}"))
    suite = load_suite(cfg)
    assert {c.name for c in suite.cells() if c.key in predict_skips(suite.cells())} == {"dlib-resnet/bits/exact"}
    records = {r["name"]: r for r in run_cells(suite.cells(), tmp_path / "r", progress=False)}
    assert records["dlib-resnet/none/exact"]["status"] == "ok"
    na = records["dlib-resnet/bits/exact"]
    assert na["status"] == "n/a" and na["reason"] == ("not applicable: defense 'bits' has no 'exact' gradient "
                                                          "(its modes: none, bpda)")
    table = tables(suite, list(records.values()))["dlib-resnet"]
    assert next(r for r in table["rows"] if r[0] == "bits")[-2] == "n/a"
    assert any(n.startswith("n/a (bits/exact): not applicable") for n in table["notes"])


def test_threats_key_limits_an_entry_to_some_columns_without_changing_keys(tiny_config, tmp_path):
    full = {c.name: c.key for c in load_suite(tiny_config).cells()}
    cfg = tmp_path / "t.yaml"
    cfg.write_text(tiny_config.read_text().replace("iwmf: {defense: iwmf, lambda_0: 0.25}",
                                                   "iwmf: {defense: iwmf, lambda_0: 0.25, threats: [clean]}"))
    cut = {c.name: c.key for c in load_suite(cfg).cells()}
    assert set(full) - set(cut) == {"dlib-resnet/iwmf/apgd"}
    assert all(full[name] == key for name, key in cut.items())  # same cells, same cache entries
    cfg.write_text(tiny_config.read_text().replace("iwmf: {defense: iwmf, lambda_0: 0.25}",
                                                   "iwmf: {defense: iwmf, lambda_0: 0.25, threats: [nope]}"))
    with pytest.raises(BenchError, match=r"defenses.iwmf.threats must be a list of the suite's threat models "
                                         r"\(clean, apgd\), got \['nope'\]"):
        load_suite(cfg)


def test_skipped_cells_are_reported_once_per_reason(tiny_run, capsys):
    suite, results, _ = tiny_run
    run_cells(suite.cells(), results, progress=False)  # finished cells cached; the skips re-checked
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("skipped")]
    assert len(lines) == 1 and lines[0].startswith(
        "skipped 2 cell(s) (dlib-resnet/diffpure/clean, dlib-resnet/diffpure/apgd): weights for 'celeba-hq-ddpm'")
