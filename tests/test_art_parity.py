"""Our `jpeg` (quality 75), `bit-depth` (5 bits) and `median` (3x3) purifiers against the
Adversarial Robustness Toolbox's JpegCompression, FeatureSqueezing and SpatialSmoothing on
the paper's 40 shared faces: bit for bit, live where ART is installed (the dev environment
installs it) and against a committed fixture of ART's outputs (scripts/parity_art.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from art_parity import ART_VERSION, PAIRS, art_outputs, digest, shared_faces
from iwmf_bench import get_defense

FIXTURE = Path(__file__).parent / "fixtures" / "parity_art.json"


def ours(images: torch.Tensor) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(0)  # all three are deterministic
    return {name: get_defense(name, **opts).purify(images, g).numpy().astype(np.float32)
            for name, (opts, _, _) in PAIRS.items()}


@pytest.fixture(scope="module")
def faces(shared_imgs):
    return shared_faces(shared_imgs)


def test_purifiers_match_the_committed_art_fixture(faces):
    names, images = faces
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["art"] == ART_VERSION and fixture["images"] == names and len(names) == 40
    for name, outputs in ours(images).items():
        mismatched = [n for n, img, want in zip(names, outputs, fixture["sha256"][name]) if digest(img) != want]
        assert not mismatched, f"{name}: {len(mismatched)} of 40 images differ from ART's, first {mismatched[:3]}"


def test_purifiers_match_art_live(faces):
    pytest.importorskip("art", reason="ART not installed (pip install adversarial-robustness-toolbox; the dev "
                        "environment of scripts/setup.sh has it)")
    import art

    assert art.__version__ == ART_VERSION
    _, images = faces
    theirs, mine = art_outputs(images), ours(images)
    for name in PAIRS:
        assert np.array_equal(mine[name], theirs[name]), (name, float(np.abs(mine[name] - theirs[name]).max()))
    # the three really transform the faces (a parity of identities would prove nothing)
    assert all(np.abs(mine[name] - images.numpy()).max() > 0.01 for name in PAIRS)
