"""Fingerprints of the code a cell runs, derived from the source itself.

A cached result is only as good as the code that computed it. Rather than a version
number someone must remember to bump, a component's fingerprint hashes the syntax tree
of its module and of every project module it imports, transitively:

* **normalized**: docstrings are dropped and the tree is dumped without positions, so
  comments, docstrings, blank lines and formatting do not count; any change to what the
  code does (a constant, an operator, a call, a default argument) does;
* **static**: imports are read from the tree (every ``import`` and ``from ... import``,
  inside functions too), nothing is executed; only modules of the component's own
  top-level package and of ``iwmf_bench`` count (torch, numpy and the like are versions
  the records state, not code we fingerprint);
* **explicit**: only the modules the code names; the package ``__init__`` files Python
  runs on the way are not pulled in (``iwmf_bench/__init__.py`` imports the public API,
  which would make every component depend on every other).

A third-party plugin gets the same treatment: its own package's modules and the
iwmf_bench modules it imports. Data files a component reads are not code: a defense
declares them (``Defense.data_files(options)``, e.g. a diffusion prior's YAML) and the
cell key hashes their bytes beside the code's fingerprint
(:meth:`iwmf_bench.pipeline.cell.Cell.code`); weights are pinned by sha256 in the code
that fetches them. What a fingerprint does not see: code reached without an import
statement (``importlib.import_module`` with a computed name).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util

PROJECT = "iwmf_bench"


def _source(modname: str) -> tuple[str, bool]:
    """(path of the module's source file, whether it is a package ``__init__``)."""
    spec = importlib.util.find_spec(modname)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(f"{modname}: no Python source to fingerprint")
    return spec.origin, spec.submodule_search_locations is not None


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node):
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _strip


@functools.lru_cache(maxsize=None)
def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _imports(tree: ast.Module, modname: str, is_package: bool) -> frozenset[str]:
    """Every module name an import statement of ``tree`` names (absolute)."""
    package = modname if is_package else modname.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            if parent == "__future__":
                continue
            for alias in node.names:
                if alias.name.startswith("__") and alias.name.endswith("__"):
                    continue  # ``from .. import __version__``: metadata, not code
                sub = f"{parent}.{alias.name}"
                # ``from pkg import mod`` names the submodule; ``from pkg import name`` the package
                found.add(sub if alias.name != "*" and _is_module(sub) else parent)
    found.discard(modname)
    found.discard("")
    return frozenset(found)


@functools.lru_cache(maxsize=None)
def _parsed(source: bytes, modname: str, is_package: bool) -> tuple[str, frozenset[str]]:
    tree = ast.parse(source)
    imports = _imports(tree, modname, is_package)
    normalized = ast.dump(_StripDocstrings().visit(tree), include_attributes=False)
    return hashlib.sha256(normalized.encode()).hexdigest(), imports


def _module(modname: str) -> tuple[str, frozenset[str]]:
    """(digest of the normalized tree, absolute names of what it imports). Read afresh
    each time (an edit within one file-system timestamp tick still counts); parsed once
    per distinct content."""
    path, is_package = _source(modname)
    with open(path, "rb") as f:
        return _parsed(f.read(), modname, is_package)


def module_digest(modname: str) -> str:
    """sha256 of the module's syntax tree without docstrings or positions."""
    return _module(modname)[0]


def _roots(modname: str, roots) -> frozenset[str]:
    return frozenset(roots) if roots is not None else frozenset({modname.split(".")[0], PROJECT})


def project_imports(modname: str, roots=None) -> set[str]:
    """The modules of ``roots`` (default: the module's own top-level package and
    iwmf_bench) that ``modname`` names in an import statement."""
    roots = _roots(modname, roots)
    return {n for n in _module(modname)[1] if n.split(".")[0] in roots}


def closure_digests(modname: str, roots=None) -> dict[str, str]:
    """Every module ``modname`` runs (itself and its project imports, transitively) -> digest."""
    roots = _roots(modname, roots)
    out: dict[str, str] = {}
    todo = [modname]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out[name] = module_digest(name)
        todo.extend(project_imports(name, roots) - set(out))
    return dict(sorted(out.items()))


def fingerprint(modname: str, roots=None) -> str:
    """16 hex digits of sha256 over ``module: digest`` of the closure: changes when, and
    only when, the code of one of those modules does."""
    lines = "\n".join(f"{m}: {d}" for m, d in closure_digests(modname, roots).items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def of(obj) -> str:
    """The fingerprint of the module that defines a class or function (or an instance's class)."""
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return fingerprint(module)
