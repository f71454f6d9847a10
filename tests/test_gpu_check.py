"""scripts/gpu_check.py (the GPU check behind scripts/gpu-check.sh) without its GPU steps:
the command line, the time budget and its carry-over, the step lists, the report table.
Steps here run real, tiny commands (this Python); nothing needs a GPU or the venv."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
WRAPPER = ROOT / "scripts" / "gpu-check.sh"

_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up by name
_spec.loader.exec_module(gc)

STEP_NAMES = ["00-env", "01-setup", "02-pytest-gpu", "03-suite", "04-diffusion-speed",
              "05-diffusion-options", "06-diffusion-memory", "07-purifiers-cuda", "08-iwmf-cpu-vs-gpu"]


def config(tmp_path, cpu=False, budget=465):
    return gc.Config(cpu=cpu, repo=ROOT, python=sys.executable, images=tmp_path / "imgs", wheels=None,
                     out=tmp_path / "out", work=tmp_path / "work", dlib="", budget=budget, tar="")


def test_help_prints_the_usage_and_exits_0():
    for cmd in ([sys.executable, str(SCRIPT), "--help"], ["bash", str(WRAPPER), "-h"]):
        r = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "PYTHON_FOR_SCRIPT": sys.executable})
        assert r.returncode == 0, r.stderr
        assert r.stdout == gc.usage()
    usage = gc.usage()
    assert "scripts/gpu-check.sh PYTHON IMAGES_DIR [WHEELS_DIR] [OUT_DIR]" in usage
    assert "scripts/gpu-check.sh --dry-run PYTHON IMAGES_DIR [WHEELS_DIR] [OUT_DIR]" in usage
    for var in ("DLIB_DAT", "GPU_CHECK_WORK", "GPU_CHECK_BUDGET", "GPU_CHECK_TAR", "GPU_CHECK_CPU"):
        assert var in usage


def test_wrong_argument_count_exits_2_with_the_usage(capsys):
    r = subprocess.run([sys.executable, str(SCRIPT), "python3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout == "" and r.stderr == gc.usage()
    assert gc.main(["a", "b", "c", "d", "e"]) == 2
    assert gc.main(["--dry-run"]) == 2
    assert capsys.readouterr().err.count("IMAGES_DIR  the shared face images") == 2


def test_parse_args():
    a = gc.parse_args(["py", "imgs"], environ={})
    assert (a.cpu, a.python, a.images, a.wheels, a.out) == (False, "py", "imgs", "", None)
    a = gc.parse_args(["py", "--dry-run", "imgs", "-", "out"], environ={})
    assert (a.cpu, a.python, a.images, a.wheels, a.out) == (True, "py", "imgs", "", "out")
    assert gc.parse_args(["py", "imgs", "w"], environ={"GPU_CHECK_CPU": "1"}).cpu
    assert not gc.parse_args(["py", "imgs", "w"], environ={"GPU_CHECK_CPU": "yes"}).cpu  # only "1"
    assert gc.parse_args(["--cpu", "py", "imgs", "w"], environ={}).wheels == "w"
    assert gc.parse_args(["py", "--help", "x", "y", "z", "too many"], environ={}) is None


def test_bad_paths_exit_2_before_anything_runs(tmp_path, capsys):
    assert gc.main(["/nonexistent/python", str(tmp_path)]) == 2
    assert "gpu-check: no Python at '/nonexistent/python'" in capsys.readouterr().err
    assert gc.main([sys.executable, str(tmp_path)]) == 2
    assert "needs source/ and target/ folders" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no report folder made


def test_budget_defaults_and_planned_ends():
    assert gc.read_budget({}, cpu=False) == 465 and gc.read_budget({}, cpu=True) == 600
    assert gc.read_budget({"GPU_CHECK_BUDGET": "900"}, cpu=True) == 900
    with pytest.raises(gc.Fatal):
        gc.read_budget({"GPU_CHECK_BUDGET": "8m"}, cpu=False)
    nominals = [10, 40, 70, 175, 50, 35, 30, 35, 20]
    assert sum(nominals) == gc.NOMINAL_TOTAL
    assert gc.planned_ends(nominals, 465) == [10, 50, 120, 295, 345, 380, 410, 445, 465]
    # Scaled per step, rounded down (as the bash script's integer arithmetic did).
    assert gc.planned_ends(nominals, 600) == [12, 63, 153, 378, 442, 487, 525, 570, 595]


def test_a_step_finishing_early_gives_its_time_to_the_next():
    ends = gc.planned_ends([10, 40, 70], 465)  # 10, 50, 120 s after the start
    t0 = 1_000_000
    # Each step ends by its planned end, 3 s before it for the kill.
    assert gc.step_allowance(t0, ends[0], t0) == 7
    # 00 took 1 s: 01 gets its own 40 s plus the 9 left by 00 (less the kill margin).
    assert gc.step_allowance(t0, ends[1], t0 + 1) == 46
    # 01 took 40 s (up to t0 + 41): 02 has 70 + 9 - 3.
    assert gc.step_allowance(t0, ends[2], t0 + 41) == 76
    # Late steps eat into the later ones' time.
    assert gc.step_allowance(t0, ends[2], t0 + 100) == 17


def test_runner_carries_time_over_and_on_past_a_failed_step(tmp_path):
    cfg = config(tmp_path, budget=100)
    cfg.out.mkdir()
    printed = []
    runner = gc.Runner(cfg, dict(os.environ), nominal_total=100, echo=lambda *a, **k: printed.append(a[0]))
    steps = [gc.Step("00-a", 20, gc.command(sys.executable, "-c", "print('hello')"), ["a"]),
             gc.Step("01-b", 20, gc.command(sys.executable, "-c", "raise SystemExit(3)"), ["b"]),
             gc.Step("02-c", 60, gc.command(sys.executable, "-c", "print('still run')"), ["c"])]
    for step in steps:
        runner.run_step(step)
    assert [(r.name, r.status) for r in runner.results] == [
        ("00-a", "pass"), ("01-b", "FAIL (exit 3)"), ("02-c", "pass")]
    limits = [int((cfg.out / f"{s.name}.log").read_text().split("limit ")[1].split("s")[0]) for s in steps]
    assert 15 <= limits[0] <= 17
    # 00 and 01 took about a second: 01 has its 20 s plus 00's unused; 02 nearly all 100.
    assert limits[1] >= 34 and limits[2] >= 94
    a = (cfg.out / "00-a.log").read_text().splitlines()
    assert a[1] == "# a" and a[2] == "hello" and a[3].startswith("# exit 0 after ")
    assert "# exit 3 after " in (cfg.out / "01-b.log").read_text()
    assert printed[0] == f"gpu-check: 00-a (limit {limits[0]}s) ..."
    assert printed[3].startswith("gpu-check: 01-b: FAIL (exit 3) (")


def test_a_step_with_no_time_left_is_skipped(tmp_path):
    cfg = config(tmp_path, budget=100)
    cfg.out.mkdir()
    runner = gc.Runner(cfg, dict(os.environ), t0=int(time.time()) - 96, nominal_total=100,
                       echo=lambda *a, **k: None)
    marker = tmp_path / "ran"
    r = runner.run_step(gc.Step("09-late", 100, gc.command("touch", marker), ["touch"]))
    assert (r.status, r.seconds) == ("SKIPPED (no time left)", 0)
    assert not marker.exists()
    assert "# not run: no time left in the budget" in (cfg.out / "09-late.log").read_text()
    assert gc.status_of(124, 42) == gc.status_of(137, 42) == "TIMEOUT after 42s"


def test_a_command_past_the_deadline_is_killed_with_its_children(tmp_path):
    with open(tmp_path / "log", "a") as log:
        ctx = gc.StepContext(config(tmp_path), log, time.time() + 1.0)
        start = time.time()
        with pytest.raises(gc.StepTimeout):
            ctx.run(["sh", "-c", "sleep 30 & echo $!; wait"])
        assert time.time() - start < 5
        # A command's own limit, shorter than the step's: 124 and the step goes on.
        ctx.deadline = time.time() + 30
        assert ctx.run(["sleep", "30"], limit=0.5).returncode == 124
        assert ctx.run(["/nonexistent/tool"]).returncode == 127
    child = int((tmp_path / "log").read_text().split()[0])
    for _ in range(50):  # the background sleep went with its group (gone, or a zombie)
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the step's child survived its timeout")


@pytest.mark.parametrize("cpu", [False, True])
def test_step_lists(tmp_path, cpu):
    steps = gc.all_steps(config(tmp_path, cpu=cpu))
    assert [s.name for s in steps] == STEP_NAMES
    assert [s.nominal for s in steps] == [10, 40, 70, 175, 50, 35, 30, 35, 20]
    shown = {s.name: " ".join(s.shown) for s in steps}
    assert ("--collect-only" in shown["02-pytest-gpu"]) == cpu
    assert shown["03-suite"].endswith("--no-progress") and " run --all --config " in shown["03-suite"]
    for name in STEP_NAMES[4:8]:
        assert ("--device cpu" if cpu else "--device cuda") in shown[name]
    for name in STEP_NAMES[4:7]:
        assert ("--config tiny" if cpu else "--config celeba_hq") in shown[name]
    assert shown["08-iwmf-cpu-vs-gpu"] == ("iwmf_cpu_vs_gpu 64 1,4 2" if cpu else "iwmf_cpu_vs_gpu 160 1,20 5")


def test_report_table_and_empty_figures(tmp_path):
    results = [gc.StepResult("00-env", "pass", 1, tmp_path / "00-env.log"),
               gc.StepResult("03-suite", "TIMEOUT after 350s", 353, tmp_path / "03-suite.log")]
    assert gc.steps_table(results).splitlines() == [
        "step                   status                       seconds  log",
        "00-env                 pass                               1  00-env.log",
        "03-suite               TIMEOUT after 350s               353  03-suite.log",
    ]
    assert gc.figures(tmp_path).startswith("suite: no cell count (see 03-suite.log)\n")
    assert gc.missing_distributions(["pytest", "matplotlib"]).count("packaging") == 1
