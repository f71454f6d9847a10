"""Run a suite's cells: predicted skips, the result cache and resume, and the local and
Ray executors with their progress bars.

This is the orchestrator above the cell pipeline (:mod:`iwmf_bench.pipeline`): it
decides which cells to compute where, and each cell goes through
:func:`~iwmf_bench.pipeline.compute.run_cell`, the same code path and the same cache on
every executor. Local, sharded (``--shard i/n``, see :meth:`iwmf_bench.suite.Suite.cells`)
and Ray runs share the cache and resume each other. Cells that cannot run here are
predicted up front (a requirement this machine lacks, missing weights, a missing
optional library), reported once per reason and kept out of the progress bar's ETA.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from .attacks.base import Attack
from .equal_utility import recraft_cells
from .errors import BenchError, NotApplicableError, WeightsError
from .pipeline.build import build_attack, build_defense, build_model, check_applicable
from .pipeline.cell import Cell
from .pipeline.compute import run_cell
from .pipeline.record import ResultStore
from .pipeline.surrogate import surrogate_defense, surrogate_model


def predict_skips(cells: list[Cell]) -> set[str]:
    """Keys of the cells that will come back ``skipped`` here (a requirement this machine
    lacks, a model/defense whose weights are missing, a cross-model surrogate (or its
    defense) whose weights are missing, an attack whose optional library is not
    installed), found by building each distinct model, defense and attack once. Lets the
    local executor report them first and size its progress bar (and ETA) to the cells it
    will actually compute."""
    built: dict[str, Any] = {}  # None: missing weights

    def build(kind: str, builder: Callable[[Cell], Any], cell: Cell, options: dict) -> Any:
        ident = kind + json.dumps(options, sort_keys=True, default=str) + cell.device
        if ident not in built:
            try:
                built[ident] = builder(cell)
            except WeightsError:
                built[ident] = None
            except Exception:  # any other failure surfaces (with its message) when the cell runs
                built[ident] = False
        return built[ident]

    def skips(cell: Cell) -> bool:
        if cell.missing_requirement is not None or build(cell.model, build_model, cell, cell.model_options) is None:
            return True
        t = cell.threat_options
        if t.get("attack"):
            attack = build("attack", build_attack, cell, t)
            if attack not in (None, False) and attack.missing_libraries():
                return True
        if t.get("surrogate"):
            defense_options = t.get("surrogate_defense_options")
            if build(t["surrogate"], surrogate_model, cell, t.get("surrogate_options") or {}) is None or (
                    defense_options and build("defense", surrogate_defense, cell, defense_options) is None):
                return True
        defense = build("defense", build_defense, cell, cell.defense_options)
        if defense is None:
            return True
        try:
            if defense is not False:
                check_applicable(cell, defense)
        except NotApplicableError:
            return True
        return False

    return {c.key for c in cells if skips(c)}


def run_cells(cells: list[Cell], results_root: str | Path, executor: str = "local",
              ray_address: str | None = None, progress: bool = True) -> list[dict]:
    """Run ``cells`` (reusing cached ones) and return their records in order."""
    results_root = Path(results_root)
    records: dict[str, dict] = {}
    todo = []
    for cell in cells:
        cached = ResultStore(results_root, cell.suite).load(cell)
        if cached is not None:
            records[cell.key] = cached
        else:
            todo.append(cell)
    skips = predict_skips(todo) if executor == "local" else set()
    skipped = [c for c in todo if c.key in skips]
    todo = [c for c in todo if c.key not in skips]
    bar = tqdm(total=len(cells) - len(skipped), initial=len(cells) - len(skipped) - len(todo), desc="suite",
               unit="cell", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    bar.set_postfix_str(f"{bar.n} cached, {len(skipped)} skipped")
    by_reason: dict[tuple[str, str], list[str]] = {}
    for cell in skipped:  # reported up front, one line per reason, outside the bar's rate and ETA
        records[cell.key] = record = run_cell(cell, results_root)
        if record["status"] in ("skipped", "n/a"):
            by_reason.setdefault((record["status"], record.get("reason", "")), []).append(record["name"])
        else:
            _report(record, bar)
    for (status, reason), names in by_reason.items():
        bar.write(f"{status} {len(names)} cell(s) ({_summary(names)}): {reason}", file=sys.stderr)
    if executor == "local":
        Attack.progress = progress  # attack iterations show under the stage bar, as in `iwmf-bench attack`
        for cell in todo:
            bar.set_description(f"suite [{cell.name}]")
            stage_bar = tqdm(total=4, desc=f"  {cell.name}", leave=False, disable=not progress,
                             file=sys.stderr, dynamic_ncols=True)

            def stage(name, _bar=stage_bar):
                if _bar.n or name != "load model":
                    _bar.update(1)
                _bar.set_postfix_str(name)

            records[cell.key] = run_cell(cell, results_root, stage)
            stage_bar.close()
            _report(records[cell.key], bar)
            bar.update(1)
        Attack.progress = False
    elif executor == "ray":
        for record in _run_ray(todo, results_root, ray_address):
            records[record["key"]] = record
            _report(record, bar)
            bar.update(1)
    else:
        raise BenchError(f"unknown executor {executor!r}; use 'local' or 'ray'")
    bar.close()
    return [records[c.key] for c in cells]


def run_suite(suite, cells: list[Cell], results_root: str | Path, executor: str = "local",
              ray_address: str | None = None, progress: bool = True) -> list[dict]:
    """Run ``cells`` of ``suite`` (:func:`run_cells`), then, when the suite sets
    ``operating_point: {recraft: true}``, the cells that the finished ones call for at equal
    utility (:func:`~iwmf_bench.equal_utility.recraft_cells`: a threshold-dependent attack
    crafted again at its defense's re-tuned threshold, which is only known once the
    genuine stages ran); their records follow the others."""
    records = run_cells(cells, results_root, executor, ray_address, progress)
    again = recraft_cells(suite, records)
    if again:
        print(f"equal utility: {len(again)} cell(s) of threshold-dependent attacks, crafted again at their "
              "defense's re-tuned threshold", file=sys.stderr)
        records += run_cells(again, results_root, executor, ray_address, progress)
    return records


def _summary(names: list[str], shown: int = 3) -> str:
    """'a, b, c and 5 more' for a list of cell names."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _report(record: dict, bar) -> None:
    if record["status"] != "ok":
        first = record.get("reason", "").splitlines()[0] if record.get("reason") else ""
        bar.write(f"{record['status']}: {record['name']}: {first}", file=sys.stderr)


def _run_ray(cells: list[Cell], results_root: Path, address: str | None):
    try:
        import ray
    except ImportError:
        raise BenchError("--executor ray needs Ray: pip install 'iwmf-bench[ray]'") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=int(os.environ.get("IWMF_BENCH_RAY_CPUS", os.cpu_count() or 1)),
                     include_dashboard=False, log_to_driver=False)
    task = ray.remote(_ray_cell)
    pending = {}
    for cell in cells:
        gpus = 1 if cell.device.startswith("cuda") else 0
        ref = task.options(num_cpus=1, num_gpus=gpus).remote(cell.transport(), str(results_root))
        pending[ref] = cell
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)
            yield ray.get(ref)


def _ray_cell(cell: dict, results_root: str) -> dict:
    # Same code path and cache as the local executor; runs on a Ray worker.
    return run_cell(cell, results_root)
