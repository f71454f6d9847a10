"""Fixed inputs of the parity fixtures (scripts/parity_fixtures.py writes the runtimes'
outputs on them; tests/test_parity.py rebuilds them to compare the ports)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from iwmf_bench.data import load_folder
from iwmf_bench.models.base import resize


def mobilefacenet_inputs(shared: Path) -> np.ndarray:
    """(6, 3, 112, 112) float32, normalized as the model's forward does: two sources and
    two targets of the shared images resized to 112, then two of seeded uniform noise."""
    faces = torch.cat([load_folder(shared / "source").images[:2], load_folder(shared / "target").images[:2]])
    faces = resize(faces, 112)
    noise = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, size=(2, 3, 112, 112)).astype(np.float32))
    return ((torch.cat([faces, noise]) * 255 - 127.5) / 128).numpy()
