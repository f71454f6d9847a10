"""MkDocs hook: the repository's committed leaderboards and figures in the documentation site.

They live outside ``docs/`` (where the benchmark writes them), so ``on_files`` adds them as
files of the site, and ``mkdocs build --strict`` checks every link to them:

* ``leaderboards/site/<suite>/...`` (the static HTML sites) -> ``leaderboards/<suite>/...``;
* ``leaderboards/<suite>/<model>.md`` -> pages ``leaderboards/<suite>/<model>.html`` (the
  CSV and JSON beside them are copied as they are);
* ``imgs/*.png`` -> ``imgs/`` (the figures the pages and the leaderboards show).

The HTML sites link to ``README.md``, ``CONTRIBUTING.md`` and ``imgs/`` by their place in the
repository (``iwmf_bench/site.py``); in the copy those links point to the pages that now
hold that text, and to the copied figures.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parents[1]
LEADERBOARDS = ROOT / "leaderboards"
SITES = LEADERBOARDS / "site"
FIGURES = ROOT / "imgs"

# Where the sites' links to repository files point in the documentation (docs pages).
SITE_LINK_TARGETS = {
    "README.md#checking-the-numbers": "methods/checking-the-numbers.md",
    "README.md": "index.md",
    "CONTRIBUTING.md": "plugins.md",
}


def _url(files: Files, page: str) -> str:
    file = files.get_file_from_path(page)
    if file is None:
        raise RuntimeError(f"docs/hooks.py: the page {page} the leaderboard sites link to is missing")
    return file.url


def _relinked(html: str, depth: int, files: Files) -> str:
    """``html`` of a site page ``depth`` folders below its suite's folder, its links to the
    repository's files pointed at the documentation site's."""
    in_repo = "../" * (3 + depth)  # leaderboards/site/<suite>/... -> repository root
    in_docs = "../" * (2 + depth)  # leaderboards/<suite>/... -> site root
    pattern = re.compile(r'((?:href|src)=")' + re.escape(in_repo) + r'([^"]*)"')

    def repl(m: re.Match) -> str:
        target = m.group(2)
        if target.startswith("imgs/"):
            return f'{m.group(1)}{in_docs}{target}"'
        page = SITE_LINK_TARGETS.get(target) or SITE_LINK_TARGETS.get(target.split("#")[0])
        if page is None:
            return m.group(0)
        return f'{m.group(1)}{in_docs}{_url(files, page)}"'

    return pattern.sub(repl, html)


def on_files(files: Files, config) -> Files:
    for path in sorted(SITES.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(SITES)  # <suite>/index.html, <suite>/cells/<cell>.html
        uri = f"leaderboards/{rel.as_posix()}"
        if path.suffix == ".html":
            content = _relinked(path.read_text(encoding="utf-8"), len(rel.parts) - 2, files)
            files.append(File.generated(config, uri, content=content))
        else:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    for suite in sorted(p for p in LEADERBOARDS.iterdir() if p.is_dir() and p != SITES):
        for path in sorted(suite.iterdir()):
            if path.is_file() and path.suffix in (".md", ".csv", ".json"):
                # A suite committed later is still built; the nav lists the known ones.
                inclusion = InclusionLevel.NOT_IN_NAV if path.suffix == ".md" else InclusionLevel.UNDEFINED
                files.append(File.generated(config, f"leaderboards/{suite.name}/{path.name}",
                                            abs_src_path=str(path), inclusion=inclusion))
    for path in sorted(FIGURES.glob("*.png")):
        files.append(File.generated(config, f"imgs/{path.name}", abs_src_path=str(path)))
    return files


# Docstrings cross-reference in Sphinx's roles (``:func:`~iwmf_bench.scoring.evaluate```),
# which Markdown renders as the role's name beside inline code. The API pages show the name
# alone, as Sphinx would: the role dropped, a leading ``~`` shortening the path to its last part.
SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def _without_roles(html: str) -> str:
    return SPHINX_ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>",
                           html)


def on_page_content(html: str, page, config, files) -> str:
    return _without_roles(html)
