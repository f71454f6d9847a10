"""``lfw``: Labeled Faces in the Wild with its official pairs protocol.

Layout ``ROOT/Name/Name_0001.jpg`` (the original, funneled and deep-funneled archives all
use it). ``pairs.txt``: a header ``folds n`` then, per fold, ``n`` matched lines
``name i j`` and ``n`` mismatched lines ``name1 i name2 j`` (10 x 300 + 300 for LFW).
``pairsDevTest.txt`` / ``pairsDevTrain.txt``: a header ``n`` then ``n`` matched and ``n``
mismatched lines (one set, fold 0).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..data import read_image
from .base import Dataset, DatasetError, Pair

_IMAGE = re.compile(r"^(?P<name>.+)_(?P<num>\d{4})\.(?P<ext>[A-Za-z0-9]+)$")


def parse_pairs(path: Path) -> tuple[int, list[tuple[int, str, int, str, int]]]:
    """``(folds, [(fold, name_a, num_a, name_b, num_b), ...])`` from an LFW pairs file."""
    try:
        lines = [ln.split() for ln in path.read_text().splitlines()]
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the pairs file ({exc.strerror}); pass pairs_file") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines or not all(t.isdigit() for t in lines[0]) or len(lines[0]) not in (1, 2):
        raise DatasetError(f"{path}:1: expected a header 'folds n' (pairs.txt) or 'n' (pairsDevTest.txt), "
                           f"got {' '.join(lines[0]) if lines else 'an empty file'!r}")
    folds, n = (1, int(lines[0][0])) if len(lines[0]) == 1 else (int(lines[0][0]), int(lines[0][1]))
    if len(lines) - 1 != folds * 2 * n:
        raise DatasetError(f"{path}: header promises {folds} fold(s) x ({n} matched + {n} mismatched) = "
                           f"{folds * 2 * n} lines, the file has {len(lines) - 1}; is it truncated?")
    out = []
    for k, tokens in enumerate(lines[1:]):
        lineno, fold, matched = k + 2, k // (2 * n), (k % (2 * n)) < n
        want = "'name i j'" if matched else "'name1 i name2 j'"
        if matched and len(tokens) == 3 and tokens[1].isdigit() and tokens[2].isdigit():
            out.append((fold, tokens[0], int(tokens[1]), tokens[0], int(tokens[2])))
        elif not matched and len(tokens) == 4 and tokens[1].isdigit() and tokens[3].isdigit():
            out.append((fold, tokens[0], int(tokens[1]), tokens[2], int(tokens[3])))
        else:
            raise DatasetError(f"{path}:{lineno}: malformed line {' '.join(tokens)!r}; a "
                               f"{'matched' if matched else 'mismatched'} pair here reads {want}")
    return folds, out


class LFW(Dataset):
    """LFW layout ROOT/Name/Name_0001.jpg with the official pairs.txt (or pairsDevTest.txt).

    ``pairs_file`` defaults to ``ROOT/pairs.txt``; ``ext`` is the images' extension.
    Every image under ROOT is part of the dataset (identities for threat pairs); the
    pairs file must name existing images.
    """

    registered_name = "lfw"
    path_options = ("root", "pairs_file")

    def __init__(self, root: str, pairs_file: str | None = None, ext: str = "jpg"):
        root_path = Path(root)
        if not root_path.is_dir():
            raise DatasetError(f"{root}: not a directory (expected the LFW layout ROOT/Name/Name_0001.{ext})")
        pairs_path = Path(pairs_file) if pairs_file else root_path / "pairs.txt"
        self.options = {"root": str(root_path.resolve()), "pairs_file": str(pairs_path.resolve()), "ext": ext}
        self.root = root_path
        self.paths: list[Path] = []
        self.names, self.labels = [], []
        identities = sorted(d.name for d in root_path.iterdir() if d.is_dir() and not d.name.startswith("."))
        self._index: dict[tuple[str, int], int] = {}
        for label, person in enumerate(identities):
            for path in sorted((root_path / person).glob(f"{person}_*.{ext}")):
                m = _IMAGE.match(path.name)
                if not m or m["name"] != person:
                    continue
                self._index[(person, int(m["num"]))] = len(self.paths)
                self.paths.append(path)
                self.names.append(f"{person}/{path.name}")
                self.labels.append(label)
        if not self.paths:
            raise DatasetError(f"{root}: no images named Name/Name_NNNN.{ext}; check root and ext")
        self.folds, raw = parse_pairs(pairs_path)
        self._pairs = []
        for fold, name_a, num_a, name_b, num_b in raw:
            ends = []
            for name, num in ((name_a, num_a), (name_b, num_b)):
                if (name, num) not in self._index:
                    raise DatasetError(f"{pairs_path}: names {name} {num}, but {root_path / name / f'{name}_{num:04d}.{ext}'} "
                                       "does not exist; check root, ext and that the pairs file matches this copy")
                ends.append(self._index[(name, num)])
            self._pairs.append(Pair(ends[0], ends[1], name_a == name_b, fold))

    def read(self, index: int) -> torch.Tensor:
        return read_image(self.paths[index])

    def pairs(self) -> list[Pair]:
        return list(self._pairs)
