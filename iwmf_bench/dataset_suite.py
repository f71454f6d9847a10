"""Suites on a dataset: threat pairs drawn from it, calibrated thresholds, clean-pair
verification per defense.

A suite's ``data`` may name a registered dataset instead of two folders::

    data: {dataset: lfw, root: data/lfw, pairs_file: data/lfw/pairs.txt, pairs: 100}

``pairs: N`` draws, with the suite seed, N impersonation pairs (attacker image, victim
reference image of a different identity) and N genuine pairs (two images of one
identity, the clean verification and dodging pairs). With identity labels the
impersonation pairs are drawn by identity; the attacker's own reference (for the FRR
of purified adversarial images against their true identity) is another image of the
attacker when one exists. Without labels (verification .bin) both come from the
dataset's listed impostor and genuine pairs. Other keys: ``align`` (default true:
MTCNN alignment through the disk cache of :mod:`.align_cache`), ``drop_no_face``.

A model's ``threshold`` is a number, or ``{far: 0.001, dataset: NAME}``: calibrated on
that dataset's clean impostor pairs (:mod:`.calibration`, cached on disk). NAME is the
suite's own data when it names the same dataset, or a mapping ``{dataset: NAME,
...options}``. Every such cell states its threshold and its source.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import torch

from . import metrics, roc
from .attacks.base import make_generator
from .datasets import Dataset, DatasetError, open_dataset
from .errors import BenchError

DATA_KEYS = ("dataset", "pairs", "align", "drop_no_face")  # suite keys of data, not dataset options


def dataset_options(data: dict) -> tuple[str, dict]:
    return data["dataset"], {k: v for k, v in data.items() if k not in DATA_KEYS}


def validate(path, data: dict, models: dict[str, dict]) -> None:
    """Dataset name/options and threshold specs, before anything runs."""
    from . import registry

    if "dataset" in data:
        name, opts = dataset_options(data)
        unknown, accepted = registry.unknown_options(registry.get("datasets", name).factory, sorted(opts))
        if unknown:
            raise BenchError(f"{path}: data: unknown option(s) {', '.join(unknown)} for dataset {name} "
                             f"(accepted: {', '.join(accepted or ())}; suite keys: {', '.join(DATA_KEYS)})")
        n = data.get("pairs", 100)
        if not isinstance(n, int) or n < 1:
            raise BenchError(f"{path}: data.pairs must be a positive integer, got {n!r}")
    for label, opts in models.items():
        if "threshold" in opts:
            spec = opts["threshold"]
            if isinstance(spec, (int, float)) and not isinstance(spec, bool):
                continue
            if not isinstance(spec, dict) or set(spec) - {"far", "dataset", "align", "seed"} or "far" not in spec \
                    or "dataset" not in spec:
                raise BenchError(f"{path}: models.{label}.threshold must be a number or "
                                 f"{{far: 0.001, dataset: NAME}} (optional align, seed), got {spec!r}")
            if not 0 < float(spec["far"]) < 1:
                raise BenchError(f"{path}: models.{label}.threshold.far must be in (0, 1), got {spec['far']}")
            calibration_dataset(spec, data, path)


def calibration_dataset(spec: dict, data: dict, path: Any = "suite") -> tuple[str, dict, bool]:
    """(dataset name, options, align) that a ``threshold: {far, dataset}`` spec names."""
    ref = spec["dataset"]
    if isinstance(ref, dict):
        if "dataset" not in ref:
            raise BenchError(f"{path}: threshold.dataset mapping needs 'dataset' (a registered dataset)")
        # every key but dataset/align is the dataset's own (identity-list's pairs included)
        opts = {k: v for k, v in ref.items() if k not in ("dataset", "align")}
        return ref["dataset"], opts, bool(spec.get("align", ref.get("align", True)))
    if data.get("dataset") == ref:
        name, opts = dataset_options(data)
        return name, opts, bool(spec.get("align", data.get("align", True)))
    raise BenchError(f"{path}: threshold.dataset {ref!r} is not the suite's data.dataset "
                     f"({data.get('dataset')!r}); name it as a mapping {{dataset: {ref}, root: ...}}")


# -- thresholds ----------------------------------------------------------------------------

def with_threshold(cell, model) -> tuple[Any, dict]:
    """A view of ``model`` (shared weights) with the cell's threshold, and where it came from."""
    spec = cell.model_options["threshold"]
    view = copy.copy(model)  # shallow: same parameters; the threshold is the view's own
    if isinstance(spec, (int, float)):
        view.threshold = float(spec)
        return view, {"value": float(spec), "source": "fixed in the suite"}
    from .calibration import cached_calibration
    from .harness import _factory_options

    name, opts, align = calibration_dataset(spec, cell.data)
    model_opts = {k: v for k, v in _factory_options(cell.model_options).items() if k != "threshold"}
    rec = cached_calibration(model, cell.model, model_opts, name, opts, float(spec["far"]), align=align,
                             device=cell.device, seed=int(spec.get("seed", 0)), progress=False,
                             drop_no_face=bool(cell.data.get("drop_no_face", False)))
    view.threshold = float(rec["threshold"])
    lo, hi = rec["threshold_ci95"]
    return view, {"value": rec["threshold"], "ci95": [lo, hi], "far_target": rec["far_target"],
                  "far": rec["far"], "tar": rec["tar"], "dataset": name, "impostor_pairs": rec["impostor_pairs"],
                  "source": f"calibrated to FAR {rec['far_target']:g} on {rec['impostor_pairs']} clean impostor "
                            f"pairs of {name} (95% bootstrap [{lo:.4g}, {hi:.4g}]; clean TAR "
                            f"{100 * rec['tar']['value']:.1f}%)"}


# -- threat pairs ----------------------------------------------------------------------------

def _draw(n: int, k: int, gen: torch.Generator) -> list[int]:
    """``k`` of ``range(n)`` without repeats (all of them, in order, when k >= n)."""
    return list(range(n)) if k >= n else sorted(torch.randperm(n, generator=gen)[:k].tolist())


def threat_pairs(ds: Dataset, n: int, seed: int) -> dict[str, list]:
    """Impersonation (attacker, victim reference, attacker reference or None) and genuine
    (probe, reference) image-index pairs, drawn with ``seed``."""
    gen = make_generator(seed, "dataset", "threat-pairs")
    listed = ds.pairs()
    genuine_listed = [(p.a, p.b) for p in listed if p.same]
    genuine = [genuine_listed[i] for i in _draw(len(genuine_listed), n, gen)]
    if hasattr(ds, "impersonation_pairs"):  # the folder protocol keeps its own pairing
        pairing = ds.impersonation_pairs()
        keep = _draw(len(pairing), n, gen)
        imp = [(pairing[i][0], pairing[i][1]) for i in keep]
    elif ds.has_identities:
        labels = ds.labels
        identities = sorted(set(labels))
        if len(identities) < 2:
            raise DatasetError("impersonation needs at least two identities in the dataset")
        imp, seen = [], set()
        while len(imp) < min(n, len(labels) * (len(labels) - 1)):
            a = int(torch.randint(len(labels), (1,), generator=gen))
            others = [q for q in identities if q != labels[a]]
            victim = others[int(torch.randint(len(others), (1,), generator=gen))]
            images = [i for i, lab in enumerate(labels) if lab == victim]
            r = images[int(torch.randint(len(images), (1,), generator=gen))]
            if (a, r) not in seen:
                seen.add((a, r))
                imp.append((a, r))
    else:
        impostor_listed = [(p.a, p.b) for p in listed if not p.same]
        imp = [impostor_listed[i] for i in _draw(len(impostor_listed), n, gen)]
    attacker_refs = []
    for a, _ in imp:  # another image of the attacker, for the true-identity FRR
        same = [i for i, lab in enumerate(ds.labels) if lab is not None and lab == ds.labels[a] and i != a]
        attacker_refs.append(same[int(torch.randint(len(same), (1,), generator=gen))] if same else None)
    return {"impersonation": imp, "attacker_refs": attacker_refs, "genuine": genuine}


def _images(ds: Dataset, model_name: str, input_size: int, indices: list[int], align: bool):
    if not indices:
        return torch.zeros(0, 3, input_size, input_size), torch.zeros(0, dtype=torch.bool)
    if align:
        from .align_cache import AlignedImages

        return AlignedImages(ds, model_name, progress=False).get(indices)
    from .models.base import resize

    return (torch.stack([resize(ds.read(i).unsqueeze(0), input_size)[0] for i in indices]),
            torch.ones(len(indices), dtype=torch.bool))


@functools.lru_cache(maxsize=4)
def _prepare(data_json: str, seed: int, model_name: str, input_size: int) -> dict[str, Any]:
    data = json.loads(data_json)
    name, opts = dataset_options(data)
    ds = open_dataset(name, **opts)
    align, drop = bool(data.get("align", True)), bool(data.get("drop_no_face", False))
    pairs = threat_pairs(ds, int(data.get("pairs", 100)), seed)
    imp, refs_a, gen_pairs = pairs["impersonation"], pairs["attacker_refs"], pairs["genuine"]
    src, ok_s = _images(ds, model_name, input_size, [a for a, _ in imp], align)
    tgt, ok_t = _images(ds, model_name, input_size, [b for _, b in imp], align)
    ga, ok_ga = _images(ds, model_name, input_size, [a for a, _ in gen_pairs], align)
    gb, ok_gb = _images(ds, model_name, input_size, [b for _, b in gen_pairs], align)
    has_ref = [r is not None for r in refs_a]
    ar, ok_ar = _images(ds, model_name, input_size, [r for r in refs_a if r is not None], align)
    ok_ref = torch.ones(len(imp), dtype=torch.bool)
    ok_ref[torch.tensor(has_ref, dtype=torch.bool)] = ok_ar
    keep_imp, keep_gen = ok_s & ok_t & ok_ref, ok_ga & ok_gb
    dropped = int((~keep_imp).sum() + (~keep_gen).sum())
    if dropped and not drop:
        bad = sorted({ds.names[i] for (a, b), k in zip(imp, keep_imp.tolist()) if not k for i in (a, b)}
                     | {ds.names[i] for (a, b), k in zip(gen_pairs, keep_gen.tolist()) if not k for i in (a, b)})
        raise DatasetError(f"no face found in an image of {dropped} drawn pair(s) (among {', '.join(bad[:4])}); "
                           "set data.drop_no_face: true to leave those pairs out (the count is reported), or "
                           "data.align: false for pre-aligned images")
    ki = keep_imp.nonzero().flatten().tolist()
    ref_rows = torch.cumsum(torch.tensor(has_ref, dtype=torch.long), 0) - 1
    refs_keep = [i for i in ki if has_ref[i]]
    labels = [ds.labels[i] if ds.labels[i] is not None else -1 for i in range(len(ds))]
    return {"sources": src[ki], "targets": tgt[ki],
            "source_labels": [labels[imp[i][0]] for i in ki], "target_labels": [labels[imp[i][1]] for i in ki],
            "source_names": [ds.names[imp[i][0]] for i in ki], "target_names": [ds.names[imp[i][1]] for i in ki],
            "attacker_refs": ar[ref_rows[refs_keep]] if refs_keep else ar[:0],
            "attacker_ref_rows": [j for j, i in enumerate(ki) if has_ref[i]],
            "genuine_a": ga[keep_gen], "genuine_b": gb[keep_gen], "dropped_pairs_no_face": dropped}


def prepare(cell, model) -> dict[str, Any]:
    """The cell's threat data from its dataset (cached per process)."""
    return _prepare(json.dumps(cell.data, sort_keys=True), cell.seed, cell.model, model.input_size)


# -- metrics of a dataset cell ------------------------------------------------------------------

@torch.no_grad()
def clean_and_identity_metrics(cell, model, defense, data: dict, purified_adv: torch.Tensor, batch: int) -> dict:
    """FRR on the genuine pairs (purified probe vs clean reference), FRR of purified
    adversarial images against another image of the attacker, and clean verification
    (TAR@FAR, AUC, EER, scores for the ROC) of the defense on the genuine pairs and the
    impersonation pairs taken clean."""
    from .harness import _batched

    dev, thr, metric = cell.device, model.threshold, model.metric
    emb = lambda x: _batched(model.embed, x.to(dev), batch).cpu()  # noqa: E731
    purify = lambda x, stream: _batched(lambda z: defense.purify(z, gen[stream]), x.to(dev), batch)  # noqa: E731
    gen = {s: make_generator(cell.seed, "dataset", s) for s in ("genuine", "impostor")}
    genuine = metrics.scores(emb(purify(data["genuine_a"], "genuine")), emb(data["genuine_b"]), metric)
    impostor = metrics.scores(emb(purify(data["sources"], "impostor")), emb(data["targets"]), metric)
    rows = data["attacker_ref_rows"]
    adv_true = metrics.matched_frr(emb(purified_adv[rows]), emb(data["attacker_refs"]), thr, metric) \
        if rows else metrics.Rate(0, 0)
    out = {"frr_genuine": metrics.Rate(int((~metrics.accepts(genuine, thr, metric)).sum()), genuine.numel()).to_dict(),
           "frr_adv_true_identity": adv_true.to_dict(),
           "dropped_pairs_no_face": data["dropped_pairs_no_face"]}
    if genuine.numel() and impostor.numel():
        out["clean"] = {**roc.clean_summary(genuine, impostor, metric),
                        "genuine_scores": genuine.tolist(), "impostor_scores": impostor.tolist()}
    return out


# -- leaderboard notes and ROC figure -------------------------------------------------------------

def _first_per_defense(records: list[dict], key: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in records:
        if r["status"] == "ok" and key in r["metrics"]:
            out.setdefault(r["cell"]["defense"], r["metrics"])
    return out


def dataset_notes(records: list[dict]) -> list[str]:
    """One model's threshold and its source, and each defense's clean verification
    (nothing for folder suites with the model's default threshold)."""
    notes = []
    for m in _first_per_defense(records, "threshold_source").values():
        sign = ">=" if m["metric"] == "cosine" else "<="
        notes.append(f"threshold {m['threshold']:.6g} ({m['metric']}, accept {sign}): "
                     f"{m['threshold_source']['source']}")
        break
    for defense, m in _first_per_defense(records, "clean").items():
        c = m["clean"]
        parts = []
        for far, t in c["tar_at_far"].items():
            parts.append(f"TAR@FAR={far} {100 * t['tar']['value']:.1f}%" if t["supported"]
                         else f"TAR@FAR={far} n/a ({t['note']})")
        notes.append(f"clean pairs ({defense}, {c['genuine_pairs']} genuine / {c['impostor_pairs']} impostor, "
                     f"threshold per defense from its own ROC): {', '.join(parts)}, AUC {c['auc']:.4f}, "
                     f"EER {100 * c['eer']:.1f}%")
    dropped = next((m["dropped_pairs_no_face"] for m in _first_per_defense(records, "dropped_pairs_no_face").values()), 0)
    if dropped:
        notes.append(f"{dropped} drawn pair(s) left out: no face found in one of their images (drop_no_face)")
    return notes


def roc_plots(suite, records: list[dict], imgs) -> list:
    """``imgs/<suite>_roc_<model>.png``: clean ROC of every defense of one model on one
    figure (dataset suites only)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = list(dict.fromkeys(r["cell"]["model"] for r in records))
    for model in models:
        per = _first_per_defense([r for r in records if r["cell"]["model"] == model], "clean")
        if not per:
            continue
        fig, ax = plt.subplots(figsize=(4.8, 4))
        for defense, m in per.items():
            far, tar, _ = roc.roc_curve(torch.tensor(m["clean"]["genuine_scores"]),
                                        torch.tensor(m["clean"]["impostor_scores"]), m["metric"])
            far = torch.cat([torch.zeros(1, dtype=far.dtype), far])
            tar = torch.cat([torch.zeros(1, dtype=tar.dtype), tar])
            ax.step(far.numpy(), tar.numpy(), where="post", label=f"{defense} (AUC {m['clean']['auc']:.3f})")
        ax.set_xlabel("FAR (clean impostor pairs)")
        ax.set_ylabel("TAR (clean genuine pairs)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{model}: clean ROC per defense ({suite.name} suite)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = Path(imgs) / f"{suite.name}_roc_{model}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
