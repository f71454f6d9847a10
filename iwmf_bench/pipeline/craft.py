"""Stage 2, craft: the adversarial images of a cell.

One interface, :class:`Crafter`, one implementation per way of crafting:

* :class:`Clean`: no attack (the probes themselves);
* :class:`Transfer`: the attack on the undefended cell model, then purified at scoring
  (the paper's setting); shared by every defense of a model, so cached on disk;
* :class:`Adaptive`: the attack with the cell's defense in its loop (EOT, exact or
  BPDA gradients, as the attack's options say);
* :class:`~iwmf_bench.pipeline.surrogate.SurrogateTransfer`: crafted on another face
  model's view of the raw photos (``surrogate: MODEL``).

The probes and their references depend only on the threat's goal
(:func:`attack_pairs`): impersonation perturbs each source towards its target,
dodging perturbs each probe away from its own identity. So every crafter works with
every pair source. A crafter returns :class:`Crafted`: the images, facts about their
crafting for the record, and the defense as the cell's model sees them through it
(the cell's defense, or a photo-space view of it).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..attacks.base import AttackTask, is_random
from ..defenses.base import Defense
from ..errors import BenchError, NotApplicableError
from ..scoring import known_view
from ..util import batched, save_tensors_atomic
from .build import build_attack
from .cell import Cell
from .outcome import AttackFacts, notes_of
from .pairs import Pairs, PairSource


@dataclass
class CraftTask:
    """What a crafter may use: the cell, its model (threshold applied), defense and pairs."""

    cell: Cell
    model: Any
    defense: Defense
    source: PairSource
    pairs: Pairs
    references: torch.Tensor  # embeddings of the attack's references (see attack_pairs), batch of the cell
    results_root: Path | None = None


@dataclass
class Crafted:
    adversarial: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    scoring_defense: Defense | None = None  # None: the cell's defense on the aligned images


def attack_pairs(pairs: Pairs, goal: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(probes, reference images, probe identity labels) of a threat's goal."""
    if goal == "dodging":
        return pairs.dodging()
    return pairs.sources, pairs.targets, list(pairs.source_labels)


def run_attack(cell: Cell, model, probes: torch.Tensor, references: torch.Tensor,
               defense: Defense | None, reference_images: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Run the cell's attack (``defense=None``: on the undefended model); images and facts.

    The facts (kept beside cached images, so plain data): ``attack``, the
    :class:`~.outcome.AttackFacts` as a dict (the attack's notes and the defense's report
    copied as they state them), ``queries`` per pair, and for a minimal-budget attack
    (``min-eps``) each pair's smallest breaking budget for the score stage. An attack whose
    images depend on the threshold says why in the notes (``threshold_dependent``)."""
    start = time.perf_counter()
    attack = build_attack(cell)
    reason = attack.not_applicable(is_random(defense, probes, cell.seed))
    if reason:
        raise NotApplicableError(f"not applicable: {reason}")
    result = attack.run(AttackTask(model, probes, references, defense, cell.seed, reference_images=reference_images))
    # Whether re-scoring the images at another threshold is what the attack would have done
    # there (:meth:`~iwmf_bench.attacks.base.Attack.threshold_dependence`): read by the operating points.
    dependence = attack.threshold_dependence()
    notes = {**notes_of(result.info), **({"threshold_dependent": dependence} if dependence else {})}
    seconds, queries = time.perf_counter() - start, int(result.queries.sum())
    facts = AttackFacts(seconds_per_image=seconds / probes.shape[0],
                        queries_per_image=float(result.queries.float().mean()), success=result.success_rate,
                        flags={k: bool(v) for k, v in result.flags.items()}, notes=notes,
                        defense_report=defense.report(cell.device) if defense is not None else {},
                        seconds=seconds, seconds_per_query=seconds / queries if queries else None)
    info = {"attack": facts.to_dict(), "queries": [int(q) for q in result.queries.tolist()]}
    if "per_pair" in result.info:
        info["per_pair"] = per_pair_facts(result.info["per_pair"], probes.shape[0], cell.name)
    if "min_eps" in result.info:
        info["min_eps"] = {k: result.info[k] for k in ("min_eps", "failed_eps", "converged")}
    return result.adversarial, info


def per_pair_facts(facts, n: int, what: str) -> dict[str, list]:
    """An attack's ``info["per_pair"]`` checked for the record: names to lists of ``n``
    JSON values (one per pair, in the pairs' order)."""
    if not isinstance(facts, dict) or not all(isinstance(k, str) for k in facts):
        raise BenchError(f"{what}: the attack's info['per_pair'] must map names to per-pair lists")
    for name, values in facts.items():
        if not isinstance(values, list) or len(values) != n:
            raise BenchError(f"{what}: the attack's per-pair {name!r} must be a list of {n} values (one per pair)")
        try:
            json.dumps(values, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise BenchError(f"{what}: the attack's per-pair {name!r} is not plain JSON ({e}); "
                             "write None for an infinite or missing value") from e
    return {k: list(v) for k, v in facts.items()}


def cached(path: Path | None, make) -> tuple[torch.Tensor, dict]:
    """``make()`` -> (images, info), saved atomically at ``path`` and reused from there."""
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["adversarial"], saved["info"]
    adv, info = make()
    if path is not None:
        save_tensors_atomic(path, {"adversarial": adv.cpu(), "info": info})
    return adv, info


class Crafter(ABC):
    @abstractmethod
    def craft(self, task: CraftTask) -> Crafted:
        """The cell's adversarial images (on the cell's device)."""


class Clean(Crafter):
    def craft(self, task: CraftTask) -> Crafted:
        return Crafted(attack_pairs(task.pairs, task.cell.goal)[0].to(task.cell.device))


def transfer_ident(cell: Cell) -> str:
    """The identity of a transfer attack's images: the cell without its defense (and
    scoring), shared by every defense of the model."""
    return cell.derived(defense="-", defense_options={}, evaluation={}).key


def transfer_images(cell: Cell, model, pairs: Pairs, results_root: Path | None) -> tuple[torch.Tensor, dict]:
    """The cell's attack on the undefended model: the same for every defense of the model,
    so computed once per (model, threat model) and cached beside the results."""
    ident = transfer_ident(cell)
    path = (Path(results_root) / cell.suite / "adversarial" / f"{ident}.pt") if results_root else None
    dev = cell.device

    def make():
        probes, ref_images, _ = attack_pairs(pairs, cell.goal)
        refs = batched(model.embed, ref_images.to(dev), 32)
        return run_attack(cell, model, probes.to(dev), refs, None, ref_images.to(dev))

    adv, info = cached(path, make)
    return adv.to(dev), info


class Transfer(Crafter):
    """Crafted on the undefended model (:func:`transfer_images`), purified at scoring."""

    def craft(self, task: CraftTask) -> Crafted:
        return Crafted(*transfer_images(task.cell, task.model, task.pairs, task.results_root))


class Adaptive(Crafter):
    """The attack with the cell's defense in its loop; with ``randomness: known``, the
    defense as it will be scored: its scorer's draws replayed (:mod:`~iwmf_bench.scoring`)."""

    def craft(self, task: CraftTask) -> Crafted:
        cell = task.cell
        probes, ref_images, _ = attack_pairs(task.pairs, cell.goal)
        probes = probes.to(cell.device)
        defense = task.defense
        if cell.randomness == "known":
            defense = known_view(defense, cell.seed, cell.draws, probes,
                                 int(cell.threat_options.get("eot_iter", 1)))
        adv, info = run_attack(cell, task.model, probes, task.references, defense, ref_images.to(cell.device))
        return Crafted(adv, info)
