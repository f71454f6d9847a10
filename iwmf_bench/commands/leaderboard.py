"""``iwmf-bench leaderboard render|check``."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ..errors import BenchError
from ..leaderboard import check as compare, committed_suite_cells, provenance
from ..suite import find_suite, load_suite, validate
from ..publish import committed_records, publish, site_dir
from ..site import build_site
from ..runner import run_suite
from .run import add_suite_options, load_checked_suite


def register(sub):
    p = sub.add_parser("leaderboard", help="render leaderboards from results, or check committed numbers")
    s = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = s.add_parser("render", help="render leaderboards/<suite> from the result cache (runs missing cells)")
    add_suite_options(r)
    r.add_argument("--leaderboards", default=None)
    r.add_argument("--imgs", default="imgs")
    r.set_defaults(func=render)
    c = s.add_parser("check", help="re-run a suite and compare with its committed leaderboard")
    add_suite_options(c)
    c.set_defaults(results=None)
    c.add_argument("--leaderboards", default=None, help="committed leaderboard folder (default leaderboards/<suite>)")
    c.add_argument("--atol", type=float, default=None, help="tolerance on rates (default: the suite's check.atol)")
    c.add_argument("--provenance", action="store_true",
                   help="compute nothing: fail, naming the cells and what changed, when a committed cell was "
                   "computed by other code (or config) than the current one (seconds; CI runs it on every "
                   "committed suite)")
    c.set_defaults(func=check)
    w = s.add_parser("site", help="write the static leaderboard site of a suite from its committed cells "
                     "(no computing, no network; `render` and `run` write it too)")
    w.add_argument("--config", default="default", help="suite file or shipped suite name (default: default)")
    w.add_argument("--leaderboards", default=None, help="the suite's leaderboard folder (default leaderboards/<suite>)")
    w.add_argument("--out", default=None, help="where to write it (default leaderboards/site/<suite>)")
    w.set_defaults(func=site)


def render(args) -> int:
    suite = load_checked_suite(args.config)
    records = run_suite(suite, suite.cells(), args.results, args.executor, args.ray_address,
                        progress=not args.no_progress)
    for path in publish(suite, records, args.leaderboards or f"leaderboards/{suite.name}", args.imgs, args.results):
        print(f"wrote {path}")
    return 0


def site(args) -> int:
    suite = load_suite(find_suite(args.config))
    validate(suite)
    folder = Path(args.leaderboards or f"leaderboards/{suite.name}")
    records = committed_records(folder)
    if not records:
        raise BenchError(f"{folder}/cells: no committed cells; run `iwmf-bench leaderboard render --config "
                         f"{args.config}` first")
    out = Path(args.out) if args.out else site_dir(folder, suite.name)
    paths = build_site(suite, records, out)
    print(f"wrote {len(paths)} pages under {out} (open {out / 'index.html'})")
    return 0


def check_provenance(args) -> int:
    suite = load_suite(find_suite(args.config))
    validate(suite)
    committed = args.leaderboards or f"leaderboards/{suite.name}"
    problems = provenance(committed_suite_cells(suite, committed), committed)
    if problems:
        for p in problems:
            print(f"leaderboard check --provenance: {p}", file=sys.stderr)
        raise BenchError(f"provenance check failed for {suite.name}: {len(problems)} committed cell(s) not computed "
                         f"by the current code, first: {problems[0]}")
    print(f"provenance check passed: every committed cell of {suite.name} ({committed}) was computed by the "
          "current code and config")
    return 0


def check(args) -> int:
    if args.provenance:
        return check_provenance(args)
    suite = load_checked_suite(args.config)
    atol = args.atol if args.atol is not None else float(suite.check.get("atol", 0.0))
    committed = args.leaderboards or f"leaderboards/{suite.name}"
    # A fresh cache unless told otherwise: the point is to recompute the numbers.
    with tempfile.TemporaryDirectory(prefix="iwmf-bench-check-") as fresh:
        records = run_suite(suite, suite.cells(), args.results or fresh, args.executor, args.ray_address,
                            progress=not args.no_progress)
    errors = [r for r in records if r["status"] == "error"]
    problems = compare(records, committed, atol) + [f"{r['name']}: error: {r.get('reason', '')}" for r in errors]
    if problems:
        for p in problems:
            print(f"leaderboard check: {p}", file=sys.stderr)
        raise BenchError(f"leaderboard check failed for {suite.name}: {len(problems)} problem(s), first: {problems[0]}")
    ok = sum(r["status"] == "ok" for r in records)
    print(f"leaderboard check passed: {ok} cells of {suite.name} within {atol} of {committed}")
    return 0
