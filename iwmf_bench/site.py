"""A static leaderboard site of a suite, from its cells: plain files, no server, no network.

``build_site(suite, records, out)`` writes ``out/index.html`` (one table per model, the
worst case first, every number with its 95% interval; sort by any column, filter by defense
kind and threat kind, switch the budget of a sweep; the security and minimal-budget curves
as inline SVG whose points show their numbers on hover) and ``out/cells/<cell>.html`` (a
cell's config, environment, code fingerprints, sanity flags and notes, and its per-pair
outcomes). Every script and style is inline: the pages open from ``file://`` and make no
request. The same cells give the same bytes (no timestamps), so the committed site is
checked like the Markdown: rebuilt and compared.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from . import registry
from .leaderboard import cell_file, metrics_of, tables
from .suite import Suite

KINDS = ("baseline", "deterministic", "random", "diffusion")
THREAT_KINDS = ("clean", "transfer", "adaptive", "black-box", "cross-model")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939")

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;cursor:pointer}th:first-child,td:first-child{text-align:left}
td.na{color:#888}th.worst,td.worst{background:#fff7e0}
.controls label{margin-right:1em}.note{color:#555;font-size:12px}
svg{border:1px solid #ddd;margin:0 1em 1em 0}pre{background:#f7f7f7;padding:.5em;overflow:auto}
"""

SCRIPT = """
function sortBy(th){
  const table=th.closest('table'), idx=[...th.parentNode.children].indexOf(th);
  const asc=th.dataset.dir!=='asc'; th.parentNode.querySelectorAll('th').forEach(h=>delete h.dataset.dir);
  th.dataset.dir=asc?'asc':'desc';
  const rows=[...table.tBodies[0].rows];
  const key=r=>{const c=r.cells[idx]; const v=c.dataset.v; return v===undefined||v===''?null:(isNaN(+v)?v:+v);};
  rows.sort((a,b)=>{const x=key(a),y=key(b); if(x===null)return 1; if(y===null)return -1;
    return (x<y?-1:x>y?1:0)*(asc?1:-1);});
  rows.forEach(r=>table.tBodies[0].appendChild(r));
}
function apply(){
  const kinds=[...document.querySelectorAll('input.dkind:checked')].map(e=>e.value);
  const tkinds=[...document.querySelectorAll('input.tkind:checked')].map(e=>e.value);
  const budget=document.getElementById('budget')?document.getElementById('budget').value:'';
  document.querySelectorAll('table.lb').forEach(t=>{
    t.tBodies[0].querySelectorAll('tr').forEach(r=>{r.style.display=kinds.includes(r.dataset.kind)?'':'none';});
    const heads=[...t.tHead.rows[0].cells];
    heads.forEach((h,i)=>{
      let show=true;
      if(h.dataset.tkind&&!tkinds.includes(h.dataset.tkind))show=false;
      if(h.dataset.budget&&budget&&h.dataset.budget!==budget)show=false;
      const d=show?'':'none'; h.style.display=d;
      [...t.tBodies[0].rows].forEach(r=>{r.cells[i].style.display=d;});
    });
  });
}
document.addEventListener('DOMContentLoaded',()=>{
  document.querySelectorAll('table.lb th').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
  document.querySelectorAll('input.dkind,input.tkind,#budget').forEach(e=>e.addEventListener('change',apply));
  apply();
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def defense_kind(options: dict) -> str:
    """baseline (no defense), diffusion, random (fresh randomness per call) or deterministic."""
    name = options.get("defense")
    if name == "none":
        return "baseline"
    try:
        factory = registry.get("defenses", name).factory
    except Exception:  # an unregistered plugin: its cells are skipped rows anyway
        return "deterministic"
    if getattr(factory, "__module__", "").endswith("diffusion"):
        return "diffusion"
    return "random" if getattr(factory, "stochastic", False) else "deterministic"


def threat_kind(options: dict) -> str:
    if not options.get("attack"):
        return "clean"
    if options.get("surrogate"):
        return "cross-model"
    if options.get("attack") == "square":
        return "black-box"
    return "adaptive" if options.get("setting") == "adaptive" else "transfer"


def _page(title: str, body: str, script: str = "") -> str:
    """A self-contained page; ``script``: inline JavaScript (the index's tables need it,
    cell pages do not)."""
    js = f"<script>{script}</script>" if script else ""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{STYLE}</style>{js}</head>\n<body>\n{body}\n</body></html>\n")


def _threat_options(suite: Suite) -> dict[str, dict]:
    return {label: opts for t in suite.threat_models for label, opts in suite.budgets(t)}


def _budget_of_label(suite: Suite) -> dict[str, str]:
    """Sweep cell labels -> their eps as text (for the budget switch)."""
    return {label: f"{eps:g}" for sweep in suite.sweeps().values() for eps, label in sweep}


def _curve_svg(title: str, series: dict[str, list[tuple[float, float, float, float]]], x_label: str,
               step: bool = False, x_name: str = "eps", x_ticks: list[float] | None = None) -> str:
    """An inline SVG: per series (x, y, lo, hi) points in [0, 1] y, a line and a band; each
    point's numbers in its <title> (shown on hover)."""
    w, h, left, bottom, top, right = 460, 300, 46, 34, 24, 120
    xs = [p[0] for pts in series.values() for p in pts] or [0.0, 1.0]
    x0, x1 = 0.0, max(xs) or 1.0
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda y: top + (1 - y) * (h - top - bottom)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img"><title>{_e(title)}</title>',
           f'<text x="{left}" y="15" font-size="12">{_e(title)}</text>']
    for t in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" font-size="10" text-anchor="end">{int(100 * t)}</text>')
    for x in (x_ticks if x_ticks is not None else sorted(set(xs))):
        out.append(f'<text x="{sx(x):.1f}" y="{h - bottom + 14}" font-size="10" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 4}" font-size="11" text-anchor="middle">'
               f'{_e(x_label)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = sorted(pts)
        if step:
            path = " ".join(f"{sx(a):.1f},{sy(b):.1f} {sx(c):.1f},{sy(b):.1f}" for (a, b, _, _), (c, _, _, _)
                            in zip(pts, pts[1:] + pts[-1:]))
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        else:
            band = [f"{sx(x):.1f},{sy(hi):.1f}" for x, _, _, hi in pts] + \
                   [f"{sx(x):.1f},{sy(lo):.1f}" for x, _, lo, _ in reversed(pts)]
            out.append(f'<polygon fill="{color}" fill-opacity="0.12" stroke="none" points="{" ".join(band)}"/>')
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
                       f'points="{" ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _, _ in pts)}"/>')
            for x, y, lo, hi in pts:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"><title>{_e(name)}, '
                           f'{x_name} {x:g}: {100 * y:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]</title></circle>')
        out.append(f'<text x="{w - right + 8}" y="{top + 12 + 13 * i}" font-size="11" fill="{color}">{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _tradeoff_svgs(suite: Suite, model: str, t: dict) -> list[str]:
    """Per budget, the trade-off of each strength-swept family: worst-case FAR against the
    genuine FRR at the model's threshold, read at that threshold and at equal utility (the
    figures of :func:`iwmf_bench.figures.tradeoff_curves`, inline); rows not comparable at
    the budget left out."""
    if not suite.families:
        return []
    frr = {r["defense"]: r["frr_genuine"]["value"] for r in t["raw"] if r["frr_genuine"]}
    eu = next((s["raw"] for s in t["sections"] if s["id"] == "equal_utility"), None)
    readings = [("at the model's threshold", {r["defense"]: r["worst_case"] for r in t["raw"]})]
    if eu:
        readings.append(("at equal utility", {r["defense"]: r["worst_case"] for r in eu["rows"]}))
    budgets = [h.removeprefix("worst case ").removesuffix(" %") for h in t["headers"] if h.startswith("worst case ")]
    svgs = []
    for b in budgets:
        for title, worst in readings:
            series = {}
            for family, f in suite.families.items():
                pts = [(frr[d], w["value"], *w["ci95"]) for d in f["rows"]
                       if d in frr and (w := worst.get(d, {}).get(b)) and w.get("comparable", True)]
                if pts:
                    series[family] = pts
            if series:
                top = max(x for pts in series.values() for x, *_ in pts)
                svgs.append(_curve_svg(f"worst case {b} %, {title}", series, "genuine FRR, model's threshold",
                                       x_name="FRR", x_ticks=[i / 10 for i in range(int(top * 10) + 1)]))
    return svgs


def _curves(suite: Suite, model: str, by: dict) -> list[str]:
    svgs = []
    for threat, budgets in suite.sweeps().items():
        series = {}
        for d in suite.defenses:
            pts = []
            for eps, label in budgets:
                r = by.get((model, d, label))
                if r and r["status"] == "ok":
                    rate = metrics_of(r).success
                    lo, hi = rate.interval
                    pts.append((float(eps), rate.value, lo, hi))
            if pts:
                series[d] = pts
        if series:
            svgs.append(_curve_svg(f"{model}: {threat}, FAR % against eps", series, "eps"))
    for threat, opts in suite.threat_models.items():
        if opts.get("attack") != "min-eps":
            continue
        series, eps_max = {}, float(opts.get("eps", 0.03))
        for d in suite.defenses:
            r = by.get((model, d, threat))
            if r and r["status"] == "ok" and metrics_of(r).min_eps:
                values = metrics_of(r).min_eps["values"]
                broken = sorted(v for v in values if v is not None)
                n = len(values)
                series[d] = [(0.0, 0.0, 0, 0)] + [(v, (i + 1) / n, 0, 0) for i, v in enumerate(broken)] + \
                    [(eps_max, len(broken) / n, 0, 0)]
        if series:
            svgs.append(_curve_svg(f"{model}: {threat}, pairs broken at budget <= eps, %", series, "eps", step=True))
    return svgs


def _index(suite: Suite, records: list[dict], docs: str) -> str:
    by = {(r["cell"]["model"], r["cell"]["defense"], r["cell"]["threat"]): r for r in records}
    opts, budget_of = _threat_options(suite), _budget_of_label(suite)
    budgets = sorted({b for b in budget_of.values()}, key=float, reverse=True)
    parts = [f"<h1>iwmf-bench: {_e(suite.name)} suite</h1>",
             f'<p class="note">Single-shot FAR (dodging: rejected probes) %, [95% interval]; the worst case per budget '
             f'first (per pair, the best of the row\'s threat models within that budget). How the numbers are computed: '
             f'<a href="{docs}/README.md#checking-the-numbers">README</a>; add your own defense: '
             f'<a href="{docs}/CONTRIBUTING.md">CONTRIBUTING</a>. Example images (source, adversarial, target, '
             f'purified): <a href="{docs}/imgs/{_e(suite.name)}_examples.png">imgs/{_e(suite.name)}_examples.png</a>; '
             f'every adversarial image a run scored is kept under its <code>results/{_e(suite.name)}/images/</code> '
             f'(<code>iwmf-bench rescore</code> re-scores them).</p>', '<div class="controls">',
             "defense kind: " + "".join(f'<label><input type="checkbox" class="dkind" value="{k}" checked> {k}</label>'
                                        for k in KINDS),
             "<br>threat kind: " + "".join(f'<label><input type="checkbox" class="tkind" value="{k}" checked> {k}</label>'
                                          for k in THREAT_KINDS)]
    if budgets:
        parts.append('<br><label>budget of the sweeps: <select id="budget">'
                     + "".join(f'<option value="{b}"{" selected" if i == 0 else ""}>{b}</option>'
                               for i, b in enumerate(budgets)) + "</select></label>")
    parts.append("</div>")
    for model, t in tables(suite, records).items():
        parts.append(f'<h2 id="{_e(model)}">{_e(model)}' + (f': {_e(t["scope"])}' if t.get("scope") else "") + "</h2>")
        heads, cols = [], []
        for h in t["headers"]:
            attrs, col = "", {"kind": "other"}
            if h.startswith("worst case "):
                b = h.removeprefix("worst case ").removesuffix(" %")
                eps = b.split()[1]
                attrs = ' class="worst"' + (f' data-budget="{eps}"' if eps in budgets else "")
                col = {"kind": "worst", "budget": b}
            elif h.endswith(" %") and h.split(" ", 1)[0] in ("FAR", "dodging"):
                label = h.split(" ", 1)[1].removesuffix(" %")
                attrs = f' data-tkind="{threat_kind(opts.get(label, {}))}"'
                if label in budget_of:
                    attrs += f' data-budget="{budget_of[label]}"'
                col = {"kind": "threat", "label": label}
            heads.append(f"<th{attrs}>{_e(h)}</th>")
            cols.append((col, attrs))
        raw = {row["defense"]: row for row in t["raw"]}
        body = []
        for row in t["rows"]:
            d = row[0]
            tds = []
            for j, ((col, _), text) in enumerate(zip(cols, row)):
                value, link, cls = "", None, ""
                if j == 0:
                    value = d
                elif j == 1:
                    value = f'{raw[d]["frr_genuine"]["value"]:.6f}' if raw[d]["frr_genuine"] else ""
                elif col["kind"] == "worst":
                    w = raw[d]["worst_case"].get(col["budget"])
                    value, cls = (f'{w["value"]:.6f}' if w else ""), ' class="worst"'
                elif col["kind"] == "threat":
                    r = by.get((model, d, col["label"]))
                    if r is not None and r["status"] == "ok":
                        value = f"{metrics_of(r).success.value:.6f}"
                        link = f"cells/{cell_file(r)[:-5]}.html"
                    else:
                        cls = ' class="na"'
                else:  # s/img
                    value = text
                content = f'<a href="{link}">{_e(text)}</a>' if link else _e(text)
                tds.append(f'<td{cls} data-v="{_e(value)}">{content}</td>')
            body.append(f'<tr data-kind="{defense_kind(suite.defenses.get(d, {}))}">{"".join(tds)}</tr>')
        parts.append(f'<table class="lb" id="table-{_e(model)}"><thead><tr>{"".join(heads)}</tr></thead>'
                     f'<tbody>{"".join(body)}</tbody></table>')
        if t.get("paired"):
            parts.append("<p class=\"note\">Paired rankings (sign test, &lt; where neighbours differ at p &lt; 0.05, ~ "
                         "where they do not):</p><ul class=\"note\">"
                         + "".join(f"<li>{_e(c)}: {_e(v['ranking'])}</li>" for c, v in t["paired"].items()) + "</ul>")
        parts.append('<ul class="note">' + "".join(f"<li>{_e(n)}</li>" for n in t["notes"]) + "</ul>")
        for section in t["sections"]:  # the random defenses' deployments, known randomness
            parts.append(f'<h3>{_e(section["title"])}</h3><p class="note">{_e(section["caption"])}</p>'
                         f'<table class="section" id="{_e(section["id"])}-{_e(model)}"><thead><tr>'
                         + "".join(f"<th>{_e(h)}</th>" for h in section["headers"]) + "</tr></thead><tbody>"
                         + "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in section["rows"])
                         + "</tbody></table>")
        parts += _curves(suite, model, by)
        parts += _tradeoff_svgs(suite, model, t)
    return _page(f"iwmf-bench {suite.name}", "\n".join(parts), SCRIPT)


def _cell_page(record: dict, docs: str) -> str:
    m = metrics_of(record)
    per = m.per_pair
    rows = []
    for i in range(len(per.successes)):
        fmt = lambda values: "" if values is None or values[i] is None else f"{values[i]:.5g}"  # noqa: E731
        rows.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in (
            i, per.probe[i] if per.probe else "", per.probe_identity[i], per.reference_identity[i],
            f"{per.successes[i]}/{per.draws}", fmt(per.linf), fmt(per.l2), fmt(per.queries), fmt(per.min_eps))) + "</tr>")
    rates = "".join(f"<tr><td>{_e(name)}</td><td>{_e(rate)}</td></tr>" for name, rate in (
        (m.rate_name, m.success), (f"{m.rate_name} worst-of-{m.draws}", m.success_worst_of_n),
        ("FRR genuine", m.frr_genuine), ("FRR adversarial vs true identity", m.frr_adv_true_identity)))
    attack = m.attack
    flags = ", ".join(k for k, v in (attack.flags if attack else {}).items() if v) or "none raised"
    body = [f'<p><a href="../index.html">&larr; {_e(record["cell"]["suite"])} leaderboard</a></p>',
            f"<h1>{_e(record['name'])}</h1>", f"<table>{rates}</table>",
            f"<p>threshold {m.threshold:.6g} ({_e(m.metric)}); purification {m.seconds_per_image:.4g} s/image; "
            f"sanity flags: {_e(flags)}</p>",
            "<h2>Per pair</h2>", "<table id=\"pairs\"><thead><tr>" + "".join(f"<th>{h}</th>" for h in (
                "pair", "probe", "probe identity", "reference identity", "accepted draws", "Linf", "L2", "queries",
                "min eps")) + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>",
            "<h2>Config</h2>", f"<pre>{_e(json.dumps(record['cell'], indent=1, sort_keys=True))}</pre>",
            "<h2>Provenance</h2>", f"<p>key {_e(record['key'])}; code fingerprints (see "
            f'<a href="{docs}/README.md#checking-the-numbers">README</a>):</p>',
            f"<pre>{_e(json.dumps(record.get('code', {}), indent=1, sort_keys=True))}</pre>",
            "<h2>Environment</h2>", f"<pre>{_e(json.dumps(record.get('env', {}), indent=1, sort_keys=True))}</pre>"]
    if attack is not None:
        body += ["<h2>Attack's account</h2>",
                 f"<pre>{_e(json.dumps({k: v for k, v in attack.to_dict().items() if k != 'seconds_per_image'}, indent=1, sort_keys=True))}</pre>"]
    return _page(record["name"], "\n".join(body))


def build_site(suite: Suite, records: list[dict], out: str | Path, docs: str = "../../..") -> list[Path]:
    """Write the site of ``records`` (a suite's cell records) under ``out``; return the paths.
    ``docs``: where README.md and CONTRIBUTING.md lie, relative to ``out``."""
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    written = []
    index = out / "index.html"
    index.write_text(_index(suite, records, docs))
    written.append(index)
    keep = set()
    for r in records:
        if r["status"] != "ok":
            continue
        path = out / "cells" / f"{cell_file(r)[:-5]}.html"
        path.write_text(_cell_page(r, "../" + docs))
        keep.add(path.name)
        written.append(path)
    for stale in (out / "cells").glob("*.html"):
        if stale.name not in keep:
            stale.unlink()  # a cell no longer in the suite
    return written
