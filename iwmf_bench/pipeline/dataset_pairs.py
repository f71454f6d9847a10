"""A registered dataset as a :class:`~iwmf_bench.pipeline.pairs.PairSource`.

A suite's ``data`` may name a dataset instead of two folders::

    data: {dataset: lfw, root: data/lfw, pairs_file: data/lfw/pairs.txt, pairs: 100}

``pairs: N`` draws, with the suite seed, N impersonation pairs (attacker image, victim
reference image of a different identity) and N genuine pairs (two images of one
identity: the clean verification and dodging pairs). With identity labels the
impersonation pairs are drawn by identity; the attacker's own reference (for the FRR
of purified adversarial images against their true identity) is another image of the
attacker when one exists. Without labels (verification .bin) both come from the
dataset's listed impostor and genuine pairs. Other keys: ``align`` (default true:
MTCNN alignment through the disk cache of :mod:`iwmf_bench.align_cache`),
``drop_no_face``.
"""

from __future__ import annotations

import functools
import json

import torch

from .. import registry
from ..align import Face, detect_faces
from ..align_cache import AlignedImages
from ..attacks.base import make_generator
from ..datasets import Dataset, DatasetError, open_dataset
from ..errors import BenchError
from ..models.base import resize
from .pairs import Pairs, PairSource

DATA_KEYS = ("dataset", "pairs", "align", "drop_no_face")  # suite keys of data, not dataset options


def dataset_options(data: dict) -> tuple[str, dict]:
    """(registered dataset name, its own options) of a suite's ``data``."""
    return data["dataset"], {k: v for k, v in data.items() if k not in DATA_KEYS}


def validate(path, data: dict) -> None:
    """Dataset name and options, before anything runs."""
    name, opts = dataset_options(data)
    unknown, accepted = registry.unknown_options(registry.get("datasets", name).factory, sorted(opts))
    if unknown:
        raise BenchError(f"{path}: data: unknown option(s) {', '.join(unknown)} for dataset {name} "
                         f"(accepted: {', '.join(accepted or ())}; suite keys: {', '.join(DATA_KEYS)})")
    n = data.get("pairs", 100)
    if not isinstance(n, int) or n < 1:
        raise BenchError(f"{path}: data.pairs must be a positive integer, got {n!r}")


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
        return AlignedImages(ds, model_name, progress=False).get(indices)
    return (torch.stack([resize(ds.read(i).unsqueeze(0), input_size)[0] for i in indices]),
            torch.ones(len(indices), dtype=torch.bool))


@functools.lru_cache(maxsize=4)
def _prepare(data_json: str, seed: int, model_name: str, input_size: int) -> tuple[Pairs, tuple[int, ...]]:
    """The cell's pairs aligned for one model, and the dataset index of each attacker."""
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
    return Pairs(sources=src[ki], targets=tgt[ki],
                 source_labels=[labels[imp[i][0]] for i in ki], target_labels=[labels[imp[i][1]] for i in ki],
                 source_names=[ds.names[imp[i][0]] for i in ki], target_names=[ds.names[imp[i][1]] for i in ki],
                 genuine_a=ga[keep_gen], genuine_b=gb[keep_gen],
                 attacker_refs=ar[ref_rows[refs_keep]] if refs_keep else ar[:0],
                 attacker_ref_rows=[j for j, i in enumerate(ki) if has_ref[i]],
                 dropped_pairs_no_face=dropped), tuple(imp[i][0] for i in ki)


@functools.lru_cache(maxsize=4)
def _photos(data_json: str, indices: tuple[int, ...]) -> tuple[torch.Tensor, tuple[Face, ...]]:
    name, opts = dataset_options(json.loads(data_json))
    ds = open_dataset(name, **opts)
    photos = [ds.read(i) for i in indices]
    shapes = sorted({tuple(p.shape) for p in photos})
    if len(shapes) > 1:
        raise DatasetError(f"attacks on the raw photos (surrogate) need photos of one size; the drawn attackers "
                           f"of {name} have sizes {', '.join('x'.join(map(str, s[1:])) for s in shapes[:3])}")
    photos = torch.stack(photos) if photos else torch.zeros(0, 3, 1, 1)
    faces = detect_faces(photos)
    missing = [ds.names[i] for i, face in zip(indices, faces) if face is None]
    if missing:
        raise DatasetError(f"no face found in {', '.join(missing[:4])} for the raw-photo attack; "
                           "set data.drop_no_face: true")
    return photos, tuple(faces)


class DatasetPairs(PairSource):
    """Pairs drawn from a registered dataset with the suite seed."""

    def __init__(self, data: dict, seed: int):
        self.data_json, self.seed = json.dumps(data, sort_keys=True), seed

    def pairs(self, model_name: str, input_size: int) -> Pairs:
        return _prepare(self.data_json, self.seed, model_name, input_size)[0]

    def photos(self, model_name: str, input_size: int) -> tuple[torch.Tensor, tuple[Face, ...]]:
        return _photos(self.data_json, _prepare(self.data_json, self.seed, model_name, input_size)[1])
