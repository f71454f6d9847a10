"""Random defenses in the leaderboard: the three deployments (single-shot, worst-of-N,
majority) side by side, the known-randomness table (an attack that knows the scorer's
draws beside the same attack without), and the notes that recompute every deployment's
rate from the per-pair draws as a check on the record."""

from __future__ import annotations

from ..metrics import Rate
from ..pipeline.outcome import DEPLOYMENTS, CellMetrics, attack_success, metrics_of
from ..ranking import budget_of, randomness_of
from ..suite import Suite


def is_random_cell(m: CellMetrics) -> bool:
    return m.deployments is not None


def short(rate: Rate) -> str:
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
        row = [d, " / ".join(short(r) for r in g)]
        raw_row = {"defense": d, "frr_genuine": {x: first.deployment(x).frr_genuine.to_dict() for x in DEPLOYMENTS},
                   "threats": {}}
        for t in shown:
            m = by.get((d, t))
            row.append(" / ".join(short(m.deployment(x).success) for x in DEPLOYMENTS) if m else "")
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
        pair = lambda get: " / ".join(short(get(x)) for x in ("single-shot", "majority"))  # noqa: E731
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
