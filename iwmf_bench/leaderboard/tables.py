"""The leaderboard's tables per model: rows of defenses, the worst case per budget
(rows that met fewer threat models listed apart), every threat model's rate, paired
rankings, the equal-utility section and the notes, as display strings and raw numbers."""

from __future__ import annotations

from typing import Any

from .. import equal_utility
from ..equal_utility import APART_MARK
from ..paired import compare, ranking
from ..pipeline.outcome import metrics_of
from ..ranking import budget_order, comparability, pct, per_pair_success, ranked, worst_case
from ..suite import Suite
from .cells import cell_display, success
from .check import staleness
from .deployments import deployment_notes, deployment_section, known_section
from .notes import (adaptive_below_transfer, apart_notes, dataset_notes, decision_notes, identity_note,
                    minimal_budget_notes, sanity_notes, threat_scope)


def paired_rankings(records: list[dict], columns: list[str], worst: dict[str, dict]) -> dict[str, dict]:
    """Per column (the worst case of each budget, then each threat model): the defenses'
    paired ranking (:func:`~iwmf_bench.paired.ranking`) and every pairwise sign test."""
    out = {}
    for column in columns:
        if column.startswith("worst case "):
            budget = column.removeprefix("worst case ")
            per = {d: w[budget]["per_pair_single"] for d, w in worst.items() if budget in w}
        else:
            per = {r["cell"]["defense"]: per_pair_success(r) for r in records
                   if r["status"] == "ok" and r["cell"]["threat"] == column}
        if len(per) >= 2:
            out[column] = {"ranking": ranking(per), "tests": [c.to_dict() for c in compare(per)]}
    return out


def tables(suite: Suite, records: list[dict]) -> dict[str, dict[str, Any]]:
    """Per model: headers, rows (display strings), raw rows (numbers) and skip notes. Cells
    crafted again at a defense's equal-utility threshold count in that section only."""
    everything = records
    records = equal_utility.split_recrafted(records)[0]
    by = {(r["cell"]["model"], r["cell"]["defense"], r["cell"]["threat"]): r for r in records}
    models = list(dict.fromkeys(r["cell"]["model"] for r in records))
    all_threats = [t for t in suite.columns() if any(k[2] == t for k in by)]
    defenses = [d for d in suite.defenses if any(k[1] == d for k in by)]
    out = {}
    for m in models:
        # Only the columns this model is crossed with (a suite entry's `threats:` may limit them).
        threats = [t for t in all_threats if any(k[0] == m and k[2] == t for k in by)]
        goals = {label: opts.get("goal") for t in suite.threat_models for label, opts in suite.budgets(t)}
        rate = lambda t: "dodging" if goals[t] == "dodging" else "FAR"  # noqa: E731
        by_def = {d: [by[k] for k in by if k[0] == m and k[1] == d] for d in defenses}
        worst = {d: worst_case(by_def[d]) for d in defenses}
        budgets = sorted({b for w in worst.values() for b in w}, key=budget_order)
        # Rows that met fewer threat models at a budget than others: apart, marked (AutoAttack's
        # rule compares rows only when every row faced the same attacks).
        missing = {b: comparability({d: rs for d, rs in by_def.items() if worst[d]}, b) for b in budgets}
        headers = (["defense", "FRR genuine %"] + [f"worst case {b} %" for b in budgets]
                   + [f"{rate(t)} {t} %" for t in threats] + ["s/img"])
        rows, raw = [], []
        # Cells whose adaptive attack falls below transfer: marked "(!)", explained in the notes.
        suspicious = {(d, t) for d, t, _ in adaptive_below_transfer([by[k] for k in by if k[0] == m])}
        reasons: dict[str, list[str]] = {}  # one note per distinct reason, naming the cells
        # Committed cells computed by other code than the current one (a suite too costly to
        # recompute at every change): shown, marked stale with what changed, never as current.
        stale = {(k[1], k[2]): why for k in by if k[0] == m and (why := staleness(by[k]))}
        for d in defenses:
            cells = [by.get((m, d, t)) for t in threats]
            ok = [c for c in cells if c and c["status"] == "ok"]
            first = metrics_of(ok[0]) if ok else None
            row = [d, pct(first.frr_genuine) if first else "skipped"]
            row += [pct(worst[d][b]) + (APART_MARK if missing[b].get(d) else "") if b in worst[d] else ""
                    for b in budgets]
            raw_row = {"defense": d, "frr_genuine": first.frr_genuine.to_dict() if first else None,
                       "worst_case": {b: {**w, "comparable": not missing[b].get(d),
                                          "missing_threats": missing[b].get(d, [])} for b, w in worst[d].items()},
                       "far": {},
                       "seconds_per_image": first.seconds_per_image if first else None}
            for t, c in zip(threats, cells):
                if c is None:
                    row.append("")
                elif c["status"] == "ok":
                    why = stale.get((d, t))
                    row.append(cell_display(c) + (" (!)" if (d, t) in suspicious else "") + (" (stale)" if why else ""))
                    raw_row["far"][t] = {**success(c).to_dict(), **({"stale": why} if why else {})}
                else:
                    row.append(c["status"])  # skipped, n/a (the threat model does not apply), error
                    where = d if c["status"] == "skipped" else f"{d}/{t}"
                    cells_with = reasons.setdefault(f"{c['status']}: {c.get('reason', '')}", [])
                    if where not in cells_with:
                        cells_with.append(where)
            row.append(f"{first.seconds_per_image:.4f}" if first else "")
            rows.append(row)
            raw.append(raw_row)
        notes = [f"{reason.split(': ', 1)[0]} ({', '.join(where)}): {reason.split(': ', 1)[1]}"
                 for reason, where in reasons.items()]
        if stale:
            notes.append(f"stale ({len(stale)} cells, marked): computed by other code or config than the current "
                         f"one, e.g. {'/'.join(next(iter(stale)))}: {next(iter(stale.values()))}; the JSON names what "
                         "changed per cell; recompute with `iwmf-bench leaderboard render`")
        notes += minimal_budget_notes([by[k] for k in by if k[0] == m])
        notes += decision_notes([by[k] for k in by if k[0] == m])
        notes += sanity_notes([by[k] for k in by if k[0] == m])
        notes += deployment_notes([by[k] for k in by if k[0] == m])
        notes += dataset_notes([by[k] for k in by if k[0] == m])  # threshold source, clean ROC (datasets)
        # The Markdown table shows one budget of each sweep; CSV and JSON keep them all.
        # Rows sorted by the first worst-case column (lowest FAR first; skipped rows last).
        if budgets:
            first_budget = budgets[0]
            rows, raw = ranked(rows, raw, worst, missing[first_budget], first_budget)
            notes.insert(0, f"worst case {first_budget} (first column, rows sorted by it): per pair, the best of "
                         f"{', '.join(worst[raw[0]['defense']][first_budget]['threats'])} (AutoAttack's rule: "
                         "a pair is robust only if every threat model within that budget fails on it)")
            notes[1:1] = apart_notes(missing)
        w = len(budgets)
        shown = [0, 1] + [2 + i for i in range(w)] + [2 + w + i for i, t in enumerate(threats) if suite.shown(t)] \
            + [len(headers) - 1]
        model_records = [by[k] for k in by if k[0] == m]
        paired = paired_rankings(model_records, [f"worst case {b}" for b in budgets] + threats,
                                 {d: {b: w for b, w in worst[d].items() if not missing[b].get(d)} for d in defenses})
        if (line := identity_note(model_records)) is not None:
            notes.append(line)
        eu, eu_notes = equal_utility.section(suite, [r for r in everything if r["cell"]["model"] == m], threats)
        notes += eu_notes
        families = equal_utility.family_section(suite, raw, eu["raw"]) if eu else None
        sections = [s for s in (eu, families, deployment_section(suite, model_records, threats),
                                known_section(model_records)) if s]
        scope = threat_scope(suite, m, threats)
        out[m] = {"scope": scope, "headers": headers, "rows": rows, "raw": raw, "notes": notes, "paired": paired, "sections": sections,
                  "md_headers": [headers[i] for i in shown], "md_rows": [[row[i] for i in shown] for row in rows],
                  "md_paired": [c for c in paired if c.startswith("worst case ") or suite.shown(c)]}
    return out
