"""Write the parity fixtures of the ported face models: each model's own runtime run on
fixed inputs, its outputs saved under tests/fixtures/ for the default test run to compare
our PyTorch ports against (tests/test_parity.py), without the runtime installed.

    .venv/bin/python scripts/parity_fixtures.py [--shared ../shared/data/iwmfdiff-imgs]

mobilefacenet-arcface: the TFLite runtime (`ai-edge-litert`, PyPI) on the cached
MobileFaceNet.tflite (`iwmf-bench fetch mobilefacenet-arcface`).
faceres: TF.js 4.22.0 in pure JavaScript (tfjs-core, tfjs-backend-cpu, tfjs-converter
from npm, no native code; scripts/setup.sh installs them into .venv/tfjs) on the cached
faceres.json/.bin, through scripts/parity_tfjs.cjs.

Inputs (rebuilt identically by the tests, so only outputs are stored): the first two
source and two target images of the shared set resized to the model's input size, and
seeded uniform noise (tests/parity_inputs.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from parity_inputs import faceres_inputs, mobilefacenet_inputs  # noqa: E402  (tests/parity_inputs.py)

TFJS = ROOT / ".venv" / "tfjs" / "node_modules"  # npm install --prefix .venv/tfjs (scripts/setup.sh)


def tflite_embeddings(model_path: Path, x_nchw: np.ndarray) -> np.ndarray:
    """The TFLite runtime's output for NCHW [-1, 1]-normalized inputs (run as NHWC, in
    batches of the graph's fixed batch size: its final reshape names it)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model_path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    batch = int(inp["shape"][0])
    if x_nchw.shape[0] % batch:
        raise ValueError(f"{x_nchw.shape[0]} inputs: not a multiple of the graph's batch {batch}")
    results = []
    for i in range(0, x_nchw.shape[0], batch):
        it.set_tensor(inp["index"], np.ascontiguousarray(x_nchw[i:i + batch].transpose(0, 2, 3, 1), dtype=np.float32))
        it.invoke()
        results.append(it.get_tensor(out["index"]).copy())
    return np.concatenate(results)


def tfjs_output(model_json: Path, x_nhwc: np.ndarray, node: str, node_modules: Path = TFJS) -> np.ndarray:
    """TF.js's value of graph node ``node`` for float32 NHWC inputs (node.js, CPU backend)."""
    import os
    import shutil
    import subprocess
    import tempfile

    if shutil.which("node") is None or not (node_modules / "@tensorflow" / "tfjs-converter").is_dir():
        raise FileNotFoundError(f"node.js or TF.js not found (expected {node_modules}: run scripts/setup.sh with npm)")
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.f32", Path(tmp) / "out.f32"
        np.ascontiguousarray(x_nhwc, dtype=np.float32).tofile(inp)
        r = subprocess.run(["node", str(ROOT / "scripts" / "parity_tfjs.cjs"), str(model_json), str(inp),
                            *map(str, x_nhwc.shape), node, str(out)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "NODE_PATH": str(node_modules)})
        if r.returncode != 0:
            raise RuntimeError(f"TF.js run failed: {r.stderr[-2000:]}")
        return np.fromfile(out, dtype=np.float32).reshape(x_nhwc.shape[0], -1)


def tfjs_version(node_modules: Path = TFJS) -> str:
    import json

    return json.loads((node_modules / "@tensorflow" / "tfjs-core" / "package.json").read_text())["version"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data" / "iwmfdiff-imgs"))
    args = p.parse_args()
    from iwmf_bench import weights as W
    from iwmf_bench.models import mobilefacenet
    from iwmf_bench.npm_weights import verified_files

    path = verified_files(W.get_checkpoint(mobilefacenet.CHECKPOINT))["MobileFaceNet.tflite"]
    x = mobilefacenet_inputs(Path(args.shared))
    out = tflite_embeddings(path, x)
    import ai_edge_litert

    dest = ROOT / "tests" / "fixtures" / "parity_mobilefacenet.npz"
    np.savez_compressed(dest, embeddings=out, runtime=np.array(f"ai-edge-litert {ai_edge_litert.__version__}"))
    print(f"wrote {dest.relative_to(ROOT)}: {out.shape} from ai-edge-litert {ai_edge_litert.__version__}")

    from iwmf_bench.models import faceres

    model_json = verified_files(W.get_checkpoint(faceres.CHECKPOINT))["faceres.json"]
    _, normalized = faceres_inputs(Path(args.shared))
    out = tfjs_output(model_json, normalized, "global_pooling/Mean")
    dest = ROOT / "tests" / "fixtures" / "parity_faceres.npz"
    np.savez_compressed(dest, descriptors=out, runtime=np.array(f"tfjs {tfjs_version()} (cpu backend)"))
    print(f"wrote {dest.relative_to(ROOT)}: {out.shape} from TF.js {tfjs_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
