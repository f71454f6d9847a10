"""One cell, top to bottom: build, pairs, craft, score, record.

:func:`compute_cell` reads as the benchmark's definition of a cell; :func:`run_cell`
adds the result cache and turns failures into records (``skipped`` with the reason and
the fix, or ``error`` with the traceback), so one broken cell never takes a suite down.
A run keeps the 8-bit images each cell scored (``results/<suite>/images/``), and
:func:`rescore_cell` scores a folder of such images exactly as the cell does.
The orchestrator (:mod:`iwmf_bench.runner`) calls :func:`run_cell` locally or on Ray
workers; nothing here knows about suites, shards or executors.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..data import load_folder, quantize, save_images
from ..devices import resolve_device
from ..errors import BenchError, MissingExtraError, NotApplicableError, WeightsError
from .build import build_defense, build_model, check_applicable, missing_weights
from . import data_spec
from .cell import Cell
from .craft import Adaptive, Clean, Crafted, Crafter, CraftTask, Transfer, attack_pairs, transfer_ident
from .dataset_pairs import DatasetPairs
from .folder_pairs import FolderPairs
from .pairs import PairSource
from .outcome import CellMetrics
from .record import ResultStore, new_record
from .score import genuine, references, score
from .surrogate import SurrogateTransfer
from .threshold import with_threshold


def pair_source(cell: Cell) -> PairSource:
    """Stage 1's implementation: a dataset plugin when ``data.dataset`` names one, else two folders."""
    data = data_spec.resolve(cell.data, cell.root)
    return DatasetPairs(data, cell.seed) if "dataset" in data else FolderPairs(data)


def crafter(cell: Cell) -> Crafter:
    """Stage 2's implementation for the cell's threat model."""
    if cell.setting is None:
        return Clean()
    if cell.setting == "transfer":
        return SurrogateTransfer() if "surrogate" in cell.threat_options else Transfer()
    return Adaptive()


@dataclass
class Prepared:
    """What scoring a cell needs besides its adversarial images (stages 1 and the genuine one)."""

    model: Any
    threshold_source: dict | None
    defense: Any
    source: PairSource
    pairs: Any
    gen: Any
    refs: Any


def prepare(cell: Cell, stage: Callable[[str], None] = lambda s: None) -> Prepared:
    stage("load model")
    model, threshold_source = with_threshold(cell, build_model(cell))
    defense = build_defense(cell)
    check_applicable(cell, defense)
    source = pair_source(cell)
    pairs = source.pairs(cell.model, model.input_size)
    stage("genuine")
    gen = genuine(cell, model, defense, pairs)
    return Prepared(model, threshold_source, defense, source, pairs, gen, references(cell, model, pairs, gen))


def images_ident(cell: Cell) -> str:
    """The folder name of a cell's saved adversarial images: the identity of its crafting
    (transfer images are shared by every defense of a model, like their cache)."""
    return transfer_ident(cell) if cell.setting == "transfer" else cell.key


def images_dir(cell: Cell, results_root: str | Path) -> Path:
    return Path(results_root) / cell.suite / "images" / images_ident(cell)


def save_scored_images(cell: Cell, crafted: Crafted, pairs, results_root: Path) -> str:
    """The 8-bit images the cell scored, as PNGs ``NNNNN_label.png`` (pair index, probe's
    identity), so anyone can re-score them (:func:`rescore_cell`); returns the folder
    relative to the suite's results."""
    folder = images_dir(cell, results_root)
    labels = attack_pairs(pairs, cell.goal)[2]
    save_images(quantize(crafted.adversarial), [f"{i:05d}_{int(label)}" for i, label in enumerate(labels)], folder)
    return str(folder.relative_to(Path(results_root) / cell.suite))


def compute_cell(cell: Cell, results_root: Path | None = None,
                 stage: Callable[[str], None] = lambda s: None) -> CellMetrics:
    """The metrics of one cell (raises on failure; see :func:`run_cell`)."""
    p = prepare(cell, stage)
    stage("attack")
    crafted = crafter(cell).craft(CraftTask(cell, p.model, p.defense, p.source, p.pairs, p.refs, results_root))

    out = scored(cell, p, crafted, stage)
    if results_root is not None:
        out.adversarial_images = save_scored_images(cell, crafted, p.pairs, results_root)
    return out


def scored(cell: Cell, p: Prepared, crafted: Crafted, stage: Callable[[str], None]) -> CellMetrics:
    """The cell's metrics of the crafted (or loaded) images, with the threshold's source."""
    stage("evaluate")
    out = score(cell, p.model, p.defense, p.pairs, p.gen, crafted, p.refs)
    out.threshold_source = p.threshold_source
    return out


def rescore_cell(cell: Cell, folder: str | Path, stage: Callable[[str], None] = lambda s: None) -> CellMetrics:
    """Score adversarial images from a folder of PNGs (``NNNNN_label.png``, one per pair
    in the cell's order: what a run saves, or any tool's) exactly as the cell scores its
    own: the same defense draws and seed, so a run's saved images give its numbers bit for
    bit. The attack's own facts (queries, steps) are not in images and not in the result."""
    if "surrogate" in cell.threat_options:
        raise BenchError(f"{cell.name}: re-scoring a cross-model cell is not supported (its images are photos "
                         "that the scoring aligns first); re-score a transfer or adaptive cell")
    p = prepare(cell, stage)
    probes = attack_pairs(p.pairs, cell.goal)[0]
    loaded = load_folder(folder)
    if tuple(loaded.images.shape) != tuple(probes.shape):
        raise BenchError(f"{folder}: {loaded.images.shape[0]} images of {tuple(loaded.images.shape[1:])}, but "
                         f"{cell.name} scores {probes.shape[0]} pairs of {tuple(probes.shape[1:])} (its model's "
                         "aligned input); save one image per pair, named NNNNN_label.png by pair index")
    if loaded.ids != list(range(probes.shape[0])):
        raise BenchError(f"{folder}: image ids must be the pair indices 0..{probes.shape[0] - 1} "
                         f"(got {loaded.ids[:5]}...)")
    return scored(cell, p, Crafted(loaded.images.to(cell.device)), stage)


def run_cell(cell: Cell | dict, results_root: str | Path | None, stage: Callable[[str], None] = lambda s: None) -> dict:
    """Compute one cell and cache it; never raises for a cell that fails.

    Returns a record with ``status`` ``ok`` (``metrics``: :meth:`CellMetrics.to_dict`),
    ``skipped`` (weights missing: the reason says how to fix it), ``n/a`` (the threat model
    does not apply to the defense, e.g. exact gradients through bit-depth reduction) or
    ``error`` (message and traceback).
    """
    if isinstance(cell, dict):
        cell = Cell(**cell)
    store = ResultStore(results_root, cell.suite) if results_root else None
    if store is not None and (cached := store.load(cell)) is not None:
        return cached
    record: dict[str, Any] = new_record(cell)
    start = time.perf_counter()
    try:
        resolve_device(cell.device)  # a clear error on a machine without that device
        if (missing := cell.missing_requirement) is not None:
            record.update(status="skipped", reason="; ".join([missing, *missing_weights(cell)]))
        else:
            record["metrics"] = compute_cell(cell, Path(results_root) if results_root else None, stage).to_dict()
            record["status"] = "ok"
    except NotApplicableError as exc:
        record.update(status="n/a", reason=str(exc))
    except (WeightsError, MissingExtraError) as exc:
        record.update(status="skipped", reason=str(exc))
    except BenchError as exc:
        record.update(status="error", reason=str(exc))
    except Exception as exc:  # a bug in one cell must not take the suite down
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - start, 3)
    if store is not None:
        store.save(record)
    return record
