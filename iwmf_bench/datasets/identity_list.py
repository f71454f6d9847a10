"""``identity-list``: a folder of images plus an ``image identity`` file (CelebA's
``identity_CelebA.txt``: lines like ``000001.jpg 2880``), with pairs drawn by a seed."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import read_image
from .base import Dataset, DatasetError, Pair, sample_pairs


class IdentityList(Dataset):
    """A folder of images and a file of 'image identity' lines (CelebA identity_CelebA.txt).

    ``pairs``: how many genuine and how many impostor pairs to draw (each), with
    ``seed``. Images are those the identity file lists, in its order; each must exist.
    """

    registered_name = "identity-list"
    path_options = ("root", "identity_file")

    def __init__(self, root: str, identity_file: str, pairs: int = 3000, seed: int = 0):
        root_path, id_path = Path(root), Path(identity_file)
        if not root_path.is_dir():
            raise DatasetError(f"{root}: not a directory (expected the folder of images)")
        if int(pairs) != pairs or pairs < 1:
            raise DatasetError(f"identity-list: pairs must be a positive integer, got {pairs!r}")
        self.options = {"root": str(root_path.resolve()), "identity_file": str(id_path.resolve()),
                        "pairs": int(pairs), "seed": int(seed)}
        try:
            lines = id_path.read_text().splitlines()
        except OSError as exc:
            raise DatasetError(f"{identity_file}: cannot read the identity file ({exc.strerror})") from None
        self.paths, self.names, self.labels = [], [], []
        missing = []
        for lineno, line in enumerate(lines, 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 2 or not tokens[1].lstrip("-").isdigit():
                raise DatasetError(f"{identity_file}:{lineno}: malformed line {line.strip()!r}; expected "
                                   "'image identity' (e.g. '000001.jpg 2880')")
            path = root_path / tokens[0]
            if not path.is_file():
                missing.append(tokens[0])
            self.paths.append(path)
            self.names.append(tokens[0])
            self.labels.append(int(tokens[1]))
        if missing:
            raise DatasetError(f"{identity_file}: names {len(missing)} image(s) missing from {root} "
                               f"(first: {', '.join(missing[:3])}); fix root or drop those lines")
        if not self.paths:
            raise DatasetError(f"{identity_file}: no 'image identity' lines")
        gen = torch.Generator().manual_seed(int(seed))
        self._pairs = sample_pairs(self.labels, int(pairs), gen)

    def read(self, index: int) -> torch.Tensor:
        return read_image(self.paths[index])

    def pairs(self) -> list[Pair]:
        return list(self._pairs)
