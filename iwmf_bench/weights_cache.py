"""Where checkpoints are cached and how a cached file is hashed: the low layer that both
:mod:`iwmf_bench.weights` (the registry) and :mod:`iwmf_bench.npm_weights` (the npm
fetcher) build on, so neither needs the other's internals.

``$IWMF_BENCH_HOME`` (default ``~/.cache/iwmf_bench``) holds ``weights/``; a checkpoint's
``filename`` is relative to that folder (it may name a subfolder, e.g. ``faceres/...``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def home() -> Path:
    """The benchmark's cache root: ``$IWMF_BENCH_HOME`` or ``~/.cache/iwmf_bench``."""
    return Path(os.environ.get("IWMF_BENCH_HOME", Path.home() / ".cache" / "iwmf_bench"))


def weights_dir() -> Path:
    """The folder that holds every cached checkpoint."""
    return home() / "weights"


def cached_file(filename: str) -> Path:
    """Where a checkpoint file named ``filename`` (relative to :func:`weights_dir`) lives."""
    return weights_dir() / filename


def file_digests(path: Path, *algorithms: str, chunk: int = 1 << 20) -> dict[str, str]:
    """Hex digests of ``path`` for each hashlib algorithm, in one read of the file."""
    hashes = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while block := f.read(chunk):
            for h in hashes.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


def sha256_of(path: Path) -> str:
    return file_digests(path, "sha256")["sha256"]
