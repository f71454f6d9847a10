"""A new user's first hour, end to end (slow; CI runs it): build the wheel, install it into
a fresh virtual environment (its dependencies reused from this one), and from an empty
folder fetch the paper's images and run the shipped smoke suite to the committed numbers.

This is also the CI regression check of the smoke leaderboard: the installed package, run
from outside the repository, must reproduce leaderboards/smoke."""

import json
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from iwmf_bench.leaderboard import committed_suite_cells
from iwmf_bench.suite import find_suite, load_suite

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("iwmf-bench"))


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory, shared_imgs):
    base = tmp_path_factory.mktemp("newcomer")
    # Build from a copy of the tracked files, so the build leaves nothing in the checkout.
    src = base / "src"
    files = _run(["git", "ls-files", "-z"], cwd=ROOT, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    wheel = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                  "-w", base / "wheel", src], timeout=600)
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    (whl,) = (base / "wheel").glob("iwmf_bench-*.whl")
    env_dir = base / "venv"
    assert _run([sys.executable, "-m", "venv", env_dir], timeout=300).returncode == 0
    py = env_dir / "bin" / "python"
    # Reuse this environment's installed dependencies (torch and the rest): a path line in a
    # .pth appends the folder without running its own .pth files, so the editable install of
    # the checkout stays out and the wheel's copy of iwmf_bench is the one imported.
    env_site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True).stdout.strip())
    (env_site / "dev-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", whl], timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    work, home = base / "work", base / "home"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(base), "IWMF_BENCH_HOME": str(home)}
    cli = env_dir / "bin" / "iwmf-bench"
    steps = {
        "where": _run([py, "-c", "import iwmf_bench; print(iwmf_bench.__file__)"], cwd=work, env=env),
        "before-fetch": _run([cli, "run", "--all", "--config", "smoke", "--no-progress"], cwd=work, env=env,
                             timeout=600),
        "fetch": _run([cli, "fetch", "paper-images", "--from", shared_imgs], cwd=work, env=env, timeout=600),
    }
    steps["run"] = _run([cli, "run", "--all", "--config", "smoke", "--no-progress"], cwd=work, env=env, timeout=1500)
    steps["check"] = _run([cli, "leaderboard", "check", "--config", "smoke", "--results", "results",
                           "--leaderboards", ROOT / "leaderboards" / "smoke", "--no-progress"],
                          cwd=work, env=env, timeout=900)
    return steps, work, env_dir


@pytest.mark.slow
def test_wheel_is_what_runs(newcomer):
    steps, _, env_dir = newcomer
    assert steps["where"].returncode == 0, steps["where"].stderr[-2000:]
    assert Path(steps["where"].stdout.strip()).is_relative_to(env_dir)


@pytest.mark.slow
def test_missing_images_stop_the_run_with_one_line(newcomer):
    r = newcomer[0]["before-fetch"]
    assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("iwmf-bench: error:") and "iwmf-bench fetch paper-images" in last and "--from" in last
    assert len(r.stderr.strip().splitlines()) == 1 and "cells:" not in r.stdout  # stopped before any cell


@pytest.mark.slow
def test_smoke_suite_from_an_empty_folder_matches_the_committed_leaderboard(newcomer):
    steps, work, _ = newcomer
    assert steps["fetch"].returncode == 0, steps["fetch"].stderr[-2000:]
    assert steps["run"].returncode == 0, steps["run"].stderr[-3000:]
    # Everything lands under the working folder: the cache, leaderboards and figures.
    assert (work / "leaderboards" / "smoke" / "dlib-resnet.md").is_file()
    assert (work / "imgs" / "smoke_far.png").is_file()
    assert steps["check"].returncode == 0, steps["check"].stderr[-3000:]
    assert "leaderboard check passed" in steps["check"].stdout
    # The same cells as the suite loaded from the repository (keys hash the suite as written).
    ran = {json.loads(p.read_text())["key"] for p in (work / "results" / "smoke").glob("*.json")}
    here = load_suite(find_suite(ROOT / "configs" / "smoke.yaml"))
    # the suite's cells and those re-crafted at equal utility (operating_point: {recraft: true})
    expected = {c.key for c in committed_suite_cells(here, ROOT / "leaderboards" / "smoke")}
    assert ran and ran <= expected
    committed = {c["key"] for c in (json.loads(p.read_text()) for p in (ROOT / "leaderboards" / "smoke" / "cells").glob("*.json"))
                 if c["status"] == "ok"}  # results/ keeps finished cells only
    assert ran == committed


@pytest.mark.slow
def test_smoke_leaderboard_check_fails_on_altered_number(newcomer, tmp_path):
    _, work, _ = newcomer
    committed = tmp_path / "committed"
    shutil.copytree(ROOT / "leaderboards" / "smoke", committed)
    cell = committed / "cells" / "dlib-resnet__iwmf-0.25__apgd-linf-transfer.json"
    data = json.loads(cell.read_text())
    frr = data["metrics"]["frr_genuine"]
    frr["k"] += frr["n"] // 2  # half the genuine images more rejected: the count and its rate move
    frr["value"] = frr["k"] / frr["n"]
    cell.write_text(json.dumps(data))
    r = _run([EXE, "leaderboard", "check", "--config", "smoke", "--results", work / "results",
              "--leaderboards", committed, "--no-progress"], cwd=tmp_path, timeout=600)
    assert r.returncode == 2
    assert "dlib-resnet/iwmf-0.25/apgd-linf-transfer: frr_genuine moved from" in r.stderr
