"""Stage 1, pairs: who impersonates whom, the genuine pairs, and the attack's references.

One small interface, :class:`PairSource`, with two implementations:

* :class:`~iwmf_bench.pipeline.folder_pairs.FolderPairs`: the paper's protocol, two folders of ``NNNNN_label``
  images where source ``i`` impersonates target ``i``; genuine pairs are the other
  images of an identity in the same folder.
* :class:`~iwmf_bench.pipeline.dataset_pairs.DatasetPairs`: a registered dataset (LFW,
  identity lists, verification bins) with pairs drawn with the suite seed.

A source gives the cell's :class:`Pairs` aligned for any face model (the cell's own, or
a surrogate's), and the raw photos of its attackers with their detected faces, for
attacks crafted before alignment (:mod:`.surrogate`). Everything is cached per process:
every cell of a suite shares one alignment per model. :func:`iwmf_bench.pipeline.compute.pair_source`
picks a cell's source.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..align import Face
from ..errors import BenchError


@dataclass
class Pairs:
    """The images of one cell, aligned for one model. Row ``i`` of ``sources`` is the
    attacker of impersonation pair ``i`` and ``targets[i]`` its victim's reference."""

    sources: torch.Tensor
    targets: torch.Tensor
    source_labels: list[int]
    target_labels: list[int]
    source_names: list[str]
    target_names: list[str]
    # Dataset sources: listed genuine pairs (probe, reference), and another image of each
    # attacker (rows ``attacker_ref_rows`` of ``sources``) for the true-identity FRR.
    genuine_a: torch.Tensor | None = None
    genuine_b: torch.Tensor | None = None
    attacker_refs: torch.Tensor | None = None
    attacker_ref_rows: list[int] | None = None
    dropped_pairs_no_face: int = 0

    @property
    def listed_genuine(self) -> bool:
        """Whether the source lists its genuine pairs (datasets) rather than deriving them
        from the labels of the folder protocol."""
        return self.genuine_a is not None

    def dodging(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(probes, references of the probes' own identities, probe labels): the pairs a
        dodging attack perturbs so that they are *rejected*. A dataset's listed genuine
        pairs; in the folder protocol each source image with the next image of the same
        identity among the sources."""
        if self.listed_genuine:
            return self.genuine_a, self.genuine_b, [-1] * self.genuine_a.shape[0]
        partner = []
        for i, label in enumerate(self.source_labels):
            same = [j for j, other in enumerate(self.source_labels) if other == label and j != i]
            if not same:
                raise BenchError(f"dodging needs two images of each identity; {self.source_names[i]} is the only "
                                 f"source of identity {label} (add one, or drop it from the sources)")
            partner.append(next((j for j in same if j > i), same[0]))  # the next one, cyclically
        return self.sources, self.sources[partner], list(self.source_labels)


class PairSource(ABC):
    """Where a cell's pairs come from."""

    @abstractmethod
    def pairs(self, model_name: str, input_size: int) -> Pairs:
        """The cell's pairs, aligned for ``model_name`` (or resized to ``input_size``)."""

    @abstractmethod
    def photos(self, model_name: str, input_size: int) -> tuple[torch.Tensor, tuple[Face, ...]]:
        """The raw photos of the attackers of :meth:`pairs` (same rows), with their faces:
        the attack space of crafting before alignment. All photos share one size."""


def pair_indices(n: int, pairs: int | None) -> list[int]:
    """``pairs`` of ``range(n)``, evenly spaced so a small suite still covers every identity."""
    if not pairs or pairs >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (pairs - 1)) for i in range(pairs)}) if pairs > 1 else [0]
