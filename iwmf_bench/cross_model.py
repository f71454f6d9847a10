"""Cross-model transfer: adversarial photos crafted on one face model (the *surrogate*),
scored on another (the cell's model).

Each face model sees its own aligned crop of a photo (:mod:`iwmf_bench.align`: MTCNN
landmarks, a per-model template), so a crop attacked for one model cannot be shown to
another. A real attacker perturbs the photo the system will detect and align, so here
the attack space is the suite's raw source photos:

* MTCNN runs once per clean photo; each model's alignment becomes a *fixed* warp
  computed from the clean photo's landmarks (:class:`PhotoAlignment`). Keeping it
  fixed means the attacker is assumed not to move the detector's landmarks (a few
  8-bit steps barely do) and lets gradients flow through the warp to the photo.
* The attack runs unchanged on :class:`AlignedModel` (photo -> surrogate's crop ->
  embedding), or, with ``surrogate_defense``, on the surrogate behind
  :class:`AlignedDefense` (photo -> crop -> purifier, with the attack's ``grad_mode``
  and ``eot_iter``). The budget (``eps``) is measured on the photo.
* The cell's model scores the 8-bit adversarial photo through ``AlignedDefense``: its
  own fixed warp, then the cell's defense on the aligned crop, as for every other cell
  (genuine FRR is unchanged: the defense purifies what the model sees, the aligned crop,
  and the warp of a clean photo is exactly its aligned crop).

The adversarial photos depend on the surrogate, its defense, the threat options, the
data and the seed, not on the cell's model or defense: they are crafted once and cached
on disk beside the results (as :func:`iwmf_bench.harness.transfer_adversarial` does).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from .align import Face, WarpPlan, apply_warp, crop_transform, detect_faces, get_spec
from .defenses.base import Defense, check_images
from .errors import BenchError
from .suite import SURROGATE_KEYS, Cell

# -- suite keys --------------------------------------------------------------------------


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
    name = opts["surrogate"]
    if not isinstance(name, str):
        raise BenchError(f"{where}.surrogate must be a model name, got {name!r}")
    if "sources" not in data or "targets" not in data:
        raise BenchError(f"{where}: surrogate attacks perturb photos from data.sources (paired with data.targets); "
                         "a dataset plugin (data.dataset) is not supported for them")
    if not data.get("align", True):
        raise BenchError(f"{where}: surrogate attacks perturb the photos before each model's alignment; "
                         "set data.align: true")
    from . import registry

    try:
        registry.get("models", name)
    except BenchError as exc:
        raise BenchError(f"{where}.surrogate: {exc}") from None
    for model in dict.fromkeys([name, *models]):  # the surrogate and every model that scores its photos
        try:
            get_spec(model)
        except BenchError as exc:
            raise BenchError(f"{where}: {exc} (photos crafted on a surrogate are aligned for each model)") from None
    opts["surrogate_options"] = dict(models.get(name, {}))
    if "surrogate_defense" in opts:
        d = opts["surrogate_defense"]
        if d not in defenses:
            raise BenchError(f"{where}.surrogate_defense: no defense labelled {d!r} in the suite "
                             f"(has: {', '.join(defenses)})")
        opts["surrogate_defense_options"] = dict(defenses[d])


# -- photo space ---------------------------------------------------------------------------


class PhotoAlignment:
    """One model's alignment of each clean photo as a fixed, differentiable warp.

    Attacks may pass any subset of the photos, in any order (Square re-queries only the
    unfinished ones), so each input is matched to the clean photo it perturbs: the
    nearest in L2, since an attack budget is far smaller than the distance between two
    different photos.
    """

    def __init__(self, clean: torch.Tensor, faces: list[Face], model: str):
        spec = get_spec(model)
        if len(faces) != clean.shape[0] or any(f is None for f in faces):
            raise BenchError(f"need one detected face per photo ({clean.shape[0]} photos, "
                             f"{sum(f is not None for f in faces)} faces)")
        h, w = clean.shape[-2:]
        self.clean = clean.detach()
        self.size = spec.size
        self.plans = [WarpPlan.build(crop_transform(face, spec), h, w, spec.size) for face in faces]

    def owners(self, photos: torch.Tensor) -> list[int]:
        """Index of the clean photo each of ``photos`` is a perturbation of."""
        if photos.shape[1:] != self.clean.shape[1:]:
            raise BenchError(f"photos of shape {tuple(photos.shape[1:])}, expected {tuple(self.clean.shape[1:])}")
        clean = self.clean.to(photos.device, photos.dtype)
        with torch.no_grad():
            return [int((clean - p).pow(2).flatten(1).sum(1).argmin()) for p in photos.detach()]

    def __call__(self, photos: torch.Tensor) -> torch.Tensor:
        return torch.cat([apply_warp(photos[i:i + 1], self.plans[j]) for i, j in enumerate(self.owners(photos))])


class AlignedModel(torch.nn.Module):
    """A face model seen from photo space: photo -> its fixed aligned crop -> embedding."""

    def __init__(self, model: torch.nn.Module, alignment: PhotoAlignment):
        super().__init__()
        self.model, self.alignment = model, alignment
        self.metric, self.threshold = model.metric, model.threshold

    @property
    def name(self) -> str:
        return f"{self.model.name} (photo space)"

    def embed(self, photos: torch.Tensor) -> torch.Tensor:
        check_images(photos, f"photos for {self.name}", channels=3)
        return self.model.embed(self.alignment(photos))


class AlignedDefense(Defense):
    """A defense seen from photo space: photo -> the model's fixed aligned crop -> purified crop.

    Unlike other defenses its output is the crop, not an image of the input's shape: it
    feeds the model directly. ``grad_mode`` applies to the wrapped defense; the warp is
    always differentiated exactly (the attacker knows it).
    """

    def __init__(self, defense: Defense, alignment: PhotoAlignment):
        super().__init__()
        self.defense, self.alignment = defense, alignment
        self.stochastic, self.grad_modes, self.channels = defense.stochastic, defense.grad_modes, defense.channels
        self.registered_name = defense.name

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None,
               grad_mode: str = "none") -> torch.Tensor:
        check_images(x, "photos to purify", channels=3)
        return self.defense.purify(self.alignment(x), generator, grad_mode)

    def config(self) -> dict[str, Any]:
        return self.defense.config()


# -- the harness's transfer-from-surrogate cells -------------------------------------------


@functools.lru_cache(maxsize=4)
def source_photos(sources: str, pairs: int | None) -> tuple[torch.Tensor, tuple[Face, ...]]:
    """The raw source photos of a suite's pairs and their faces (MTCNN once per photo,
    on the whole folder like :func:`iwmf_bench.harness.prepare_data`, so the warps
    reproduce its aligned crops exactly)."""
    from .data import load_folder
    from .harness import _pair_indices

    src = load_folder(sources)
    faces = detect_faces(src.images)
    missing = [name for name, face in zip(src.names, faces) if face is None]
    if missing:
        raise BenchError(f"no face found in {', '.join(missing)} ({sources}); remove them")
    keep = _pair_indices(len(src), pairs)
    return src.images[keep], tuple(faces[i] for i in keep)


def _photos_for(cell: Cell) -> tuple[torch.Tensor, tuple[Face, ...]]:
    return source_photos(str(Path(cell.data["sources"]).resolve()), cell.data.get("pairs"))


def crafted_on_surrogate(cell: Cell, results_root: Path | None) -> tuple[torch.Tensor, dict]:
    """Adversarial photos crafted on the cell's surrogate (through its defense, if any);
    the same for every model and defense of the suite, so cached on disk."""
    from . import registry
    from .harness import _attack, _batched, _factory_options, _model, prepare_data, save_adversarial

    t = cell.threat_options
    name, model_opts = t["surrogate"], _factory_options(t["surrogate_options"])
    defense_opts = t.get("surrogate_defense_options")
    ident = Cell(cell.suite, name, t["surrogate_options"], t.get("surrogate_defense", "-"), defense_opts or {},
                 cell.threat, t, cell.data, {}, cell.seed, cell.device).key
    path = (Path(results_root) / cell.suite / "adversarial" / f"photos-{ident}.pt") if results_root else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["adversarial"].to(cell.device), saved["info"]

    dev = cell.device
    surrogate = _model(name, json.dumps(model_opts, sort_keys=True), dev)
    photos, faces = _photos_for(cell)
    photos = photos.to(dev)
    alignment = PhotoAlignment(photos, list(faces), name)
    d = cell.data
    targets = prepare_data(str(Path(d["sources"]).resolve()), str(Path(d["targets"]).resolve()), True,
                           d.get("pairs"), name, surrogate.input_size)["targets"]
    refs = _batched(surrogate.embed, targets.to(dev), int(cell.evaluation.get("batch_size", 32)))
    if defense_opts is None:
        adv, info = _attack(cell, AlignedModel(surrogate, alignment), photos, refs, None)
    else:
        defense = registry.create("defenses", defense_opts["defense"], **_factory_options(defense_opts))
        adv, info = _attack(cell, surrogate, photos, refs, AlignedDefense(defense.to(dev).eval(), alignment))
    info = {**info, "surrogate": name, "surrogate_defense": t.get("surrogate_defense"),
            "photo_linf": float((adv.double() - photos.double()).abs().amax())}  # the budget, on the photo
    if path is not None:
        save_adversarial(path, adv, info)
    return adv, info


def transfer_from_surrogate(cell: Cell, defense: Defense, results_root: Path | None
                            ) -> tuple[torch.Tensor, dict, AlignedDefense]:
    """What a transfer-from-surrogate cell scores: the adversarial photos, facts about
    their crafting, and the cell's defense seen from photo space (the cell's model's
    fixed warp, then the defense on the crop)."""
    photos, faces = _photos_for(cell)
    adv, info = crafted_on_surrogate(cell, results_root)
    return adv, info, AlignedDefense(defense, PhotoAlignment(photos.to(cell.device), list(faces), cell.model))
