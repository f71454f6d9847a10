"""A cell: one (model, defense, threat model) of a suite, with everything needed to
compute it on its own.

Results are keyed by a hash of the cell's full config and of the code that computes it
(:attr:`Cell.key`, :meth:`Cell.code`), so a cell computed locally, on another shard or on
a Ray worker is the same file, and a cell computed by other code is never served as
current. Changing what a cell holds changes every key: the committed leaderboards depend
on this layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .. import code_identity, registry
from ..scoring import check_randomness
from ..util import factory_options

SETTINGS = ("transfer", "adaptive")
REQUIRES = ("cuda",)  # ``requires: cuda``: skip the entry's cells on a machine without a GPU
# Threat-model keys of the transfer-from-surrogate setting (:mod:`.surrogate`), not passed
# to the attack; the last two are filled in at load from the suite's entries.
SURROGATE_KEYS = ("surrogate", "surrogate_defense", "surrogate_options", "surrogate_defense_options")
# The module whose import closure is "the pipeline": every stage a cell runs (building,
# crafting, scoring, thresholds, records) and the shared code they import.
PIPELINE_MODULE = "iwmf_bench.pipeline.compute"


def component_fingerprint(kind: str, name: str) -> str:
    """Fingerprint of a registered plugin's code (:mod:`iwmf_bench.code_identity`): the
    module its entry point names, with what it imports from its own package and iwmf_bench."""
    entry = registry.get(kind, name)
    module = entry.source.partition(":")[0]
    try:
        return code_identity.fingerprint(module)
    except ValueError:  # compiled, no source: the distribution's version is all there is
        try:
            return f"{entry.distribution}=={version(entry.distribution)}"
        except PackageNotFoundError:
            raise ValueError(f"{kind[:-1]} {name!r} ({entry.source}): no Python source to fingerprint and no "
                             f"installed distribution version; install it as a package") from None


def data_fingerprint(defense_options: dict) -> str:
    """The data files a defense with these options declares (``data_files``: e.g. a
    diffusion prior's YAML), as ``name:sha256`` pairs ("" for none)."""
    name = defense_options.get("defense")
    if not name:
        return ""
    declared = getattr(registry.get("defenses", name).factory, "data_files", None)
    parts = []
    for path in (declared(factory_options(defense_options)) if declared else []):
        path = Path(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:20] if path.is_file() else "missing"
        parts.append(f"{path.name}:{digest}")
    return ",".join(parts)


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
    # The suite file's folder, where the data's relative paths resolve (pipeline.data_spec).
    # A machine path: never part of the key or the record (to_dict), so a suite gives the
    # same cells from any folder; it travels to workers with :meth:`transport`.
    root: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.defense}/{self.threat}"

    def to_dict(self) -> dict[str, Any]:
        """The cell's identity as recorded (without the machine-local ``root``)."""
        out = asdict(self)
        out.pop("root")
        return out

    def transport(self) -> dict[str, Any]:
        """Everything needed to rebuild the cell on another process: ``Cell(**transport())``."""
        return {**self.to_dict(), "root": self.root}

    def code(self) -> dict[str, str]:
        """Fingerprints of the code this cell runs, by role: ``pipeline`` and each plugin it
        names (model, defense, attack, surrogate model and defense, dataset). A role the cell
        does not use (no attack on clean images, no defense on shared transfer images) is
        absent, so a change to it cannot touch this cell."""
        out = {"pipeline": code_identity.fingerprint(PIPELINE_MODULE)}
        t = self.threat_options
        for role, kind, name in (
                ("model", "models", self.model),
                ("defense", "defenses", self.defense_options.get("defense")),
                ("attack", "attacks", t.get("attack")),
                ("surrogate", "models", t.get("surrogate")),
                ("surrogate_defense", "defenses", (t.get("surrogate_defense_options") or {}).get("defense")),
                ("dataset", "datasets", self.data.get("dataset"))):
            if name:
                out[role] = component_fingerprint(kind, name)
        for role, options in (("defense_data", self.defense_options),
                              ("surrogate_defense_data", t.get("surrogate_defense_options") or {})):
            files = data_fingerprint(options)
            if files:
                out[role] = files
        return out

    @property
    def key(self) -> str:
        """Hash of everything that determines the cell's numbers: its config (without the
        suite's name) and the fingerprints of the code it runs (:meth:`code`)."""
        payload = {k: v for k, v in self.to_dict().items() if k != "suite"}
        blob = json.dumps({"cell": payload, "code": self.code()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def derived(self, **changes: Any) -> "Cell":
        """This cell with some fields replaced: the identity of a stage's result that is
        shared by several cells (e.g. ``defense="-"`` for transfer images, which every
        defense of a model shares)."""
        return Cell(**{**self.transport(), **changes})

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
        """``None`` (clean images), ``"transfer"`` or ``"adaptive"``."""
        return self.threat_options.get("setting") if self.threat_options.get("attack") else None

    @property
    def randomness(self) -> str:
        """``"unknown"`` (the default: the attacker draws its own randomness) or ``"known"``
        (it knows the draws the scorer uses: :mod:`iwmf_bench.scoring`)."""
        return check_randomness(self.threat_options.get("randomness", "unknown"))

    @property
    def goal(self) -> str:
        """``"impersonation"`` (the default) or ``"dodging"``."""
        return str(self.threat_options.get("goal", "impersonation"))

    @property
    def draws(self) -> int:
        """Purifications per image at scoring of a random defense (``evaluation.draws``)."""
        return int(self.evaluation.get("draws", 10))

    @property
    def batch_size(self) -> int:
        return int(self.evaluation.get("batch_size", 32))
