"""One cell, top to bottom: build, pairs, craft, score, record.

:func:`compute_cell` reads as the benchmark's definition of a cell; :func:`run_cell`
adds the result cache and turns failures into records (``skipped`` with the reason and
the fix, or ``error`` with the traceback), so one broken cell never takes a suite down.
The orchestrator (:mod:`iwmf_bench.runner`) calls :func:`run_cell` locally or on Ray
workers; nothing here knows about suites, shards or executors.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..devices import resolve_device
from ..errors import BenchError, MissingExtraError, NotApplicableError, WeightsError
from .build import build_defense, build_model, check_applicable, missing_weights
from . import data_spec
from .cell import Cell
from .craft import Adaptive, Clean, Crafter, CraftTask, Transfer
from .dataset_pairs import DatasetPairs
from .folder_pairs import FolderPairs
from .pairs import PairSource
from .record import ResultStore, new_record
from .score import genuine, references, score
from .surrogate import SurrogateTransfer
from .threshold import with_threshold


def pair_source(cell: Cell) -> PairSource:
    """Stage 1's implementation: a dataset plugin when ``data.dataset`` names one, else two folders."""
    data = data_spec.resolve(cell.data, cell.root)
    return DatasetPairs(data, cell.seed) if "dataset" in data else FolderPairs(data)


def crafter(cell: Cell) -> Crafter:
    """Stage 2's implementation for the cell's threat model."""
    if cell.setting is None:
        return Clean()
    if cell.setting == "transfer":
        return SurrogateTransfer() if "surrogate" in cell.threat_options else Transfer()
    return Adaptive()


def compute_cell(cell: Cell, results_root: Path | None = None, stage: Callable[[str], None] = lambda s: None) -> dict:
    """The metrics of one cell (raises on failure; see :func:`run_cell`)."""
    stage("load model")
    model, threshold_source = with_threshold(cell, build_model(cell))
    defense = build_defense(cell)
    check_applicable(cell, defense)
    source = pair_source(cell)
    pairs = source.pairs(cell.model, model.input_size)

    stage("genuine")
    gen = genuine(cell, model, defense, pairs)

    stage("attack")
    refs = references(cell, model, pairs, gen)
    crafted = crafter(cell).craft(CraftTask(cell, model, defense, source, pairs, refs, results_root))

    stage("evaluate")
    out = score(cell, model, defense, pairs, gen, crafted, refs)
    if threshold_source is not None:
        out["threshold_source"] = threshold_source
    return out


def run_cell(cell: Cell | dict, results_root: str | Path | None, stage: Callable[[str], None] = lambda s: None) -> dict:
    """Compute one cell and cache it; never raises for a cell that fails.

    Returns a record with ``status`` ``ok``, ``skipped`` (weights missing: the reason
    says how to fix it) or ``error`` (message and traceback).
    """
    if isinstance(cell, dict):
        cell = Cell(**cell)
    store = ResultStore(results_root, cell.suite) if results_root else None
    if store is not None and (cached := store.load(cell)) is not None:
        return cached
    record: dict[str, Any] = new_record(cell)
    start = time.perf_counter()
    try:
        resolve_device(cell.device)  # a clear error on a machine without that device
        if (missing := cell.missing_requirement) is not None:
            record.update(status="skipped", reason="; ".join([missing, *missing_weights(cell)]))
        else:
            record["metrics"] = compute_cell(cell, Path(results_root) if results_root else None, stage)
            record["status"] = "ok"
    except (WeightsError, MissingExtraError, NotApplicableError) as exc:
        record.update(status="skipped", reason=str(exc))
    except BenchError as exc:
        record.update(status="error", reason=str(exc))
    except Exception as exc:  # a bug in one cell must not take the suite down
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - start, 3)
    if store is not None:
        store.save(record)
    return record
