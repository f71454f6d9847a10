"""Writing a suite's leaderboard: per model Markdown (tabulate), CSV and JSON, and every
cell's record as one JSON file (``cells/``, what the check compares)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from tabulate import tabulate

from ..suite import Suite
from ..util import write_json_atomic
from .cells import cell_file
from .tables import tables


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
