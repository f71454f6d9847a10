"""The paper's folder protocol as a :class:`~iwmf_bench.pipeline.pairs.PairSource`.

``data: {sources: DIR, targets: DIR, align: true, pairs: N}``: two folders of
``NNNNN_label`` images holding the same ids; source ``i`` impersonates target ``i``.
``pairs: N`` keeps N evenly spaced ids. Genuine pairs are derived from the labels
(:mod:`.score`), dodging pairs from the sources' labels (:meth:`Pairs.dodging`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..align import Face, align_images, detect_faces
from ..data import load_folder
from ..errors import BenchError
from .pairs import Pairs, PairSource, pair_indices


@functools.lru_cache(maxsize=8)
def folder_pairs(sources: str, targets: str, align: bool, pairs: int | None, model_name: str,
                 input_size: int) -> Pairs:
    """Sources and targets for one model: aligned to its template (or resized), paired by id."""
    src = load_folder(sources, size=None if align else input_size)
    tgt = load_folder(targets, size=None if align else input_size)
    if src.ids != tgt.ids:
        raise BenchError(f"{sources} and {targets} must hold the same ids (source i impersonates target i); "
                         f"only in one: {sorted(set(src.ids) ^ set(tgt.ids))[:5]}")
    if align:
        for data in (src, tgt):
            aligned, ok = align_images(data.images, model_name)
            if not bool(ok.all()):
                bad = [data.names[i] for i in range(len(ok)) if not ok[i]]
                raise BenchError(f"no face found in {', '.join(bad)} ({data.root}); remove them or set "
                                 "data.align: false")
            data.images = aligned
    keep = pair_indices(len(src), pairs)
    return Pairs(sources=src.images[keep], targets=tgt.images[keep],
                 source_labels=[src.labels[i] for i in keep], target_labels=[tgt.labels[i] for i in keep],
                 source_names=[src.names[i] for i in keep], target_names=[tgt.names[i] for i in keep])


@functools.lru_cache(maxsize=4)
def folder_photos(sources: str, pairs: int | None) -> tuple[torch.Tensor, tuple[Face, ...]]:
    """The raw source photos of a folder suite's pairs and their faces (MTCNN once per
    photo, on the whole folder like :func:`folder_pairs`, so the warps reproduce its
    aligned crops exactly)."""
    src = load_folder(sources)
    faces = detect_faces(src.images)
    missing = [name for name, face in zip(src.names, faces) if face is None]
    if missing:
        raise BenchError(f"no face found in {', '.join(missing)} ({sources}); remove them")
    keep = pair_indices(len(src), pairs)
    return src.images[keep], tuple(faces[i] for i in keep)


class FolderPairs(PairSource):
    """The paper's protocol: ``data: {sources: DIR, targets: DIR, align, pairs}``."""

    def __init__(self, data: dict):
        self.sources = str(Path(data["sources"]).resolve())
        self.targets = str(Path(data["targets"]).resolve())
        self.align, self.n = bool(data.get("align", True)), data.get("pairs")

    def pairs(self, model_name: str, input_size: int) -> Pairs:
        return folder_pairs(self.sources, self.targets, self.align, self.n, model_name, input_size)

    def photos(self, model_name: str, input_size: int) -> tuple[torch.Tensor, tuple[Face, ...]]:
        return folder_photos(self.sources, self.n)
