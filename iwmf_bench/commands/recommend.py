"""``iwmf-bench recommend``: the setting of a defense family a deployer should pick under a
utility constraint (:mod:`iwmf_bench.recommend`), from the suite's cells."""

from __future__ import annotations

import json
from pathlib import Path

from ..equal_utility import undefended_rows
from ..errors import BenchError
from ..leaderboard import cell_file
from ..recommend import recommend, report
from ..runner import run_cells
from .run import add_suite_options, load_checked_suite


def register(sub):
    p = sub.add_parser("recommend", help="which setting of a defense family to deploy under a genuine-FRR "
                       "constraint (reads the suite's committed cells, runs what is missing)")
    add_suite_options(p)
    p.set_defaults(config="tradeoff")
    p.add_argument("--model", required=True, help="model label of the suite")
    p.add_argument("--family", required=True, help="a strength-swept defense family of the suite (e.g. iwmf)")
    p.add_argument("--max-frr-increase", type=float, default=0.02,
                   help="utility constraint: genuine FRR at most this much above the undefended model's (default "
                   "0.02, i.e. 2 points)")
    p.add_argument("--budget", default=None, help="worst-case budget to rank by, e.g. 'Linf 0.008' (default: the "
                   "one with the most threat models)")
    p.add_argument("--leaderboards", default=None, help="committed cells to read (default leaderboards/<suite>)")
    p.set_defaults(func=main)


def main(args) -> int:
    if not 0 <= args.max_frr_increase < 1:
        raise BenchError(f"--max-frr-increase must be in [0, 1) (a fraction: 0.02 is 2 points), got "
                         f"{args.max_frr_increase}")
    suite = load_checked_suite(args.config)
    if args.model not in suite.models:
        raise BenchError(f"--model {args.model}: not a model of {suite.name} (has: {', '.join(suite.models)})")
    if args.family not in suite.families:
        raise BenchError(f"--family {args.family}: not a strength-swept family of {suite.name} (has: "
                         f"{', '.join(suite.families) or 'none'})")
    wanted = set(suite.families[args.family]["rows"]) | set(undefended_rows(suite))
    cells = [c for c in suite.cells(models=[args.model]) if c.defense in wanted]
    committed = Path(args.leaderboards or f"leaderboards/{suite.name}") / "cells"
    records, missing = [], []
    for cell in cells:  # a committed cell computed by the current code and config is the cell
        path = committed / cell_file({"cell": cell.to_dict()})
        record = json.loads(path.read_text()) if path.is_file() else None
        if record is not None and record.get("key") == cell.key:
            records.append(record)
        else:
            missing.append(cell)
    if missing:
        print(f"recommend: {len(missing)} of {len(cells)} cells not committed for the current code; computing them "
              f"(cached in {args.results})")
        records += run_cells(missing, args.results, args.executor, args.ray_address, progress=not args.no_progress)
    try:
        rec = recommend(suite, records, args.model, args.family, args.max_frr_increase, args.budget)
    except ValueError as exc:
        raise BenchError(f"recommend: {exc}") from None
    print(report(rec))
    return 0
