"""The components a cell names, built from its options: face model, defense, attack.

Models are cached per process (weights load once per suite, not once per cell) and
frozen (eval mode, no weight gradients: attacks differentiate the input). Building
raises :class:`~iwmf_bench.errors.WeightsError` when weights are missing, which the
orchestrator turns into a ``skipped`` record naming the fetch command.
"""

from __future__ import annotations

import functools
import json

from .. import registry
from ..errors import NotApplicableError, WeightsError
from ..models.base import frozen
from ..util import factory_options
from .cell import SURROGATE_KEYS, Cell


@functools.lru_cache(maxsize=4)
def _cached_model(name: str, options_json: str, device: str):
    return frozen(registry.create("models", name, **json.loads(options_json)), device)


def model_named(name: str, options: dict, device: str):
    """A registered face model with a suite entry's options, frozen, on ``device`` (cached)."""
    return _cached_model(name, json.dumps(factory_options(options), sort_keys=True), device)


def clear_model_cache() -> None:
    """Forget the models built so far (their weights may have changed on disk)."""
    _cached_model.cache_clear()


def build_model(cell: Cell):
    return model_named(cell.model, cell.model_options, cell.device)


def defense_from(options: dict, device: str):
    """A defense from a suite entry's options (``defense``: its registered name)."""
    return registry.create("defenses", options["defense"], **factory_options(options)).to(device).eval()


def build_defense(cell: Cell):
    return defense_from(cell.defense_options, cell.device)


def build_attack(cell: Cell):
    opts = {k: v for k, v in cell.threat_options.items() if k not in SURROGATE_KEYS and k != "randomness"}
    name, _ = opts.pop("attack"), opts.pop("setting", None)
    return registry.create("attacks", name, **opts)


def check_applicable(cell: Cell, defense) -> None:
    """An adaptive threat model that asks for a gradient mode the defense lacks (exact
    gradients through bit-depth reduction, say) does not apply: the cell is ``n/a``, and
    the defense's other gradient modes have their own columns."""
    mode = cell.threat_options.get("grad_mode")
    if cell.setting == "adaptive" and mode not in (None, "none") and mode not in defense.grad_modes:
        raise NotApplicableError(f"not applicable: defense {cell.defense!r} has no {mode!r} gradient "
                                 f"(its modes: {', '.join(defense.grad_modes)})")


def missing_weights(cell: Cell) -> list[str]:
    """What building the cell's model and defense says about missing weights (so a cell
    skipped for another reason names every fix at once)."""
    problems = []
    for build in (build_model, build_defense):
        try:
            build(cell)
        except WeightsError as exc:
            problems.append(str(exc))
    return problems
