"""The shared pieces of the ART parity checks (tests/test_art_parity.py and
scripts/parity_art.py): the faces, ART's three input transformations set as our
purifiers are, and the digest of an output image."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from iwmf_bench.data import load_folder

ART_VERSION = "1.20.1"
# Our purifier (registered name, options) -> ART's preprocessor and its options.
PAIRS = {
    "jpeg": ({"quality": 75}, "JpegCompression", {"clip_values": (0, 1), "quality": 75, "channels_first": True}),
    "bit-depth": ({"bits": 5}, "FeatureSqueezing", {"clip_values": (0, 1), "bit_depth": 5}),
    "median": ({"k": 3}, "SpatialSmoothing", {"clip_values": (0, 1), "window_size": 3, "channels_first": True}),
}


def shared_faces(root: Path) -> tuple[list[str], torch.Tensor]:
    """The 20 source then 20 target faces, (40, 3, 160, 160) in [0, 1], and their names."""
    names, images = [], []
    for side in ("source", "target"):
        loaded = load_folder(root / side)
        names += [f"{side}/{name}" for name in loaded.names]
        images.append(loaded.images)
    return names, torch.cat(images)


def art_outputs(images: torch.Tensor) -> dict[str, np.ndarray]:
    """ART's output of each of :data:`PAIRS` on ``images`` (float32, NCHW)."""
    from art.defences import preprocessor

    x = images.numpy().astype(np.float32)
    return {ours: getattr(preprocessor, cls)(**opts)(x)[0].astype(np.float32) for ours, (_, cls, opts) in PAIRS.items()}


def digest(image) -> str:
    """SHA-256 of one image's float32 bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(image, dtype=np.float32)).tobytes()).hexdigest()
