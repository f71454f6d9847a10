"""The documentation site (docs/, mkdocs.yml): it builds with `mkdocs build --strict` (no
broken link, no page missing from the nav, no docstring the API reference cannot render),
its pages open in a real browser (headless Chromium through Playwright), the README stays a
two-minute read, and every measured table in docs/ names its command and its date.

The browser test needs Debian's `chromium` and the `playwright` package (the dev extra), as
tests/test_site.py does; without them it is skipped with that reason. The build needs the
docs tools (the `docs` extra, also in `dev`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

NOT_A_MEASUREMENT = "<!-- not a measurement -->"
DATE = re.compile(r"20\d\d-\d\d-\d\d")
# A command in backticks: a program the reader runs, or the script or test that measures.
COMMAND = re.compile(r"`[^`\n]*(?:python |iwmf-bench |pytest|bash |benchmarks/\w+\.py|scripts/[\w-]+\.sh)[^`\n]*`")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs tools are not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="the docs tools are not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "WARNING" not in r.stderr, r.stderr[-4000:]
    return out


def test_docs_build_strict(site):
    assert (site / "index.html").is_file()
    assert (site / "reference" / "api.html").is_file()
    for suite in ("smoke", "default", "tradeoff"):  # the committed leaderboard sites, linked from the docs
        assert (site / "leaderboards" / suite / "index.html").is_file(), suite
        assert (site / "leaderboards" / suite / "dlib-resnet.html").is_file(), suite
    assert not (site / "hooks.py").exists()


def test_api_reference_shows_cross_references_without_sphinx_roles(site):
    """Docstrings write ``:func:`~iwmf_bench.scoring.evaluate``` (Sphinx); the API page shows
    ``evaluate`` as code, not the role's name beside it."""
    api = (site / "reference" / "api.html").read_text(encoding="utf-8")
    assert not re.search(r":(?:func|class|meth|mod|attr|data|exc):<code>", api)
    assert "<code>iwmf_bench.operating_points</code>" in api  # a full path stays as written


def test_leaderboard_sites_links_resolve_in_the_docs(site):
    """The copied leaderboard sites keep working inside the docs: every relative link and
    image of their pages (to their cells, to the figures, to the pages that hold the README's
    text) names a file of the built site."""
    sites = sorted([*(site / "leaderboards").glob("*/index.html"), *(site / "leaderboards").glob("*/cells/*.html")])
    assert len(sites) > 3
    broken = []
    for page in sites:
        for target in re.findall(r'(?:href|src)="([^"#]+)', page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):
                continue
            if not (page.parent / target).resolve().is_file():
                broken.append(f"{page.relative_to(site)} -> {target}")
    assert not broken, broken[:10]


def test_start_page_and_api_reference_in_a_browser(site, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto((site / "index.html").as_uri())
        assert "iwmf-bench" in page.title()
        heading = page.locator("article h1").first
        assert heading.inner_text().strip().startswith("iwmf-bench")
        assert page.get_by_text("adversarial purification for face verification").first.is_visible()

        page.goto((site / "reference" / "api.html").as_uri() + "#iwmf_bench.get_defense")
        entry = page.locator('[id="iwmf_bench.get_defense"]')
        assert entry.count() == 1
        assert entry.is_visible()
        assert "get_defense" in entry.inner_text()
        docstring = page.get_by_text("Build a registered defense").first
        assert docstring.is_visible()
        signature = page.locator('[id="iwmf_bench.get_defense"] + .doc-signature')
        assert signature.is_visible()
        assert signature.inner_text().strip().startswith("get_defense(name: str")
        # The search index is fetched by a script that file:// pages may not load (`mkdocs
        # serve` serves it); anything else that throws is a broken page.
        assert not [e for e in errors if "search" not in e], errors
    finally:
        page.close()


def test_readme_is_a_two_minute_read():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)


def _tables(lines: list[str]) -> list[int]:
    """First line (0-based) of each Markdown table outside fenced code."""
    starts, fence = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        if not fence and line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            starts.append(i)
    return starts


def test_every_measured_table_names_its_command_and_date():
    pages = sorted(DOCS.rglob("*.md"))
    assert len(pages) > 10
    missing, checked = [], 0
    for path in pages:
        lines = path.read_text().splitlines()
        for start in _tables(lines):
            if start > 0 and lines[start - 1].strip() == NOT_A_MEASUREMENT:
                continue
            end = start
            while end + 1 < len(lines) and lines[end + 1].startswith("|"):
                end += 1
            around = "\n".join(lines[max(0, start - 15):start] + lines[end + 1:end + 6])
            checked += 1
            if not (DATE.search(around) and COMMAND.search(around)):
                missing.append(f"{path.relative_to(ROOT)}:{start + 1}")
    assert checked > 20
    assert not missing, "tables without a command and a date near them: " + ", ".join(missing)
