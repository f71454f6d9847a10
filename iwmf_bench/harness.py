"""Compute benchmark cells: the cross product, a result cache that survives crashes,
and two executors (in-process and Ray).

Every cell's result is one JSON file ``<results>/<suite>/<key>.json`` written atomically
(temporary file + rename), so a run killed at any moment loses at most the cell in
flight, and a re-run reuses every finished cell. Local, sharded (``--shard i/n``) and Ray
runs share this cache and resume each other. Cells that cannot run here (weights
missing offline) come back as ``skipped`` records with the reason and the fix; they are
not cached, so they run once the weights are there.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from . import __version__, metrics, registry
from .attacks.adaptive import evaluate
from .attacks.base import Attack, AttackTask, make_generator
from .data import load_folder, quantize
from .devices import resolve_device
from .errors import BenchError, MissingExtraError, NotApplicableError, WeightsError
from .models.base import frozen
from .suite import SUITE_KEYS, SURROGATE_KEYS, Cell

# -- result cache ----------------------------------------------------------------------


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class ResultStore:
    """One JSON file per finished cell, keyed by the cell's hash."""

    def __init__(self, root: str | Path, suite: str):
        self.dir = Path(root) / suite

    def path(self, cell: Cell) -> Path:
        return self.dir / f"{cell.key}.json"

    def load(self, cell: Cell) -> dict | None:
        path = self.path(cell)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:  # cannot happen with atomic writes; recompute if it does
            return None
        return record if record.get("status") == "ok" else None

    def save(self, record: dict) -> None:
        if record["status"] == "ok":
            write_json_atomic(self.dir / f"{record['key']}.json", record)


# -- environment -------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    import numpy

    env = {"iwmf_bench": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "device": device,
           "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


# -- data --------------------------------------------------------------------------------


def _pair_indices(n: int, pairs: int | None) -> list[int]:
    if not pairs or pairs >= n:
        return list(range(n))
    # Evenly spaced, so a small suite still covers every identity.
    return sorted({round(i * (n - 1) / (pairs - 1)) for i in range(pairs)}) if pairs > 1 else [0]


@functools.lru_cache(maxsize=8)
def prepare_data(sources: str, targets: str, align: bool, pairs: int | None, model_name: str,
                 input_size: int) -> dict[str, Any]:
    """Sources and targets for one model: aligned to its template (or resized), paired by id."""
    src = load_folder(sources, size=None if align else input_size)
    tgt = load_folder(targets, size=None if align else input_size)
    if src.ids != tgt.ids:
        raise BenchError(f"{sources} and {targets} must hold the same ids (source i impersonates target i); "
                         f"only in one: {sorted(set(src.ids) ^ set(tgt.ids))[:5]}")
    if align:
        from .align import align_images

        for name, data in (("sources", src), ("targets", tgt)):
            aligned, ok = align_images(data.images, model_name)
            if not bool(ok.all()):
                bad = [data.names[i] for i in range(len(ok)) if not ok[i]]
                raise BenchError(f"no face found in {', '.join(bad)} ({data.root}); remove them or set "
                                 "data.align: false")
            data.images = aligned
    keep = _pair_indices(len(src), pairs)
    take = lambda d: (d.images[keep], [d.labels[i] for i in keep], [d.names[i] for i in keep])  # noqa: E731
    s_img, s_lab, s_names = take(src)
    t_img, t_lab, t_names = take(tgt)
    return {"sources": s_img, "source_labels": s_lab, "source_names": s_names,
            "targets": t_img, "target_labels": t_lab, "target_names": t_names}


def _data_for(cell: Cell, model) -> dict[str, Any]:
    d = cell.data
    if "dataset" in d:  # a dataset plugin instead of two folders
        from .dataset_suite import prepare

        return prepare(cell, model)
    return prepare_data(str(Path(d["sources"]).resolve()), str(Path(d["targets"]).resolve()),
                        bool(d.get("align", True)), d.get("pairs"), cell.model, model.input_size)


# -- building blocks -------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _model(name: str, options_json: str, device: str):
    return frozen(registry.create("models", name, **json.loads(options_json)), device)


def _factory_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in SUITE_KEYS}


def build_model(cell: Cell):
    return _model(cell.model, json.dumps(_factory_options(cell.model_options), sort_keys=True), cell.device)


def build_defense(cell: Cell):
    opts = _factory_options(cell.defense_options)
    return registry.create("defenses", cell.defense_options["defense"], **opts).to(cell.device).eval()


def check_applicable(cell: Cell, defense) -> None:
    """An adaptive threat model that asks for a gradient mode the defense lacks (exact
    gradients through bit-depth reduction, say) does not apply: the cell is ``n/a``, and
    the defense's other gradient modes have their own columns."""
    mode = cell.threat_options.get("grad_mode")
    if cell.setting == "adaptive" and mode not in (None, "none") and mode not in defense.grad_modes:
        raise NotApplicableError(f"not applicable: defense {cell.defense!r} has no {mode!r} gradient "
                                 f"(its modes: {', '.join(defense.grad_modes)})")


def build_attack(cell: Cell):
    opts = {k: v for k, v in cell.threat_options.items() if k not in SURROGATE_KEYS}
    name, _ = opts.pop("attack"), opts.pop("setting", None)
    return registry.create("attacks", name, **opts)


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def _cross_identity_frr(emb: torch.Tensor, ref: torch.Tensor, labels: list[int], threshold: float,
                        metric: str):
    """FRR over same-identity pairs (i, j), i != j: image i (processed) vs clean image j."""
    return metrics.far_frr(metrics.pair_scores(emb, ref, metric).cpu(), labels, labels, threshold, metric,
                           exclude_diagonal=True)["frr"]


def _attack(cell: Cell, model, sources: torch.Tensor, refs: torch.Tensor, defense) -> tuple[torch.Tensor, dict]:
    """Run the cell's attack (``defense=None``: on the undefended model); images and facts."""
    start = time.perf_counter()
    result = build_attack(cell).run(AttackTask(model, sources, refs, defense, cell.seed))
    return result.adversarial, {
        "attack_seconds_per_image": (time.perf_counter() - start) / sources.shape[0],
        "flags": {k: bool(v) for k, v in result.flags.items()},
        "attack_success": result.success_rate.to_dict(),
        "attack_queries_per_image": float(result.queries.float().mean()),
        # facts a reader needs (library RNG use, EOT cut to one draw, ...), as the attack states them
        "attack_notes": {k: v for k, v in result.info.items() if k in ("rng", "eot_note", "library", "projected")}}


def transfer_adversarial(cell: Cell, model, data: dict, results_root: Path | None) -> tuple[torch.Tensor, dict]:
    """Adversarial images crafted on the undefended model: shared by every defense, so
    computed once per (model, threat model) and cached on disk next to the results."""
    ident = Cell(cell.suite, cell.model, cell.model_options, "-", {}, cell.threat, cell.threat_options,
                 cell.data, {}, cell.seed, cell.device).key
    path = (Path(results_root) / cell.suite / "adversarial" / f"{ident}.pt") if results_root else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["adversarial"].to(cell.device), saved["info"]
    refs = _batched(model.embed, data["targets"].to(cell.device), 32)
    adv, info = _attack(cell, model, data["sources"].to(cell.device), refs, None)
    if path is not None:
        save_adversarial(path, adv, info)
    return adv, info


def save_adversarial(path: Path, adv: torch.Tensor, info: dict) -> None:
    """Cache adversarial images atomically (temporary file + rename), like result cells."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"adversarial": adv.cpu(), "info": info}, tmp)
    os.replace(tmp, path)


_GENUINE: dict[str, tuple] = {}  # per process: the genuine stage of each (model, defense, data, seed)


def _genuine(cell: Cell, model, defense, data: dict, batch: int) -> tuple:
    """Reference embeddings, purification seconds per image and genuine FRR: the same for
    every threat model of a (model, defense), so computed once per process (same
    generator, so the same numbers), not once per cell."""
    ident = Cell(cell.suite, cell.model, cell.model_options, cell.defense, cell.defense_options, "-", {},
                 cell.data, cell.evaluation, cell.seed, cell.device).key
    if ident in _GENUINE:
        return _GENUINE[ident]
    dev = cell.device
    targets, sources, n = data["targets"].to(dev), data["sources"].to(dev), data["sources"].shape[0]
    refs = _batched(model.embed, targets, batch)
    source_refs = _batched(model.embed, sources, batch)
    gen = make_generator(cell.seed, "harness", "genuine")
    with torch.no_grad():  # warm-up (lazy loading, JIT caches) stays out of the timing
        defense.purify(targets[:1], make_generator(cell.seed, "harness", "warm-up"))
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    purified = _batched(lambda x: defense.purify(x, gen), targets, batch)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    seconds_per_image = (time.perf_counter() - start) / n
    frr_genuine = _cross_identity_frr(_batched(model.embed, purified, batch), refs, data["target_labels"],
                                      model.threshold, model.metric)
    if len(_GENUINE) >= 64:
        _GENUINE.pop(next(iter(_GENUINE)))
    _GENUINE[ident] = (refs, source_refs, seconds_per_image, frr_genuine)
    return _GENUINE[ident]


def compute_cell(cell: Cell, results_root: Path | None = None, stage: Callable[[str], None] = lambda s: None) -> dict:
    """The numbers of one cell (raises on failure; see :func:`run_cell`)."""
    stage("load model")
    model = build_model(cell)
    threshold_source = None
    if "threshold" in cell.model_options:  # fixed or calibrated in the suite
        from .dataset_suite import with_threshold

        model, threshold_source = with_threshold(cell, model)
    defense = build_defense(cell)
    check_applicable(cell, defense)
    data = _data_for(cell, model)
    dev = cell.device
    sources, targets = data["sources"].to(dev), data["targets"].to(dev)
    n = sources.shape[0]
    batch = int(cell.evaluation.get("batch_size", 32))

    stage("genuine")
    refs, source_refs, seconds_per_image, frr_genuine = _genuine(cell, model, defense, data, batch)

    stage("attack")
    info: dict[str, Any] = {}
    if cell.setting is None:
        adv = sources
    elif cell.setting == "transfer" and "surrogate" in cell.threat_options:
        from .cross_model import transfer_from_surrogate

        # adv: photos crafted on the surrogate; the model sees them through its own alignment
        # warp, then the defense (on the aligned crop), so `defense` becomes that photo-space view.
        adv, info, defense = transfer_from_surrogate(cell, defense, results_root)
    elif cell.setting == "transfer":
        adv, info = transfer_adversarial(cell, model, data, results_root)
    else:
        adv, info = _attack(cell, model, sources, refs, defense)

    stage("evaluate")
    draws = int(cell.evaluation.get("draws", 10))
    ev = evaluate(model, defense, adv, refs, cell.seed, n_draws=draws)
    gen = make_generator(cell.seed, "harness", "adversarial-identity")
    purified_adv = _batched(lambda x: defense.purify(x, gen), quantize(adv), batch)
    frr_adv_true = _cross_identity_frr(_batched(model.embed, purified_adv, batch), source_refs,
                                       data["source_labels"], model.threshold, model.metric)
    out = {
        "far": ev.single_shot.to_dict(),
        "far_worst_of_n": ev.worst_of_n.to_dict(),
        "draws": ev.n_draws,
        "frr_genuine": frr_genuine.to_dict(),
        "frr_adv_true_identity": frr_adv_true.to_dict(),
        "seconds_per_image": seconds_per_image,
        "threshold": model.threshold,
        "metric": model.metric,
        "pairs": n,
        **info,
    }
    if "genuine_a" in data:  # dataset suites: genuine pairs, attacker references, clean ROC
        from .dataset_suite import clean_and_identity_metrics

        out.update(clean_and_identity_metrics(cell, model, defense, data, purified_adv, batch))
    if threshold_source is not None:
        out["threshold_source"] = threshold_source
    return out


def _missing_weights(cell: Cell) -> list[str]:
    """What building the cell's model and defense says about missing weights (so a cell
    skipped for another reason names every fix at once)."""
    problems = []
    for build in (build_model, build_defense):
        try:
            build(cell)
        except WeightsError as exc:
            problems.append(str(exc))
    return problems


def run_cell(cell: Cell | dict, results_root: str | Path | None, stage: Callable[[str], None] = lambda s: None) -> dict:
    """Compute one cell and cache it; never raises for a cell that fails.

    Returns a record with ``status`` ``ok``, ``skipped`` (weights missing: the reason
    says how to fix it) or ``error`` (message and traceback).
    """
    if isinstance(cell, dict):
        cell = Cell(**cell)
    store = ResultStore(results_root, cell.suite) if results_root else None
    if store is not None and (cached := store.load(cell)) is not None:
        return cached
    record: dict[str, Any] = {"key": cell.key, "cell": cell.to_dict(), "name": cell.name,
                              "env": environment(cell.device), "seed": cell.seed,
                              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    start = time.perf_counter()
    try:
        resolve_device(cell.device)  # a clear error on a machine without that device
        if (missing := cell.missing_requirement) is not None:
            record.update(status="skipped", reason="; ".join([missing, *_missing_weights(cell)]))
        else:
            record["metrics"] = compute_cell(cell, Path(results_root) if results_root else None, stage)
            record["status"] = "ok"
    except (WeightsError, MissingExtraError, NotApplicableError) as exc:
        record.update(status="skipped", reason=str(exc))
    except BenchError as exc:
        record.update(status="error", reason=str(exc))
    except Exception as exc:  # a bug in one cell must not take the suite down
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - start, 3)
    if store is not None:
        store.save(record)
    return record


# -- executors ---------------------------------------------------------------------------


def predict_skips(cells: list[Cell]) -> set[str]:
    """Keys of the cells that will come back ``skipped`` here (a requirement this machine
    lacks, a model/defense whose weights are missing, a cross-model surrogate (or its
    defense) whose weights are missing, an attack whose optional library is not
    installed), found by building each distinct model, defense and attack once. Lets the
    local executor report them first and size its progress bar (and ETA) to the cells it
    will actually compute."""
    built: dict[str, Any] = {}  # None: missing weights

    def build(kind: str, builder: Callable[[Cell], Any], cell: Cell, options: dict) -> Any:
        ident = kind + json.dumps(options, sort_keys=True, default=str) + cell.device
        if ident not in built:
            try:
                built[ident] = builder(cell)
            except WeightsError:
                built[ident] = None
            except Exception:  # any other failure surfaces (with its message) when the cell runs
                built[ident] = False
        return built[ident]

    def skips(cell: Cell) -> bool:
        if cell.missing_requirement is not None or build(cell.model, build_model, cell, cell.model_options) is None:
            return True
        t = cell.threat_options
        if t.get("attack"):
            attack = build("attack", build_attack, cell, t)
            if attack not in (None, False) and attack.missing_libraries():
                return True
        if t.get("surrogate"):
            name, options = t["surrogate"], t.get("surrogate_options") or {}
            defense_options = t.get("surrogate_defense_options")

            def surrogate(c: Cell):
                return _model(name, json.dumps(_factory_options(options), sort_keys=True), c.device)

            def surrogate_defense(c: Cell):
                return registry.create("defenses", defense_options["defense"], **_factory_options(defense_options))

            if build(name, surrogate, cell, options) is None or (
                    defense_options and build("defense", surrogate_defense, cell, defense_options) is None):
                return True
        defense = build("defense", build_defense, cell, cell.defense_options)
        if defense is None:
            return True
        try:
            if defense is not False:
                check_applicable(cell, defense)
        except NotApplicableError:
            return True
        return False

    return {c.key for c in cells if skips(c)}


def run_cells(cells: list[Cell], results_root: str | Path, executor: str = "local",
              ray_address: str | None = None, progress: bool = True) -> list[dict]:
    """Run ``cells`` (reusing cached ones) and return their records in order."""
    results_root = Path(results_root)
    records: dict[str, dict] = {}
    todo = []
    for cell in cells:
        cached = ResultStore(results_root, cell.suite).load(cell)
        if cached is not None:
            records[cell.key] = cached
        else:
            todo.append(cell)
    skips = predict_skips(todo) if executor == "local" else set()
    skipped = [c for c in todo if c.key in skips]
    todo = [c for c in todo if c.key not in skips]
    bar = tqdm(total=len(cells) - len(skipped), initial=len(cells) - len(skipped) - len(todo), desc="suite",
               unit="cell", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    bar.set_postfix_str(f"{bar.n} cached, {len(skipped)} skipped")
    by_reason: dict[str, list[str]] = {}
    for cell in skipped:  # reported up front, one line per reason, outside the bar's rate and ETA
        records[cell.key] = record = run_cell(cell, results_root)
        if record["status"] == "skipped":
            by_reason.setdefault(record.get("reason", ""), []).append(record["name"])
        else:
            _report(record, bar)
    for reason, names in by_reason.items():
        bar.write(f"skipped {len(names)} cell(s) ({_summary(names)}): {reason}", file=sys.stderr)
    if executor == "local":
        Attack.progress = progress  # attack iterations show under the stage bar, as in `iwmf-bench attack`
        for cell in todo:
            bar.set_description(f"suite [{cell.name}]")
            stage_bar = tqdm(total=4, desc=f"  {cell.name}", leave=False, disable=not progress,
                             file=sys.stderr, dynamic_ncols=True)

            def stage(name, _bar=stage_bar):
                if _bar.n or name != "load model":
                    _bar.update(1)
                _bar.set_postfix_str(name)

            records[cell.key] = run_cell(cell, results_root, stage)
            stage_bar.close()
            _report(records[cell.key], bar)
            bar.update(1)
        Attack.progress = False
    elif executor == "ray":
        for record in _run_ray(todo, results_root, ray_address):
            records[record["key"]] = record
            _report(record, bar)
            bar.update(1)
    else:
        raise BenchError(f"unknown executor {executor!r}; use 'local' or 'ray'")
    bar.close()
    return [records[c.key] for c in cells]


def _summary(names: list[str], shown: int = 3) -> str:
    """'a, b, c and 5 more' for a list of cell names."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _report(record: dict, bar) -> None:
    if record["status"] != "ok":
        first = record.get("reason", "").splitlines()[0] if record.get("reason") else ""
        bar.write(f"{record['status']}: {record['name']}: {first}", file=sys.stderr)


def _run_ray(cells: list[Cell], results_root: Path, address: str | None):
    try:
        import ray
    except ImportError:
        raise BenchError("--executor ray needs Ray: pip install 'iwmf-bench[ray]'") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=int(os.environ.get("IWMF_BENCH_RAY_CPUS", os.cpu_count() or 1)),
                     include_dashboard=False, log_to_driver=False)
    task = ray.remote(_ray_cell)
    pending = {}
    for cell in cells:
        gpus = 1 if cell.device.startswith("cuda") else 0
        ref = task.options(num_cpus=1, num_gpus=gpus).remote(cell.to_dict(), str(results_root))
        pending[ref] = cell
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)
            yield ray.get(ref)


def _ray_cell(cell: dict, results_root: str) -> dict:
    # Same code path and cache as the local executor; runs on a Ray worker.
    return run_cell(cell, results_root)
