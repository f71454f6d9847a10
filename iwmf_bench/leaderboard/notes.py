"""The notes under a leaderboard table, and its sanity rules: what the intervals can
claim about identities, rows listed apart, a model's transfer-only scope, minimal
budgets, the decision-based attacks' queries and distances, dataset thresholds, and the
AutoAttack-style warnings (a black-box attack beating the white-box one, an attack weaker
than its reference implementation, adaptive below transfer)."""

from __future__ import annotations

import math
import statistics

from ..attacks.base import blackbox_beats_whitebox
from ..equal_utility import APART_MARK
from ..metrics import Rate
from ..paired import BOOTSTRAP, MIN_IDENTITIES
from ..pipeline.outcome import CellMetrics, metrics_of
from ..suite import Suite
from .cells import success


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


def decision_notes(records: list[dict]) -> list[str]:
    """Decision-based threat models (cells whose per-pair record holds the distance each
    walk reached): per threat model, each defense's median distance reached before the
    projection onto the budget (``inf``: no accepted start), its pairs within the budget,
    and the attack's cost per query; one line per threat model."""
    by_threat: dict[str, list] = {}
    for r in records:
        if r["status"] != "ok" or "distance" not in ((m := metrics_of(r)).per_pair.attack or {}):
            continue
        by_threat.setdefault(r["cell"]["threat"], []).append((r["cell"]["defense"], r["cell"]["threat_options"], m))
    notes = []
    for threat, rows in by_threat.items():
        t = rows[0][1]
        norm, eps, repeats = t.get("norm", "L2"), float(t["eps"]), int(t.get("repeats", 1))
        parts = []
        for defense, _, m in rows:
            reached = sorted(math.inf if v is None else float(v) for v in m.per_pair.attack["distance"])
            median = statistics.median(reached) if reached else math.nan
            within = sum(v <= eps for v in reached)
            cost = m.attack.seconds_per_query if m.attack is not None else None
            parts.append(f"{defense} {median:.3g} ({within}/{len(reached)} within"
                         + (f", {1000 * cost:.1f} ms/query)" if cost else ")"))
        how = f", each decision the majority of {repeats} submissions" if repeats > 1 else ""
        notes.append(f"{threat} (decision-based: accept/reject only, {t.get('max_queries')} queries per pair{how}): "
                     f"median {norm} distance to the source reached before projection onto eps {eps:g}, per "
                     "defense: " + "; ".join(parts))
    return notes


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
        attack, setting, norm, eps = kind_of(black)
        if attack != "square":
            continue
        for white in ok:
            if kind_of(white) == ("apgd", setting, norm, eps) and white["cell"]["defense"] == black["cell"]["defense"]:
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


def kind_of(record: dict) -> tuple:
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
        attack, setting, norm, eps = kind_of(adaptive)
        if setting != "adaptive":
            continue
        for transfer in ok:
            defense = adaptive["cell"]["defense"]
            if kind_of(transfer) != (attack, "transfer", norm, eps) or transfer["cell"]["defense"] != defense \
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
