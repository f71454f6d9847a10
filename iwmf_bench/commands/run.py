"""``iwmf-bench run``: compute a suite (every model x defense x threat model)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..devices import resolve_device
from ..errors import BenchError
from ..publish import publish
from ..runner import run_cells, run_suite
from ..suite import check_data, find_suite, load_suite, parse_shard, validate

DEFAULT_CONFIG = "default"  # the shipped default suite (configs/default.yaml in the source tree)


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def add_suite_options(p, executor=True):
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"a suite YAML file, or the name of a shipped suite (default, smoke, tradeoff, extended, paper); "
                   f"default {DEFAULT_CONFIG}. Relative data paths in a suite resolve against its file's folder")
    p.add_argument("--results", default="results", help="result cache folder (default ./results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if executor:
        p.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="local: this process; ray: one Ray task per cell (pip install 'iwmf-bench[ray]')")
        p.add_argument("--ray-address", default=None, help="join an existing Ray cluster (default: start one)")


def register(sub):
    p = sub.add_parser("run", help="run a benchmark suite (default: configs/default.yaml)")
    p.add_argument("--all", action="store_true", help="every cell of the suite")
    p.add_argument("--models", help="comma-separated model labels to keep")
    p.add_argument("--defenses", help="comma-separated defense labels to keep")
    p.add_argument("--attacks", help="comma-separated threat-model labels to keep")
    p.add_argument("--shard", help="i/n: run a deterministic share of the cells (e.g. 1/4)")
    p.add_argument("--leaderboards", default=None, help="where to write leaderboards (default leaderboards/<suite>)")
    p.add_argument("--imgs", default="imgs", help="where to write the plot and example grid")
    add_suite_options(p)
    p.set_defaults(func=run)


def load_checked_suite(config: str):
    """The suite named by ``--config``, validated, with every data path and image set it
    names checked before anything runs (one line and exit 2 when one is missing)."""
    suite = load_suite(find_suite(config))
    validate(suite)
    check_data(suite)
    return suite


def run(args) -> int:
    suite = load_checked_suite(args.config)
    filters = (_names(args.models), _names(args.defenses), _names(args.attacks))
    if not args.all and not any(filters):
        raise BenchError("say which cells to run: --all, or filters --models/--defenses/--attacks")
    shard = parse_shard(args.shard)
    cells = suite.cells(*filters, shard=shard)
    if not cells:
        raise BenchError("no cells selected")
    if args.executor == "local":  # on Ray the workers' devices count, checked per cell
        resolve_device(cells[0].device)
    complete = shard is None and not any(filters)  # the cells re-crafted at equal utility need every cell
    records = (run_suite(suite, cells, args.results, args.executor, args.ray_address, progress=not args.no_progress)
               if complete else
               run_cells(cells, args.results, args.executor, args.ray_address, progress=not args.no_progress))
    summary = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "n/a", "error")}
    na = f", {summary['n/a']} n/a" if summary["n/a"] else ""
    print(f"{len(records)} cells: {summary['ok']} ok, {summary['skipped']} skipped{na}, {summary['error']} errors "
          f"(results in {Path(args.results) / suite.name})")
    if complete:
        out = args.leaderboards or f"leaderboards/{suite.name}"
        for path in publish(suite, records, out, args.imgs, args.results):
            print(f"wrote {path}")
    else:
        print("partial run: leaderboards not rendered (run `iwmf-bench leaderboard render` once all cells are done)")
    for r in records:
        if r["status"] == "error":
            print(f"error: {r['name']}: {r.get('reason', '')}", file=sys.stderr)
    return 1 if summary["error"] else 0
