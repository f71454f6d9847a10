"""``folder``: the two ``NNNNN_label.ext`` folders of the paper's protocol."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import list_images, read_image
from .base import Dataset, Pair


class FolderDataset(Dataset):
    """Two NNNNN_label.ext folders (sources, targets): source i impersonates target i.

    Images are the sources then the targets. :meth:`pairs` is every unordered pair of
    distinct images (genuine when the labels match), what ``iwmf-bench eval`` counts on
    one folder; :meth:`impersonation_pairs` keeps the folders' own pairing by id.
    """

    registered_name = "folder"
    path_options = ("sources", "targets")

    def __init__(self, sources: str, targets: str):
        self.options = {"sources": str(Path(sources).resolve()), "targets": str(Path(targets).resolve())}
        src, tgt = list_images(sources), list_images(targets)
        self.paths = [p for _, _, p in src] + [p for _, _, p in tgt]
        self.names = [f"sources/{p.name}" for _, _, p in src] + [f"targets/{p.name}" for _, _, p in tgt]
        self.labels = [label for _, label, _ in src] + [label for _, label, _ in tgt]
        self._pairing = [(i, len(src) + j) for i, (sid, _, _) in enumerate(src)
                         for j, (tid, _, _) in enumerate(tgt) if sid == tid]

    def read(self, index: int) -> torch.Tensor:
        return read_image(self.paths[index])

    def pairs(self) -> list[Pair]:
        n = len(self)
        return [Pair(a, b, self.labels[a] == self.labels[b]) for a in range(n) for b in range(a + 1, n)]

    def impersonation_pairs(self) -> list[tuple[int, int]]:
        """(source, target) image indices with the same id, in id order."""
        return list(self._pairing)
