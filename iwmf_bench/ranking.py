"""The worst case over threat models and which rows it may rank together.

:func:`worst_case` is AutoAttack's rule on per-pair records: a pair is robust at a budget
only if every threat model within that budget fails on it. A row that met fewer threat
models at a budget than the others is not comparable with them: its worst case is taken
over less evidence, an upper bound on its robustness (:func:`comparability`), so rankings
put it apart (RobustBench ranks every entry by the same evaluation).
"""

from __future__ import annotations

from typing import Callable

from .metrics import Rate, wilson_interval
from .paired import identity_interval
from .pipeline.outcome import PerPair, metrics_of


def budget_of(record: dict) -> str | None:
    """The budget a cell's attack works under (``Linf 0.03``), or None (clean, dodging)."""
    t = record["cell"]["threat_options"]
    if not t.get("attack") or t.get("goal", "impersonation") != "impersonation" or t.get("eps") is None:
        return None
    return f"{t.get('norm', 'Linf')} {t['eps']:g}"


def worst_case(records: list[dict], per_pair_of: Callable[[dict], PerPair] | None = None) -> dict[str, dict]:
    """Per budget, the AutoAttack-style worst case of one (model, defense) over the suite's
    threat models within that budget (same norm, eps at most the budget's: a face
    perturbed by 0.008 is also one within 0.016), from the cells' per-pair records: a pair
    counts as broken single-shot with the largest fraction of accepted draws any of them
    reached on it (the mean of those maxima is the rate), and worst-of-N when any of them
    got it accepted in any draw. The union over pairs, not the largest column; it never
    decreases with the budget. Known-randomness cells do not count: theirs is another
    threat model (the defense's randomness is no secret), shown in its own table.
    ``per_pair_of``: a finished cell's per-pair record (default: as stored; an operating
    point passes the cell re-scored at its threshold, :mod:`iwmf_bench.operating_points`)."""
    per_pair_of = per_pair_of or (lambda r: metrics_of(r).per_pair)
    attacked = [(r, b.split()) for r in records if r["status"] == "ok" and (b := budget_of(r)) is not None
                and randomness_of(r) == "unknown"]
    out = {}
    for budget in sorted({" ".join(nb) for _, nb in attacked}):
        norm, eps = budget.split()
        cells = [r for r, (n, e) in attacked if n == norm and float(e) <= float(eps) + 1e-12]
        per = [per_pair_of(c) for c in cells]
        if len({len(p.successes) for p in per}) != 1:
            continue  # over other pairs (cannot happen within one suite's data)
        n = len(per[0].successes)
        fractions = [success_fractions(p) for p in per]
        single = [max(f[i] for f in fractions) for i in range(n)]
        broken = [any(p.successes[i] > 0 for p in per) for i in range(n)]
        lo, hi = wilson_interval(sum(single), n)
        by_identity = identity_interval(single, per[0].probe_identity)
        out[budget] = {"value": sum(single) / n, "ci95": list(by_identity or (lo, hi)),
                       "interval": "bootstrap over identities" if by_identity else "Wilson over pairs",
                       "ci95_pairs": [lo, hi], "pairs": n, "threats": sorted(c["cell"]["threat"] for c in cells),
                       "worst_of_n": Rate(sum(broken), n).to_dict(), "per_pair_single": single,
                       "per_pair_broken": broken}
    return out


def success_fractions(per_pair) -> list[float]:
    """Per pair, the fraction of draws the attack won (accepted; dodging: rejected)."""
    return [k / per_pair.draws for k in per_pair.successes]


def per_pair_success(record: dict) -> list[float]:
    """A finished cell's per-pair success fractions."""
    return success_fractions(metrics_of(record).per_pair)


def randomness_of(record: dict) -> str:
    """``"known"`` when the cell's attacker knew the scorer's draws, else ``"unknown"``."""
    return record["cell"]["threat_options"].get("randomness", "unknown")


def budget_order(budget: str) -> tuple:
    norm, eps = budget.split()
    return (norm != "Linf", -float(eps))  # Linf first, the largest budget first


def ranked(rows: list, raw: list[dict], worst: dict[str, dict], missing: dict[str, list[str]],
           budget: str) -> tuple[list, list[dict]]:
    """Table rows (display and raw, in step) sorted by ``budget``'s worst case, lowest first,
    the rows that met every threat model there before those that did not (``missing``: per
    defense, the threat models it lacks); rows without that worst case last."""
    order = sorted(range(len(rows)), key=lambda i: (bool(missing.get(raw[i]["defense"])),
                                                    worst[raw[i]["defense"]].get(budget, {}).get("value", 2.0)))
    return [rows[i] for i in order], [raw[i] for i in order]


def threats_within(records: list[dict], budget: str, statuses: tuple[str, ...] = ("ok", "n/a")) -> set[str]:
    """The threat models within ``budget`` that one (model, defense)'s cells met: finished,
    or not applicable to the defense (exact gradients through a non-differentiable one: no
    evidence is missing there). Known-randomness cells are another threat model."""
    norm, eps = budget.split()
    out = set()
    for r in records:
        b = budget_of(r)
        if r["status"] in statuses and b is not None and randomness_of(r) == "unknown":
            n, e = b.split()
            if n == norm and float(e) <= float(eps) + 1e-12:
                out.add(r["cell"]["threat"])
    return out


def comparability(by_defense: dict[str, list[dict]], budget: str) -> dict[str, list[str]]:
    """Per defense, the threat models within ``budget`` that some other row met and it did
    not (empty: its worst case is comparable with every complete row's)."""
    met = {d: threats_within(rs, budget) for d, rs in by_defense.items()}
    every = set().union(*met.values()) if met else set()
    return {d: sorted(every - m) for d, m in met.items()}


def pct(rate: Rate | dict) -> str:
    """``12.5 [4, 30]``: a rate (or a worst case's dict: ``value``, ``ci95``) in % with its
    95% interval, as every leaderboard table writes it."""
    value, (lo, hi) = (rate.value, rate.interval) if isinstance(rate, Rate) else (rate["value"], rate["ci95"])
    return f"{100 * value:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"
