"""Suite configs (YAML), their validation, and the cells they expand to.

A suite names models, defenses and threat models (each a label -> options mapping)
plus the data and evaluation settings. :meth:`Suite.cells` expands it into
:class:`~iwmf_bench.pipeline.cell.Cell` s (the cross product, filtered, optionally one
shard of it), each with everything it needs to be computed on its own. Model and
defense entries may carry suite keys (:data:`iwmf_bench.util.SUITE_KEYS`) that are not
factory keywords; ``threats: [LABEL, ...]`` limits an entry to some threat models
without entering the cells' options, so editing it never invalidates computed cells.
This module sits above the pipeline: it asks each stage to validate its own keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import registry
from .devices import resolve_device
from .errors import BenchError
from . import image_sets
from .pipeline import data_spec, dataset_pairs, threshold
from .scoring import RANDOMNESS
from .pipeline.cell import REQUIRES, SETTINGS, SURROGATE_KEYS, Cell
from .pipeline.surrogate import resolve_surrogate
from .util import SUITE_KEYS

# Suite-level keys of a threat model entry (not in its cells' options): ``table_eps``, the
# budget of an ``eps: [...]`` sweep that the Markdown table shows.
THREAT_SUITE_KEYS = ("table_eps",)

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
    # How the leaderboard's equal-utility operating point is set (:mod:`iwmf_bench.equal_utility`):
    # ``{target_frr: 0.05}``; default the undefended model's genuine FRR. ``recraft: true``:
    # threshold-dependent attacks are crafted again at each defense's operating point
    # (:func:`iwmf_bench.equal_utility.recraft_cells`, cells of their own); without it their
    # rates there are marked as bounds. No existing cell's key depends on it.
    operating_point: dict = field(default_factory=dict)
    # Strength sweeps of the defenses (:func:`expand_sweeps`): family label -> {"parameter": NAME,
    # "rows": {row label: value}}; each row is a defense of its own.
    families: dict = field(default_factory=dict)

    def family_of(self, defense: str) -> tuple[str, str, Any] | None:
        """(family, parameter, value) of a row of a strength sweep, else None."""
        for family, f in self.families.items():
            if defense in f["rows"]:
                return family, f["parameter"], f["rows"][defense]
        return None

    @property
    def root(self) -> str:
        """The suite file's folder: where its data's relative paths resolve."""
        return str(self.path.resolve().parent)

    def budgets(self, threat: str) -> list[tuple[str, dict]]:
        """(cell label, attack options) of each budget of a threat model: itself when its
        ``eps`` is one number; when ``eps`` is a list, one cell per budget (so a longer list
        reuses the computed ones): the budget the table shows (``table_eps``, default the
        largest) keeps the threat's label, so turning a number into a list that holds it
        keeps that cell's key; the others are ``LABEL@EPS``."""
        raw = self.threat_models[threat]
        opts = {k: v for k, v in raw.items() if k not in THREAT_SUITE_KEYS}
        if not isinstance(opts.get("eps"), list):
            return [(threat, opts)]
        shown = raw.get("table_eps", max(opts["eps"]))
        return [(threat if eps == shown else budget_label(threat, eps), {**opts, "eps": eps}) for eps in opts["eps"]]

    def sweeps(self) -> dict[str, list[tuple[float, str]]]:
        """Threat models with a list of budgets: (eps, cell label) of each, in order."""
        return {t: [(o["eps"], label) for label, o in self.budgets(t)]
                for t, opts in self.threat_models.items() if isinstance(opts.get("eps"), list)}

    def query_sweeps(self) -> dict[str, list[tuple[int, str]]]:
        """Query-budget curves: threat models that differ only in ``max_queries`` (a
        decision-based attack at several query budgets), by a name of their shared options,
        with the (max_queries, label) of each in increasing order; only groups of two or more."""
        groups: dict[str, list[tuple[int, str]]] = {}
        for label, opts in self.threat_models.items():
            if "max_queries" not in opts or isinstance(opts.get("eps"), list):
                continue
            rest = {k: v for k, v in opts.items() if k != "max_queries"}
            name = "-".join(str(rest[k]) for k in ("attack", "norm", "eps") if k in rest)
            extra = sorted((k, v) for k, v in rest.items() if k not in ("attack", "norm", "eps", "setting"))
            name += "".join(f"-{k}{v}" for k, v in extra)
            groups.setdefault(name, []).append((int(opts["max_queries"]), label))
        return {name: sorted(members) for name, members in groups.items() if len(members) > 1}

    def columns(self) -> list[str]:
        """Cell labels in table order; of a sweep, every budget (CSV/JSON show them all)."""
        return [label for t in self.threat_models for label, _ in self.budgets(t)]

    def shown(self, label: str) -> bool:
        """Whether a column appears in the Markdown table: every threat model's own label
        (of a sweep, its ``table_eps`` budget), not the other budgets of a sweep."""
        return label in self.threat_models

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
                for t in self.threat_models:
                    if (models and m not in models) or (defenses and d not in defenses) \
                            or (attacks and t not in attacks) \
                            or t not in m_opts.get("threats", [t]) or t not in d_opts.get("threats", [t]):
                        continue
                    for label, t_opts in self.budgets(t):
                        out.append(Cell(self.name, m, strip(m_opts), d, strip(d_opts), label, dict(t_opts),
                                        dict(self.data), dict(self.evaluation), self.seed, device, self.root))
        if shard:
            i, n = shard
            out = [c for j, c in enumerate(out) if j % n == i - 1]
        return out


def budget_label(threat: str, eps: float) -> str:
    return f"{threat}@{eps:g}"


def check_budgets(path: Path, label: str, opts: dict) -> None:
    """``eps`` is a number or a non-empty list of distinct positive numbers; ``table_eps``
    (the budget the Markdown table shows) is one of them."""
    where = f"{path}: threat_models.{label}"
    eps = opts.get("eps")
    if isinstance(eps, list):
        if not eps or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0 for e in eps) \
                or len({float(e) for e in eps}) != len(eps):
            raise BenchError(f"{where}.eps must be a number or a list of distinct positive numbers, got {eps!r}")
        if opts["attack"] is None:
            raise BenchError(f"{where}: a list of budgets needs an attack (attack: null has no budget)")
    if "table_eps" in opts and (not isinstance(eps, list) or opts["table_eps"] not in eps):
        raise BenchError(f"{where}.table_eps must be one of its eps list, got {opts['table_eps']!r} "
                         f"(eps: {eps!r})")


def _check_options(path: Path, what: str, label: str, factory: Any, options: dict) -> None:
    """Unknown option names (typos) fail before anything runs, naming what is accepted."""
    unknown, accepted = registry.unknown_options(factory, sorted(options))
    if unknown:
        raise BenchError(f"{path}: {what}.{label}: unknown option(s) {', '.join(unknown)} "
                         f"(accepted: {', '.join(accepted)})")


def validate(suite: "Suite") -> None:
    """Every name is registered and every option is accepted by its factory."""
    for label, opts in suite.models.items():
        rest = {k: v for k, v in opts.items() if k not in SUITE_KEYS}
        _check_options(suite.path, "models", label, registry.get("models", label).factory, rest)
    for label, opts in suite.defenses.items():
        rest = {k: v for k, v in opts.items() if k not in SUITE_KEYS}
        _check_options(suite.path, "defenses", label, registry.get("defenses", opts["defense"]).factory, rest)
    for label, opts in suite.threat_models.items():
        if opts["attack"] is None:
            continue
        suite_keys = ("attack", "setting", "randomness", *SURROGATE_KEYS, *THREAT_SUITE_KEYS)  # not the attack's
        rest = {k: v for k, v in opts.items() if k not in suite_keys}
        if isinstance(rest.get("eps"), list):  # a sweep: each budget is checked as its own attack
            rest["eps"] = rest["eps"][0]
        factory = registry.get("attacks", opts["attack"]).factory
        _check_options(suite.path, "threat_models", label, factory, rest)
        if hasattr(factory, "validate_options"):  # attacks that can check more (e.g. a library class name)
            try:
                factory.validate_options(**rest)
            except BenchError as exc:
                raise BenchError(f"{suite.path}: threat_models.{label}: {exc}") from None
    if "dataset" in suite.data:
        dataset_pairs.validate(suite.path, suite.data)
    threshold.validate(suite.path, suite.data, suite.models)


def check_data(suite: "Suite") -> None:
    """Every image set, folder and file the suite's data (and its models' calibration
    sets) names exists: checked once, before any cell runs (one line and exit 2 otherwise)."""
    data_spec.check(suite.data, suite.root, str(suite.path))
    for label, opts in suite.models.items():
        spec = opts.get("threshold")
        if isinstance(spec, dict) and isinstance(spec.get("dataset"), dict):
            ref = {k: v for k, v in spec["dataset"].items() if k != "align"}
            data_spec.check(ref, suite.root, f"{suite.path}: models.{label}.threshold")


SUITES_DIRS = (Path(__file__).parent / "suites",  # in an installed wheel
               Path(__file__).resolve().parents[1] / "configs")  # in the source tree


def shipped_suites() -> dict[str, Path]:
    """The suites that come with the package, by name (file stem)."""
    out: dict[str, Path] = {}
    for folder in SUITES_DIRS:
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            out.setdefault(path.stem, path)
    return out


def find_suite(name_or_path: str | Path) -> Path:
    """A suite file: a path that exists, else a shipped suite's name (``smoke``, ``default``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_suites()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise BenchError(f"--config {name_or_path}: no such file and no shipped suite of that name "
                     f"(shipped: {', '.join(shipped) or 'none found'})")


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
    defenses, families = expand_sweeps(path, defenses)
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
        if "randomness" in opts:
            if opts["randomness"] not in RANDOMNESS:
                raise BenchError(f"{path}: threat_models.{label}.randomness must be one of {RANDOMNESS}, "
                                 f"got {opts['randomness']!r}")
            if opts["randomness"] == "known" and opts.get("setting") != "adaptive":
                raise BenchError(f"{path}: threat_models.{label}: randomness: known needs setting: adaptive "
                                 "(the attacker knows the draws of the defense in its loop)")
        check_budgets(path, label, opts)
    data = dict(raw["data"])
    kinds = [k for k in (data_spec.IMAGE_SET, "dataset", "sources") if k in data]
    if len(kinds) > 1 and kinds != ["sources"]:
        raise BenchError(f"{path}: data names {' and '.join(kinds)}; give one of images: NAME (a fetched image set), "
                         "dataset: NAME (a dataset plugin) or sources/targets folders")
    if data_spec.IMAGE_SET in data:
        if data[data_spec.IMAGE_SET] not in image_sets.known():
            raise BenchError(f"{path}: data.images {data[data_spec.IMAGE_SET]!r} is not a known image set "
                             f"(known: {', '.join(image_sets.known())})")
    elif "dataset" not in data:  # two folders (or a dataset plugin: pipeline.dataset_pairs)
        for key in data_spec.FOLDER_KEYS:
            if key not in data:
                raise BenchError(f"{path}: data.{key} is required (or data.images: a fetched image set such as "
                                 "paper-images, or data.dataset: a registered dataset)")
    for label, opts in threats.items():
        if any(key in opts for key in SURROGATE_KEYS):
            resolve_surrogate(path, label, opts, models, defenses, data)
    return Suite(name=str(raw.get("name", path.stem)), path=path, seed=int(raw.get("seed", 0)),
                 device=str(raw.get("device", "auto")), data=data,
                 models=models, defenses=defenses, threat_models=threats,
                 evaluation=dict(raw.get("evaluation") or {}), check=dict(raw.get("check") or {}),
                 operating_point=check_operating_point(path, raw.get("operating_point")), families=families)


def sweep_label(family: str, value: Any) -> str:
    return f"{family}-{value:g}" if isinstance(value, (int, float)) else f"{family}-{value}"


def expand_sweeps(path: Path, defenses: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """A defense entry with one option given as a list (``lambda_0: [0.1, 0.25, 0.5]``) is a
    strength sweep: one row per value, labelled ``LABEL-VALUE`` (``iwmf-0.25``), each a defense
    of its own (its own cells and keys), grouped as the family LABEL for the trade-off curves
    and tables. Returns the expanded rows (in order) and the families."""
    rows: dict[str, dict] = {}
    families: dict[str, dict] = {}
    for label, opts in defenses.items():
        swept = [k for k, v in opts.items() if isinstance(v, list) and k not in SUITE_KEYS]
        if not swept:
            rows[label] = opts
            continue
        if len(swept) > 1:
            raise BenchError(f"{path}: defenses.{label} sweeps {', '.join(swept)}; a family sweeps one option "
                             "(write one entry per combination of the others)")
        key, values = swept[0], opts[swept[0]]
        if not values or len(set(map(repr, values))) != len(values):
            raise BenchError(f"{path}: defenses.{label}.{key} must be a non-empty list of distinct values, "
                             f"got {values!r}")
        families[label] = {"parameter": key, "rows": {}}
        for value in values:
            row = sweep_label(label, value)
            if row in defenses or row in rows:
                raise BenchError(f"{path}: defenses.{label}: the sweep's row {row!r} is also another entry's label")
            rows[row] = {**opts, key: value}
            families[label]["rows"][row] = value
    return rows, families


def check_operating_point(path: Path, spec: Any) -> dict:
    """``operating_point: {target_frr: F, recraft: true}`` (F in [0, 1), both optional), or nothing."""
    if spec is None:
        return {}
    target = spec.get("target_frr") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or set(spec) - {"target_frr", "recraft"} \
            or ("target_frr" in spec and (not isinstance(target, (int, float)) or isinstance(target, bool)
                                          or not 0 <= target < 1)) \
            or not isinstance(spec.get("recraft", False), bool):
        raise BenchError(f"{path}: operating_point must be {{target_frr: F, recraft: true|false}} (both optional; "
                         "F in [0, 1): the genuine FRR every defense is re-tuned to; recraft: craft the attacks "
                         f"whose images depend on the threshold again at each defense's threshold), got {spec!r}")
    return dict(spec)
