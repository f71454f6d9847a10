"""Leaderboards rendered from cell records, and the regression check CI runs.

Per model: rows are defenses; columns are the FRR on genuine images after purification,
the FAR under each threat model (single-shot, with 95% Wilson intervals), and seconds
per image of purification. Written as Markdown (tabulate), CSV and JSON; each cell's
record is also kept as one JSON file (``cells/``), which is what the check compares.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .attacks.base import blackbox_beats_whitebox
from .metrics import Rate
from .paired import BOOTSTRAP, MIN_IDENTITIES, compare, identity_interval, ranking
from .pipeline.cell import Cell
from .pipeline.outcome import DEPLOYMENTS, CellMetrics, attack_success, metrics_of
from . import equal_utility
from .equal_utility import APART_MARK
from .ranking import (budget_of, budget_order, comparability, per_pair_success, randomness_of,  # noqa: F401 (API)
                      ranked, worst_case)
from .suite import Suite
from .util import write_json_atomic


def checked_rates(m: CellMetrics) -> dict[str, float]:
    """The rates the regression check compares, by their names in the JSON (a dodging
    cell's success rates are ``dodging_success*``): single-shot and worst-of-N, the
    majority deployment's, and a known-randomness cell's on fresh draws."""
    out = {m.rate_name: m.success.value, f"{m.rate_name}_worst_of_n": m.success_worst_of_n.value,
           "frr_genuine": m.frr_genuine.value, "frr_adv_true_identity": m.frr_adv_true_identity.value}
    majority = m.deployment("majority")
    out.update({f"{m.rate_name}_majority": majority.success.value, "frr_genuine_majority": majority.frr_genuine.value,
                "frr_adv_true_identity_majority": majority.frr_adv_true_identity.value})
    if m.fresh_draws:
        out[f"{m.rate_name}_fresh_draws"] = m.fresh_draws["single-shot"].value
    return out


def _pct(rate: Rate | dict) -> str:
    """``12.5 [4, 30]``: a rate (or a worst case's dict) in % with its 95% interval."""
    value, (lo, hi) = (rate.value, rate.interval) if isinstance(rate, Rate) else (rate["value"], rate["ci95"])
    return f"{100 * value:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def success(record: dict) -> Rate:
    """The attack's success rate of a cell: its FAR (impersonation), or the rate of
    probes rejected against their own identity (``goal: dodging``)."""
    return metrics_of(record).success


def is_random_cell(m: CellMetrics) -> bool:
    return m.deployments is not None


def _short(rate: Rate) -> str:
    return f"{100 * rate.value:.1f}"


def deployment_section(suite: Suite, records: list[dict], threats: list[str]) -> dict | None:
    """The three deployments of each random defense (rows) under each threat model shown
    (one column each: ``single / worst-of-N / majority`` FAR, %), with the FRR of genuine
    and of adversarial images single-shot and by majority; None without random cells."""
    ok = [r for r in records if r["status"] == "ok" and is_random_cell(metrics_of(r))]
    if not ok:
        return None
    shown = [t for t in threats if suite.shown(t) and any(r["cell"]["threat"] == t for r in ok)]
    by = {(r["cell"]["defense"], r["cell"]["threat"]): metrics_of(r) for r in ok}
    headers = ["defense", "FRR genuine % (single / majority)"] + [f"{t} % (single / worst / majority)" for t in shown]
    rows, raw = [], []
    for d in dict.fromkeys(r["cell"]["defense"] for r in ok):
        first = next(m for (dd, _), m in by.items() if dd == d)
        g = [first.deployment(x).frr_genuine for x in ("single-shot", "majority")]
        row = [d, " / ".join(_short(r) for r in g)]
        raw_row = {"defense": d, "frr_genuine": {x: first.deployment(x).frr_genuine.to_dict() for x in DEPLOYMENTS},
                   "threats": {}}
        for t in shown:
            m = by.get((d, t))
            row.append(" / ".join(_short(m.deployment(x).success) for x in DEPLOYMENTS) if m else "")
            if m:
                raw_row["threats"][t] = {x: m.deployment(x).to_dict(m.rate_name) for x in DEPLOYMENTS}
        rows.append(row)
        raw.append(raw_row)
    return {"id": "deployments", "title": "Deployments of the random defenses", "headers": headers, "rows": rows, "raw": raw,
            "caption": "Each cell scored three ways from the same draws (N = the suite's evaluation draws): "
                       "single-shot (each purification counted), worst-of-N (the attacker resubmits until one "
                       "draw accepts) and majority (purify N times, accept when more than half accept). FRR of "
                       "adversarial images against their true identity per deployment: the cells' JSON."}


def counterpart(known: dict, records: list[dict]) -> dict | None:
    """The unknown-randomness cell of a known-randomness one: same model, defense and
    threat options except ``randomness``, ``eot_iter`` and ``steps`` (the default suite
    pairs them at an equal number of gradient evaluations)."""
    loose = ("randomness", "eot_iter", "steps", "table_eps")
    want = {k: v for k, v in known["cell"]["threat_options"].items() if k not in loose}
    for r in records:
        c = r["cell"]
        opts = c["threat_options"]
        if r["status"] == "ok" and c["model"] == known["cell"]["model"] and c["defense"] == known["cell"]["defense"] \
                and randomness_of(r) == "unknown" \
                and {k: v for k, v in opts.items() if k not in loose} == want:
            return r
    return None


def gradient_cost(options: dict) -> int:
    """Gradient evaluations per image of an EOT attack: (steps + 1) x eot_iter."""
    return (int(options.get("steps", 0)) + 1) * int(options.get("eot_iter", 1))


def known_section(records: list[dict]) -> dict | None:
    """Per random defense and known-randomness threat model: its FAR on the draws it knew,
    on fresh draws, and the FAR of the same attack with unknown randomness (the part of the
    robustness that comes from stochasticity is the gap); None without known cells."""
    known = [r for r in records if r["status"] == "ok" and randomness_of(r) == "known"]
    if not known:
        return None
    headers = ["defense", "threat (known)", "budget", "known draws % (single / majority)",
               "fresh draws % (single / majority)", "unknown randomness", "unknown % (single / majority)",
               "known - unknown, points"]
    rows, raw = [], []
    for r in known:
        m, other = metrics_of(r), counterpart(r, records)
        fresh = m.fresh_draws or {}
        u = metrics_of(other) if other else None
        pair = lambda get: " / ".join(_short(get(x)) for x in ("single-shot", "majority"))  # noqa: E731
        gap = 100 * (m.success.value - u.success.value) if u else None
        rows.append([r["cell"]["defense"], r["cell"]["threat"], budget_of(r) or "",
                     pair(lambda x: m.deployment(x).success),
                     pair(lambda x: fresh[x]) if fresh else "",
                     (f"{other['cell']['threat']}, {gradient_cost(other['cell']['threat_options'])} gradients "
                      f"(known: {gradient_cost(r['cell']['threat_options'])})") if other else "none in the suite",
                     pair(lambda x: u.deployment(x).success) if u else "", f"{gap:+.1f}" if u else ""])
        raw.append({"defense": r["cell"]["defense"], "threat": r["cell"]["threat"], "budget": budget_of(r),
                    "known": {x: m.deployment(x).success.to_dict() for x in DEPLOYMENTS},
                    "fresh": {x: fresh[x].to_dict() for x in DEPLOYMENTS} if fresh else None,
                    "unknown_threat": other["cell"]["threat"] if other else None,
                    "unknown": {x: u.deployment(x).success.to_dict() for x in DEPLOYMENTS} if u else None})
    return {"id": "known_randomness", "title": "Known against unknown randomness", "headers": headers, "rows": rows, "raw": raw,
            "caption": "Known: the attacker crafts against the exact draws the scorer then uses, so the random "
                       "defense is a fixed function to it; fresh: the same images on draws it did not know; "
                       "unknown: the same attack drawing its own randomness. The gap between known and unknown is "
                       "the part of the robustness that comes from stochasticity."}


def deployment_notes(records: list[dict]) -> list[str]:
    """The sanity rules of random defenses, on every cell: each deployment's rates follow
    from the per-pair draws and votes; majority FAR <= worst-of-N FAR; with known
    randomness FAR >= the unknown-randomness FAR of the same attack and budget."""
    notes, checked, inconsistent = [], 0, False
    for r in records:
        if r["status"] != "ok" or not is_random_cell(m := metrics_of(r)):
            continue
        checked += 1
        where = f"{r['cell']['defense']}/{r['cell']['threat']}"
        p = m.per_pair
        wrong = [f"{d} {m.rate_name}" for d in DEPLOYMENTS
                 if attack_success(p.successes, p.draws, d, m.goal).k != m.deployment(d).success.k]
        if m.votes:
            wrong += [f"{d} {name}" for d in DEPLOYMENTS for name, v in
                      (("frr_genuine", m.votes["genuine"]), ("frr_adv_true_identity", m.votes["adversarial_true_identity"]))
                      if v.rate(d, rejected=True).k != getattr(m.deployment(d), name).k]
        if m.success.k != m.deployment("single-shot").success.k or \
                m.success_worst_of_n.k != m.deployment("worst-of-n").success.k:
            wrong.append("the cell's own single-shot / worst-of-N rates")
        if wrong:
            inconsistent = True
            notes.append(f"sanity ({where}): {', '.join(wrong)} do not follow from the per-pair draws; the record "
                         "is inconsistent, recompute it")
        if m.deployment("majority").success.value > m.deployment("worst-of-n").success.value:
            notes.append(f"sanity ({where}): majority {m.rate_name} above worst-of-N, which cannot happen; "
                         "recompute it")
        if randomness_of(r) == "known" and (other := counterpart(r, records)):
            k, u = m.success, metrics_of(other).success
            if k.value < u.value:
                beyond = "beyond" if k.interval[1] < u.interval[0] else "within"
                notes.append(f"sanity ({where}): known randomness ({100 * k.value:.1f}%) below unknown "
                             f"{other['cell']['threat']} ({100 * u.value:.1f}%, {beyond} the 95% intervals): "
                             "the attack is too weak to trust on this defense")
    if checked:
        notes.append(f"deployments: in all {checked} cells of random defenses every deployment's rate was recomputed "
                     "from the per-pair draws and votes" + ("" if inconsistent else " and matches the record"))
    return notes


def cell_display(record: dict) -> str:
    """A cell's rate with its interval: over identities where the data has enough of them
    (:func:`~iwmf_bench.paired.identity_interval`), else the Wilson interval of its Rate."""
    m = metrics_of(record)
    by_identity = identity_interval(per_pair_success(record), m.per_pair.probe_identity)
    return _pct({"value": m.success.value, "ci95": by_identity} if by_identity else m.success)


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


def identity_note(records: list[dict]) -> str | None:
    """One line when the pairs share too few identities for intervals over identities."""
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return None
    p = metrics_of(ok[0]).per_pair
    sources, targets = len(set(p.probe_identity)), len(set(p.reference_identity))
    if sources >= MIN_IDENTITIES:
        return (f"intervals: percentile bootstrap over the {sources} source identities ({BOOTSTRAP} resamples, "
                "seed 0): pairs of one identity are not independent")
    return (f"intervals and paired tests treat the {len(p.successes)} pairs as independent, but they come from "
            f"{sources} source and {targets} target identit{'y' if targets == 1 else 'ies'}: too few (under "
            f"{MIN_IDENTITIES}) for a bootstrap over identities, so differences between defenses generalize to "
            "these faces, not to faces at large")


def cell_file(record: dict) -> str:
    c = record["cell"]
    return f"{c['model']}__{c['defense']}__{c['threat']}.json"


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


def tables(suite: Suite, records: list[dict]) -> dict[str, dict[str, Any]]:
    """Per model: headers, rows (display strings), raw rows (numbers) and skip notes."""
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
            row = [d, _pct(first.frr_genuine) if first else "skipped"]
            row += [_pct(worst[d][b]) + (APART_MARK if missing[b].get(d) else "") if b in worst[d] else ""
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
        eu, eu_notes = equal_utility.section(suite, model_records, threats)
        notes += eu_notes
        families = equal_utility.family_section(suite, raw, eu["raw"]) if eu else None
        sections = [s for s in (eu, families, deployment_section(suite, model_records, threats),
                                known_section(model_records)) if s]
        scope = threat_scope(suite, m, threats)
        out[m] = {"scope": scope, "headers": headers, "rows": rows, "raw": raw, "notes": notes, "paired": paired, "sections": sections,
                  "md_headers": [headers[i] for i in shown], "md_rows": [[row[i] for i in shown] for row in rows],
                  "md_paired": [c for c in paired if c.startswith("worst case ") or suite.shown(c)]}
    return out


def apart_notes(missing: dict[str, dict[str, list[str]]]) -> list[str]:
    """One note per budget naming the rows its worst case cannot rank with the others."""
    notes = []
    for b, per in missing.items():
        apart = {d: m for d, m in per.items() if m}
        if apart:
            notes.append(f"worst case {b}{APART_MARK}: " + "; ".join(f"{d} did not meet {', '.join(m)}" for d, m in
                                                                  apart.items())
                         + ". Their worst case is over fewer threat models, an upper bound on their robustness that is "
                         "not comparable with the complete rows: they are listed after them and left out of the "
                         "paired ranking of that column")
    return notes


def threat_scope(suite: Suite, model: str, threats: list[str]) -> str | None:
    """A phrase for the table's header when the model met no adaptive threat model (its
    suite entry limits it to transfer columns), else None."""
    settings = {suite.threat_models[t].get("setting") for t in suite.threat_models
                if suite.threat_models[t].get("attack") and any(t == c or c.startswith(f"{t}@") for c in threats)}
    if settings and "adaptive" not in settings:
        return "transfer threat models only: no attack saw the defenses, so these rates are upper bounds on robustness"
    return None


def minimal_budget_notes(records: list[dict]) -> list[str]:
    """Minimal-budget threats (``min-eps``): the median smallest breaking budget, once per
    threat model for a transfer search (it ran on the undefended model: the same budgets
    whichever defense then scores the images), per defense for an adaptive one."""
    notes, seen = [], set()
    for r in records:
        if r["status"] != "ok" or (b := metrics_of(r).min_eps) is None:
            continue
        fmt = lambda v: "inf" if v is None else f"{v:.4g}"  # noqa: E731  (None: not broken within eps)
        t = r["cell"]["threat_options"]
        if t.get("setting") == "transfer":
            if r["cell"]["threat"] in seen:
                continue
            seen.add(r["cell"]["threat"])
            where = f"{r['cell']['threat']}, searched on the undefended model, the same for every defense"
        else:
            where = f"{r['cell']['defense']}/{r['cell']['threat']}"
        notes.append(f"minimal budget ({where}, "
                     f"{r['cell']['threat_options'].get('norm', 'Linf')}): median {fmt(b['median'])} "
                     f"[{fmt(b['ci95'][0])}, {fmt(b['ci95'][1])}], broken within eps "
                     f"{r['cell']['threat_options'].get('eps')}: {b['broken']['k']}/{b['broken']['n']}")
    return notes


def sanity_notes(records: list[dict]) -> list[str]:
    """AutoAttack-style warnings for one model's cells: flags an attack raised (zero
    gradients, randomness without EOT, ...), and a black-box attack beating the
    white-box one with the same setting and norm on the same defense (then the white-box
    attack is broken or the defense masks gradients)."""
    ok = [r for r in records if r["status"] == "ok"]
    notes = []
    for r in ok:
        attack = metrics_of(r).attack
        raised = [name for name, on in (attack.flags if attack else {}).items() if on]
        if raised:
            notes.append(f"sanity ({r['cell']['defense']}/{r['cell']['threat']}): attack flagged "
                         f"{', '.join(raised)}")

    for black in ok:
        attack, setting, norm, eps = _kind(black)
        if attack != "square":
            continue
        for white in ok:
            if _kind(white) == ("apgd", setting, norm, eps) and white["cell"]["defense"] == black["cell"]["defense"]:
                b, w = success(black), success(white)
                if blackbox_beats_whitebox(Rate(b.k, b.n), Rate(w.k, w.n)):
                    notes.append(f"sanity ({black['cell']['defense']}): black-box {black['cell']['threat']} "
                                 f"({100 * b.value:.1f}%) beats white-box {white['cell']['threat']} "
                                 f"({100 * w.value:.1f}%): check the white-box attack or gradient masking")
    notes += [text for _, _, text in adaptive_below_transfer(ok)]
    notes += weaker_than_reference(ok)
    return notes


def first_per_defense(records: list[dict], field: str) -> dict[str, CellMetrics]:
    """Per defense, the metrics of its first finished cell where ``field`` is set."""
    out: dict[str, CellMetrics] = {}
    for r in records:
        if r["status"] == "ok" and getattr(m := metrics_of(r), field):
            out.setdefault(r["cell"]["defense"], m)
    return out


def dataset_notes(records: list[dict]) -> list[str]:
    """One model's threshold and its source, and each defense's clean verification
    (nothing for folder suites with the model's default threshold)."""
    notes = []
    for m in first_per_defense(records, "threshold_source").values():
        sign = ">=" if m.metric == "cosine" else "<="
        notes.append(f"threshold {m.threshold:.6g} ({m.metric}, accept {sign}): {m.threshold_source['source']}")
        break
    for defense, m in first_per_defense(records, "clean").items():
        c = m.clean
        parts = []
        for far, t in c["tar_at_far"].items():
            parts.append(f"TAR@FAR={far} {100 * t['tar']['value']:.1f}%" if t["supported"]
                         else f"TAR@FAR={far} n/a ({t['note']})")
        notes.append(f"clean pairs ({defense}, {c['genuine_pairs']} genuine / {c['impostor_pairs']} impostor, "
                     f"threshold per defense from its own ROC): {', '.join(parts)}, AUC {c['auc']:.4f}, "
                     f"EER {100 * c['eer']:.1f}%")
    dropped = next((m.dropped_pairs_no_face for m in first_per_defense(records, "dropped_pairs_no_face").values()), 0)
    if dropped:
        notes.append(f"{dropped} drawn pair(s) left out: no face found in one of their images (drop_no_face)")
    return notes


def attack_family(record: dict) -> tuple[str, bool] | None:
    """(family, is_reference) of a cell's attack: our ``apgd`` / ``apgd-eot`` / ``adaptive``
    and the references' APGD (AutoAttack run with only ``apgd-ce``, torchattacks ``APGD``)
    form the "apgd" family; our ``square`` and the references' Square (AutoAttack with
    only ``square``, torchattacks ``Square``) the "square" family. None: no family."""
    t = record["cell"]["threat_options"]
    attack = t.get("attack")
    if attack in ("apgd", "apgd-eot", "adaptive", "square"):
        return ("square" if attack == "square" else "apgd"), False
    if attack == "autoattack" and list(t.get("attacks") or []) in (["apgd-ce"], ["square"]):
        return ("apgd" if t["attacks"] == ["apgd-ce"] else "square"), True
    if attack == "torchattacks" and t.get("name") in ("APGD", "Square"):
        return t["name"].lower(), True
    return None


def weaker_than_reference(records: list[dict]) -> list[str]:
    """A reference implementation (AutoAttack, torchattacks) of the same family, setting,
    norm and eps beating our attack on the same defense with disjoint 95% intervals: ours
    is weaker than the reference (a bug or a worse setting to fix)."""
    notes = []
    for ours in records:
        fam = attack_family(ours)
        if fam is None or fam[1]:
            continue
        for ref in records:
            rfam = attack_family(ref)
            same = all(ours["cell"]["threat_options"].get(k) == ref["cell"]["threat_options"].get(k)
                       for k in ("setting", "norm", "eps", "surrogate", "goal"))
            if rfam != (fam[0], True) or not same or ref["cell"]["defense"] != ours["cell"]["defense"]:
                continue
            o, r = success(ours), success(ref)
            if o.interval[1] < r.interval[0]:
                notes.append(f"sanity ({ours['cell']['defense']}): our {ours['cell']['threat']} "
                             f"({100 * o.value:.1f}%) is weaker than the reference {ref['cell']['threat']} "
                             f"({100 * r.value:.1f}%) beyond the 95% intervals")
    return notes


def _kind(record: dict) -> tuple:
    t = record["cell"]["threat_options"]
    # Crafted on a surrogate (cross_model) is another question than the model's own attacks.
    setting = f"transfer from {t['surrogate']}" if t.get("surrogate") else t.get("setting")
    if t.get("goal", "impersonation") != "impersonation":  # dodging is compared with dodging only
        setting = f"{setting} ({t['goal']})"
    return t.get("attack"), setting, t.get("norm", "Linf"), t.get("eps")


def adaptive_below_transfer(records: list[dict]) -> list[tuple[str, str, str]]:
    """An adaptive attack knows everything a transfer attack knows (and sees the defense),
    so on the same defense it should do at least as well. When its FAR is below the
    transfer FAR of the same attack and norm, with disjoint 95% intervals, the gradients it
    follows through the defense are broken or obfuscated. Returns (defense, adaptive
    threat, note) for each such cell."""
    ok = [r for r in records if r["status"] == "ok"]
    flagged = []
    for adaptive in ok:
        attack, setting, norm, eps = _kind(adaptive)
        if setting != "adaptive":
            continue
        for transfer in ok:
            defense = adaptive["cell"]["defense"]
            if _kind(transfer) != (attack, "transfer", norm, eps) or transfer["cell"]["defense"] != defense \
                    or transfer["cell"]["threat_options"].get("surrogate"):  # cross-model: another question
                continue
            a, t = success(adaptive), success(transfer)
            if a.interval[1] < t.interval[0]:
                flagged.append((defense, adaptive["cell"]["threat"],
                                f"sanity ({defense}): adaptive {adaptive['cell']['threat']} ({100 * a.value:.1f}%) "
                                f"is below transfer {transfer['cell']['threat']} ({100 * t.value:.1f}%) beyond the "
                                "95% intervals: check its gradients through the defense (broken or obfuscated) "
                                "and its budget"))
    return flagged


def render(suite: Suite, records: list[dict], out_dir: str | Path,
           figures: dict[str, list[Path]] | None = None) -> list[Path]:
    """Write ``<model>.md|csv|json`` and ``cells/*.json`` under ``out_dir``; return the
    paths. ``figures``: per model, figures (security curves) the Markdown links to."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    cells_dir = out_dir / "cells"
    for record in records:
        # Skipped and n/a cells too (their reason, no metrics): the site and the tables
        # built from committed cells show them as the run did.
        fields = ("key", "name", "cell", "code", "metrics", "env", "seed", "status") if record["status"] == "ok" \
            else ("key", "name", "cell", "code", "status", "reason")
        if record["status"] != "error":
            write_json_atomic(cells_dir / cell_file(record), {k: record[k] for k in fields if k in record})
    for model, t in tables(suite, records).items():
        md = [f"## {model} ({suite.name} suite)" + (f": {t['scope']}" if t["scope"] else ""), "",
              "FAR: adversarial source i accepted as target i (single-shot, fresh randomness), %, "
              "[95% Wilson interval]. FRR genuine: purified genuine images rejected against other "
              "images of the same identity. s/img: purification seconds per image.", "",
              tabulate(t["md_rows"], headers=t["md_headers"], tablefmt="github"), ""]
        md += [f"- {n}" for n in t["notes"]]
        if t["md_paired"]:
            md += ["", "Paired comparisons on the same pairs (exact sign test on per-pair success fractions; "
                   "McNemar's with one draw per pair): defenses from the lowest rate up, `<` where neighbours "
                   "differ at p < 0.05, `~` where they do not (uncorrected for the number of tests; every "
                   f"pairwise test is in `{model}.json`).", ""]
            md += [f"- {c}: {t['paired'][c]['ranking']}" for c in t["md_paired"]]
        for section in t["sections"]:
            md += ["", f"### {section['title']}", "", section["caption"], "",
                   tabulate(section["rows"], headers=section["headers"], tablefmt="github", disable_numparse=True)]
        if suite.sweeps():
            md += ["", "Budget sweeps (`eps: [...]`) show one budget in the table (column `LABEL@EPS`); "
                   f"`{model}.csv` and `{model}.json` hold every budget."]
        for path in (figures or {}).get(model, []):
            md += ["", f"![{Path(path).stem}]({os.path.relpath(path, out_dir)})"]
        paths = {ext: out_dir / f"{model}.{ext}" for ext in ("md", "csv", "json")}
        paths["md"].write_text("\n".join(md) + "\n")
        buf = io.StringIO()
        csv.writer(buf).writerows([t["headers"], *t["rows"]])
        paths["csv"].write_text(buf.getvalue())
        write_json_atomic(paths["json"], {"suite": suite.name, "model": model, "rows": t["raw"],
                                          "paired": t["paired"], "notes": t["notes"],
                                          **{s["id"]: s["raw"] for s in t["sections"]}})
        written += list(paths.values())
    return written


def _why_moved(old: dict, new: dict) -> str:
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
                                f"(now), beyond tolerance {atol}; {_why_moved(old, new)}")
    for name, new in fresh_ok.items():
        if name not in committed:
            problems.append(f"{new['name']}: ran but has no committed entry (re-render the leaderboard)")
    return problems
