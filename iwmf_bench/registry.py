"""Name-based registries fed by Python entry points.

Built-in defenses, attacks and models are declared in this package's own
``pyproject.toml`` under the groups below, so they take exactly the same path as
third-party plugins. An entry point names a class or factory; calling it with keyword
arguments builds the object. Its one-line description is the first line of its
docstring (or a ``description`` attribute).

A plugin that fails to import is recorded in :func:`broken` and skipped; it never takes
the harness down.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from .errors import BenchError

GROUPS = {
    "defenses": "iwmf_bench.defenses",
    "attacks": "iwmf_bench.attacks",
    "models": "iwmf_bench.models",
    "datasets": "iwmf_bench.datasets",
}


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    factory: Callable[..., Any]
    source: str  # "module:attr" of the entry point
    distribution: str  # the installed package that declared it

    @property
    def description(self) -> str:
        desc = getattr(self.factory, "description", None)
        if not desc:
            doc = (getattr(self.factory, "__doc__", None) or "").strip()
            desc = doc.splitlines()[0] if doc else ""
        return desc


@dataclass(frozen=True)
class BrokenPlugin:
    name: str
    kind: str
    source: str
    distribution: str
    error: str


@functools.lru_cache(maxsize=None)
def _load(kind: str) -> tuple[dict[str, Entry], tuple[BrokenPlugin, ...]]:
    if kind not in GROUPS:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {sorted(GROUPS)}")
    entries: dict[str, Entry] = {}
    broken: list[BrokenPlugin] = []
    for ep in entry_points(group=GROUPS[kind]):
        dist = ep.dist.name if ep.dist is not None else "?"
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take the harness down
            broken.append(BrokenPlugin(ep.name, kind, ep.value, dist, f"{type(exc).__name__}: {exc}"))
            continue
        if ep.name in entries and entries[ep.name].source != ep.value:
            broken.append(
                BrokenPlugin(ep.name, kind, ep.value, dist,
                             f"name already registered by {entries[ep.name].distribution} "
                             f"({entries[ep.name].source}); ignored")
            )
            continue
        entries[ep.name] = Entry(ep.name, kind, obj, ep.value, dist)
    return dict(sorted(entries.items())), tuple(broken)


def refresh() -> None:
    """Forget cached entry points (after installing a plugin in a running process)."""
    _load.cache_clear()


def available(kind: str) -> dict[str, Entry]:
    """Registered, importable entries of one kind, by name."""
    return _load(kind)[0]


def broken(kind: str | None = None) -> list[BrokenPlugin]:
    """Plugins that failed to load (all kinds when ``kind`` is None)."""
    kinds = [kind] if kind else list(GROUPS)
    return [b for k in kinds for b in _load(k)[1]]


def get(kind: str, name: str) -> Entry:
    entries = available(kind)
    if name not in entries:
        hint = ""
        for b in broken(kind):
            if b.name == name:
                hint = f" (the plugin {b.distribution} failed to load: {b.error})"
                break
        singular = kind[:-1] if kind.endswith("s") else kind
        raise BenchError(
            f"unknown {singular} {name!r}{hint}; registered: {', '.join(entries) or 'none'} "
            f"(see `iwmf-bench list`)"
        )
    return entries[name]


def accepted_options(factory: Callable[..., Any]) -> tuple[str, ...] | None:
    """Keyword names a factory accepts, or None when it takes ``**kwargs`` or cannot be
    introspected (then only the call itself can tell)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return tuple(n for n, p in params.items() if p.kind != p.VAR_POSITIONAL)


def unknown_options(factory: Callable[..., Any], names: Any) -> tuple[list[str], tuple[str, ...] | None]:
    """The ``names`` (in their order) that ``factory`` does not accept, and what it accepts;
    nothing is unknown when the factory cannot be introspected (see :func:`accepted_options`)."""
    accepted = accepted_options(factory)
    return ([n for n in names if n not in accepted] if accepted is not None else []), accepted


def create(kind: str, name: str, /, **kwargs: Any) -> Any:
    """Build a registered object: ``create('defenses', 'iwmf', lambda_0=0.25)``."""
    return get(kind, name).factory(**kwargs)
