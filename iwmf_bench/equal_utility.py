"""The leaderboard at equal utility: every defense at the threshold that keeps its genuine
users in as well as the undefended model does (:mod:`iwmf_bench.operating_points`).

A defense that rejects genuine users can look robust at the model's own threshold: it
rejects attackers too. A deployer who adds it re-tunes the threshold until genuine users
get in as before; this section reads every cell again at that threshold, from its stored
scores: the threshold, its genuine FRR and clean impostor FAR, the worst case of each
budget (with the same comparability rule as the main table) and the FAR of every threat
model. A cell whose attack crafts differently at another threshold (its record's note
``threshold_dependent``) is either crafted again at the operating point's threshold, as an
attacker who knows the deployed threshold would (``operating_point: {recraft: true}`` in
the suite: :func:`recraft_cells`, a cell of its own labelled ``THREAT@equal-utility`` whose
model threshold is the defense's), or, without that option, re-scored and marked as a
bound.
"""

from __future__ import annotations

from .metrics import Rate
from .operating_points import NoScores, OperatingPoint, as_float32, equal_utility, rescored, target_frr
from .paired import ranking
from .pipeline.cell import Cell
from .pipeline.outcome import CellMetrics, metrics_of
from .ranking import budget_order, comparability, pct, ranked, worst_case

BOUND_MARK = " †"
APART_MARK = " ‡"
RECRAFT_MARK = " §"
RECRAFT_SUFFIX = "@equal-utility"  # threat label of a cell crafted again at a defense's operating point


def is_recrafted(record: dict) -> bool:
    """Whether a record is a threshold-dependent attack crafted again at its defense's
    equal-utility threshold (:func:`recraft_cells`): not a column of the tables, it stands
    in for its original cell at that operating point."""
    return record["cell"]["threat"].endswith(RECRAFT_SUFFIX)


def split_recrafted(records: list[dict]) -> tuple[list[dict], dict[tuple[str, str, str], dict]]:
    """The suite's own cells, and the re-crafted ones by (model, defense, original threat label)."""
    again = {(r["cell"]["model"], r["cell"]["defense"], r["cell"]["threat"][:-len(RECRAFT_SUFFIX)]): r
             for r in records if is_recrafted(r)}
    return [r for r in records if not is_recrafted(r)], again


def threshold_dependent(record: dict) -> str | None:
    """Why a finished cell's attack would craft other images at another threshold (None: it would not)."""
    m = metrics_of(record)
    return (m.attack.notes if m.attack else {}).get("threshold_dependent")


def crafted_at(record: dict | None, threshold: float) -> bool:
    """Whether ``record`` is a finished cell crafted and scored at ``threshold`` (float32)."""
    return record is not None and record["status"] == "ok" and \
        as_float32(metrics_of(record).threshold) == as_float32(threshold)


def recraft_cells(suite, records: list[dict]) -> list[Cell]:
    """The cells to craft again at equal utility: of each finished cell whose attack depends
    on the threshold, where its defense's equal-utility threshold is not the cell's, the same
    cell with that threshold fixed in its model options (so the attacker crafts for the
    deployed threshold and everything is scored there) and the label ``THREAT@equal-utility``.
    None unless the suite sets ``operating_point: {recraft: true}``; none for a model whose
    operating points cannot be set (its table says why)."""
    if not (suite.operating_point or {}).get("recraft"):
        return []
    primary, _ = split_recrafted(records)
    out = []
    for model in dict.fromkeys(r["cell"]["model"] for r in primary):
        mine = [r for r in primary if r["cell"]["model"] == model]
        try:
            points = operating_points(suite, mine)[0]
        except (ValueError, NoScores):
            continue
        for r in mine:
            point = points.get(r["cell"]["defense"])
            if r["status"] != "ok" or point is None or not threshold_dependent(r) \
                    or as_float32(point.threshold) == as_float32(metrics_of(r).threshold):
                continue
            cell = Cell(**r["cell"], root=suite.root)
            out.append(cell.derived(threat=cell.threat + RECRAFT_SUFFIX,
                                    model_options={**cell.model_options, "threshold": point.threshold}))
    return out


def undefended_rows(suite) -> list[str]:
    """The suite's undefended rows (``defense: none``), in order."""
    return [d for d, o in suite.defenses.items() if o.get("defense") == "none"]


def undefended_of(suite, records: list[dict]) -> CellMetrics | None:
    """The metrics of one finished cell of the suite's undefended row (``defense: none``)."""
    labels = set(undefended_rows(suite))
    return next((metrics_of(r) for r in records if r["status"] == "ok" and r["cell"]["defense"] in labels), None)


def defense_cells(records: list[dict]) -> tuple[CellMetrics, CellMetrics | None]:
    """Of one (model, defense)'s records, which must hold a finished cell: the metrics of its
    first finished cell (every cell of a defense shares the genuine stage) and of its clean
    cell, if any (the impostor FAR at a threshold)."""
    ok = [r for r in records if r["status"] == "ok"]
    clean = next((metrics_of(r) for r in ok if not r["cell"]["threat_options"].get("attack")), None)
    return metrics_of(ok[0]), clean


def operating_points(suite, records: list[dict]) -> tuple[dict[str, OperatingPoint], float, str]:
    """Per defense of one model's records, its equal-utility operating point; the target FRR
    and how it was set. Raises ValueError (or :class:`NoScores`) when it cannot be set."""
    records = split_recrafted(records)[0]
    target, how = target_frr(undefended_of(suite, records), (suite.operating_point or {}).get("target_frr"))
    out = {}
    for d in suite.defenses:
        cells = [r for r in records if r["status"] == "ok" and r["cell"]["defense"] == d]
        if cells:
            out[d] = equal_utility(*defense_cells(cells), target, how)
    return out, target, how


def rescored_cells(by_def: dict[str, list[dict]], points: dict[str, OperatingPoint],
                   again: dict[tuple[str, str, str], dict] | None = None) -> tuple[dict, dict]:
    """Every attacked cell of each defense (its own cells: ``by_def`` holds no re-crafted
    one) at the defense's operating point (``(defense, threat)`` ->
    :class:`~iwmf_bench.operating_points.Rescored`): the cell crafted again at that threshold
    where ``again`` (:func:`split_recrafted`) holds a finished one crafted at that very
    threshold, else the cell re-scored from its scores (marked if it depends on the threshold);
    and each defense's worst case there (:func:`~iwmf_bench.ranking.worst_case`)."""
    at = {}
    for d, rs in by_def.items():
        for r in rs:
            if r["status"] == "ok" and r["cell"]["threat_options"].get("attack"):
                c = r["cell"]
                redone = (again or {}).get((c["model"], d, c["threat"]))
                source = redone if crafted_at(redone, points[d].threshold) else r
                at[(d, c["threat"])] = rescored(metrics_of(source), points[d].threshold)
    worst = {d: worst_case(rs, lambda r, d=d: at[(d, r["cell"]["threat"])].per_pair) for d, rs in by_def.items()}
    return at, worst


def worst_at_equal_utility(suite, records: list[dict]) -> tuple[dict[str, OperatingPoint], dict[str, dict]]:
    """One model's operating points and each defense's worst case there (for figures)."""
    primary, again = split_recrafted(records)
    points = operating_points(suite, primary)[0]
    return points, rescored_cells({d: [r for r in primary if r["cell"]["defense"] == d] for d in points}, points,
                                  again)[1]


def family_section(suite, main_raw: list[dict], eu_raw: dict) -> dict | None:
    """Per strength-swept family (``suite.families``) and budget: the setting with the lowest
    worst-case FAR at equal utility among the rows comparable at that budget, beside the
    undefended row; None without families."""
    if not suite.families:
        return None
    main = {r["defense"]: r for r in main_raw}
    eu = {r["defense"]: r for r in eu_raw["rows"]}
    budgets = sorted({b for r in eu.values() for b in r["worst_case"]}, key=budget_order)
    headers = ["family", "parameter"] + [f"best at {b}: setting, worst case % (equal utility)" for b in budgets]
    rows, raw = [], []
    undefended = [d for d in undefended_rows(suite) if d in eu]
    entries = [(d, None, {d: None}) for d in undefended] + [
        (family, f["parameter"], f["rows"]) for family, f in suite.families.items()]
    for family, parameter, settings in entries:
        row, raw_row = [family, parameter or ""], {"family": family, "parameter": parameter, "best": {}}
        for b in budgets:
            candidates = [(eu[d]["worst_case"][b]["value"], d) for d in settings
                          if d in eu and b in eu[d]["worst_case"] and eu[d]["worst_case"][b]["comparable"]]
            if not candidates:
                row.append("")
                continue
            value, d = min(candidates)
            w = eu[d]["worst_case"][b]
            frr = main.get(d, {}).get("frr_genuine")
            row.append(f"{d}: {pct({'value': value, 'ci95': w['ci95']})}" + (f" (FRR at the model's threshold {100 * frr['value']:.1f})"
                                                           if frr and parameter else ""))
            raw_row["best"][b] = {"defense": d, "value": settings[d], "worst_case": w,
                                  "frr_genuine_model_threshold": frr, "threshold": eu[d]["threshold"]}
        rows.append(row)
        raw.append(raw_row)
    return {"id": "tradeoff", "title": "Each family's best setting at equal utility", "headers": headers,
            "rows": rows, "raw": raw,
            "caption": "Per family of a strength sweep and per budget, the setting whose worst-case FAR at equal utility "
                       "(the table above) is lowest among the comparable rows, with its 95% interval and the genuine "
                       "FRR it costs at the model's own threshold (before re-tuning). Overlapping intervals mean the "
                       "data cannot tell the settings apart; the paired rankings above say which differences hold."}


def section(suite, records: list[dict], threats: list[str]) -> tuple[dict | None, list[str]]:
    """The equal-utility table of one model (None with the reason as a note, when it cannot
    be computed: records without scores, no undefended row and no target)."""
    try:
        points, target, how = operating_points(suite, records)
    except (ValueError, NoScores) as exc:
        return None, [f"equal utility: not computed ({exc})"]
    records, again = split_recrafted(records)
    by_def = {d: [r for r in records if r["cell"]["defense"] == d] for d in points}
    at, worst = rescored_cells(by_def, points, again)
    redone = {(d, t) for (_, d, t), r in again.items() if d in points and crafted_at(r, points[d].threshold)}
    budgets = sorted({b for w in worst.values() for b in w}, key=budget_order)
    missing = {b: comparability({d: rs for d, rs in by_def.items() if worst[d]}, b) for b in budgets}
    shown = [t for t in threats if suite.shown(t) and any((d, t) in at for d in points)]
    headers = (["defense", "threshold", "FRR genuine %", "clean FAR %"] + [f"worst case {b} %" for b in budgets]
               + [f"FAR {t} %" for t in shown])
    rows, raw = [], []
    bounds = set()
    for d, p in points.items():
        row = [d, f"{p.threshold:.6g}", _rate(p.frr_genuine), _rate(p.clean_far)]
        raw_row = {"defense": d, **p.to_dict(), "worst_case": {}, "far": {}}
        for b in budgets:
            w = worst[d].get(b)
            row.append(pct(w) + (APART_MARK if missing[b].get(d) else "") if w else "")
            if w:
                raw_row["worst_case"][b] = {**{k: v for k, v in w.items() if not k.startswith("per_pair")},
                                            "comparable": not missing[b].get(d), "missing_threats": missing[b].get(d, [])}
        for t in shown:
            r = at.get((d, t))
            if r is None:
                row.append("")
                continue
            rate = r.single_shot
            row.append(pct(rate) + (BOUND_MARK if r.bound else "") + (RECRAFT_MARK if (d, t) in redone else ""))
            raw_row["far"][t] = {**rate.to_dict(), "bound": r.bound, "recrafted": (d, t) in redone}
            if r.bound:
                bounds.add(r.bound.split(": ", 1)[1].split(";")[0])
        rows.append(row)
        raw.append(raw_row)
    if budgets:
        rows, raw = ranked(rows, raw, worst, missing[budgets[0]], budgets[0])
    paired = {}
    for b in budgets:  # paired rankings at equal utility, complete rows only
        per = {d: worst[d][b]["per_pair_single"] for d in points if b in worst[d] and not missing[b].get(d)}
        if len(per) >= 2:
            paired[f"worst case {b}"] = ranking(per)
    caption = (f"Each defense at the threshold where its purified genuine images are rejected as often as the "
               f"target FRR {100 * target:.1f}% ({how}; the closest its genuine scores allow), read from every "
               "cell's stored scores: the genuine FRR it reaches, the clean impostor FAR (the clean column) and "
               "the FAR of every threat model there (single-shot, 95% intervals). Rows sorted by the first "
               "worst case; ‡: met fewer threat models at that budget than other rows (an upper bound on its "
               "robustness, listed after the comparable rows).")
    if bounds:
        caption += (" †: crafted for the model's own threshold by an attack whose images depend on it ("
                    + "; ".join(sorted(bounds)) + "): images crafted for another threshold, not what that "
                    "attack crafts at this one (a suite's operating_point: {recraft: true} crafts it here).")
    if redone & {(d, t) for d in points for t in shown}:
        caption += (" §: an attack whose images depend on the threshold, crafted again at this defense's "
                    f"threshold, as an attacker who knows the deployed threshold would (its own cell, "
                    f"`THREAT{RECRAFT_SUFFIX}`); the worst cases use it too.")
    if paired:
        caption += " Paired rankings at equal utility (sign tests, complete rows): " + "; ".join(
            f"{c}: {v}" for c, v in paired.items()) + "."
    return {"id": "equal_utility", "title": "At equal utility (threshold re-tuned per defense)", "headers": headers,
            "rows": rows, "raw": {"target_frr": target, "how": how, "rows": raw, "paired": paired},
            "caption": caption}, []


def _rate(rate: Rate | None) -> str:
    return pct(rate) if rate is not None else ""
