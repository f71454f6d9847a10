"""Suite configs (YAML) and the cells they expand to.

A suite names models, defenses and threat models (each a label -> options mapping)
plus the data and evaluation settings. A *cell* is one (model, defense, threat model)
with everything it needs to be computed on its own: results are keyed by a hash of
the cell's full config and the package version, so a cell computed locally, on another
shard or on a Ray worker is the same file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .devices import resolve_device
from .errors import BenchError

SETTINGS = ("transfer", "adaptive")
# Suite-level keys of a model or defense entry (not passed to its factory).
REQUIRES = ("cuda",)  # ``requires: cuda``: skip the entry's cells on a machine without a GPU
SUITE_KEYS = ("defense", "requires", "threshold", "threats")  # threshold: a model's, fixed or calibrated (dataset_suite)
# ``threats: [LABEL, ...]`` on a model or defense entry: cross it with only these threat
# models (default: all), so a suite can give an expensive entry a cheaper column set. Not
# part of the cells' options, so editing the list never invalidates computed cells.
# Threat-model keys of the transfer-from-surrogate setting (iwmf_bench.cross_model), not
# passed to the attack; the last two are filled in at load from the suite's entries.
SURROGATE_KEYS = ("surrogate", "surrogate_defense", "surrogate_options", "surrogate_defense_options")


@dataclass(frozen=True)
class Cell:
    suite: str
    model: str
    model_options: dict
    defense: str  # label in the suite
    defense_options: dict  # includes "defense": registered name
    threat: str  # label in the suite
    threat_options: dict  # includes "attack": registered name or None
    data: dict
    evaluation: dict
    seed: int
    device: str

    @property
    def name(self) -> str:
        return f"{self.model}/{self.defense}/{self.threat}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> str:
        """Hash of everything that determines the cell's numbers, and the package version."""
        payload = {k: v for k, v in self.to_dict().items() if k != "suite"}
        blob = json.dumps({"cell": payload, "version": __version__}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @property
    def missing_requirement(self) -> str | None:
        """Why this cell cannot run on its device (None: it can)."""
        t = self.threat_options
        for what, label, opts in (("model", self.model, self.model_options),
                                  ("defense", self.defense, self.defense_options),
                                  ("surrogate", t.get("surrogate"), t.get("surrogate_options") or {}),
                                  ("surrogate defense", t.get("surrogate_defense"),
                                   t.get("surrogate_defense_options") or {})):
            if opts.get("requires") == "cuda" and not self.device.startswith("cuda"):
                return (f"{what} {label!r} needs a CUDA GPU ('requires: cuda' in the suite: far too slow on "
                        f"{self.device}); run the suite on a GPU machine, or delete that line to run it on "
                        f"{self.device} anyway")
        return None

    @property
    def setting(self) -> str | None:
        return self.threat_options.get("setting") if self.threat_options.get("attack") else None


@dataclass
class Suite:
    name: str
    path: Path
    seed: int
    device: str
    data: dict
    models: dict[str, dict]
    defenses: dict[str, dict]
    threat_models: dict[str, dict]
    evaluation: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)

    def cells(self, models: list[str] | None = None, defenses: list[str] | None = None,
              attacks: list[str] | None = None, shard: tuple[int, int] | None = None) -> list[Cell]:
        """The cross product, filtered; ``shard=(i, n)`` keeps every n-th cell (1-based i)."""
        for what, chosen, known in (("model", models, self.models), ("defense", defenses, self.defenses),
                                    ("threat model", attacks, self.threat_models)):
            unknown = sorted(set(chosen or []) - set(known))
            if unknown:
                raise BenchError(f"{self.path}: no {what} named {', '.join(unknown)} in the suite "
                                 f"(has: {', '.join(known)})")
        device = resolve_device(self.device, check_available=False)  # checked where each cell runs
        out = []
        strip = lambda opts: {k: v for k, v in opts.items() if k != "threats"}  # noqa: E731
        for m, m_opts in self.models.items():
            for d, d_opts in self.defenses.items():
                for t, t_opts in self.threat_models.items():
                    if (models and m not in models) or (defenses and d not in defenses) \
                            or (attacks and t not in attacks) \
                            or t not in m_opts.get("threats", [t]) or t not in d_opts.get("threats", [t]):
                        continue
                    out.append(Cell(self.name, m, strip(m_opts), d, strip(d_opts), t, dict(t_opts),
                                    dict(self.data), dict(self.evaluation), self.seed, device))
        if shard:
            i, n = shard
            out = [c for j, c in enumerate(out) if j % n == i - 1]
        return out


def _check_options(path: Path, what: str, label: str, factory: Any, options: dict) -> None:
    """Unknown option names (typos) fail before anything runs, naming what is accepted."""
    from .registry import unknown_options

    unknown, accepted = unknown_options(factory, sorted(options))
    if unknown:
        raise BenchError(f"{path}: {what}.{label}: unknown option(s) {', '.join(unknown)} "
                         f"(accepted: {', '.join(accepted)})")


def validate(suite: "Suite") -> None:
    """Every name is registered and every option is accepted by its factory."""
    from . import registry

    for label, opts in suite.models.items():
        rest = {k: v for k, v in opts.items() if k not in SUITE_KEYS}
        _check_options(suite.path, "models", label, registry.get("models", label).factory, rest)
    for label, opts in suite.defenses.items():
        rest = {k: v for k, v in opts.items() if k not in SUITE_KEYS}
        _check_options(suite.path, "defenses", label, registry.get("defenses", opts["defense"]).factory, rest)
    for label, opts in suite.threat_models.items():
        if opts["attack"] is None:
            continue
        rest = {k: v for k, v in opts.items() if k not in ("attack", "setting", *SURROGATE_KEYS)}
        factory = registry.get("attacks", opts["attack"]).factory
        _check_options(suite.path, "threat_models", label, factory, rest)
        if hasattr(factory, "validate_options"):  # attacks that can check more (e.g. a library class name)
            try:
                factory.validate_options(**rest)
            except BenchError as exc:
                raise BenchError(f"{suite.path}: threat_models.{label}: {exc}") from None
    from .dataset_suite import validate as validate_dataset  # data.dataset and model thresholds

    validate_dataset(suite.path, suite.data, suite.models)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise BenchError(f"--shard must look like i/n (e.g. 2/4), got {text!r}") from None
    if not 1 <= i <= n:
        raise BenchError(f"--shard {text}: need 1 <= i <= n")
    return i, n


def _mapping(raw: Any, what: str, path: Path) -> dict[str, dict]:
    if raw is None:
        return {}
    if isinstance(raw, list):  # a bare list of names: default options
        raw = {name: {} for name in raw}
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: '{what}' must be a mapping of label -> options")
    out = {}
    for label, opts in raw.items():
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise BenchError(f"{path}: {what}.{label} must be a mapping of options, got {opts!r}")
        out[str(label)] = opts
    return out


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise BenchError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: expected a mapping at the top level")
    for key in ("models", "defenses", "threat_models", "data"):
        if key not in raw:
            raise BenchError(f"{path}: missing '{key}'")
    models = _mapping(raw["models"], "models", path)
    defenses = _mapping(raw["defenses"], "defenses", path)
    for label, opts in defenses.items():
        opts.setdefault("defense", label)
    for what, entries in (("models", models), ("defenses", defenses)):
        for label, opts in entries.items():
            if "requires" in opts and opts["requires"] not in REQUIRES:
                raise BenchError(f"{path}: {what}.{label}.requires must be one of {', '.join(REQUIRES)}, "
                                 f"got {opts['requires']!r}")
            if "threats" in opts and (not isinstance(opts["threats"], list)
                                      or set(map(str, opts["threats"])) - set(raw["threat_models"] or {})):
                raise BenchError(f"{path}: {what}.{label}.threats must be a list of the suite's threat models "
                                 f"({', '.join(raw['threat_models'] or {})}), got {opts['threats']!r}")
    threats = _mapping(raw["threat_models"], "threat_models", path)
    for label, opts in threats.items():
        if "attack" not in opts:
            raise BenchError(f"{path}: threat_models.{label} needs 'attack' (a registered attack, or null "
                             "for clean images)")
        if opts["attack"] is not None and opts.setdefault("setting", "transfer") not in SETTINGS:
            raise BenchError(f"{path}: threat_models.{label}.setting must be one of {SETTINGS}")
    data = dict(raw["data"])
    for key in ("sources", "targets") if "dataset" not in data else ():  # or a dataset plugin (dataset_suite)
        if key not in data:
            raise BenchError(f"{path}: data.{key} is required (or data.dataset: a registered dataset)")
    for label, opts in threats.items():
        if any(key in opts for key in SURROGATE_KEYS):
            from .cross_model import resolve_surrogate

            resolve_surrogate(path, label, opts, models, defenses, data)
    return Suite(name=str(raw.get("name", path.stem)), path=path, seed=int(raw.get("seed", 0)),
                 device=str(raw.get("device", "auto")), data=data,
                 models=models, defenses=defenses, threat_models=threats,
                 evaluation=dict(raw.get("evaluation") or {}), check=dict(raw.get("check") or {}))
