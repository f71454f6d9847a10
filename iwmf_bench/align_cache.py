"""Aligned crops of a dataset, computed once and kept on disk.

Alignment (MTCNN + the model's template, :mod:`.align`) is the slow part of reading a
face dataset, and it depends only on the images, the template and this package's
version. So the crops are cached under
``$IWMF_BENCH_CACHE/aligned/<dataset>-<template>-<key>/`` (default cache:
``~/.cache/iwmf_bench/cache``), ``key`` hashing the dataset's fingerprint, the template
and the version. The dataset is split in chunks of :data:`CHUNK` images; each chunk is
one file written atomically (temporary file + rename, like result cells), so an
interrupted run keeps every finished chunk and nothing half-written is ever read. Only
the chunks a caller asks for are computed; one chunk is in memory at a time. Crops are
stored as 8-bit, exactly what an aligned PNG on disk would hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from . import __version__
from .align import ALIASES, align_images, detect_faces, get_spec
from .datasets.base import Dataset
from .util import save_tensors_atomic, write_json_atomic
from .weights import home

CHUNK = 256


def cache_root() -> Path:
    return Path(os.environ.get("IWMF_BENCH_CACHE", home() / "cache"))


class AlignedImages:
    """Lazily computed, disk-cached aligned crops of ``dataset`` for ``model``'s template."""

    def __init__(self, dataset: Dataset, model: str, root: str | Path | None = None, device: str = "cpu",
                 progress: bool = True):
        self.dataset, self.device, self.progress = dataset, device, progress
        self.template = ALIASES.get(model, model)
        self.size = get_spec(self.template).size
        blob = json.dumps({"dataset": dataset.fingerprint(), "template": self.template, "size": self.size,
                           "version": __version__}, sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        name = getattr(dataset, "registered_name", "") or type(dataset).__name__
        self.dir = Path(root or cache_root()) / "aligned" / f"{name}-{self.template}-{key}"
        self._loaded: tuple[int, dict] | None = None

    def _path(self, c: int) -> Path:
        return self.dir / f"chunk_{c:05d}.pt"

    def _compute(self, c: int) -> dict:
        indices = range(c * CHUNK, min((c + 1) * CHUNK, len(self.dataset)))
        images = [self.dataset.read(i) for i in indices]
        faces = detect_faces(images, device=self.device)
        aligned, ok = align_images(images, self.template, faces=faces)
        chunk = {"images": aligned.mul(255).round().to(torch.uint8).cpu(), "ok": ok}
        save_tensors_atomic(self._path(c), chunk)
        return chunk

    def _chunk(self, c: int) -> dict:
        if self._loaded is not None and self._loaded[0] == c:
            return self._loaded[1]
        path = self._path(c)
        chunk = torch.load(path, weights_only=True) if path.is_file() else self._compute(c)
        self._loaded = (c, chunk)
        return chunk

    def ensure(self, indices: Sequence[int]) -> None:
        """Compute (with a progress bar) every missing chunk that holds one of ``indices``."""
        todo = sorted({i // CHUNK for i in indices} - {c for c in range((len(self.dataset) + CHUNK - 1) // CHUNK)
                                                       if self._path(c).is_file()})
        if not todo:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.is_file():
            write_json_atomic(meta, {"dataset": getattr(self.dataset, "registered_name", ""),
                                     "options": self.dataset.options, "template": self.template,
                                     "size": self.size, "images": len(self.dataset), "version": __version__})
        for c in tqdm(todo, desc=f"align {self.template}", unit="chunk", disable=not self.progress,
                      file=sys.stderr, dynamic_ncols=True):
            if not self._path(c).is_file():  # another process may have written it meanwhile
                self._loaded = (c, self._compute(c))

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float [0,1] crops (n, 3, S, S) and the found-a-face mask for ``indices``."""
        self.ensure(indices)
        out = torch.empty(len(indices), 3, self.size, self.size)
        ok = torch.empty(len(indices), dtype=torch.bool)
        for j, i in enumerate(indices):
            chunk = self._chunk(i // CHUNK)
            out[j] = chunk["images"][i % CHUNK].float().div(255)
            ok[j] = chunk["ok"][i % CHUNK]
        return out, ok

    def batches(self, indices: Sequence[int], batch: int = 64) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """(indices, crops, ok) in batches of ``batch``, in the order given."""
        indices = list(indices)
        self.ensure(indices)
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            crops, ok = self.get(chunk)
            yield chunk, crops, ok
