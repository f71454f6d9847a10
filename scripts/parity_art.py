"""Write tests/fixtures/parity_art.json: the Adversarial Robustness Toolbox's (ART 1.20.1)
outputs of its JpegCompression (quality 75), FeatureSqueezing (5 bits) and
SpatialSmoothing (3x3) on the paper's 40 shared faces, as a SHA-256 of each output image's
float32 bytes (no image data is stored), for tests/test_art_parity.py to compare our
`jpeg`, `bit-depth` and `median` purifiers against without ART installed.

    .venv/bin/python scripts/parity_art.py [--shared ../shared/data/iwmfdiff-imgs]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from art_parity import ART_VERSION, art_outputs, digest, shared_faces  # noqa: E402  (tests/art_parity.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data" / "iwmfdiff-imgs"))
    args = parser.parse_args()
    names, images = shared_faces(Path(args.shared))
    out = {"art": ART_VERSION, "images": names,
           "sha256": {ours: [digest(img) for img in outputs] for ours, outputs in art_outputs(images).items()}}
    path = ROOT / "tests" / "fixtures" / "parity_art.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
