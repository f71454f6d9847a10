"""The dataset contract: images read lazily, identity labels, and verification pairs.

A dataset knows its images by index (``0 .. len-1``) and reads one only when asked
(:meth:`Dataset.read`), so a 13,000-image LFW never sits decoded in memory. Each image
has a name (its path relative to the dataset root, or a position in a file) and an
identity label (``None`` where the format has none, as in verification ``.bin`` files).
:meth:`Dataset.pairs` gives the genuine (same identity) and impostor pairs of the
dataset's protocol, with folds where the protocol has them (LFW's 10 folds).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..errors import DataError


PAIR_OPTIONS = ("pairs", "seed", "pairs_file")  # choose pairs, not images: not part of the image cache key


class DatasetError(DataError):
    """A problem with a dataset's files (missing image, malformed protocol line)."""


@dataclass(frozen=True)
class Pair:
    a: int  # image index
    b: int  # image index
    same: bool  # genuine (same identity) or impostor
    fold: int = 0


class Dataset:
    """Base class of dataset plugins (see the module docstring).

    Subclasses set ``names`` and ``labels`` (one per image) and implement :meth:`read`
    and :meth:`pairs`; ``options`` are the keyword arguments they were built with (part
    of the cache keys).
    """

    registered_name = ""
    #: Options that name files or folders: a suite's relative paths there resolve against
    #: the suite file's folder (:mod:`iwmf_bench.pipeline.data_spec`). Plugins list theirs.
    path_options: tuple[str, ...] = ()
    names: list[str]
    labels: list[int | None]
    options: dict[str, Any]

    def __len__(self) -> int:
        return len(self.names)

    def read(self, index: int) -> torch.Tensor:
        """Image ``index`` as float [0,1] (3, H, W) RGB."""
        raise NotImplementedError

    def pairs(self) -> list[Pair]:
        raise NotImplementedError

    @property
    def has_identities(self) -> bool:
        return all(label is not None for label in self.labels)

    def iter_images(self, indices: Sequence[int], batch: int = 64) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """Images in chunks of ``batch``: only one chunk is decoded at a time."""
        indices = list(indices)
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            yield chunk, [self.read(i) for i in chunk]

    def fingerprint(self) -> str:
        """What identifies this dataset's images for caches: kind, options except those
        that only choose pairs, image names."""
        names = hashlib.sha256("\n".join(self.names).encode()).hexdigest()
        options = {k: v for k, v in self.options.items() if k not in PAIR_OPTIONS}
        blob = json.dumps({"kind": type(self).__name__, "options": options, "names": names},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def describe(self) -> str:
        pairs = self.pairs()
        genuine = sum(p.same for p in pairs)
        folds = len({p.fold for p in pairs})
        return (f"{len(self)} images, {genuine} genuine + {len(pairs) - genuine} impostor pairs"
                + (f" in {folds} folds" if folds > 1 else ""))


def sample_pairs(labels: Sequence[int], n: int, generator: torch.Generator) -> list[Pair]:
    """``n`` genuine and ``n`` impostor pairs of distinct images, drawn without repeats.

    Genuine: an identity with at least two images (weighted by its image count), then two
    of its images. Impostor: two images of different identities. Raises when the labels
    cannot give ``n`` distinct pairs of a kind.
    """
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    multi = [idx for idx in by_label.values() if len(idx) >= 2]
    max_genuine = sum(len(i) * (len(i) - 1) // 2 for i in multi)
    total = len(labels) * (len(labels) - 1) // 2
    max_impostor = total - sum(len(i) * (len(i) - 1) // 2 for i in by_label.values())
    if n > max_genuine or n > max_impostor:
        raise DatasetError(f"cannot draw {n} genuine and {n} impostor pairs: the identities allow at most "
                           f"{max_genuine} genuine and {max_impostor} impostor pairs; ask for fewer pairs")
    label_of = list(labels)

    def draw(count: int, pick) -> list[tuple[int, int]]:
        seen: set[tuple[int, int]] = set()
        out = []
        while len(out) < count:
            a, b = pick()
            key = (min(a, b), max(a, b))
            if a != b and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    weights = torch.tensor([len(i) for i in multi], dtype=torch.float64)

    def genuine():
        idx = multi[int(torch.multinomial(weights, 1, generator=generator))]
        a, b = torch.randperm(len(idx), generator=generator)[:2].tolist()
        return idx[a], idx[b]

    def impostor():
        while True:
            a, b = torch.randint(len(label_of), (2,), generator=generator).tolist()
            if label_of[a] != label_of[b]:
                return a, b

    return [Pair(a, b, True) for a, b in draw(n, genuine)] + [Pair(a, b, False) for a, b in draw(n, impostor)]
