"""The static leaderboard site: rebuilt from the committed cells it is byte-identical to the
committed one, and in a real browser (headless Chromium through Playwright) its numbers are
the cells', sorting, filters and the budget switch work, cell pages open, nothing errs and
nothing is fetched from outside the page's folder.

The browser tests need Debian's `chromium` (scripts/setup.sh installs it as root when it is
missing) and the `playwright` package (the dev extra); without them they are skipped with
that reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from iwmf_bench.publish import committed_records
from iwmf_bench.site import build_site
from iwmf_bench.suite import find_suite, load_suite

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "leaderboards" / "site"


@pytest.mark.parametrize("suite", ["smoke", "default", "tradeoff"])
def test_committed_site_is_what_the_committed_cells_build(suite, tmp_path):
    built = build_site(load_suite(find_suite(suite)), committed_records(ROOT / "leaderboards" / suite), tmp_path)
    names = {p.relative_to(tmp_path) for p in built}
    committed = {p.relative_to(SITE / suite) for p in (SITE / suite).rglob("*.html")}
    assert names == committed
    for name in sorted(names):
        assert (tmp_path / name).read_bytes() == (SITE / suite / name).read_bytes(), name


@pytest.fixture
def smoke_page(browser, tmp_path):
    """The smoke index in a fresh page, with every console error and every request recorded."""
    site = tmp_path / "site"
    shutil.copytree(SITE / "smoke", site)  # a copy: requests outside it would be visible as such
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto((site / "index.html").as_uri())
    yield page, site, errors, requests
    page.close()


def _column(page, header: str) -> list[str]:
    return page.eval_on_selector(
        "table#table-dlib-resnet",
        """(t, header) => { const i = [...t.tHead.rows[0].cells].findIndex(c => c.textContent === header);
                           return [...t.tBodies[0].rows].filter(r => r.style.display !== 'none')
                                  .map(r => r.cells[i].textContent); }""", header)


def test_tables_show_the_cells_numbers(smoke_page):
    page, _, errors, requests = smoke_page
    cells = {(c["cell"]["defense"], c["cell"]["threat"]): c for c in committed_records(ROOT / "leaderboards" / "smoke")}
    defenses = _column(page, "defense")
    far = _column(page, "FAR apgd-linf-transfer %")
    assert len(defenses) == 6
    for d, text in zip(defenses, far):
        c = cells[(d, "apgd-linf-transfer")]
        if c["status"] != "ok":
            assert text == c["status"]
            continue
        rate = c["metrics"]["far"]
        lo, hi = rate["ci95"]
        assert text == f"{100 * rate['value']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"
    assert errors == []
    assert all(u.startswith("file://") for u in requests)


def test_sorting_filters_and_a_cell_page(smoke_page, tmp_path):
    page, site, errors, requests = smoke_page
    header = "FAR apgd-linf-transfer %"
    page.click(f"table#table-dlib-resnet th:text-is('{header}')")
    ascending = _column(page, header)
    values = [float(v.split()[0]) for v in ascending if v[0].isdigit()]
    assert values == sorted(values) and ascending[0].startswith("61.3")  # iwmf-0.25 first
    page.click(f"table#table-dlib-resnet th:text-is('{header}')")
    assert _column(page, header)[0].startswith("100.0")  # descending
    # a defense-kind filter hides its rows and shows them again
    assert "diffpure" in _column(page, "defense")
    page.uncheck("input.dkind[value=diffusion]")
    assert "diffpure" not in _column(page, "defense") and "iwmfdiff" not in _column(page, "defense")
    page.check("input.dkind[value=diffusion]")
    assert "diffpure" in _column(page, "defense")
    # a threat-kind filter hides its columns
    page.uncheck("input.tkind[value=adaptive]")
    assert not page.is_visible("table#table-dlib-resnet th:text-is('FAR apgd-eot-adaptive %')")
    page.check("input.tkind[value=adaptive]")
    assert page.is_visible("table#table-dlib-resnet th:text-is('FAR apgd-eot-adaptive %')")
    page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
    assert (tmp_path / "index.png").stat().st_size > 10_000
    # a table entry opens its cell page, with the cell's per-pair outcomes
    page.click("table#table-dlib-resnet tr:has(td:text-is('iwmf-0.25')) a:text-is('61.3 [30, 86]')")
    page.wait_for_load_state()
    assert page.url.endswith("cells/dlib-resnet__iwmf-0.25__apgd-linf-transfer.html")
    assert page.inner_text("h1") == "dlib-resnet/iwmf-0.25/apgd-linf-transfer"
    cell = json.loads((ROOT / "leaderboards" / "smoke" / "cells" /
                       "dlib-resnet__iwmf-0.25__apgd-linf-transfer.json").read_text())
    per = cell["metrics"]["per_pair"]
    shown = page.eval_on_selector("table#pairs", "t => [...t.tBodies[0].rows].map(r => r.cells[4].textContent)")
    assert shown == [f"{k}/{per['draws']}" for k in per["successes"]]
    assert errors == [] and all(u.startswith("file://") and u.startswith(site.as_uri()) for u in requests)


def test_budget_switch_shows_one_budget_of_a_sweep(browser, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(SITE / "default", site)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((site / "index.html").as_uri())
    visible = lambda text: page.is_visible(f"table#table-dlib-resnet th:text-is('{text}')")  # noqa: E731
    assert visible("FAR apgd-linf-transfer %") and not visible("FAR apgd-linf-transfer@0.004 %")
    page.select_option("#budget", "0.004")
    assert visible("FAR apgd-linf-transfer@0.004 %") and not visible("FAR apgd-linf-transfer %")
    assert visible("worst case Linf 0.004 %") and not visible("worst case Linf 0.03 %")
    assert visible("FAR clean %")  # not a sweep: always shown
    assert page.locator("svg circle title").count() > 0  # curves, their numbers on hover
    assert errors == []
    page.close()
