"""Stage 4, record: the cell's JSON, written atomically.

Every cell's result is one file ``<results>/<suite>/<key>.json`` (temporary file +
rename), so a run killed at any moment loses at most the cell in flight and a re-run
reuses every finished cell. Only ``ok`` records are stored: a cell skipped for missing
weights or failed with an error runs again next time. A record names the cell, its
key, seed, start time, run time and the environment (versions, device, threads, GPU).
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy
import torch

from .. import __version__
from ..util import write_json_atomic
from .cell import Cell


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout the package runs from (``+dirty`` with local changes);
    None for an installed wheel or without git."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: str) -> dict[str, Any]:
    """Versions, and what decides a cell's float rounding: the CPU model and the instruction
    set torch picked its kernels for (two machines with the same code and seed can differ in
    the last bits, and an attack's path can then diverge), the GPU and its CUDA/cuDNN."""
    env = {"iwmf_bench": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "device": device,
           "torch_threads": torch.get_num_threads(), "git_commit": git_commit(), "cpu": cpu_model(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def new_record(cell: Cell) -> dict[str, Any]:
    """A record's identity and context, before the cell runs (status still to fill in)."""
    return {"key": cell.key, "cell": cell.to_dict(), "name": cell.name, "code": cell.code(),
            "env": environment(cell.device),
            "seed": cell.seed, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class ResultStore:
    """One JSON file per finished cell, keyed by the cell's hash."""

    def __init__(self, root: str | Path, suite: str):
        self.dir = Path(root) / suite

    def path(self, cell: Cell) -> Path:
        return self.dir / f"{cell.key}.json"

    def load(self, cell: Cell) -> dict | None:
        path = self.path(cell)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:  # cannot happen with atomic writes; recompute if it does
            return None
        return record if record.get("status") == "ok" else None

    def save(self, record: dict) -> None:
        if record["status"] == "ok":
            write_json_atomic(self.dir / f"{record['key']}.json", record)
