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
import os
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .attacks.base import blackbox_beats_whitebox
from .metrics import Rate
from .suite import Suite
from .util import write_json_atomic

# Rates the check compares (a dodging cell has dodging_success* instead of far*).
CHECKED = ("far", "far_worst_of_n", "dodging_success", "dodging_success_worst_of_n", "frr_genuine",
           "frr_adv_true_identity")


def _pct(rate: dict) -> str:
    lo, hi = rate["ci95"]
    return f"{100 * rate['value']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def success(record: dict) -> dict:
    """The attack's success rate of a cell: its FAR (impersonation), or the rate of
    probes rejected against their own identity (``goal: dodging``)."""
    m = record["metrics"]
    return m["far"] if "far" in m else m["dodging_success"]


def cell_file(record: dict) -> str:
    c = record["cell"]
    return f"{c['model']}__{c['defense']}__{c['threat']}.json"


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
        headers = ["defense", "FRR genuine %"] + [f"{rate(t)} {t} %" for t in threats] + ["s/img"]
        rows, raw = [], []
        # Cells whose adaptive attack falls below transfer: marked "(!)", explained in the notes.
        suspicious = {(d, t) for d, t, _ in adaptive_below_transfer([by[k] for k in by if k[0] == m])}
        reasons: dict[str, list[str]] = {}  # one note per distinct reason, naming the cells
        for d in defenses:
            cells = [by.get((m, d, t)) for t in threats]
            ok = [c for c in cells if c and c["status"] == "ok"]
            first = ok[0]["metrics"] if ok else None
            row = [d, _pct(first["frr_genuine"]) if first else "skipped"]
            raw_row = {"defense": d, "frr_genuine": first["frr_genuine"] if first else None,
                       "far": {}, "seconds_per_image": first["seconds_per_image"] if first else None}
            for t, c in zip(threats, cells):
                if c is None:
                    row.append("")
                elif c["status"] == "ok":
                    row.append(_pct(success(c)) + (" (!)" if (d, t) in suspicious else ""))
                    raw_row["far"][t] = success(c)
                else:
                    not_applicable = c.get("reason", "").startswith("not applicable")
                    row.append("n/a" if not_applicable else c["status"])
                    where = d if c["status"] == "skipped" and not not_applicable else f"{d}/{t}"
                    cells_with = reasons.setdefault(f"{c['status']}: {c.get('reason', '')}", [])
                    if where not in cells_with:
                        cells_with.append(where)
            row.append(f"{first['seconds_per_image']:.4f}" if first else "")
            rows.append(row)
            raw.append(raw_row)
        notes = [f"{reason.split(': ', 1)[0]} ({', '.join(where)}): {reason.split(': ', 1)[1]}"
                 for reason, where in reasons.items()]
        notes += minimal_budget_notes([by[k] for k in by if k[0] == m])
        notes += sanity_notes([by[k] for k in by if k[0] == m])
        notes += dataset_notes([by[k] for k in by if k[0] == m])  # threshold source, clean ROC (datasets)
        # The Markdown table shows one budget of each sweep; CSV and JSON keep them all.
        shown = [0, 1] + [2 + i for i, t in enumerate(threats) if suite.shown(t)] + [len(headers) - 1]
        out[m] = {"headers": headers, "rows": rows, "raw": raw, "notes": notes,
                  "md_headers": [headers[i] for i in shown], "md_rows": [[row[i] for i in shown] for row in rows]}
    return out


def minimal_budget_notes(records: list[dict]) -> list[str]:
    """Minimal-budget threats (``min-eps``): each defense's median smallest breaking budget."""
    notes = []
    for r in records:
        m = r.get("metrics") or {}
        if r["status"] != "ok" or "min_eps" not in m:
            continue
        b = m["min_eps"]
        fmt = lambda v: "inf" if v is None else f"{v:.4g}"  # noqa: E731  (None: not broken within eps)
        notes.append(f"minimal budget ({r['cell']['defense']}/{r['cell']['threat']}, "
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
        raised = [name for name, on in (r["metrics"].get("flags") or {}).items() if on]
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
                if blackbox_beats_whitebox(Rate(b["k"], b["n"]), Rate(w["k"], w["n"])):
                    notes.append(f"sanity ({black['cell']['defense']}): black-box {black['cell']['threat']} "
                                 f"({100 * b['value']:.1f}%) beats white-box {white['cell']['threat']} "
                                 f"({100 * w['value']:.1f}%): check the white-box attack or gradient masking")
    notes += [text for _, _, text in adaptive_below_transfer(ok)]
    notes += weaker_than_reference(ok)
    return notes


def first_per_defense(records: list[dict], key: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in records:
        if r["status"] == "ok" and key in r["metrics"]:
            out.setdefault(r["cell"]["defense"], r["metrics"])
    return out


def dataset_notes(records: list[dict]) -> list[str]:
    """One model's threshold and its source, and each defense's clean verification
    (nothing for folder suites with the model's default threshold)."""
    notes = []
    for m in first_per_defense(records, "threshold_source").values():
        sign = ">=" if m["metric"] == "cosine" else "<="
        notes.append(f"threshold {m['threshold']:.6g} ({m['metric']}, accept {sign}): "
                     f"{m['threshold_source']['source']}")
        break
    for defense, m in first_per_defense(records, "clean").items():
        c = m["clean"]
        parts = []
        for far, t in c["tar_at_far"].items():
            parts.append(f"TAR@FAR={far} {100 * t['tar']['value']:.1f}%" if t["supported"]
                         else f"TAR@FAR={far} n/a ({t['note']})")
        notes.append(f"clean pairs ({defense}, {c['genuine_pairs']} genuine / {c['impostor_pairs']} impostor, "
                     f"threshold per defense from its own ROC): {', '.join(parts)}, AUC {c['auc']:.4f}, "
                     f"EER {100 * c['eer']:.1f}%")
    dropped = next((m["dropped_pairs_no_face"] for m in first_per_defense(records, "dropped_pairs_no_face").values()), 0)
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
            if o["ci95"][1] < r["ci95"][0]:
                notes.append(f"sanity ({ours['cell']['defense']}): our {ours['cell']['threat']} "
                             f"({100 * o['value']:.1f}%) is weaker than the reference {ref['cell']['threat']} "
                             f"({100 * r['value']:.1f}%) beyond the 95% intervals")
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
            if a["ci95"][1] < t["ci95"][0]:
                flagged.append((defense, adaptive["cell"]["threat"],
                                f"sanity ({defense}): adaptive {adaptive['cell']['threat']} ({100 * a['value']:.1f}%) "
                                f"is below transfer {transfer['cell']['threat']} ({100 * t['value']:.1f}%) beyond the "
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
        if record["status"] == "ok":
            keep = {k: record[k] for k in ("key", "name", "cell", "metrics", "env", "seed", "status")}
            write_json_atomic(cells_dir / cell_file(record), keep)
    for model, t in tables(suite, records).items():
        md = [f"## {model} ({suite.name} suite)", "",
              "FAR: adversarial source i accepted as target i (single-shot, fresh randomness), %, "
              "[95% Wilson interval]. FRR genuine: purified genuine images rejected against other "
              "images of the same identity. s/img: purification seconds per image.", "",
              tabulate(t["md_rows"], headers=t["md_headers"], tablefmt="github"), ""]
        md += [f"- {n}" for n in t["notes"]]
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
                                          "notes": t["notes"]})
        written += list(paths.values())
    return written


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
        if new is None:
            status = next((r["status"] for r in records if cell_file(r) == name), "not run")
            problems.append(f"{old['name']}: committed but now {status}")
            continue
        for metric in (m for m in CHECKED if m in old["metrics"]):
            a, b = old["metrics"][metric]["value"], new["metrics"][metric]["value"]
            if abs(a - b) > atol:
                problems.append(f"{old['name']}: {metric} moved from {a:.4f} (committed) to {b:.4f} "
                                f"(now), beyond tolerance {atol}")
    for name, new in fresh_ok.items():
        if name not in committed:
            problems.append(f"{new['name']}: ran but has no committed entry (re-render the leaderboard)")
    return problems
