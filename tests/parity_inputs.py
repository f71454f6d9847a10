"""Fixed inputs of the parity fixtures (scripts/parity_fixtures.py writes the runtimes'
outputs on them; tests/test_parity.py rebuilds them to compare the ports)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def dlib_chips(shared: Path) -> np.ndarray:
    """(5, 150, 150, 3) uint8 RGB, from integers alone (no resampling, so the same bytes
    everywhere, and numpy + pillow only, for a scratch environment with dlib): the central
    150x150 crop of the first two source and two target images, then one chip of seeded
    uniform noise."""
    from PIL import Image

    images = lambda d: sorted(f for f in d.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))  # noqa: E731
    files = images(shared / "source")[:2] + images(shared / "target")[:2]
    chips = []
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        top, left = (a.shape[0] - 150) // 2, (a.shape[1] - 150) // 2
        chips.append(a[top:top + 150, left:left + 150])
    chips.append(np.random.default_rng(2).integers(0, 256, size=(150, 150, 3), dtype=np.uint8))
    return np.stack(chips)


def mobilefacenet_inputs(shared: Path) -> np.ndarray:
    """(6, 3, 112, 112) float32, normalized as the model's forward does: two sources and
    two targets of the shared images resized to 112, then two of seeded uniform noise."""
    import torch

    from iwmf_bench.data import load_folder
    from iwmf_bench.models.base import resize

    faces = torch.cat([load_folder(shared / "source").images[:2], load_folder(shared / "target").images[:2]])
    faces = resize(faces, 112)
    noise = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, size=(2, 3, 112, 112)).astype(np.float32))
    return ((torch.cat([faces, noise]) * 255 - 127.5) / 128).numpy()


def faceres_inputs(shared: Path) -> tuple[np.ndarray, np.ndarray]:
    """([0,1] NCHW float32 (5, 3, 224, 224), the same normalized as FaceRes.forward does,
    NHWC, for the TF.js graph): two sources and two targets resized to 224, one noise image."""
    import torch

    from iwmf_bench.data import load_folder
    from iwmf_bench.models.base import resize
    from iwmf_bench.models.faceres import BGR_MEANS

    faces = torch.cat([load_folder(shared / "source").images[:2], load_folder(shared / "target").images[:2]])
    faces = resize(faces, 224)
    noise = torch.from_numpy(np.random.default_rng(1).uniform(0, 1, size=(1, 3, 224, 224)).astype(np.float32))
    x = torch.cat([faces, noise])
    normalized = x.flip(1) * 255 - torch.tensor(BGR_MEANS, dtype=torch.float32).view(1, 3, 1, 1)
    return x.numpy(), normalized.permute(0, 2, 3, 1).contiguous().numpy()
