"""Write everything a finished suite publishes: leaderboards, the FAR plot, example images."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .attacks.base import make_generator
from .figures import example_grid, far_plot, query_curves, roc_plots, security_curves, tradeoff_curves
from .leaderboard import render
from .site import build_site
from .pipeline.build import build_defense, build_model
from .pipeline.cell import Cell
from .pipeline.compute import pair_source
from .pipeline.craft import transfer_images
from .suite import Suite


def publish(suite: Suite, records: list[dict], leaderboards: str | Path, imgs: str | Path,
            results_root: str | Path) -> list[Path]:
    curves = security_curves(suite, records, imgs)
    for extra in (tradeoff_curves(suite, records, imgs), query_curves(suite, records, imgs)):
        for model, paths in extra.items():
            curves.setdefault(model, []).extend(paths)
    paths = render(suite, records, leaderboards, curves)
    paths += [p for model in curves.values() for p in model]
    plot = far_plot(suite, records, Path(imgs) / f"{suite.name}_far.png")
    if plot:
        paths.append(plot)
    paths += roc_plots(suite, records, imgs)  # dataset suites: clean ROC per model
    grid = _examples(suite, records, Path(imgs) / f"{suite.name}_examples.png", results_root)
    if grid:
        paths.append(grid)
    # The site, from the cells just committed (what `leaderboard site` rebuilds them from).
    paths += build_site(suite, committed_records(leaderboards), site_dir(leaderboards, suite.name))
    return paths


def site_dir(leaderboards: str | Path, suite: str) -> Path:
    """A suite's site beside its leaderboard folder: ``leaderboards/site/<suite>/``."""
    return Path(leaderboards).parent / "site" / suite


def committed_records(leaderboards: str | Path) -> list[dict]:
    """The cell records of a rendered leaderboard folder, in file order."""
    return [json.loads(p.read_text()) for p in sorted((Path(leaderboards) / "cells").glob("*.json"))]


def _examples(suite: Suite, records: list[dict], path: Path, results_root) -> Path | None:
    """Source, adversarial (first transfer threat), and purified by each finished defense."""
    ok = [r for r in records if r["status"] == "ok" and r["cell"]["threat_options"].get("setting") == "transfer"]
    if not ok:
        return None
    first = Cell(**ok[0]["cell"], root=suite.root)
    model = build_model(first)
    pairs = pair_source(first).pairs(first.model, model.input_size)
    adv, _ = transfer_images(first, model, pairs, Path(results_root))
    columns = {"source": pairs.sources, f"adversarial ({first.threat})": adv.cpu(), "target": pairs.targets}
    for r in ok:
        cell = Cell(**r["cell"], root=suite.root)
        if cell.model != first.model or cell.threat != first.threat or cell.defense == "none":
            continue
        gen = make_generator(cell.seed, "examples")
        with torch.no_grad():
            columns[f"{cell.defense}(adv)"] = build_defense(cell).purify(adv[:4], gen).cpu()
    return example_grid(columns, path)
