"""The package's structure, read from the source: no import circles, no private names
imported across modules, function-level imports only where they defer a dependency,
and pipeline modules small enough to read in one sitting, each stating its contract."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "iwmf_bench"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def project_imports(name: str, path: Path):
    """(imported module, imported name or None, ast node, function-level?) for every
    import of a project module in ``path``, module-level and function-level alike."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PKG.name:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # `from . import registry`: the module itself
                    yield sub, None, node, id(node) in in_function
                else:
                    yield target, alias.name, node, id(node) in in_function
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PKG.name:
                    yield alias.name, None, node, id(node) in in_function


def import_graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for target, _, _, _ in project_imports(m, path):
            while target not in MODULES:  # `from .defenses.base import X` where X is a name
                target = target.rpartition(".")[0]
            if target != m:
                graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle_and_reads_relative_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "iwmf_bench.pipeline.cell" in graph["iwmf_bench.pipeline.compute"]
    assert "iwmf_bench.registry" in graph["iwmf_bench.pipeline.build"]  # `from .. import registry`


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_no_private_names_imported_across_modules():
    bad = [f"{m} imports {name} from {target}" for m, path in MODULES.items()
           for target, name, _, _ in project_imports(m, path)
           if name and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))]
    assert bad == []


def test_function_level_imports_say_what_they_defer():
    """A project import inside a function is allowed only to defer an optional or heavy
    dependency, and a comment on that line or the line above says so."""
    bad = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        for _, _, node, in_function in project_imports(m, path):
            if in_function:
                context = " ".join(lines[max(0, node.lineno - 2):node.end_lineno]).lower()
                if "defer" not in context:
                    bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert bad == []


def test_stages_never_import_the_orchestrator():
    above = {"iwmf_bench.runner", "iwmf_bench.suite", "iwmf_bench.cli", "iwmf_bench.publish",
             "iwmf_bench.leaderboard", "iwmf_bench.figures"}
    graph = import_graph()
    reach = {}

    def reachable(m):
        if m not in reach:
            reach[m] = set()
            for w in graph[m]:
                reach[m] |= {w} | reachable(w)
        return reach[m]

    above |= {m for m in MODULES if m.startswith("iwmf_bench.leaderboard.")}
    for m in MODULES:
        if m.startswith("iwmf_bench.pipeline") or m in ("iwmf_bench.util", "iwmf_bench.weights"):
            assert not reachable(m) & above, (m, reachable(m) & above)
    assert "iwmf_bench.weights" not in reachable("iwmf_bench.npm_weights")  # the fetcher is a source of weights


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("iwmf_bench.pipeline")) +
                         ["iwmf_bench.runner", "iwmf_bench.suite", "iwmf_bench.util"])
def test_pipeline_modules_are_short_and_state_their_contract(name):
    path = MODULES[name]
    assert len(path.read_text().splitlines()) <= 400
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc) > 80, f"{path.name} needs a docstring stating its contract"


def test_pipeline_asks_the_attack_contract_only():
    """The stages reach attacks through their contract (``attacks/base``: the interface an
    attack declares) and never a particular attack's module, so a new attack with its own
    needs does not edit a stage; the scorer's draws live in ``iwmf_bench.scoring``."""
    for name, path in MODULES.items():
        if not name.startswith("iwmf_bench.pipeline"):
            continue
        for target, _, _, _ in project_imports(name, path):
            if target.startswith("iwmf_bench.attacks"):
                assert target in ("iwmf_bench.attacks", "iwmf_bench.attacks.base"), (name, target)
                assert target == "iwmf_bench.attacks.base", (name, target)


CAP = 400  # lines: a module one reads in a sitting


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_is_short_and_states_its_concern(name):
    """Every module of the package: at most CAP lines, unless its docstring says why it is
    longer ("over the 400-line cap: <why>"), and a docstring stating what it is for (an
    empty package ``__init__`` needs none)."""
    path = MODULES[name]
    text = path.read_text()
    if not text.strip():
        return
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert len(doc) > 30, f"{path.name}: needs a module docstring stating its concern"
    lines = len(text.splitlines())
    assert lines <= CAP or f"over the {CAP}-line cap:" in doc.lower(), \
        f"{name}: {lines} lines; split it, or say in its docstring why it is over the {CAP}-line cap"
