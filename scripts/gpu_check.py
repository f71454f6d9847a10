"""The GPU check, for a bare GPU node without network access (as many cluster compute
nodes are). Run from anywhere; the repository is the one this script lives in:

  scripts/gpu-check.sh PYTHON IMAGES_DIR [WHEELS_DIR] [OUT_DIR]
  scripts/gpu-check.sh --dry-run PYTHON IMAGES_DIR [WHEELS_DIR] [OUT_DIR]   # CPU, tiny sizes

PYTHON      a Python that already has torch (a CUDA build), e.g. python3 or /opt/x/bin/python
IMAGES_DIR  the shared face images: a folder with source/ and target/ (iwmfdiff-imgs)
WHEELS_DIR  optional folder of wheels for the runtime needs PYTHON lacks (facenet-pytorch,
            pyyaml, tqdm, tabulate, numba, matplotlib, pytest, ... and their own needs); a
            dlib_face_recognition_resnet_model_v1.dat in it is used as the dlib weights.
            "" or - : none. Prepare it on any machine with network access, e.g.
              pip download --no-deps --only-binary=:all: --python-version 3.12 \\
                --platform manylinux2014_x86_64 -d wheels facenet-pytorch==2.5.3 requests
            (face-recognition-models is a 100 MB sdist: copy just its
            models/dlib_face_recognition_resnet_model_v1.dat into the folder instead).
OUT_DIR     the report folder (default out/gpu-check/<UTC time> in the repository)

Nothing is fetched from the network: a venv is made with --system-site-packages (so torch,
triton and numpy come from PYTHON; where PYTHON is itself a venv, a .pth file adds its
site-packages), the project is installed with `pip install --no-deps --no-index -e .`, and
missing runtime needs from WHEELS_DIR with --no-index --no-deps. Then, in order, each with
a time limit, its log in OUT_DIR, carrying on past a failed step:
  pytest -m gpu; the CUDA suite configs/gpu-check.yaml (timing only: random diffusion
  weights); benchmarks/diffusion.py on celeba_hq (speed, options, exact-gradient memory);
  benchmarks/purifiers.py --device cuda; IWMF per image on this GPU and on this node's CPU.
Step limits add up to GPU_CHECK_BUDGET seconds (default 465, under 8 minutes on one
H200-class GPU); time a step leaves unused carries over to the next ones.

--dry-run (or GPU_CHECK_CPU=1): the same steps on the CPU with tiny sizes (tiny UNet, 2
pairs, 2 DDRM steps, pytest only collects the GPU tests): checks the script itself.

Environment: DLIB_DAT (a dlib_face_recognition_resnet_model_v1.dat to use), GPU_CHECK_WORK
(venv and caches; default ${TMPDIR:-/tmp}/iwmf-bench-gpu-check), GPU_CHECK_BUDGET,
GPU_CHECK_TAR (also pack the report folder into this .tar.gz).

This is scripts/gpu_check.py (standard library only, Python 3.9 or newer);
scripts/gpu-check.sh runs it with python3 (or $PYTHON_FOR_SCRIPT).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

# The nominal step limits (seconds) add up to this; GPU_CHECK_BUDGET scales them.
NOMINAL_TOTAL = 465
DEFAULT_BUDGET_GPU = 465  # under 8 minutes in all
DEFAULT_BUDGET_CPU = 600  # the CPU dry run gets more (a shared 2-core host is slow)
KILL_AFTER = 3            # seconds a timed-out step is given between SIGTERM and SIGKILL
MIN_ALLOW = 5             # a step with less time than this left is skipped

# import name -> distributions (with the needs of each that a bare Python may lack).
NEEDS = [
    ("yaml", ["pyyaml"]),
    ("tqdm", ["tqdm"]),
    ("tabulate", ["tabulate"]),
    ("PIL", ["pillow"]),
    ("numba", ["numba", "llvmlite"]),
    ("matplotlib", ["matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing",
                    "python-dateutil", "six", "packaging"]),
    ("requests", ["requests", "urllib3", "idna", "certifi", "charset-normalizer"]),
    ("facenet_pytorch", ["facenet-pytorch"]),
    ("pytest", ["pytest", "pluggy", "iniconfig", "packaging"]),
    ("torchvision", ["torchvision"]),
]

README_TEMPLATE = """\
iwmf-bench GPU check report ({date}), written by scripts/gpu-check.sh
{dry_run_line}

TIMING ONLY: the diffusion defenses (DiffPure, IWMF-Diff) in this report run on RANDOM
UNet weights (pretrained: false), which does not change their speed or memory; every
FAR/accuracy figure of those defenses here (suite/leaderboard) is meaningless as a
robustness result. The IWMF and undefended rows use the real dlib weights.

summary.txt          pass/fail per step, the figures that matter, the benchmark tables
env.txt              date, git commit, torch/CUDA/Triton versions, nvidia-smi
gpu-check.yaml       the suite as run (configs/gpu-check.yaml with this node's paths)
NN-*.log             each step's full output (the command is on its first lines)
suite/leaderboard/   the suite's leaderboard (labelled timing only), suite/results/ its cells
"""

# -- Python run by PYTHON or by the venv's python (they may lack what this script has) ----
TORCH_INFO_PY = """\
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
except Exception as exc:  # noqa: BLE001
    print("torch: not importable:", exc)
    raise SystemExit(0)
print("torch", torch.__version__, "cuda build", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:  # noqa: BLE001
    print("triton: not importable:", type(exc).__name__, exc)
print("cuda available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs")
"""

# --system-site-packages sees the base interpreter's packages; where PYTHON is itself a
# venv (its torch in its own site-packages), add those too, after the new venv's own.
BASE_PTH_PY = """\
import site, subprocess, sys
if sys.prefix == sys.base_prefix:
    raise SystemExit(0)
dirs = [d for d in dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()]) if d]
target = subprocess.run([sys.argv[1], "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
with open(f"{target}/_gpu_check_base_python.pth", "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\\n")
print("added to the venv's path:", dirs)
"""

MISSING_IMPORTS_PY = """\
import importlib, sys
bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure to import counts as missing
        bad.append(name)
print(" ".join(bad))
"""

PROJECT_INFO_PY = ("import iwmf_bench, importlib.metadata as m; print('iwmf_bench', iwmf_bench.__version__, "
                   "len(m.entry_points(group='iwmf_bench.defenses')), 'defenses registered')")

WRITE_SUITE_PY = """\
import sys
import yaml
src, dst, images, cpu, dat = sys.argv[1:6]
raw = yaml.safe_load(open(src))
raw["data"].pop("images", None)  # the node's copy of the images, not the fetched set
raw["data"].update(sources=f"{images}/source", targets=f"{images}/target")
if dat:
    raw["models"]["dlib-resnet"]["weights"] = dat
head = ("# Written by scripts/gpu-check.sh from configs/gpu-check.yaml. TIMING ONLY: the\\n"
        "# diffusion defenses run on random UNet weights (pretrained: false).\\n")
if cpu == "1":  # the CPU dry run: tiny sizes, the same cells
    head += "# CPU dry run: tiny UNet, 2 pairs, 2 DDRM steps, 2 attack steps.\\n"
    raw.update(name="gpu-check-cpu-dry-run", device="cpu")
    raw["data"]["pairs"] = 2
    for opts in raw["defenses"].values():
        opts.pop("requires", None)
        if opts["defense"] in ("diffpure", "iwmfdiff"):
            opts.update(config="tiny", timesteps=2)
    for opts in raw["threat_models"].values():
        if opts.get("attack") == "apgd":
            opts["steps"] = 1 if opts.get("setting") == "adaptive" else 2
    raw.setdefault("evaluation", {})["draws"] = 1
with open(dst, "w") as f:
    f.write(head)
    yaml.safe_dump(raw, f, sort_keys=False, width=110)
print(open(dst).read())
"""

# IWMF per image on the GPU (Triton kernel) and on this node's CPU.
IWMF_CPU_VS_GPU_PY = """\
import statistics, sys, time
import torch
from iwmf_bench.defenses.iwmf import IWMF

size, batches, repeats = int(sys.argv[1]), [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3])
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
print(f"IWMF (lambda_0 0.25, s 3) forward, {size}x{size}, median of {repeats} after a warm-up; "
      f"cpu: {torch.get_num_threads()} threads; torch {torch.__version__}")
print("| device | batch | ms/image | fwd+bwd (exact) ms/image |")
print("|--------|-------|----------|--------------------------|")
for device in devices:
    d = IWMF(lambda_0=0.25).to(device)
    for batch in batches:
        x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        v = torch.randn_like(x)
        def run(grad):
            xi = x.clone().requires_grad_(grad)
            y = d.purify(xi, torch.Generator().manual_seed(1), grad_mode="exact" if grad else "none")
            if grad:
                torch.autograd.grad(y, xi, v)
            if device == "cuda":
                torch.cuda.synchronize()
        cells = []
        for grad in (False, True):
            run(grad)
            times = []
            for _ in range(repeats):
                t = time.perf_counter(); run(grad); times.append(time.perf_counter() - t)
            cells.append(f"{1000 * statistics.median(times) / batch:.3f}")
        print(f"| {device} | {batch} | {cells[0]} | {cells[1]} |", flush=True)
"""


# -- arguments and configuration ------------------------------------------------------------
def usage() -> str:
    """The usage text (this module's docstring), as --help prints it."""
    return __doc__.strip("\n") + "\n"


class UsageError(Exception):
    """Wrong arguments: the usage goes to stderr and the exit status is 2."""


@dataclass
class Args:
    cpu: bool
    python: str
    images: str
    wheels: str
    out: Optional[str]


def parse_args(argv: Sequence[str], environ=os.environ) -> Optional[Args]:
    """The command line as the bash script read it: --dry-run/--cpu anywhere, -h/--help
    (returns None: print the usage), then 2 to 4 positional arguments. GPU_CHECK_CPU=1 also
    selects the dry run. Raises UsageError for a wrong argument count."""
    cpu = environ.get("GPU_CHECK_CPU", "0") == "1"
    positional: List[str] = []
    for a in argv:
        if a in ("--dry-run", "--cpu"):
            cpu = True
        elif a in ("-h", "--help"):
            return None
        else:
            positional.append(a)
    if not 2 <= len(positional) <= 4:
        raise UsageError(f"expected 2 to 4 arguments, got {len(positional)}")
    wheels = positional[2] if len(positional) > 2 else ""
    if wheels == "-":
        wheels = ""
    out = positional[3] if len(positional) > 3 and positional[3] else None
    return Args(cpu=cpu, python=positional[0], images=positional[1], wheels=wheels, out=out)


class Fatal(Exception):
    """A configuration error: 'gpu-check: MESSAGE' on stderr, exit status 2."""


def default_budget(cpu: bool) -> int:
    return DEFAULT_BUDGET_CPU if cpu else DEFAULT_BUDGET_GPU


def read_budget(environ, cpu: bool) -> int:
    raw = environ.get("GPU_CHECK_BUDGET", "")
    if not raw:
        return default_budget(cpu)
    try:
        return int(raw)
    except ValueError:
        raise Fatal(f"GPU_CHECK_BUDGET must be a whole number of seconds, not '{raw}'") from None


@dataclass
class Config:
    cpu: bool
    repo: Path
    python: str
    images: Path
    wheels: Optional[Path]
    out: Path
    work: Path
    dlib: str
    budget: int
    tar: str

    @property
    def venv(self) -> Path:
        return self.work / "venv"

    @property
    def vpy(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def suite_yaml(self) -> Path:
        return self.out / "gpu-check.yaml"


def utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def utc_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def make_config(args: Args, environ=os.environ, repo: Optional[Path] = None) -> Config:
    """Checks the paths and makes them absolute (relative ones against the current folder);
    creates OUT_DIR and the work folder."""
    repo = repo or Path(os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))
    found = shutil.which(args.python)
    if not found:
        raise Fatal(f"no Python at '{args.python}'")
    python = os.path.abspath(found)  # not resolved: a venv's python must keep its path
    images = Path(os.path.abspath(args.images))
    if not ((images / "source").is_dir() and (images / "target").is_dir()):
        raise Fatal(f"'{args.images}' needs source/ and target/ folders (the shared iwmfdiff-imgs)")
    wheels = None
    if args.wheels:
        if not os.path.isdir(args.wheels):
            raise Fatal(f"no wheels folder '{args.wheels}'")
        wheels = Path(os.path.abspath(args.wheels))
    out = args.out or str(repo / "out" / "gpu-check" / (utc_stamp() + ("-cpu" if args.cpu else "")))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError:
        raise Fatal(f"cannot create '{out}'") from None
    tmpdir = environ.get("TMPDIR") or "/tmp"
    work = environ.get("GPU_CHECK_WORK") or os.path.join(tmpdir, "iwmf-bench-gpu-check")
    try:
        os.makedirs(work, exist_ok=True)
    except OSError:
        raise Fatal(f"cannot create '{work}'") from None
    dlib = environ.get("DLIB_DAT", "")
    if not dlib and wheels is not None and (wheels / "dlib_face_recognition_resnet_model_v1.dat").is_file():
        dlib = str(wheels / "dlib_face_recognition_resnet_model_v1.dat")
    tar = environ.get("GPU_CHECK_TAR", "")
    return Config(cpu=args.cpu, repo=repo, python=python, images=images, wheels=wheels,
                  out=Path(os.path.abspath(out)), work=Path(os.path.abspath(work)),
                  dlib=os.path.abspath(dlib) if dlib else "", budget=read_budget(environ, args.cpu),
                  tar=os.path.abspath(tar) if tar else "")


def check_environment(cfg: Config) -> dict:
    """Offline, unattended, and every cache out of the home directory and the repository."""
    w = str(cfg.work)
    return {
        "PYTHONUNBUFFERED": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1", "MPLBACKEND": "Agg", "MPLCONFIGDIR": f"{w}/matplotlib",
        "TORCHINDUCTOR_CACHE_DIR": f"{w}/inductor", "TRITON_CACHE_DIR": f"{w}/triton",
        "IWMF_BENCH_CACHE": f"{w}/align-cache", "NUMBA_CACHE_DIR": f"{w}/numba",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    }


# -- the time budget -------------------------------------------------------------------------
def planned_ends(nominals: Sequence[int], budget: int, nominal_total: int = NOMINAL_TOTAL) -> List[int]:
    """Each step's planned end, in seconds from the start: the sum of the nominal limits so
    far, each scaled to the budget (whole seconds, rounded down per step)."""
    ends, planned = [], 0
    for nominal in nominals:
        planned += nominal * budget // nominal_total
        ends.append(planned)
    return ends


def step_allowance(t0: int, planned_end: int, start: int) -> int:
    """The limit of a step that starts at `start`: it ends by its planned end, KILL_AFTER
    seconds before it for the kill. A step that finished early left its unused time here."""
    return t0 + planned_end - start - KILL_AFTER


# -- running a step ----------------------------------------------------------------------------
class StepTimeout(Exception):
    """The step's time limit ran out."""


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class StepContext:
    """What a step runs with: its log (open for appending), the environment and the step's
    deadline; every command runs through run(), limited to the time the step has left."""

    def __init__(self, cfg: Config, log, deadline: float, env: Optional[dict] = None):
        self.cfg = cfg
        self.log = log
        self.deadline = deadline
        self.env = env if env is not None else dict(os.environ)

    def say(self, *parts: object) -> None:
        self.log.write(" ".join(str(p) for p in parts) + "\n")
        self.log.flush()

    def run(self, cmd: Sequence, limit: Optional[float] = None, trace: bool = False,
            capture: bool = False) -> "subprocess.CompletedProcess":
        """Runs cmd (a list, no shell) with its output in the log (or captured), within the
        step's deadline and `limit` seconds. A command that outlives the step's deadline is
        killed with its process group (and StepTimeout raised); one that only outlives
        `limit` is killed and returns 124, as timeout(1) would. A command that cannot be
        started returns 127 (126: not executable), with the error in the log."""
        cmd = [str(c) for c in cmd]
        if trace:  # as `set -x` showed it; a script given with -c shows as "<script>"
            self.say("+ " + " ".join("<script>" if "\n" in c else shlex.quote(c) for c in cmd))
        left = self.deadline - time.time()
        if left <= 0:
            raise StepTimeout()
        step_bound = limit is None or limit >= left  # the step's deadline comes first
        timeout = left if step_bound else limit
        out = subprocess.PIPE if capture else self.log
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env, start_new_session=True, text=True)
        except OSError as exc:
            self.say(f"{cmd[0]}: {exc.strerror}")
            return subprocess.CompletedProcess(cmd, 126 if isinstance(exc, PermissionError) else 127, "")
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM to the command and all it started, SIGKILL KILL_AFTER seconds later.
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                stdout, _ = proc.communicate(timeout=KILL_AFTER)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                stdout, _ = proc.communicate()
            _kill_group(proc.pid, signal.SIGKILL)
            if step_bound:
                raise StepTimeout() from None
            self.say(f"(timed out after {limit:g}s: {cmd[0]})")
            return subprocess.CompletedProcess(cmd, 124, stdout or "")
        except BaseException:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout or "")


@dataclass
class Step:
    name: str
    nominal: int
    func: Callable[[StepContext], int]  # returns the exit status
    shown: List[str]                    # the command, as the log's first lines show it


@dataclass
class StepResult:
    name: str
    status: str
    seconds: int
    log: Path

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def status_of(rc: int, allow: int) -> str:
    if rc == 0:
        return "pass"
    if rc in (124, 137):
        return f"TIMEOUT after {allow}s"
    return f"FAIL (exit {rc})"


class Runner:
    """Runs the steps in order, each limited so that it ends by its planned end (the sum of
    the nominal limits so far, scaled to the budget), never past the budget."""

    def __init__(self, cfg: Config, env: dict, t0: Optional[int] = None,
                 nominal_total: int = NOMINAL_TOTAL, echo=print):
        self.cfg = cfg
        self.env = env
        self.t0 = int(time.time()) if t0 is None else t0
        self.nominal_total = nominal_total
        self.planned = 0
        self.results: List[StepResult] = []
        self.echo = echo

    def run_step(self, step: Step) -> StepResult:
        log_path = self.cfg.out / f"{step.name}.log"
        self.planned += step.nominal * self.cfg.budget // self.nominal_total
        start = int(time.time())
        allow = step_allowance(self.t0, self.planned, start)
        open(log_path, "w").close()
        with open(log_path, "a") as log:  # appending: the commands write to it too
            log.write(f"# step {step.name} ({utc_iso()}), limit {allow}s\n")
            log.write("#" + "".join(" " + shlex.quote(str(a)) for a in step.shown) + "\n")
            if allow < MIN_ALLOW:
                log.write("# not run: no time left in the budget\n")
                result = StepResult(step.name, "SKIPPED (no time left)", 0, log_path)
                self.results.append(result)
                self.echo(f"gpu-check: {step.name}: skipped (no time left)", flush=True)
                return result
            log.flush()
            self.echo(f"gpu-check: {step.name} (limit {allow}s) ...", flush=True)
            ctx = StepContext(self.cfg, log, time.time() + allow, self.env)
            try:
                rc = step.func(ctx)
            except StepTimeout:
                rc = 124
            except Exception:  # noqa: BLE001 - a step's own error fails that step only
                log.write(traceback.format_exc())
                rc = 1
            now = int(time.time())
            status = status_of(rc, allow)
            log.write(f"# exit {rc} after {now - start}s\n")
        result = StepResult(step.name, status, now - start, log_path)
        self.results.append(result)
        self.echo(f"gpu-check: {step.name}: {status} ({now - start}s)", flush=True)
        return result


def command(*cmd) -> Callable[[StepContext], int]:
    """A step that is one command."""
    return lambda ctx: ctx.run(cmd).returncode


# -- 0. environment ----------------------------------------------------------------------------
def _out(cmd: Sequence[str], default: str = "") -> str:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return default
    return r.stdout.rstrip() if r.returncode == 0 else default


def git_commit(repo: Path, short: bool = False) -> str:
    return _out(["git", "-C", str(repo), "rev-parse"] + (["--short"] if short else []) + ["HEAD"], "unknown")


def _count_entries(folder: Path) -> int:
    return sum(1 for e in os.listdir(folder) if not e.startswith("."))


def _cpu_info() -> str:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cores} cores; {model}"


def step_env(ctx: StepContext) -> int:
    cfg = ctx.cfg
    ctx.say(f"date: {utc_iso()}")
    ctx.say("mode: " + ("CPU dry run (GPU_CHECK_CPU=1 / --dry-run)" if cfg.cpu else "GPU"))
    ctx.say("host: " + (_out(["uname", "-a"]) or " ".join(os.uname())))
    ctx.say(f"repo: {cfg.repo}")
    ctx.say(f"git commit: {git_commit(cfg.repo)}")
    ctx.say("git status (short):")
    status = _out(["git", "-C", str(cfg.repo), "status", "--short"])
    for line in status.splitlines()[:40]:
        ctx.say("  " + line)
    ctx.say(f"python: {cfg.python}")
    ctx.say(f"images: {cfg.images} ({_count_entries(cfg.images / 'source')} sources, "
            f"{_count_entries(cfg.images / 'target')} targets)")
    ctx.say(f"wheels: {cfg.wheels or 'none'}")
    ctx.say(f"work: {cfg.work}")
    ctx.say(f"cpu: {_cpu_info()}")
    ctx.say()
    ctx.say("== torch")
    ctx.run([cfg.python, "-c", TORCH_INFO_PY], limit=60)
    ctx.say()
    ctx.say("== nvidia-smi")
    smi = shutil.which("nvidia-smi")
    if smi:
        ctx.run([smi], limit=20)
        ctx.run([smi, "--query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit",
                 "--format=csv"], limit=20)
    else:
        ctx.say("nvidia-smi not found")
    return 0


# -- 1. setup: venv, project, missing runtime needs from the wheels folder -------------------
def missing_imports(ctx: StepContext) -> List[str]:
    """The NEEDS modules the venv cannot import (one interpreter for all)."""
    r = ctx.run([ctx.cfg.vpy, "-c", MISSING_IMPORTS_PY] + [mod for mod, _ in NEEDS], capture=True)
    if r.returncode != 0:
        ctx.log.write(r.stdout)
        return [mod for mod, _ in NEEDS]
    return r.stdout.split()


def missing_distributions(absent: Sequence[str]) -> List[str]:
    """The distributions to install for the modules `absent`, in NEEDS order, once each."""
    dists: List[str] = []
    for mod, names in NEEDS:
        if mod in absent:
            dists += names
    return list(dict.fromkeys(dists))


def make_venv(ctx: StepContext) -> bool:
    """The venv in the work folder, remade when PYTHON (or whether it has pip) changed.
    Where PYTHON has pip, the venv gets none of its own: pip, setuptools and wheel then come
    from PYTHON's environment like torch (a fresh venv's bundled setuptools can be too old
    to build an editable install without the wheel package); else ensurepip's."""
    cfg = ctx.cfg
    has_pip = ctx.run([cfg.python, "-m", "pip", "--version"], capture=True, trace=True).returncode == 0
    mode = "without-pip" if has_pip else "with-pip"
    marker = cfg.venv / ".base-python"
    try:
        current = marker.read_text().rstrip("\n")
    except OSError:
        current = ""
    if not os.access(cfg.vpy, os.X_OK) or current != f"{cfg.python} {mode}":
        ctx.say(f"+ rm -rf {shlex.quote(str(cfg.venv))}")
        shutil.rmtree(cfg.venv, ignore_errors=True)
        cmd = [cfg.python, "-m", "venv", "--system-site-packages"] + (["--without-pip"] if has_pip else [])
        if ctx.run(cmd + [cfg.venv], trace=True).returncode != 0:
            return False
        marker.write_text(f"{cfg.python} {mode}\n")
    return ctx.run([cfg.python, "-c", BASE_PTH_PY, cfg.vpy], trace=True).returncode == 0


def step_setup(ctx: StepContext) -> int:
    cfg = ctx.cfg
    vpy = cfg.vpy
    if not make_venv(ctx):
        return 1
    if ctx.run([vpy, "-m", "pip", "--version"]).returncode != 0:
        ctx.say("no pip for the venv")
        return 1
    if ctx.run([vpy, "-c", "import torch; print('torch', torch.__version__, 'from', torch.__file__)"]).returncode:
        return 1
    absent = missing_imports(ctx)
    for mod in absent:
        ctx.say(f"missing: {mod}")
    missing = missing_distributions(absent)
    # The editable install's build backend, without build isolation (nothing to fetch):
    # setuptools, and wheel where setuptools is older than 70.1 (no bdist_wheel of its own).
    if ctx.run([vpy, "-c", "import setuptools"], capture=True).returncode != 0:
        missing.append("setuptools")
    new_setuptools = ("import setuptools, sys; "
                      "sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))")
    if (ctx.run([vpy, "-c", new_setuptools], capture=True).returncode != 0
            and ctx.run([vpy, "-c", "import wheel"], capture=True).returncode != 0):
        missing.append("wheel")
    missing = list(dict.fromkeys(missing))
    if missing:
        if cfg.wheels is None:
            ctx.say("missing runtime needs and no WHEELS_DIR: " + " ".join(missing))
        else:
            for dist in missing:
                r = ctx.run([vpy, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                             cfg.wheels, dist], trace=True)
                if r.returncode != 0:
                    ctx.say(f"could not install {dist} from {cfg.wheels}")
    # The project itself (its entry points register the plugins), from this checkout.
    r = ctx.run([vpy, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "-e",
                 cfg.repo], trace=True)
    if r.returncode != 0:
        return 1
    bad = 0
    still = missing_imports(ctx)
    if still:
        ctx.say("STILL MISSING (import): " + " ".join(still))
        bad = 1
    if ctx.run([vpy, "-c", PROJECT_INFO_PY]).returncode != 0:
        return 1
    return bad


# -- 2. the suite: a copy of configs/gpu-check.yaml with the data path filled in -----------
def write_suite(cfg: Config, env: dict) -> bool:
    """Writes OUT/gpu-check.yaml (its output in 01-suite-yaml.log); not a timed step."""
    with open(cfg.out / "01-suite-yaml.log", "w") as log:
        try:
            r = subprocess.run([str(cfg.vpy), "-c", WRITE_SUITE_PY, str(cfg.repo / "configs" / "gpu-check.yaml"),
                                str(cfg.suite_yaml), str(cfg.images), "1" if cfg.cpu else "0", cfg.dlib],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                               timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.write(f"{exc}\n")
            return False
    return r.returncode == 0


SUITE_DONE = re.compile(r"^[0-9]+ cells: [0-9]+ ok, 0 skipped, 0 errors", re.M)
TIMING_ONLY_LABEL = (
    "> **TIMING ONLY** (scripts/gpu-check.sh): the diffusion defenses ran on random UNet weights\n"
    "> (pretrained: false); their rates say nothing about DiffPure or IWMF-Diff as defenses.\n\n")


def step_suite(ctx: StepContext) -> int:
    cfg = ctx.cfg
    suite = cfg.out / "suite"
    shutil.rmtree(suite / "results", ignore_errors=True)  # fresh: cached cells would time nothing
    ctx.log.flush()
    offset = os.path.getsize(ctx.log.name)
    rc = ctx.run(suite_command(cfg)).returncode
    with open(ctx.log.name, errors="replace") as f:  # the suite's output, as `tee` kept it
        f.seek(offset)
        output = f.read()
    (cfg.work / "suite-output.txt").write_text(output)
    # A skipped cell (weights missing, no GPU) fails the step too: the check is that all ran.
    if rc == 0 and not SUITE_DONE.search(output):
        ctx.say("gpu-check: not every cell ran (skipped or errors above)")
        rc = 3
    # Label every rendered leaderboard: timing only.
    for md in sorted((suite / "leaderboard").glob("*.md")):
        if md.is_file():
            md.write_text(TIMING_ONLY_LABEL + md.read_text())
    return rc


def suite_command(cfg: Config) -> List[str]:
    suite = cfg.out / "suite"
    return [str(cfg.venv / "bin" / "iwmf-bench"), "run", "--all", "--config", str(cfg.suite_yaml),
            "--results", str(suite / "results"), "--leaderboards", str(suite / "leaderboard"),
            "--imgs", str(suite / "imgs"), "--no-progress"]


def iwmf_cpu_vs_gpu(size: int, batches: str, repeats: int) -> Callable[[StepContext], int]:
    return lambda ctx: ctx.run([ctx.cfg.vpy, "-c", IWMF_CPU_VS_GPU_PY, size, batches, repeats]).returncode


# -- the steps -------------------------------------------------------------------------------
def steps_before_suite_yaml(cfg: Config) -> List[Step]:
    return [
        Step("00-env", 10, step_env, ["env_info"]),
        Step("01-setup", 40, step_setup, ["setup"]),
    ]


def steps_after_suite_yaml(cfg: Config) -> List[Step]:
    vpy = str(cfg.vpy)

    def cmd(name: str, nominal: int, *argv: str) -> Step:
        return Step(name, nominal, command(*argv), list(argv))

    if cfg.cpu:
        # No GPU: the GPU tests are only collected (they need CUDA); everything else runs tiny.
        return [
            cmd("02-pytest-gpu", 70, vpy, "-m", "pytest", "-m", "gpu", "-q", "--collect-only",
                "-p", "no:cacheprovider"),
            Step("03-suite", 175, step_suite, suite_command(cfg)),
            cmd("04-diffusion-speed", 50, vpy, "benchmarks/diffusion.py", "--config", "tiny", "--device", "cpu",
                "--timesteps", "2", "--batches", "1", "2", "--repeats", "1", "--skip-options", "--skip-memory",
                "--skip-eot"),
            cmd("05-diffusion-options", 35, vpy, "benchmarks/diffusion.py", "--config", "tiny", "--device", "cpu",
                "--timesteps", "2", "--batches", "1", "--repeats", "1", "--skip-speed", "--skip-memory",
                "--skip-eot", "--variants", "fp32 eager", "fp32 cuda graphs"),
            cmd("06-diffusion-memory", 30, vpy, "benchmarks/diffusion.py", "--config", "tiny", "--device", "cpu",
                "--skip-speed", "--skip-options", "--mem-steps", "2", "--mem-batch", "1", "--compile", "false",
                "--repeats", "1", "--eot-images", "1", "--eot-draws", "2", "--eot-steps", "2"),
            cmd("07-purifiers-cuda", 35, vpy, "benchmarks/purifiers.py", "--device", "cpu", "--defenses", "iwmf",
                "--batches", "1", "--size", "64", "--repeats", "1", "--paper-repeats", "1"),
            Step("08-iwmf-cpu-vs-gpu", 20, iwmf_cpu_vs_gpu(64, "1,4", 2), ["iwmf_cpu_vs_gpu", "64", "1,4", "2"]),
        ]
    return [
        cmd("02-pytest-gpu", 70, vpy, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"),
        Step("03-suite", 175, step_suite, suite_command(cfg)),
        # Table 1: the CUDA defaults (bf16, SDPA, compile, CUDA graphs) at batch 1 and 16.
        cmd("04-diffusion-speed", 50, vpy, "benchmarks/diffusion.py", "--config", "celeba_hq", "--device", "cuda",
            "--timesteps", "20", "--batches", "1", "16", "--repeats", "2", "--skip-options", "--skip-memory",
            "--skip-eot"),
        # Table 2: fp32 eager (the baseline of the "before" figures) and the eager/graph variants
        # that need no compilation; the default's own rows are Table 1's.
        cmd("05-diffusion-options", 35, vpy, "benchmarks/diffusion.py", "--config", "celeba_hq", "--device",
            "cuda", "--timesteps", "20", "--batches", "1", "16", "--repeats", "2", "--skip-speed",
            "--skip-memory", "--skip-eot", "--variants", "fp32 eager", "bf16 eager", "bf16 cuda graphs"),
        # Table 3: exact-gradient memory per policy, batch 4, 4 steps (eager: no compile per
        # process); Table 4: one exact EOT step (4 images x 4 draws, 4 steps), draws in one DDRM
        # run vs the loop.
        cmd("06-diffusion-memory", 30, vpy, "benchmarks/diffusion.py", "--config", "celeba_hq", "--device", "cuda",
            "--skip-speed", "--skip-options", "--mem-steps", "4", "--mem-batch", "4", "--compile", "false",
            "--repeats", "1", "--eot-images", "4", "--eot-draws", "4", "--eot-steps", "4"),
        cmd("07-purifiers-cuda", 35, vpy, "benchmarks/purifiers.py", "--device", "cuda", "--repeats", "3"),
        # IWMF per image on this node's CPU beside the GPU kernel (the defense as the suite runs it).
        Step("08-iwmf-cpu-vs-gpu", 20, iwmf_cpu_vs_gpu(160, "1,20", 5), ["iwmf_cpu_vs_gpu", "160", "1,20", "5"]),
    ]


def all_steps(cfg: Config) -> List[Step]:
    """Every step in order (the suite's YAML is written between the two parts)."""
    return steps_before_suite_yaml(cfg) + steps_after_suite_yaml(cfg)


# -- the report ----------------------------------------------------------------------------------
def write_readme(cfg: Config) -> None:
    line = ("CPU DRY RUN (tiny sizes): checks the script, not the GPU; no figure here is a GPU figure."
            if cfg.cpu else "")
    (cfg.out / "README.txt").write_text(README_TEMPLATE.format(date=utc_iso(), dry_run_line=line))


def steps_table(results: Sequence[StepResult]) -> str:
    lines = ["%-22s %-28s %7s  %s" % ("step", "status", "seconds", "log")]
    for r in results:
        lines.append("%-22s %-28s %7s  %s" % (r.name, r.status, r.seconds, r.log.name))
    return "\n".join(lines) + "\n"


def _find(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            r = _find(v, key)
            if r is not None:
                return r
    return None


def figures(out: Path) -> str:
    """The figures that matter: the suite's cell count and cells, pytest's last line, and
    every table the benchmarks printed (titles and Markdown rows) with their fallback lines."""
    lines: List[str] = []
    say = lines.append

    def text(name: str) -> str:
        p = out / name
        return p.read_text(errors="replace") if p.is_file() else ""

    # The suite: its cell count line, each cell's time, and the exact-gradient cost per
    # image per DDRM step of the adaptive diffusion cells.
    suite_log = text("03-suite.log")
    m = re.search(r"^(\d+) cells: (\d+) ok, (\d+) skipped, (\d+) errors", suite_log, re.M)
    say("suite: " + (m.group(0) if m else "no cell count (see 03-suite.log)"))
    if m and (int(m.group(3)) or int(m.group(4))):
        say("  WARNING: not every cell ran; reasons in 03-suite.log / suite/leaderboard")
    rows = []
    for f in sorted((out / "suite" / "results").glob("*/*.json")):
        r = json.loads(f.read_text())
        c = r.get("cell", {})
        d, t = c.get("defense_options", {}), c.get("threat_options", {})
        per = _find(r, "attack_seconds_per_image")
        note = ""
        if per is not None and t.get("grad_mode") == "exact" and d.get("defense") in ("diffpure", "iwmfdiff"):
            steps, eot, ts = t.get("steps", 1), t.get("eot_iter", 1), d.get("timesteps", 20)
            note = (f"exact fwd+bwd {1000 * per / (steps * eot * ts):.1f} ms/image/DDRM step "
                    "(first call's compile included)")
            pol = _find(r, "memory_policy")
            if pol:
                note += f"; memory policy {pol.get('policy')} ({pol.get('kept_steps')}/{pol.get('steps')} kept)"
        rows.append((c.get("defense"), c.get("threat"), r.get("status"), r.get("seconds"),
                     f"{per:.3f}" if per is not None else "", note))
    order = {"clean": 0, "apgd-linf-transfer": 1, "apgd-eot-adaptive": 2}
    rows.sort(key=lambda r: (order.get(r[1], 9), str(r[1]), str(r[0])))
    if rows:
        say(f"  {'defense':26} {'threat':20} {'status':7} {'s':>8} {'attack s/img':>12}  note")
        for row in rows:
            say(f"  {row[0]!s:26} {row[1]!s:20} {row[2]!s:7} {row[3]!s:>8} {row[4]:>12}  {row[5]}")
    say("")
    # pytest's last line
    for line in reversed(text("02-pytest-gpu.log").splitlines()):
        if re.search(r"\b(passed|failed|error|skipped|deselected|collected|tests? collected)\b", line):
            say("pytest -m gpu: " + line.strip())
            break
    say("")
    for name in ("04-diffusion-speed.log", "05-diffusion-options.log", "06-diffusion-memory.log",
                 "07-purifiers-cuda.log", "08-iwmf-cpu-vs-gpu.log"):
        log = text(name).splitlines()
        keep = [l for i, l in enumerate(log)
                if l.startswith(("config=", "default options", "Defenses at")) or l.startswith("|")
                or (i + 1 < len(log) and log[i + 1].startswith("|") and not l.startswith("|") and l.strip())
                or re.search(r"fell back|failed|Traceback|Error", l)]
        if keep:
            say(f"== {name}")
            say("\n".join(keep[:80]))
            say("")
    return "\n".join(lines) + "\n"


def summary(cfg: Config, results: Sequence[StepResult], total: int) -> str:
    head = "CPU DRY RUN (tiny sizes; not GPU figures)" if cfg.cpu else "GPU"
    parts = [f"iwmf-bench GPU check: {head}\n",
             f"report: {cfg.out}\n",
             f"commit: {git_commit(cfg.repo, short=True)}   total: {total}s (budget {cfg.budget}s)\n"]
    env_txt = cfg.out / "env.txt"
    if env_txt.is_file():
        parts += [l + "\n" for l in env_txt.read_text(errors="replace").splitlines()
                  if re.match(r"(torch|cuda:0|triton) ", l)]
    parts += ["\n", steps_table(results), "\n"]
    try:
        parts.append(figures(cfg.out))
    except Exception:  # noqa: BLE001 - the report still gets the table above
        parts.append(traceback.format_exc())
    return "".join(parts)


def pack(cfg: Config) -> None:
    """GPU_CHECK_TAR: the report folder as a .tar.gz."""
    try:
        with tarfile.open(cfg.tar, "w:gz") as tar:
            tar.add(str(cfg.out), arcname=cfg.out.name)
    except (OSError, tarfile.TarError) as exc:
        print(f"gpu-check: could not pack {cfg.tar}: {exc}", file=sys.stderr)
        return
    print(f"packed: {cfg.tar}", flush=True)


# -- the run -----------------------------------------------------------------------------------
def run_check(cfg: Config) -> int:
    """All steps, the report; 0 when every step passed, else 1."""
    os.chdir(cfg.repo)
    env = dict(os.environ)
    env.update(check_environment(cfg))
    t0 = int(time.time())
    write_readme(cfg)
    runner = Runner(cfg, env, t0=t0)
    for step in steps_before_suite_yaml(cfg):
        runner.run_step(step)
        if step.name == "00-env":
            shutil.copyfile(cfg.out / "00-env.log", cfg.out / "env.txt")
    if not write_suite(cfg, env):
        print(f"gpu-check: could not write {cfg.suite_yaml} (see 01-suite-yaml.log)", flush=True)
    for step in steps_after_suite_yaml(cfg):
        runner.run_step(step)
    text = summary(cfg, runner.results, int(time.time()) - t0)
    (cfg.out / "summary.txt").write_text(text)
    sys.stdout.write(text)
    sys.stdout.flush()
    if cfg.tar:
        pack(cfg)
    return 0 if all(r.passed for r in runner.results) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except UsageError:
        sys.stderr.write(usage())
        return 2
    if args is None:
        sys.stdout.write(usage())
        return 0
    try:
        cfg = make_config(args)
    except Fatal as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    try:
        return run_check(cfg)
    except KeyboardInterrupt:
        print("gpu-check: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
