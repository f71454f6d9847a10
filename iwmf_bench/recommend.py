"""The deployer's question: which setting of a defense family, under a utility constraint?

Given one model's cells of a suite that sweeps a family's strength (``suite.families``)
and a constraint "genuine FRR at most ``allowance`` above the undefended model's", each
setting is deployed at the strictest threshold that keeps its purified genuine images
within the constraint (the threshold re-tuned, :mod:`iwmf_bench.operating_points`), and
read there: its genuine FRR, clean impostor FAR and worst-case FAR of every budget. The
recommended setting has the lowest worst-case FAR at the chosen budget among the settings
that met every threat model there; the caveat says how much data stands behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .equal_utility import defense_cells, rescored_cells, split_recrafted, undefended_of
from .metrics import Rate
from .operating_points import OperatingPoint, equal_utility, genuine_votes
from .ranking import budget_order, comparability


@dataclass
class Setting:
    defense: str
    value: object
    frr_model_threshold: Rate
    point: OperatingPoint
    worst: dict[str, dict]  # by budget, at the point's threshold
    missing: dict[str, list[str]] = field(default_factory=dict)  # by budget: threat models not met


@dataclass
class Recommendation:
    model: str
    family: str
    parameter: str
    budget: str
    undefended_frr: Rate
    target: float
    settings: list[Setting]
    best: Setting | None
    caveat: str


def recommend(suite, records: list[dict], model: str, family: str, allowance: float,
              budget: str | None = None) -> Recommendation:
    """The recommendation for ``family`` on ``model`` (``records``: the suite's cells; at
    least the family's rows and the undefended row). Raises ValueError naming what is missing."""
    if family not in suite.families:
        raise ValueError(f"{suite.name}: no family {family!r} (strength sweeps: {', '.join(suite.families) or 'none'};"
                         " a defense entry with one list-valued option is a family)")
    mine, again = split_recrafted([r for r in records if r["cell"]["model"] == model])
    undefended = undefended_of(suite, mine)
    if undefended is None:
        raise ValueError(f"{suite.name}/{model}: no finished undefended cell ('defense: none'): the constraint is "
                         "relative to the undefended FRR")
    target = undefended.frr_genuine.value + allowance
    f = suite.families[family]
    by_def = {d: [r for r in mine if r["cell"]["defense"] == d] for d in f["rows"]}
    by_def = {d: rs for d, rs in by_def.items() if any(r["status"] == "ok" for r in rs)}
    if not by_def:
        raise ValueError(f"{suite.name}/{model}: no finished cell of family {family!r}")
    points = {d: equal_utility(*defense_cells(rs), target, f"genuine FRR at most {100 * target:.1f}%", at_most=True)
              for d, rs in by_def.items()}
    at, worst = rescored_cells(by_def, points, again)  # re-crafted cells count where crafted at that threshold
    budgets = sorted({b for w in worst.values() for b in w}, key=budget_order)
    if not budgets:
        raise ValueError(f"{suite.name}/{model}: family {family!r} has no attacked cell with a budget")
    if budget is None:  # the budget whose worst case covers the most threat models (the most evidence)
        budget = max(budgets, key=lambda b: (max(len(w[b]["threats"]) for w in worst.values() if b in w),
                                             -budgets.index(b)))
    elif budget not in budgets:
        raise ValueError(f"budget {budget!r} not among the family's worst cases ({', '.join(budgets)})")
    missing = {b: comparability(by_def, b) for b in budgets}
    settings = [Setting(d, f["rows"][d], defense_cells(rs)[0].frr_genuine, points[d], worst[d],
                        {b: missing[b].get(d, []) for b in budgets}) for d, rs in by_def.items()]
    eligible = [s for s in settings if budget in s.worst and not s.missing[budget]]
    best = min(eligible, key=lambda s: s.worst[budget]["value"]) if eligible else None
    p = undefended.per_pair
    caveat = (f"{len(p.successes)} pairs from {len(set(p.probe_identity))} source and {len(set(p.reference_identity))} "
              f"target identities, {len(genuine_votes(undefended).accepted)} genuine comparisons: the intervals are "
              "wide and the differences hold for these faces; ")
    if best is not None:
        lo = best.worst[budget]["ci95"][1]
        rivals = [s.defense for s in eligible if s is not best and s.worst[budget]["ci95"][0] <= lo]
        caveat += (f"{', '.join(rivals)} cannot be told apart from it at 95%" if rivals
                   else "no other setting's interval overlaps its own")
    bounded = sorted({t for (_, t), r in at.items() if r.bound})
    if bounded:
        caveat += (f"; {', '.join(bounded)} crafted for the model's threshold by attacks whose images depend on it: "
                   "at these thresholds their rates come from images crafted for another one")
    return Recommendation(model, family, f["parameter"], budget, undefended.frr_genuine, target, settings, best,
                          caveat)


def report(rec: Recommendation) -> str:
    """The recommendation as text: one line per setting, then the choice and the caveat."""
    pct = lambda r: f"{100 * r.value:.1f}%" if r is not None else "-"  # noqa: E731
    ci = lambda w: f"{100 * w['value']:.1f}% [{100 * w['ci95'][0]:.0f}, {100 * w['ci95'][1]:.0f}]"  # noqa: E731
    lines = [f"{rec.model}, family {rec.family} ({rec.parameter}); undefended genuine FRR {pct(rec.undefended_frr)}, "
             f"constraint: genuine FRR at most {100 * rec.target:.1f}% (threshold re-tuned per setting); "
             f"worst case at {rec.budget}", ""]
    header = f"{'setting':>24}  {'FRR (model thr)':>15}  {'threshold':>10}  {'FRR there':>9}  {'clean FAR':>9}  worst case"
    lines += [header, "-" * len(header)]
    for s in rec.settings:
        w = s.worst.get(rec.budget)
        tag = "" if not s.missing.get(rec.budget) else f"  (not comparable: missing {', '.join(s.missing[rec.budget])})"
        lines.append(f"{s.defense:>24}  {pct(s.frr_model_threshold):>15}  {s.point.threshold:>10.6g}  "
                     f"{pct(s.point.frr_genuine):>9}  {pct(s.point.clean_far):>9}  {ci(w) if w else '-'}{tag}")
    lines.append("")
    if rec.best is None:
        lines.append("no setting met every threat model at this budget: nothing to recommend")
    else:
        lines.append(f"recommended: {rec.best.defense} ({rec.parameter} = {rec.best.value}), worst-case FAR "
                     f"{ci(rec.best.worst[rec.budget])} at {rec.budget}, threshold {rec.best.point.threshold:.6g}")
    lines.append(f"caveat: {rec.caveat}")
    return "\n".join(lines)
