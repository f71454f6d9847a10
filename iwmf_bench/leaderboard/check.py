"""Provenance and the regression check: whether a committed cell was computed by the
current code (its key), what changed when it was not (stale cells are marked in every
output, never shown as current), and CI's comparison of recomputed rates with the
committed ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..equal_utility import recraft_cells
from ..pipeline.cell import Cell
from ..pipeline.outcome import metrics_of
from .cells import cell_file, checked_rates


def changed_code(record: dict, cell) -> str:
    """What differs between the code (or config) that computed a record and ``cell``'s now."""
    before, now = record.get("code"), cell.code()
    if before is None:
        return "computed before cells recorded their code"
    changed = [f"{part} ({now[part] if part in now else '-'} was {before.get(part, '-')})"
               for part in sorted(set(now) | set(before)) if now.get(part) != before.get(part)]
    return f"code changed: {', '.join(changed)}" if changed else "its config changed"


def staleness(record: dict) -> str | None:
    """None when a finished cell's record was computed by the current code and config (its
    key is the key its cell has now), else what changed: a committed leaderboard that was not
    recomputed after a change shows such cells as stale, never as current."""
    if record.get("status") != "ok" or "key" not in record:
        return None
    try:
        cell = Cell(**record["cell"])
    except TypeError:
        return "its config has fields the current code does not know"
    return None if cell.key == record["key"] else changed_code(record, cell)


def committed_suite_cells(suite, committed_dir: str | Path) -> list[Cell]:
    """The cells a committed leaderboard of ``suite`` should hold: the suite's own and those
    re-crafted at equal utility that its committed cells call for
    (:func:`~iwmf_bench.equal_utility.recraft_cells`: their thresholds come from the
    committed genuine scores), computing nothing."""
    records = [json.loads(p.read_text()) for p in sorted((Path(committed_dir) / "cells").glob("*.json"))]
    return suite.cells() + recraft_cells(suite, records)


def provenance(cells: list, committed_dir: str | Path) -> list[str]:
    """Committed cells that the current code would not have computed, without computing
    anything: a cell's key hashes its config and the fingerprints of the code it runs
    (:meth:`~iwmf_bench.pipeline.cell.Cell.code`), so a committed key that differs from the
    current one names what changed: a component's code, the pipeline's, or the config."""
    committed_dir = Path(committed_dir) / "cells"
    committed = {p.name: json.loads(p.read_text()) for p in sorted(committed_dir.glob("*.json"))}
    if not committed:
        return [f"no committed cells in {committed_dir}; render the leaderboard first"]
    current = {cell_file({"cell": c.to_dict()}): c for c in cells}
    problems = []
    for name, old in committed.items():
        cell = current.get(name)
        if cell is None:
            problems.append(f"{old['name']}: committed but no longer a cell of the suite")
            continue
        if old.get("key") == cell.key:
            continue
        problems.append(f"{old['name']}: {changed_code(old, cell)}; recompute it (iwmf-bench leaderboard render)")
    return problems


def why_moved(old: dict, new: dict) -> str:
    """A code change or a machine change: the keys hash the code, the env says the machine."""
    if old.get("key") != new.get("key"):
        return "the code or config differs from the committed cell's (see leaderboard check --provenance)"
    machine = lambda env: f"{env.get('cpu', '?')} ({env.get('cpu_capability', '?')}, {env.get('gpu', 'no GPU')})"  # noqa: E731
    a, b = machine(old.get("env", {})), machine(new.get("env", {}))
    return (f"same code; committed on {a}, now on {b}" if a != b
            else f"same code and the same kind of machine ({a}): not expected, look for nondeterminism")


def check(records: list[dict], committed_dir: str | Path, atol: float) -> list[str]:
    """Compare fresh records with the committed cell files; return the problems found."""
    committed_dir = Path(committed_dir) / "cells"
    problems = []
    fresh_ok = {cell_file(r): r for r in records if r["status"] == "ok"}
    committed = {p.name: json.loads(p.read_text()) for p in sorted(committed_dir.glob("*.json"))}
    if not committed:
        return [f"no committed cells in {committed_dir}; render the leaderboard first"]
    for name, old in committed.items():
        new = fresh_ok.get(name)
        status = next((r["status"] for r in records if cell_file(r) == name), "not run")
        if old["status"] != "ok":  # committed skipped / n/a: the same status again
            if status != old["status"]:
                problems.append(f"{old['name']}: committed as {old['status']} but now {status}")
            continue
        if new is None:
            problems.append(f"{old['name']}: committed but now {status}")
            continue
        try:
            before = checked_rates(metrics_of(old))
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{old['name']}: committed record is inconsistent: {exc}")
            continue
        now = checked_rates(metrics_of(new))
        for metric, a in before.items():
            b = now[metric]
            # 1e-9: rates are k/n, so a move of exactly the tolerance (2 of 20 = 0.1) must pass
            # although 0.8 - 0.7 is 0.10000000000000009 in floats; NaN: a rate over no pairs
            if not (abs(a - b) <= atol + 1e-9 or (math.isnan(a) and math.isnan(b))):
                problems.append(f"{old['name']}: {metric} moved from {a:.4f} (committed) to {b:.4f} "
                                f"(now), beyond tolerance {atol}; {why_moved(old, new)}")
    for name, new in fresh_ok.items():
        if name not in committed:
            problems.append(f"{new['name']}: ran but has no committed entry (re-render the leaderboard)")
    return problems
