"""Cross-model transfer as a :class:`~iwmf_bench.pipeline.craft.Crafter`: adversarial
photos crafted on one face model (the *surrogate*), scored on another (the cell's).

The attack space is the raw photos of the pair source's attackers (folder or dataset):
the attack runs unchanged on the surrogate seen from photo space
(:class:`~iwmf_bench.pipeline.photo_space.AlignedModel`: photo -> its fixed aligned crop
-> embedding), or, with ``surrogate_defense``, on the surrogate behind that defense
(:class:`~iwmf_bench.pipeline.photo_space.AlignedDefense`, with the attack's
``grad_mode`` and ``eot_iter``). The budget (``eps``) is measured on the photo. The
cell's model scores the 8-bit photos through its own fixed warp, then the cell's
defense on the aligned crop, as for every other cell (genuine FRR is unchanged: the
warp of a clean photo is exactly its aligned crop).

The photos depend on the surrogate, its defense, the threat options, the data and the
seed, not on the cell's model or defense: they are crafted once and cached on disk
beside the results.
"""

from __future__ import annotations

from pathlib import Path

from .. import registry
from ..align import get_spec
from ..errors import BenchError
from ..util import batched
from .build import defense_from, model_named
from .cell import SURROGATE_KEYS, Cell
from .craft import Crafted, Crafter, CraftTask, attack_pairs, cached, run_attack
from .photo_space import AlignedDefense, AlignedModel, PhotoAlignment


def resolve_surrogate(path: Path, label: str, opts: dict, models: dict, defenses: dict, data: dict) -> None:
    """Check one threat model's ``surrogate`` keys when the suite loads, and record the
    surrogate's (and its defense's) suite options in it, so each cell carries all it needs."""
    where = f"{path}: threat_models.{label}"
    for key in SURROGATE_KEYS[2:]:
        if key in opts:
            raise BenchError(f"{where}.{key} is filled in from the suite's models/defenses; remove it")
    if "surrogate" not in opts:
        if "surrogate_defense" in opts:
            raise BenchError(f"{where}: surrogate_defense needs surrogate: MODEL (the model to craft on)")
        return
    if opts["attack"] is None or opts.get("setting") != "transfer":
        raise BenchError(f"{where}: surrogate needs an attack with setting: transfer (crafted on the surrogate, "
                         f"scored on each model), not {opts.get('setting') or 'attack: null'}; remove surrogate "
                         "or set setting: transfer")
    if opts.get("goal", "impersonation") != "impersonation":
        raise BenchError(f"{where}: surrogate attacks perturb the attackers' photos (impersonation); "
                         "goal: dodging is not supported with surrogate")
    name = opts["surrogate"]
    if not isinstance(name, str):
        raise BenchError(f"{where}.surrogate must be a model name, got {name!r}")
    if not data.get("align", True):
        raise BenchError(f"{where}: surrogate attacks perturb the photos before each model's alignment; "
                         "set data.align: true")
    try:
        registry.get("models", name)
    except BenchError as exc:
        raise BenchError(f"{where}.surrogate: {exc}") from None
    for model in dict.fromkeys([name, *models]):  # the surrogate and every model that scores its photos
        try:
            get_spec(model)
        except BenchError as exc:
            raise BenchError(f"{where}: {exc} (photos crafted on a surrogate are aligned for each model)") from None
    # The entry's `threats:` list only picks columns; in the options it would tie these
    # cells' keys to the column lists of the suite.
    opts["surrogate_options"] = {k: v for k, v in models.get(name, {}).items() if k != "threats"}
    if "surrogate_defense" in opts:
        d = opts["surrogate_defense"]
        if d not in defenses:
            raise BenchError(f"{where}.surrogate_defense: no defense labelled {d!r} in the suite "
                             f"(has: {', '.join(defenses)})")
        opts["surrogate_defense_options"] = {k: v for k, v in defenses[d].items() if k != "threats"}


def surrogate_model(cell: Cell):
    t = cell.threat_options
    return model_named(t["surrogate"], t["surrogate_options"], cell.device)


def surrogate_defense(cell: Cell):
    """The surrogate's defense (None: the surrogate is attacked undefended)."""
    options = cell.threat_options.get("surrogate_defense_options")
    return None if options is None else defense_from(options, cell.device)


class SurrogateTransfer(Crafter):
    """Photos crafted on the cell's surrogate (through its defense, if any)."""

    @staticmethod
    def path(cell: Cell, results_root: Path | None) -> Path | None:
        t = cell.threat_options
        ident = cell.derived(model=t["surrogate"], model_options=t["surrogate_options"],
                             defense=t.get("surrogate_defense", "-"),
                             defense_options=t.get("surrogate_defense_options") or {}, evaluation={}).key
        return (Path(results_root) / cell.suite / "adversarial" / f"photos-{ident}.pt") if results_root else None

    def photos(self, task: CraftTask, model_name: str, input_size: int):
        photos, faces = task.source.photos(model_name, input_size)
        if photos.shape[0] != task.pairs.sources.shape[0]:
            raise BenchError(f"{task.cell.name}: the surrogate and the cell's model keep different pairs "
                             f"({photos.shape[0]} vs {task.pairs.sources.shape[0]}); set data.drop_no_face: false "
                             "to see which images lack a face")
        return photos.to(task.cell.device), list(faces)

    def craft(self, task: CraftTask) -> Crafted:
        cell, t = task.cell, task.cell.threat_options

        def make():
            surrogate = surrogate_model(cell)
            photos, faces = self.photos(task, t["surrogate"], surrogate.input_size)
            alignment = PhotoAlignment(photos, faces, t["surrogate"])
            ref_images = attack_pairs(task.source.pairs(t["surrogate"], surrogate.input_size), "impersonation")[1]
            refs = batched(surrogate.embed, ref_images.to(cell.device), cell.batch_size)
            defense = surrogate_defense(cell)
            if defense is None:
                adv, info = run_attack(cell, AlignedModel(surrogate, alignment), photos, refs, None)
            else:
                adv, info = run_attack(cell, surrogate, photos, refs, AlignedDefense(defense, alignment))
            info["attack"]["notes"].update(surrogate=t["surrogate"], surrogate_defense=t.get("surrogate_defense"),
                                           photo_linf=float((adv.double() - photos.double()).abs().amax()))
            return adv, info  # the budget holds on the photo: photo_linf

        adv, info = cached(self.path(cell, task.results_root), make)
        photos, faces = self.photos(task, cell.model, task.model.input_size)
        # The cell's model sees the photos through its own fixed warp, then the defense on the crop.
        return Crafted(adv.to(cell.device), info, AlignedDefense(task.defense, PhotoAlignment(photos, faces, cell.model)))
