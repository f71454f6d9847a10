"""What the library threat models (``autoattack``, ``torchattacks``) share: importing an
optional library with a clear skip, running it on a :class:`VerificationClassifier` with
its global-RNG use pinned to the task seed, progress, and per-image query counts.

Both libraries draw random numbers from torch's *global* RNG (AutoAttack even reseeds
it with ``torch.manual_seed``). We cannot hand them a generator, so
:func:`seeded_global_rng` seeds the global RNG from the task seed inside
``torch.random.fork_rng`` and restores the caller's state afterwards: a run is
bit-reproducible for a seed on one machine (tests check it) and leaves the global state
as it found it. The cell records this in ``info["rng"]``.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from tqdm import tqdm

from ..errors import MissingExtraError
from .base import derive_seed

INSTALL = "pip install 'iwmf-bench[suites]'"


def import_library(module: str, attack: str):
    """Import an optional attack library or raise :class:`MissingExtraError` (a skipped cell)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"attack {attack!r} needs the {module} package ({exc}); install the "
                                f"optional extra: {INSTALL}") from None


RNG_NOTE = ("the library draws from torch's global RNG; seeded from the task seed inside "
            "torch.random.fork_rng (caller's state restored): reproducible for a seed")


@contextlib.contextmanager
def seeded_global_rng(seed: int, *stream, device: torch.device | str = "cpu"):
    """Seed torch's global RNG for one library call; restore the previous state after."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, *stream))
        yield


class QueryCounter:
    """Counts each source's forward passes through the adapter and drives a progress bar."""

    def __init__(self, n: int, name: str, progress: bool):
        self.per_image = torch.zeros(n, dtype=torch.long)
        self.bar = tqdm(desc=name, unit="query", leave=False, disable=not progress)
        self.n = n

    def __call__(self, rows: torch.Tensor) -> None:
        self.per_image.index_add_(0, rows.cpu(), torch.ones(rows.numel(), dtype=torch.long))
        self.bar.update(rows.numel() / self.n)  # in queries per image

    def close(self) -> None:
        self.bar.close()
