"""Small helpers any layer of the package may import: atomic files, batching, and the
suite keys that are not factory keywords.

This module imports nothing from the project but :mod:`iwmf_bench.errors`, so models,
defenses, attacks, the pipeline stages and the orchestrator can all lean on it
without an import circle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

# Suite-level keys of a model or defense entry (not passed to its factory):
# ``defense`` (the registered name), ``requires: cuda``, a model's ``threshold`` (fixed or
# calibrated) and ``threats: [LABEL, ...]`` (cross the entry with only these threat models).
SUITE_KEYS = ("defense", "requires", "threshold", "threats")


def factory_options(options: dict) -> dict:
    """A suite entry's options without its suite keys: the keywords of its factory."""
    return {k: v for k, v in options.items() if k not in SUITE_KEYS}


def dumps(obj: Any) -> str:
    """JSON as ``json.dumps(obj, indent=2, sort_keys=True)`` writes it, except that a list
    of numbers, strings, booleans or nulls stays on one line (per-pair records and scores:
    a number per line would make a cell file several times longer)."""
    def flat(x):
        return isinstance(x, list) and all(v is None or isinstance(v, (int, float, str, bool)) for v in x)

    def emit(x, depth: int) -> str:
        pad, inner = "  " * depth, "  " * (depth + 1)
        if isinstance(x, dict) and x:
            items = [f"{inner}{json.dumps(str(k))}: {emit(v, depth + 1)}" for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(x, (list, tuple)) and x and not flat(list(x)):
            return "[\n" + ",\n".join(inner + emit(v, depth + 1) for v in x) + "\n" + pad + "]"
        return json.dumps(x)

    return emit(obj, 0)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename: a reader (or a run
    killed mid-write) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(obj))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors_atomic(path: Path, obj: dict) -> None:
    """``torch.save`` through a temporary file and a rename, like :func:`write_json_atomic`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    """``fn`` over ``x`` in chunks of ``batch`` images, without gradients, concatenated."""
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
